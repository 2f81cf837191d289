"""OpenAI's Responses API over the chat pipeline (core/responses_api.py) and its bounded store
(runtime/response_store.py): the chat request a Responses request means, errors in its own terms,
stored conversations, and renderers whose stream the official client assembles into the response."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai._models import construct_type
from openai._types import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent

from jamba_server.core import responses_api
from jamba_server.core.features import plan_chat
from jamba_server.core.outputs import ChoiceDelta, EngineStep
from jamba_server.core.parsing import ParserConfig
from jamba_server.core.prompt import render_chat
from jamba_server.errors import InvalidRequestError, NotFoundError
from jamba_server.responses_protocol import ResponsesFeatures, ResponsesRequest
from jamba_server.runtime.response_store import ResponseStore
from jamba_server.settings import DEFAULT_TEMPLATE, Settings
from tests.support import PrepareEngine, case_to_responses_request, golden_cases

TEMPLATE = DEFAULT_TEMPLATE.read_text(encoding="utf-8")
TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def request(**fields) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", **fields})


@pytest.fixture(scope="module")
def engine(dev_model):
    return PrepareEngine(dev_model)


# ---- request


def test_a_tool_loop_becomes_the_chat_conversation_it_means():
    body = request(
        instructions="Be brief.", tools=[TOOL], tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False, max_output_tokens=32, text={"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
        ],
    )  # fmt: skip
    translation = responses_api.to_chat_request(body, history=())
    chat = translation.chat
    assert [m.role for m in chat.messages] == ["system", "user", "assistant", "tool"]
    assert translation.origins == ["instructions", "input[0]", "input[1]", "input[2]"]
    assert chat.messages[2].tool_calls[0].function.arguments == {"city": "Paris"}
    assert (chat.messages[3].tool_call_id, chat.messages[3].content) == ("call_1", "18C")
    assert chat.tool_choice.function.name == "get_weather" and chat.parallel_tool_calls is False
    assert chat.max_tokens == 32
    assert chat.response_format is None  # a forced call has no text to format (chat refuses the pair)
    assert [m["role"] for m in translation.conversation] == ["user", "assistant", "tool"]  # instructions are not kept
    later = responses_api.to_chat_request(body.model_copy(update={"tool_choice": "auto"}), history=()).chat
    assert later.response_format.json_schema.schema_ == {"type": "object"}


def test_an_assistant_message_and_its_calls_are_one_turn():
    body = request(input=[
        {"role": "user", "content": "hi"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
        {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "b", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "a", "output": "1"},
        {"type": "function_call_output", "call_id": "b", "output": [{"type": "input_text", "text": "2"}]},
    ])  # fmt: skip
    chat = responses_api.to_chat_request(body, ()).chat
    assert [m.role for m in chat.messages] == ["user", "assistant", "tool", "tool"]
    assert chat.messages[1].content == "Checking." and [c.id for c in chat.messages[1].tool_calls] == ["a", "b"]


def test_history_comes_before_this_input():
    history = ({"role": "user", "content": "first"}, {"role": "assistant", "content": "answer"})
    translation = responses_api.to_chat_request(request(input="second", instructions="Sys"), history)
    assert [(m.role, m.content) for m in translation.chat.messages] == [
        ("system", "Sys"), ("user", "first"), ("assistant", "answer"), ("user", "second")
    ]  # fmt: skip
    assert translation.origins[1:3] == ["previous_response_id"] * 2


def test_errors_name_the_responses_request():
    body = request(input=[{"role": "user", "content": "hi"}, {"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}])
    with pytest.raises(InvalidRequestError) as refused:
        responses_api.to_chat_request(body, ())
    assert refused.value.param == "input[1]"
    error = responses_api.in_responses_terms(InvalidRequestError("too big", param="max_tokens"), ["input"])
    assert error.param == "max_output_tokens"
    error = responses_api.in_responses_terms(InvalidRequestError("x", param="tools[1].function.parameters"), ["input"])
    assert error.param == "tools[1].parameters"


def test_prepare_names_the_responses_param_of_a_limit(engine):
    with pytest.raises(InvalidRequestError) as refused:
        responses_api.prepare_responses(request(input="hi", max_output_tokens=100), engine, Settings(model="m", max_tokens_limit=8), TEMPLATE, ResponseStore(10, 10**6, 60))
    assert refused.value.param == "max_output_tokens"


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"background": True}, "background"),
        ({"tools": [{"type": "web_search"}]}, "built-in tools"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input_image"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "item_reference"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"conversation": "conv_1"}, "conversation"),
    ],
)
def test_unsupported_fields_say_so(extra, words):
    with pytest.raises(ValueError, match=words):
        request(**{"input": "hi", **extra})


def test_routing_fields_are_accepted():
    assert request(input="hi", service_tier="auto", prompt_cache_key="k", safety_identifier="s", include=[], reasoning=None,
                   truncation="disabled", store=False, metadata={"a": "b"}, text={"format": {"type": "text"}, "verbosity": "low"},
                   prompt_cache_options={"mode": "auto"}, top_logprobs=0,
                   tools=[{**TOOL, "defer_loading": False, "allowed_callers": ["direct"], "output_schema": {"type": "string"}}])  # fmt: skip
    defaults = request(input="hi", store=None, stream=None)
    assert defaults.store is True and defaults.stream is False


def test_empty_input_is_a_400_naming_it():
    with pytest.raises(ValueError, match="input must not be empty"):
        request(input=[])


def test_citations_are_kept_in_the_conversation():
    item = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ans", "annotations": [
        {"type": "file_citation", "file_id": "document-1", "filename": "B", "index": 3}]}]}  # fmt: skip
    body = request(input=[{"role": "user", "content": "q1"}, item, {"role": "user", "content": "q2"}],
                   documents=[{"text": "a"}, {"text": "b"}], citation_mode="fast")  # fmt: skip
    assert responses_api.to_chat_request(body, ()).chat.messages[1].citation_ids() == [1]
    _, built = _stream_and_build([CITED, "<citations>[1]</citations>", ""], "stop", ParserConfig(document_titles=("A", "B"), citation_mode=True))
    assert len(built.output[0].content[0].annotations) == 1  # cited once per message
    accumulator = responses_api.ResponsesAccumulator("r", "m", ParserConfig(document_titles=("A", "B"), citation_mode=True), SHAPE)
    accumulator.add(EngineStep((ChoiceDelta(0, CITED, (1,), None, "stop"),), 3, True))
    assert accumulator.items.assistant_turn() == {"role": "assistant", "content": "The bridge opened in 1937.", "citations": [1]}


# ---- store


def stored(size: int = 10):
    return responses_api.StoredResponse(b"{}", b"x" * (size - 2))


def test_store_evicts_least_recently_used_and_by_bytes():
    store = ResponseStore(max_entries=2, max_bytes=100, ttl=60)
    store.put("a", stored())
    store.put("b", stored())
    assert store.get("a") is not None  # a is now the most recently used
    store.put("c", stored())
    assert store.get("b") is None and store.get("a") is not None and store.get("c") is not None
    store.put("big", stored(95))  # pushes everything else out by bytes
    assert len(store) == 1 and store.get("big") is not None
    store.put("huge", stored(101))  # never fits: not kept
    assert store.get("huge") is None


def test_store_expires_and_deletes():
    now = [0.0]
    store = ResponseStore(max_entries=10, max_bytes=10**6, ttl=5, clock=lambda: now[0])
    store.put("a", stored())
    now[0] = 4.9
    assert store.get("a") is not None
    now[0] = 5.0
    assert store.get("a") is None and len(store) == 0
    store.put("b", stored())
    assert store.delete("b") and not store.delete("b") and store.get("b") is None


def test_expiry_does_not_wait_for_eviction_and_its_queue_stays_bounded():
    now = [0.0]
    store = ResponseStore(max_entries=3, max_bytes=10**6, ttl=5, clock=lambda: now[0])
    store.put("old", stored())
    store.put("new", stored())
    now[0] = 1.0
    store.get("old")  # the most recently used, but still due at t=5
    now[0] = 5.5
    store.put("newest", stored())
    assert store.get("old") is None and store.get("new") is None and len(store) == 1
    for i in range(1000):  # evicted ones must not pile up in the expiry queue
        store.put(str(i), stored())
    assert len(store) == 3 and len(store._expiry) <= 2 * 3 + 64


def test_store_is_safe_across_threads():
    import sys
    import threading

    store = ResponseStore(max_entries=50, max_bytes=10**6, ttl=60)
    errors: list[BaseException] = []

    def hammer(offset: int) -> None:
        try:
            for i in range(4000):
                store.put(f"{offset}-{i % 120}", stored())
                store.get(f"{1 - offset}-{i % 120}")
                if i % 7 == 0:
                    store.delete(f"{offset}-{(i + 3) % 120}")
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=hammer, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert store._bytes == sum(e.value.size for e in store._entries.values()) and len(store) <= 50


def test_previous_response_must_exist(engine):
    store = ResponseStore(10, 10**6, 60)
    with pytest.raises(NotFoundError) as missing:
        responses_api.prepare_responses(request(input="hi", previous_response_id="resp_x"), engine, Settings(model="m"), TEMPLATE, store)
    assert missing.value.status_code == 404 and missing.value.param == "previous_response_id"


def test_a_finished_response_is_stored_with_its_conversation_unless_store_is_false(engine):
    store = ResponseStore(10, 10**6, 60)
    for keep in (True, False):
        job = responses_api.prepare_responses(request(input="hi", store=keep), engine, Settings(model="m"), TEMPLATE, store)
        accumulator = job.renderers.accumulator(f"resp_{keep}", "m")
        accumulator.add(EngineStep((ChoiceDelta(0, "Hello", (1,), None, "stop"),), 3, True))
        response = accumulator.build()
        kept = store.get(response.id)
        if keep:
            assert json.loads(kept.response) == response.model_dump(mode="json")
            assert json.loads(kept.conversation) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}]
        else:
            assert kept is None


# ---- golden prompts

RESPONSES_CASES = [c for c in golden_cases() if case_to_responses_request(c) is not None]


def test_most_golden_cases_have_a_responses_form():
    assert {"tool_call_round_trip", "tool_call_openai_shape", "json_mode", "documents_citations_json"} <= {c["name"] for c in RESPONSES_CASES}


@pytest.mark.parametrize("case", RESPONSES_CASES, ids=[c["name"] for c in RESPONSES_CASES])
def test_golden_case_as_a_responses_request(engine, case):
    """The golden case, sent as the openai client's `responses.create` would, renders to the same bytes."""
    body = ResponsesFeatures.model_validate({"model": "m", **case_to_responses_request(case)})
    chat = responses_api.to_chat_request(body, ()).chat
    assert render_chat(engine.tokenizer, TEMPLATE, plan_chat(chat).template_inputs, True).text == case["expected"]


