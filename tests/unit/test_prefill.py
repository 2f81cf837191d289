"""Assistant prefill: chat's `continue_final_message` / `add_generation_prompt` (vLLM's fields and
errors), chat `echo`, `/tokenize`, Anthropic's final assistant message, and what a prefill cannot
be combined with. The trust-boundary property for a prefill is in test_prompt.py."""

import json

import pytest
from hypothesis import given, settings, strategies as st
from pydantic import ValidationError

from jamba_server.anthropic_protocol import CountTokensRequest, MessagesRequest
from jamba_server.core import anthropic, responses_api
from jamba_server.core.features import plan_chat
from jamba_server.core.outputs import ChoiceDelta, EngineStep
from jamba_server.core.prepare import prepare_chat, prepare_tokenize
from jamba_server.core.prompt import render_chat
from jamba_server.core.responses import ChatAccumulator, ChatStreamer
from jamba_server.errors import InvalidRequestError
from jamba_server.protocol import ChatCompletionChunk, ChatCompletionRequest, TokenizeRequest
from jamba_server.responses_protocol import ResponsesRequest
from jamba_server.settings import DEFAULT_TEMPLATE, Settings
from tests.support import PrepareEngine, case_to_request, golden_cases

TEMPLATE = DEFAULT_TEMPLATE.read_text(encoding="utf-8")
SETTINGS = Settings(model="m", max_tokens_limit=64)
EOM = "<|eom|>"
PREFILL = {"continue_final_message": True, "add_generation_prompt": False}
ASK = [{"role": "user", "content": "Name a color."}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def engine(dev_model):
    return PrepareEngine(dev_model)


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", **fields})


def render(engine, body: ChatCompletionRequest):
    plan = plan_chat(body)
    return render_chat(
        engine.tokenizer, TEMPLATE, plan.template_inputs, plan.add_generation_prompt, plan.prompt_suffix,
        continue_final_message=plan.continue_final_message,
    )  # fmt: skip


# ---- prompt shape against the golden cases


def _assistant_prefixes():
    """(name, request body, the closed turn's golden text) for each golden conversation cut after an
    assistant message with text only (no documents or modes: their place depends on the last user turn)."""
    out = []
    for case in golden_cases():
        if case.get("documents") or case.get("knobs"):
            continue
        body = case_to_request(case)
        for k, message in enumerate(body["messages"]):
            if message["role"] == "assistant" and not message.get("tool_calls"):
                out.append((f"{case['name']}[:{k + 1}]", {**body, "messages": body["messages"][: k + 1]}, case))
    return out


PREFIXES = _assistant_prefixes()


def test_the_golden_cases_give_conversations_to_continue():
    assert {"no_generation_prompt[:2]", "multi_turn[:3]"} <= {name for name, _, _ in PREFIXES}


@pytest.mark.parametrize("name, body, case", PREFIXES, ids=[p[0] for p in PREFIXES])
def test_a_continued_prompt_is_the_closed_turn_without_its_end(engine, name, body, case):
    """The prompt ends with the assistant text exactly: the golden closed turn up to `<|eom|>`; its ids
    are the closed turn's without the `<|eom|>` id (the cut is at a control token, so no text
    tokenizes differently)."""
    closed = render(engine, chat(**body, add_generation_prompt=False))
    assert case["expected"].startswith(closed.text)  # the cut golden text
    if not case["add_generation_prompt"]:
        assert closed.text == case["expected"]
    content = body["messages"][-1]["content"]
    assert closed.text.endswith(f"<|bom|><|assistant|> {content}{EOM}")
    continued = render(engine, chat(**body, **PREFILL))
    assert continued.text == closed.text.removesuffix(EOM)
    assert continued.token_ids + [engine.tokenizer.convert_tokens_to_ids(EOM)] == closed.token_ids


def test_an_empty_prefill_ends_at_the_templates_opening(engine):
    """As vLLM (transformers) renders it: the template's own space before the content stays."""
    prompt = render(engine, chat(messages=[*ASK, {"role": "assistant", "content": ""}], **PREFILL))
    assert prompt.text.endswith("<|bom|><|assistant|> ")


def test_prefill_with_tools_documents_and_citations(engine):
    """Tools (auto), documents and citation mode keep their prompt; the reply may still call a tool."""
    body = chat(
        messages=[*ASK, {"role": "assistant", "content": "Let me"}], tools=TOOLS,
        documents=[{"text": "Blue is calm.", "title": "Colors"}], citation_mode="fast", **PREFILL,
    )  # fmt: skip
    plan = plan_chat(body)
    prompt = render(engine, body)
    assert prompt.text.endswith("<|eom|><|bom|><|user|> Name a color.<|eom|><|bom|><|assistant|> Let me")
    assert "<tool_definitions>" in prompt.text and "<documents>" in prompt.text and "Citation Mode" in prompt.text
    assert plan.parser.tool_names == frozenset({"f"}) and plan.constraint is None and plan.prompt_suffix == ""


def test_add_generation_prompt_false_ends_at_the_last_turn(engine):
    prompt = render(engine, chat(messages=ASK, add_generation_prompt=False))
    assert prompt.text.endswith(f"Name a color.{EOM}")


# ---- validation


@pytest.mark.parametrize(
    "fields, param, words",
    [
        ({"continue_final_message": True}, "continue_final_message", "Cannot set both `continue_final_message` and `add_generation_prompt`"),
        ({"messages": ASK, **PREFILL}, "continue_final_message", "the last message is not from the assistant"),
        ({"messages": [*ASK, {"role": "assistant", "content": "x", "tool_calls": [
            {"id": "c", "function": {"name": "f", "arguments": "{}"}}]}], "tools": TOOLS, **PREFILL},
         "messages[1].tool_calls", "only an assistant message's text"),
        ({"messages": [*ASK, {"role": "assistant", "content": "x", "citations": [0]}],
          "documents": [{"text": "d"}], **PREFILL}, "messages[1].citations", "finished answer"),
        ({"response_format": {"type": "json_object"}, **PREFILL}, "response_format", "continue_final_message"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}}, **PREFILL},
         "response_format", "continue_final_message"),
        ({"structured_outputs": {"json": {"type": "object"}}, **PREFILL}, "structured_outputs", "continue_final_message"),
        ({"structured_outputs": {"json_object": True}, **PREFILL}, "structured_outputs", "continue_final_message"),
        ({"tools": TOOLS, "tool_choice": "required", **PREFILL}, "tool_choice", "continue_final_message"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "f"}}, **PREFILL}, "tool_choice", "continue_final_message"),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "A"}],
          "documents": [{"text": "d"}], **PREFILL}, "documents", "user message before it"),
        ({"messages": ASK, "tools": TOOLS, "tool_choice": "required", "add_generation_prompt": False},
         "add_generation_prompt", "needs add_generation_prompt"),
    ],
)  # fmt: skip
def test_what_a_prefill_cannot_be_is_a_400_naming_the_field(fields, param, words):
    body = chat(**{"messages": [*ASK, {"role": "assistant", "content": "{"}], **fields})
    with pytest.raises(InvalidRequestError) as refused:
        plan_chat(body)
    assert refused.value.param == param and words in refused.value.message


