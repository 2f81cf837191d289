"""OpenAI's Responses API through the live server, with the official `openai` client and one real
`openai-agents` agent loop: plain text, streaming (the client's assembled response equals the
non-streamed one), a forced tool call, a two-turn tool loop, JSON schema output, stored responses
across three turns, retrieve / delete, and bad input."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.support import MODEL_NAME, PERSON_SCHEMA

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "London"]}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
    "strict": True,
}  # fmt: skip
ASK = "What is the weather in Paris?"
CITY_ONLY = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London"]}}, "required": ["city"], "additionalProperties": False}


def comparable(response: dict) -> dict:
    """A response without what differs between two runs of the same request (ids, creation time),
    nor what the stream helper adds (`parsed_arguments`)."""
    output = [{k: v for k, v in item.items() if k not in ("id", "call_id", "parsed_arguments")} for item in response["output"]]
    return {**{k: v for k, v in response.items() if k not in ("id", "created_at")}, "output": output}


def test_plain_text(client):
    response = client.responses.create(model=MODEL_NAME, input=ASK, instructions="Be brief.", max_output_tokens=8, temperature=0)
    assert response.id.startswith("resp_") and response.object == "response" and response.model == MODEL_NAME
    assert response.status in ("completed", "incomplete") and response.instructions == "Be brief."
    assert isinstance(response.output_text, str)
    assert response.usage.input_tokens > 0 and 1 <= response.usage.output_tokens <= 8
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"


def test_streamed_events_end_with_the_non_streamed_response(client):
    kwargs = {"model": MODEL_NAME, "input": ASK, "max_output_tokens": 12, "temperature": 0, "store": False}
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(**kwargs, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[1].type == "response.in_progress"
    assert events[-1].type in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text
    assert comparable(events[-1].response.model_dump(mode="json")) == comparable(whole.model_dump(mode="json"))


def test_forced_tool_call_and_the_stream_helper(client):
    kwargs = {"model": MODEL_NAME, "input": ASK, "tools": [WEATHER], "tool_choice": "required", "temperature": 0, "store": False}
    whole = client.responses.create(**kwargs)
    calls = [item for item in whole.output if item.type == "function_call"]
    assert calls and whole.status == "completed"
    for call in calls:
        assert call.name == "get_weather"
        jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    with client.responses.stream(**kwargs) as stream:
        streamed = stream.get_final_response()
    assert comparable(streamed.model_dump(mode="json", exclude_none=True)) == comparable(whole.model_dump(mode="json", exclude_none=True))


def test_a_call_list_cut_by_max_output_tokens_keeps_its_complete_calls(client):
    city_only = {"type": "function", "name": "get_weather", "parameters": CITY_ONLY, "strict": True}
    response = client.responses.create(
        model=MODEL_NAME, input=ASK, tools=[city_only], tool_choice="required", temperature=0, max_output_tokens=48, store=False
    )  # greedy: the dev model repeats the call until cut
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output and {item.type for item in response.output} == {"function_call"}
    for call in response.output:
        jsonschema.validate(json.loads(call.arguments), CITY_ONLY)


def test_two_turn_tool_loop_with_and_without_the_store(client):
    first = client.responses.create(
        model=MODEL_NAME, input=ASK, tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False, temperature=0,
    )  # fmt: skip
    (call,) = [item for item in first.output if item.type == "function_call"]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees, sunny"}
    stored = client.responses.create(
        model=MODEL_NAME, previous_response_id=first.id, input=[result], tools=[WEATHER], tool_choice="none",
        max_output_tokens=16, temperature=0,
    )  # fmt: skip
    assert [item.type for item in stored.output] == ["message"] * len(stored.output)
    spelled_out = client.responses.create(
        model=MODEL_NAME, input=[{"role": "user", "content": ASK}, *[item.model_dump(exclude_none=True) for item in first.output], result],
        tools=[WEATHER], tool_choice="none", max_output_tokens=16, temperature=0, store=False,
    )  # fmt: skip
    # The stored conversation is the same prompt as the one the client spells out.
    assert spelled_out.usage.input_tokens == stored.usage.input_tokens
    assert spelled_out.output_text == stored.output_text


def test_json_schema_output(client):
    schema = PERSON_SCHEMA
    response = client.responses.create(
        model=MODEL_NAME, input="A person, as JSON.", temperature=0, store=False,
        text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}},
    )  # fmt: skip
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text.format.type == "json_schema"


def test_three_turns_through_previous_response_id(client, http):
    turns, previous = [], None
    for text in ("My name is Ada.", "I live in Paris.", "What is my name?"):
        response = client.responses.create(
            model=MODEL_NAME, input=text, previous_response_id=previous, instructions="Be brief.", max_output_tokens=6, temperature=0
        )
        turns.append((text, response))
        previous = response.id
    # The third turn's prompt is the whole conversation, as a chat request would spell it.
    messages = [{"role": "system", "content": "Be brief."}]
    for text, response in turns[:-1]:
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": response.output_text}]
    messages.append({"role": "user", "content": turns[-1][0]})
    tokenized = http.post("/tokenize", json={"model": MODEL_NAME, "messages": messages}).json()
    assert turns[-1][1].usage.input_tokens == tokenized["count"]
    assert turns[-1][1].previous_response_id == turns[1][1].id
    assert client.responses.retrieve(turns[0][1].id).model_dump() == turns[0][1].model_dump()


def test_store_false_keeps_nothing_and_delete_forgets(client):
    kept = client.responses.create(model=MODEL_NAME, input="hi", max_output_tokens=2)
    not_kept = client.responses.create(model=MODEL_NAME, input="hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(not_kept.id)
    client.responses.delete(kept.id)
    for call in (lambda: client.responses.retrieve(kept.id), lambda: client.responses.delete(kept.id),
                 lambda: client.responses.create(model=MODEL_NAME, input="again", previous_response_id=kept.id, max_output_tokens=2)):  # fmt: skip
        with pytest.raises(openai.NotFoundError) as missing:
            call()
        assert missing.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"background": True}, None),
        ({"tools": [{"type": "web_search"}]}, None),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, None),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object", "properties": {"a": {"pattern": "("}}}}}}, "text.format.schema"),
    ],
)  # fmt: skip
def test_bad_input_is_a_400_in_openais_envelope(client, fields, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(**{"model": MODEL_NAME, "input": "hi", **fields})
    assert refused.value.body["type"] == "invalid_request_error"
    if param is not None:
        assert refused.value.body["param"] == param


def test_an_openai_agents_run_with_a_function_tool(server):
    """One real agent loop: the model must call the tool (tool_choice required), the SDK runs it and
    sends the result back, and the next turn answers (the SDK resets tool_choice after a call) in the
    agent's output type (a JSON schema: the random-weight dev model then ends its answer in time)."""
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    called: list[str] = []

    class Weather(BaseModel):
        celsius: int = Field(ge=-50, le=50)

    @function_tool
    def get_weather(city: Literal["Paris", "London"]) -> str:
        """Get the current weather in a city."""
        called.append(city)
        return f"18 degrees in {city}"

    async def run():
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300) as client:
            agent = Agent(
                name="weather", instructions="Answer with the weather.", tools=[get_weather],
                model=OpenAIResponsesModel(model=MODEL_NAME, openai_client=client),
                model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=64), output_type=Weather,
            )  # fmt: skip
            return await Runner.run(agent, ASK, max_turns=4)

    result = asyncio.run(run())
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"] and kinds[-1] == "message_output_item"
    assert called == ["Paris"] or called == ["London"]
    assert isinstance(result.final_output, Weather)