# ---- renderers

SHAPE = responses_api.ResponseShape(echo={"instructions": None}, created_at=7, on_done=lambda response, turn: None)
TOOL_CONFIG = ParserConfig(tool_names=frozenset({"get_weather"}))
TOOL_TEXT = 'Let me check.<tool_calls>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_calls>'
CITED = "The bridge opened in 1937.<citations>[1]</citations>"


def _stream_and_build(pieces, finish, config=ParserConfig()):
    streamer = responses_api.ResponsesStreamer("resp_1", "m", config, SHAPE)
    accumulator = responses_api.ResponsesAccumulator("resp_1", "m", config, SHAPE)
    events = streamer.opening()
    last = len(pieces) - 1
    for i, piece in enumerate(pieces):
        step = EngineStep((ChoiceDelta(0, piece, (i,), None, finish if i == last else None),), 4, i == last)
        accumulator.add(step)
        events += streamer.step(step)
    events += streamer.closing()
    payloads = []
    for event in events:
        name, _, data = event.partition("\ndata: ")
        payload = json.loads(data)
        assert name == f"event: {payload['type']}"
        payloads.append(payload)
    assert [p["sequence_number"] for p in payloads] == list(range(len(payloads)))
    return payloads, accumulator.build()


def _without_ids(response: dict) -> dict:
    output = [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in response["output"]]
    return {**response, "output": output}


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_the_clients_assembled_stream_equals_the_response(data):
    text, config = data.draw(st.sampled_from([
        ("Hello there, friend.", ParserConfig()),
        (TOOL_TEXT, TOOL_CONFIG),
        (CITED, ParserConfig(document_titles=("A", "B"), citation_mode=True)),
    ]))  # fmt: skip
    cuts = sorted(data.draw(st.sets(st.integers(1, len(text) - 1), max_size=8)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])] + [""]
    payloads, built = _stream_and_build(pieces, "stop", config)
    state = ResponseStreamState(input_tools=[], text_format=omit)
    for payload in payloads:
        state.handle_event(construct_type(type_=ResponseStreamEvent, value=payload))
    final = state._completed_response.model_dump(mode="json", exclude_none=True)
    assert _without_ids(final) == _without_ids(built.model_dump(mode="json", exclude_none=True))
    snapshot = state._ResponseStreamState__current_snapshot  # what the deltas alone assembled
    assert [getattr(i, "arguments", None) for i in snapshot.output] == [i.get("arguments") for i in final["output"]]
    assert "".join(c.text for i in snapshot.output if i.type == "message" for c in i.content) == "".join(
        c["text"] for i in final["output"] if i["type"] == "message" for c in i["content"]
    )