def test_a_prefill_may_be_continued_under_a_regex_or_grammar():
    for structured in ({"regex": "[a-z ]+"}, {"choice": ["yes", "no"]}, {"grammar": 'root ::= "a"'}):
        plan = plan_chat(chat(messages=[*ASK, {"role": "assistant", "content": "Sure"}], structured_outputs=structured, **PREFILL))
        assert plan.continue_final_message and plan.constraint is not None


def test_tool_choice_none_and_auto_go_with_a_prefill():
    for choice in ("none", "auto"):
        plan = plan_chat(chat(messages=[*ASK, {"role": "assistant", "content": "Sure"}], tools=TOOLS, tool_choice=choice, **PREFILL))
        assert plan.continue_final_message and not plan.add_generation_prompt


# ---- what only the template can tell (any --chat-template): the cut removes template text only

CHATML = "{% for m in messages %}<|bom|>{{ m.role }}\n{{ m.content }}<|eom|>\n{% endfor %}{% if add_generation_prompt %}<|bom|>assistant\n{% endif %}"


def test_another_templates_end_of_turn_is_removed_whatever_it_is(engine):
    body = chat(messages=[*ASK, {"role": "assistant", "content": "Red <|eom|> or"}], **PREFILL)
    prompt = render_chat(engine.tokenizer, CHATML, plan_chat(body).template_inputs, False, continue_final_message=True)
    assert prompt.text == "<|bom|>user\nName a color.<|eom|>\n<|bom|>assistant\nRed <|eom|> or"
    assert engine.tokenizer.convert_tokens_to_ids(EOM) not in prompt.token_ids[-6:]  # the client's spelling is text


@pytest.mark.parametrize(
    "template, words",
    [
        ("{% for m in messages %}{{ m.content | upper }}<|eom|>{% endfor %}", "does not render its content as given"),
        ("{% for m in messages %}{{ m.content }}{{ m.content }}<|eom|>{% endfor %}", "does not render its content as given"),
        ("{% for m in messages %}{{ m.content }}<|eom|>{% endfor %}{% for d in documents or [] %}{{ d.text }}{% endfor %}",
         "writes request content after it"),
    ],
)  # fmt: skip
def test_a_template_that_would_lose_client_text_is_a_400(engine, template, words):
    body = chat(messages=[*ASK, {"role": "assistant", "content": "Blue"}], documents=[{"text": "doc"}], **PREFILL)
    with pytest.raises(InvalidRequestError, match=words):
        render_chat(engine.tokenizer, template, plan_chat(body).template_inputs, False, continue_final_message=True)


