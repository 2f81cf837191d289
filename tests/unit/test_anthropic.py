"""Anthropic's Messages API over the chat pipeline (core/anthropic.py): the chat request a Messages
request means, errors in its own terms, and renderers whose stream the official client assembles
into the non-streamed message."""

import json

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from jamba_server.anthropic_protocol import CountTokensRequest, MessagesRequest
from jamba_server.core import anthropic
from jamba_server.core.features import plan_chat
from jamba_server.core.outputs import ChoiceDelta, EngineStep
from jamba_server.core.parsing import ParserConfig
from jamba_server.core.prompt import render_chat
from jamba_server.errors import InvalidRequestError
from jamba_server.settings import DEFAULT_TEMPLATE, Settings
from tests.support import PrepareEngine, case_to_anthropic_request, golden_cases

TEMPLATE = DEFAULT_TEMPLATE.read_text(encoding="utf-8")
TOOL = {"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def request(**fields) -> MessagesRequest:
    return MessagesRequest.model_validate({"model": "m", "max_tokens": 16, **fields})


# ---- request


def test_a_tool_loop_becomes_the_chat_conversation_it_means():
    body = request(
        system=[{"type": "text", "text": "Be brief."}],
        tools=[TOOL],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18C"}]},
                {"type": "text", "text": "And now?"},
            ]},
        ],
        stop_sequences=["END"],
    )  # fmt: skip
    chat, origins = anthropic.to_chat_request(body)
    assert [m.role for m in chat.messages] == ["system", "user", "assistant", "tool", "user"]
    assert origins == ["system", "messages[0]", "messages[1]", "messages[2].content[0]", "messages[2]"]
    call = chat.messages[2].tool_calls[0]
    assert (call.id, call.function.name, call.function.arguments) == ("toolu_1", "get_weather", {"city": "Paris"})
    assert (chat.messages[3].tool_call_id, chat.messages[3].content) == ("toolu_1", "18C")
    assert chat.tool_choice == "required" and chat.parallel_tool_calls is False
    assert chat.tools[0].function.parameters == TOOL["input_schema"]
    assert chat.stop == ["END"] and chat.max_tokens == 16


def test_named_tool_and_output_format_map_to_chat_fields():
    chat, _ = anthropic.to_chat_request(request(
        messages=[{"role": "user", "content": "hi"}], tools=[TOOL], tool_choice={"type": "tool", "name": "get_weather"},
    ))  # fmt: skip
    assert chat.tool_choice.function.name == "get_weather"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat, _ = anthropic.to_chat_request(request(
        messages=[{"role": "user", "content": "hi"}], output_config={"format": {"type": "json_schema", "schema": schema}},
    ))  # fmt: skip
    assert chat.response_format.type == "json_schema" and chat.response_format.json_schema.schema_ == schema


@pytest.mark.parametrize(
    "messages, param",
    [
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure "}], "messages"),
        ([{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}], "messages[0].content[0]"),
        ([{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]}, {"role": "user", "content": "x"}],
         "messages[0].content[0]"),
    ],
)  # fmt: skip
def test_misplaced_turns_and_blocks_are_400s_naming_them(messages, param):
    with pytest.raises(InvalidRequestError) as refused:
        anthropic.to_chat_request(request(messages=messages))
    assert refused.value.param == param


def test_chat_errors_are_renamed_to_the_messages_request():
    origins = ["system", "messages[0]", "messages[1].content[2]"]
    error = anthropic.in_anthropic_terms(InvalidRequestError("messages[2].content: too long", param="messages[2].content"), origins)
    assert error.param == "messages[1].content[2]"
    error = anthropic.in_anthropic_terms(
        InvalidRequestError("tools[0].function.parameters nests too deep", param="tools[0].function.parameters"), origins
    )
    assert error.param == "tools[0].input_schema" and error.message == "tools[0].input_schema nests too deep"
    error = anthropic.in_anthropic_terms(InvalidRequestError("bad", param="response_format.json_schema.schema"), origins)
    assert error.param == "output_config.format.schema"
    assert error.anthropic_envelope() == {
        "type": "error", "error": {"type": "invalid_request_error", "message": "output_config.format.schema: bad"}
    }  # fmt: skip