def test_tool_call_response_shape_and_event_order():
    payloads, built = _stream_and_build([TOOL_TEXT, ""], "stop", TOOL_CONFIG)
    message, call = built.output
    assert message.content[0].text == "Let me check." and message.status == "completed"
    assert (call.name, json.loads(call.arguments), call.status) == ("get_weather", {"city": "Paris"}, "completed")
    assert call.call_id.startswith("call_") and call.id.startswith("fc_") and message.id.startswith("msg_")
    assert built.status == "completed" and built.usage.input_tokens == 4 and built.usage.total_tokens == 4 + 2
    assert [p["type"] for p in payloads] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip


def test_citations_are_file_citations_at_the_end_of_the_text():
    payloads, built = _stream_and_build([CITED, ""], "stop", ParserConfig(document_titles=(None, "Bridge"), citation_mode=True))
    (annotation,) = built.output[0].content[0].annotations
    assert annotation.model_dump() == {"type": "file_citation", "file_id": "document-1", "filename": "Bridge", "index": 26}
    assert "response.output_text.annotation.added" in [p["type"] for p in payloads]


def test_cut_by_max_output_tokens_is_incomplete():
    payloads, built = _stream_and_build(["Hello", " wor"], "length")
    assert built.status == "incomplete" and built.incomplete_details.reason == "max_output_tokens"
    assert built.output[0].status == "incomplete"
    assert payloads[-1]["type"] == "response.incomplete" and payloads[-1]["response"]["status"] == "incomplete"


def test_a_failed_stream_ends_with_response_failed():
    streamer = responses_api.ResponsesStreamer("resp_1", "m", ParserConfig(), SHAPE)
    streamer.opening()
    streamer.step(EngineStep((ChoiceDelta(0, "Hel", (1,), None, None),), 4, False))
    events = streamer.failed(InvalidRequestError("engine says no"))
    kinds = [json.loads(e.partition("\ndata: ")[2])["type"] for e in events]
    assert kinds[-1] == "response.failed" and "response.output_item.done" in kinds
    failed = json.loads(events[-1].partition("\ndata: ")[2])["response"]
    assert failed["status"] == "failed" and failed["error"]["message"] == "engine says no"