# ---- echo


def _steps(pieces, n=1):
    last = len(pieces) - 1
    return [
        EngineStep(tuple(ChoiceDelta(c, p, (i,), None, "stop" if i == last else None) for c in range(n)), 5, i == last)
        for i, p in enumerate(pieces)
    ]


def test_echo_starts_each_choices_content_streamed_or_not():
    acc = ChatAccumulator("id", "m", 2, False, echo_text="Roses are")
    streamer = ChatStreamer("id", "m", 2, False, created=0)
    chunks = [streamer.opening(), *streamer.echo("Roses are")]
    for step in _steps([" red", ","], n=2):
        acc.add(step)
        chunks += streamer.step(step)
    streamed = ["", ""]
    for chunk in chunks:
        for choice in ChatCompletionChunk.model_validate_json(chunk).choices:
            streamed[choice.index] += choice.delta.content or ""
    assert [c.message.content for c in acc.build().choices] == ["Roses are red,"] * 2 == streamed
    first = json.loads(chunks[1])["choices"][0]
    assert first["delta"] == {"content": "Roses are"} and first["finish_reason"] is None


def test_echo_with_a_tool_call_only_reply_is_the_echoed_text():
    from jamba_server.core.parsing import ParserConfig

    acc = ChatAccumulator("id", "m", 1, False, ParserConfig(tool_names=frozenset({"f"})), echo_text="Let me check.")
    for step in _steps(['<tool_calls>[{"name": "f", "arguments": {}}]</tool_calls>']):
        acc.add(step)
    message = acc.build().choices[0].message
    assert message.content == "Let me check." and message.tool_calls[0].function.name == "f"


@pytest.mark.parametrize(
    "last, fields, echoed",
    [
        ({"role": "assistant", "content": "Roses are"}, PREFILL, "Roses are"),
        ({"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}, PREFILL, "a\nb"),
        ({"role": "assistant", "content": "Done."}, {}, "Done."),  # vLLM: same role as the reply
        ({"role": "user", "content": "Hi"}, {}, ""),
    ],
)  # fmt: skip
def test_prepare_echoes_the_last_message_when_it_is_the_assistants(engine, last, fields, echoed):
    body = chat(messages=[*ASK, last], echo=True, stream=True, **fields)
    job = prepare_chat(body, engine, SETTINGS, TEMPLATE)
    opening = job.renderers.opening(job.renderers.streamer("id", "m"))
    assert len(opening) == (2 if echoed else 1)
    if echoed:
        assert json.loads(opening[1])["choices"][0]["delta"] == {"content": echoed}
    accumulator = job.renderers.accumulator("id", "m")
    for step in _steps(["!"]):
        accumulator.add(step)
    assert accumulator.build().choices[0].message.content == echoed + "!"


def test_prepare_chat_runs_the_prefilled_prompt(engine):
    body = chat(messages=[*ASK, {"role": "assistant", "content": "Roses are"}], **PREFILL)
    job = prepare_chat(body, engine, SETTINGS, TEMPLATE)
    assert job.prompt.text.endswith("<|bom|><|assistant|> Roses are")


# ---- /tokenize


def test_tokenize_shows_the_prefilled_prompt(engine):
    body = TokenizeRequest.model_validate({"messages": [*ASK, {"role": "assistant", "content": "Roses are"}], **PREFILL})
    assert prepare_tokenize(body, engine, SETTINGS, TEMPLATE).text.endswith("<|assistant|> Roses are")
    with pytest.raises(InvalidRequestError, match="Cannot set both"):
        prepare_tokenize(TokenizeRequest.model_validate({"messages": ASK, "continue_final_message": True}), engine, SETTINGS, TEMPLATE)


def test_tokenize_refuses_continue_final_message_on_a_raw_prompt():
    with pytest.raises(ValidationError, match="continue_final_message applies to messages"):
        TokenizeRequest.model_validate({"prompt": "hi", "continue_final_message": True, "add_generation_prompt": False})
    assert TokenizeRequest.model_validate({"prompt": "hi", "add_generation_prompt": False})


# ---- Anthropic: a final assistant message is the prefill


def messages_request(**fields) -> MessagesRequest:
    return MessagesRequest.model_validate({"model": "m", "max_tokens": 16, **fields})


def test_a_final_assistant_message_continues_and_count_tokens_counts_the_same_prompt(engine):
    for content in ("Roses are", [{"type": "text", "text": "Roses"}, {"type": "text", "text": "are"}]):
        fields = {"messages": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": content}]}
        body = messages_request(**fields)
        chat_body, _ = anthropic.to_chat_request(body)
        assert chat_body.continue_final_message and not chat_body.add_generation_prompt
        job = anthropic.prepare_messages(body, engine, SETTINGS, TEMPLATE)
        text = "Roses are" if isinstance(content, str) else "Roses\nare"
        assert job.prompt.text.endswith(f"<|bom|><|assistant|> {text}")
        counted = anthropic.prepare_count_tokens(CountTokensRequest.model_validate({"model": "m", **fields}), engine, SETTINGS, TEMPLATE)
        assert counted.token_ids == job.prompt.token_ids


def test_an_empty_final_assistant_message_prefills_nothing(engine):
    for empty in ("", []):
        body = messages_request(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": empty}])
        chat_body, _ = anthropic.to_chat_request(body)
        assert not chat_body.continue_final_message and [m.role for m in chat_body.messages] == ["user"]
        assert anthropic.prepare_messages(body, engine, SETTINGS, TEMPLATE).prompt.text.endswith("Hi<|eom|><|bom|><|assistant|>")


@pytest.mark.parametrize("content", ["Sure ", "Sure\n", [{"type": "text", "text": "a"}, {"type": "text", "text": "b\t"}]])
def test_trailing_whitespace_in_the_final_assistant_message_is_anthropics_400(content):
    body = messages_request(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": content}])
    with pytest.raises(InvalidRequestError) as refused:
        anthropic.to_chat_request(body)
    assert refused.value.anthropic_envelope()["error"]["message"] == "messages: final assistant content cannot end with trailing whitespace"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, "output_config.format.schema"),
        ({"tools": [{"name": "f", "input_schema": {"type": "object"}}], "tool_choice": {"type": "any"}}, "tool_choice"),
    ],
)
def test_a_prefill_with_a_constrained_output_is_a_400_in_anthropic_terms(engine, fields, param):
    body = messages_request(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "{"}], **fields)
    with pytest.raises(InvalidRequestError) as refused:
        anthropic.prepare_messages(body, engine, SETTINGS, TEMPLATE)
    assert refused.value.param == param