def test_prepare_names_the_messages_param_of_a_limit(dev_model):
    engine = PrepareEngine(dev_model)
    body = request(messages=[{"role": "user", "content": "hi"}], stop_sequences=["x" * 500])
    with pytest.raises(InvalidRequestError) as refused:
        anthropic.prepare_messages(body, engine, Settings(model="m"), TEMPLATE)
    assert refused.value.param == "stop_sequences"


def test_unsupported_fields_and_blocks_say_so():
    for extra, words in [
        ({"container": "c"}, "container is not supported"),
        ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "extended thinking is not available"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "`image` are not supported"),
        ({"output_config": {"effort": "high"}}, "effort is not supported"),
    ]:
        with pytest.raises(ValueError, match=words):
            request(**{"messages": [{"role": "user", "content": "hi"}], **extra})
    assert request(messages=[{"role": "user", "content": "hi"}], thinking={"type": "disabled"}, service_tier="auto",
                   metadata={"user_id": "u"}, cache_control={"type": "ephemeral"},
                   tools=[{**TOOL, "eager_input_streaming": True, "defer_loading": False, "input_examples": [{"city": "Paris"}]}])  # fmt: skip


# ---- golden prompts


ANTHROPIC_CASES = [c for c in golden_cases() if case_to_anthropic_request(c) is not None]


def test_most_golden_cases_have_an_anthropic_form():
    assert {"tool_call_round_trip", "tool_call_openai_shape", "documents_multi_turn", "citations_only"} <= {
        c["name"] for c in ANTHROPIC_CASES
    }


@pytest.mark.parametrize("case", ANTHROPIC_CASES, ids=[c["name"] for c in ANTHROPIC_CASES])
def test_golden_case_as_a_messages_request(dev_model, case):
    """The golden case, sent as Anthropic's client would send it, renders to the same bytes."""
    tokenizer = AutoTokenizer.from_pretrained(dev_model)
    body = CountTokensRequest.model_validate({"model": "m", **case_to_anthropic_request(case)})
    chat, _ = anthropic.to_chat_request(body)
    assert render_chat(tokenizer, TEMPLATE, plan_chat(chat).template_inputs, True).text == case["expected"]


# ---- renderers


def _steps(pieces: list[str], finish: str, stop_sequence: str | None = None) -> list[EngineStep]:
    last = len(pieces) - 1
    return [
        EngineStep((ChoiceDelta(0, p, (i,), None, finish if i == last else None, stop_sequence if i == last else None),), 5, i == last)
        for i, p in enumerate(pieces)
    ]


def _stream_and_build(pieces, finish, config=ParserConfig(), documents=None, stop_sequence=None):
    streamer = anthropic.MessagesStreamer("msg_1", "m", config, documents, prompt_tokens=5)
    accumulator = anthropic.MessagesAccumulator("msg_1", "m", config, documents)
    events = streamer.opening()
    for step in _steps(pieces, finish, stop_sequence):
        accumulator.add(step)
        events += streamer.step(step)
    events += streamer.closing()
    snapshot = None
    for event in events:
        name, _, data = event.partition("\ndata: ")
        payload = json.loads(data)
        assert name == f"event: {payload['type']}"
        if payload["type"] != "ping":
            snapshot = accumulate_event(event=payload, current_snapshot=snapshot, json_bufs={})
    return snapshot, accumulator.build(), events


def _comparable(message: dict) -> dict:
    """Tool-use ids are random per renderer; usage is compared on its own."""
    content = [{**b, "id": "toolu"} if b["type"] == "tool_use" else b for b in message["content"]]
    return {**message, "content": content, "usage": None}


TOOL_CONFIG = ParserConfig(tool_names=frozenset({"get_weather"}))
TOOL_TEXT = 'Let me check.<tool_calls>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_calls>'
CITED_TEXT = "The bridge opened in 1937.<citations>[1]</citations>"


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_the_clients_assembled_stream_equals_the_message(data):
    text, finish, config, documents = data.draw(st.sampled_from([
        ("Hello there, friend.", "stop", ParserConfig(), None),
        (TOOL_TEXT, "stop", TOOL_CONFIG, None),
        (CITED_TEXT, "stop", ParserConfig(document_titles=("A", "B"), citation_mode=True),
         [{"text": "Cats purr."}, {"text": "The bridge opened in 1937.", "title": "B"}]),
        ("Cut short", "length", ParserConfig(), None),
    ]))  # fmt: skip
    cuts = sorted(data.draw(st.sets(st.integers(1, len(text) - 1), max_size=8)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])] + [""]
    assembled, built, _ = _stream_and_build(pieces, finish, config, documents)
    assert _comparable(assembled.model_dump(exclude_none=True)) == _comparable(built.model_dump(exclude_none=True))
    assert assembled.usage.output_tokens == built.usage.output_tokens and assembled.usage.input_tokens == 5