def test_a_final_tool_use_is_not_a_prefill(engine):
    body = messages_request(
        messages=[{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}],
        tools=[{"name": "f", "input_schema": {"type": "object"}}],
    )  # fmt: skip
    with pytest.raises(InvalidRequestError) as refused:
        anthropic.prepare_messages(body, engine, SETTINGS, TEMPLATE)
    assert refused.value.param == "messages[1]"


# ---- Responses: OpenAI's API has no prefill; a final assistant item is a finished turn


def test_a_final_assistant_item_in_responses_is_a_finished_turn(engine):
    body = ResponsesRequest.model_validate({"model": "m", "input": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]})  # fmt: skip
    translation = responses_api.to_chat_request(body, [])
    assert not translation.chat.continue_final_message
    prompt = render(engine, translation.chat)
    assert prompt.text.endswith(f"Hello.{EOM}<|bom|><|assistant|>")


# ---- any combination: a prompt or a 400, never anything else

_role_messages = st.lists(
    st.tuples(st.sampled_from(["system", "user", "assistant", "tool", "developer"]), st.text(max_size=12), st.booleans()),
    min_size=1, max_size=4,
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    turns=_role_messages,
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    tool_choice=st.sampled_from([None, "none", "auto", "required"]),
    extras=st.sets(st.sampled_from(["documents", "citations", "json"])),
)
def test_any_prompt_shape_is_a_prompt_or_a_400(engine, turns, flags, tool_choice, extras):
    continue_final, add_generation_prompt, echo = flags
    messages = []
    for role, text, with_call in turns:
        message = {"role": role, "content": text}
        if role == "assistant" and with_call:
            message["tool_calls"] = [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]
        if role == "tool":
            message["tool_call_id"] = "c"
        messages.append(message)
    fields = {"messages": messages, "continue_final_message": continue_final, "add_generation_prompt": add_generation_prompt, "echo": echo}
    if tool_choice is not None:
        fields |= {"tools": TOOLS, "tool_choice": tool_choice}
    if "documents" in extras:
        fields["documents"] = [{"text": "doc"}]
    if "citations" in extras:
        fields["citation_mode"] = "fast"
    if "json" in extras:
        fields["response_format"] = {"type": "json_object"}
    try:
        job = prepare_chat(chat(**fields), engine, SETTINGS, TEMPLATE)
    except InvalidRequestError:
        return
    if continue_final:
        assert job.prompt.text.endswith("<|bom|><|assistant|> " + messages[-1]["content"])
    elif add_generation_prompt:
        assert job.prompt.text.endswith(("<|bom|><|assistant|>", "<|bom|><|assistant|> <tool_calls>"))
    else:
        assert job.prompt.text.endswith("<|eom|>")