def test_tool_call_message_shape():
    _, built, events = _stream_and_build([TOOL_TEXT, ""], "stop", TOOL_CONFIG)
    text, call = built.content
    assert text.text == "Let me check."
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Paris"}
    assert call.id.startswith("toolu_") and built.id == "msg_1"
    assert built.stop_reason == "tool_use"
    names = [e.partition("\n")[0].removeprefix("event: ") for e in events]
    assert names == ["message_start", "ping", "content_block_start", "content_block_delta", "content_block_stop",
                     "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"]  # fmt: skip


def test_citations_name_the_whole_document():
    documents = [{"text": "Cats purr."}, {"text": "The bridge opened in 1937.", "title": "B"}]
    _, built, _ = _stream_and_build([CITED_TEXT, ""], "stop", ParserConfig(document_titles=(None, "B"), citation_mode=True), documents)
    (block,) = built.content
    assert block.text == "The bridge opened in 1937."
    (citation,) = block.citations
    assert (citation.document_index, citation.document_title, citation.cited_text) == (1, "B", documents[1]["text"])
    assert (citation.start_char_index, citation.end_char_index) == (0, len(documents[1]["text"]))


def test_a_long_document_is_quoted_by_its_beginning_and_cited_once_per_block():
    long_text = "word " * 5000
    documents = [{"text": long_text, "title": "Long"}]
    pieces = ["Answer.<citations>[0]</citations>", "<citations>[0]</citations>", " More.<citations>[0]</citations>", ""]
    _, built, events = _stream_and_build(pieces, "stop", ParserConfig(document_titles=("Long",), citation_mode=True), documents)
    (block,) = built.content
    (citation,) = block.citations
    assert citation.cited_text == long_text[: anthropic.CITED_TEXT_CHARS] + "…"
    assert (citation.start_char_index, citation.end_char_index) == (0, len(long_text))
    assert sum('"citations_delta"' in e for e in events) == 1 and sum(len(e) for e in events) < 5 * anthropic.CITED_TEXT_CHARS


def test_citations_sent_back_render_into_their_turn():
    body = request(
        documents=[{"text": "a"}, {"text": "b"}], citation_mode="fast",
        messages=[
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": [{"type": "text", "text": "ans", "citations": [
                {"type": "char_location", "cited_text": "b", "document_index": 1, "document_title": None, "start_char_index": 0, "end_char_index": 1}]}]},
            {"role": "user", "content": "q2"},
        ],
    )  # fmt: skip
    chat, _ = anthropic.to_chat_request(body)
    assert chat.messages[1].citation_ids() == [1]


def test_a_forced_tool_turn_leaves_the_output_format_for_later():
    body = request(
        messages=[{"role": "user", "content": "hi"}], tools=[TOOL], tool_choice={"type": "any"},
        output_config={"format": {"type": "json_schema", "schema": {"type": "object"}}},
    )  # fmt: skip
    chat, _ = anthropic.to_chat_request(body)
    assert chat.tool_choice == "required" and chat.response_format is None


@pytest.mark.parametrize(
    "finish, stop_sequence, expected",
    [("stop", None, ("end_turn", None)), ("stop", "END", ("stop_sequence", "END")), ("length", None, ("max_tokens", None))],
)
def test_stop_reasons(finish, stop_sequence, expected):
    assembled, built, _ = _stream_and_build(["Hi", ""], finish, stop_sequence=stop_sequence)
    assert (built.stop_reason, built.stop_sequence) == expected == (assembled.stop_reason, assembled.stop_sequence)


def test_text_delta_fast_path_is_the_generic_event():
    for text in ["plain", 'quo"te', "\u2028line", "é"]:
        generic = anthropic._event("content_block_delta", {"type": "content_block_delta", "index": 3, "delta": {"type": "text_delta", "text": text}})
        assert anthropic._text_delta(3, text) == generic
