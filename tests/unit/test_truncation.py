"""Prompt truncation (core/truncation.py): `truncate_prompt_tokens` / `truncation_side` on chat,
completions and the Responses API's `truncation: "auto"`.

The chat cut's invariant, checked on random conversations: the prompt ends within the budget (or the
request is a 400 because the parts never cut do not fit), keeps every control token of the original
render except those of whole history exchanges it dropped, and keeps of each message and document a
token-aligned suffix (`left`) or prefix (`right`) of its text, cutting history and documents before
the final user message and that before system messages.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import event, given, settings, strategies as st
from pydantic import ValidationError

from jamba_server.core import responses_api
from jamba_server.core.features import plan_chat
from jamba_server.core.prepare import prepare_chat, prepare_completion
from jamba_server.core.outputs import ChoiceDelta, EngineStep
from jamba_server.core.prompt import control_spellings, render_chat
from jamba_server.core.truncation import prompt_budget, truncate_chat, truncate_ids
from jamba_server.errors import ContextLengthExceededError, InvalidRequestError
from jamba_server.protocol import ChatCompletionRequest, CompletionRequest
from jamba_server.responses_protocol import ResponsesRequest
from jamba_server.runtime.response_store import ResponseStore
from jamba_server.settings import DEFAULT_TEMPLATE, Settings
from tests.support import CONTROL_IDS, PrepareEngine

TEMPLATE = DEFAULT_TEMPLATE.read_text(encoding="utf-8")
SPELLINGS = ["<|bom|>", "<|eom|>", "<|user|>", "<tool_calls>", "</citations>"]


@pytest.fixture(scope="module")
def engine(dev_model):
    return PrepareEngine(dev_model, max_model_len=512)


def _controls(ids):
    return [i for i in ids if i in CONTROL_IDS]


def _renderer(tokenizer, plan):
    return lambda inputs: render_chat(tokenizer, TEMPLATE, inputs, True, plan.prompt_suffix)


# ---- random conversations

words = st.lists(
    st.one_of(st.sampled_from(["the", " cat", "sat", "é", "日本", "\n", " ", "ab", "q?"]), st.sampled_from(SPELLINGS), st.text(max_size=6)),
    max_size=24,
).map("".join)


@st.composite
def conversations(draw):
    """A chat request: optional system prompt, history exchanges (some with tool calls), maybe a
    system message among them, a final user message, maybe an agent loop's turns after it, maybe
    documents; or no user message at all."""
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(words)})
    for i in range(draw(st.integers(0, 3))):
        messages.append({"role": "user", "content": draw(words)})
        if draw(st.booleans()):
            call = {"id": f"c{i}", "type": "function", "function": {"name": "look", "arguments": {"q": draw(words)}}}
            messages.append({"role": "assistant", "content": draw(st.sampled_from([None, "ok"])), "tool_calls": [call]})
            messages.append({"role": "tool", "tool_call_id": f"c{i}", "content": draw(words)})
        messages.append({"role": "assistant", "content": draw(words), **({"name": "bot"} if draw(st.booleans()) else {})})
        if draw(st.integers(0, 5)) == 0:
            messages.append({"role": "system", "content": draw(words)})
    if draw(st.integers(0, 5)) > 0:
        messages.append({"role": "user", "content": draw(words)})
    if draw(st.integers(0, 3)) == 0:
        call = {"id": "cz", "type": "function", "function": {"name": "look", "arguments": {}}}
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": "cz", "content": draw(words)})
    if not messages:
        messages.append({"role": "user", "content": draw(words)})
    body = {"model": "m", "messages": messages}
    if draw(st.booleans()):
        body["documents"] = [{"text": draw(words), "title": "T"} for _ in range(draw(st.integers(1, 3)))]
    return body


def _tier1_order(inputs):
    """Where history, documents and later turns render (the cut order for `left`), by key."""
    conversation = inputs["conversation"]
    users = [i for i, m in enumerate(conversation) if m["role"] == "user"]
    final_user = users[-1] if users else -1
    messages = [("message", i) for i, m in enumerate(conversation) if m["role"] != "system" and i != final_user]
    docs = [("document", j) for j in range(len(inputs.get("documents") or []))]
    if final_user == -1:
        return messages + docs
    return [k for k in messages if k[1] < final_user] + docs + [k for k in messages if k[1] > final_user]


@settings(max_examples=200, deadline=None)
@given(body=conversations(), side=st.sampled_from(["left", "right"]), fraction=st.floats(0.0, 1.0))
def test_the_cut_fits_keeps_the_structure_and_cuts_text_in_order(engine, body, side, fraction):
    tokenizer = engine.tokenizer
    spellings = control_spellings(tokenizer)
    plan = plan_chat(ChatCompletionRequest.model_validate(body))
    render = _renderer(tokenizer, plan)
    inputs = plan.template_inputs
    original = render(inputs)
    limit = max(1, int(len(original.token_ids) * fraction))
    try:
        cut = truncate_chat(inputs, original, limit, side, render, spellings.token_starts)
    except ContextLengthExceededError as exc:
        assert exc.param == "truncate_prompt_tokens"
        # Even with every text cut and every history exchange dropped, the prompt does not fit.
        conversation = inputs["conversation"]
        users = [i for i, m in enumerate(conversation) if m["role"] == "user"]
        final_user = users[-1] if users else -1
        bare = {
            **inputs,
            "conversation": [{**m, "content": ""} for i, m in enumerate(conversation) if i >= final_user or m["role"] == "system"],
        }
        if "documents" in inputs:
            bare["documents"] = [{**d, "text": ""} for d in inputs["documents"]]
        assert len(render(bare).token_ids) > limit
        event("the parts never cut do not fit")
        return
    result, report = cut.prompt, cut.truncation
    assert len(result.token_ids) <= limit
    event("dropped exchanges" if report.messages_dropped else "cut" if report.tokens_removed else "fits")
    assert report.prompt_tokens_before == len(original.token_ids) and report.prompt_tokens == len(result.token_ids)
    assert tokenizer.decode(result.token_ids) == result.text

    conversation = inputs["conversation"]
    users = [i for i, m in enumerate(conversation) if m["role"] == "user"]
    final_user = users[-1] if users else -1
    dropped = set(report.messages_dropped)
    # Only whole history exchanges go: never a system message, the final user message or a later turn,
    # and a dropped user message takes its answers with it.
    assert all(i < final_user and conversation[i]["role"] != "system" for i in dropped)
    for i in dropped:
        if conversation[i]["role"] == "user":
            following = range(i + 1, ([u for u in users if u > i] or [final_user])[0])
            assert {j for j in following if conversation[j]["role"] != "system"} <= dropped
    # Control tokens: the original's, less the dropped turns'.
    remaining = {**inputs, "conversation": [m for i, m in enumerate(conversation) if i not in dropped]}
    assert _controls(result.token_ids) == _controls(render(remaining).token_ids)

    # Kept text: each message's and document's a token-aligned suffix (left) or prefix (right).
    kept_messages = [i for i in range(len(conversation)) if i not in dropped]
    assert len(kept_messages) == len(cut.inputs["conversation"])
    now = {("message", i): m.get("content") or "" for i, m in zip(kept_messages, cut.inputs["conversation"])}
    now.update({("document", j): d["text"] for j, d in enumerate(cut.inputs.get("documents") or [])})
    before = {("message", i): m.get("content") or "" for i, m in enumerate(conversation)}
    before.update({("document", j): d["text"] for j, d in enumerate(inputs.get("documents") or [])})
    for key, text in now.items():
        if text == before[key]:
            continue
        starts = spellings.token_starts(before[key])
        if side == "left":
            assert before[key].endswith(text) and (text == "" or len(before[key]) - len(text) in starts)
        else:
            assert before[key].startswith(text) and (text == "" or len(text) in starts)
    changed = {k for k in now if now[k] != before[k]}
    assert set(report.messages_truncated) == {i for kind, i in changed if kind == "message"}
    assert set(report.documents_truncated) == {j for kind, j in changed if kind == "document"}

    # Order: history, documents and later turns (oldest first on the left, newest on the right) before
    # the final user message, and that before system messages.
    def touched(key):
        return key in changed or (key[0] == "message" and key[1] in dropped)

    def emptied(key):
        return now.get(key, "") == "" or (key[0] == "message" and key[1] in dropped)

    order = _tier1_order(inputs)
    if side == "right":
        order = order[::-1]
    touched_at = [n for n, key in enumerate(order) if touched(key)]
    if touched_at:
        assert all(emptied(key) for key in order[: touched_at[-1]])
    if final_user >= 0 and touched(("message", final_user)):
        assert all(emptied(key) for key in order) and all(
            i in dropped for i in range(final_user) if conversation[i]["role"] != "system"
        )
    if any(touched(("message", i)) for i, m in enumerate(conversation) if m["role"] == "system"):
        assert final_user < 0 or emptied(("message", final_user))


def test_a_long_document_is_cut_from_its_start_and_keeps_everything_else(engine):
    body = ChatCompletionRequest.model_validate({
        "model": "m", "max_tokens": 16, "truncate_prompt_tokens": -1,
        "messages": [{"role": "system", "content": "Answer from the document."}, {"role": "user", "content": "What is the last word?"}],
        "documents": [{"text": " ".join(f"w{i}" for i in range(400)), "title": "Words"}],
    })  # fmt: skip
    job = prepare_chat(body, engine, Settings(model="m"), TEMPLATE)
    assert 512 - 16 - 3 <= len(job.prompt.token_ids) <= 512 - 16 and job.spec.max_tokens == 16
    assert "Answer from the document.<|eom|>" in job.prompt.text and "What is the last word?<|eom|>" in job.prompt.text
    assert "w399\n</documents>" in job.prompt.text and " w0 " not in job.prompt.text
    report = job.renderers.accumulator("chatcmpl-1", "m").prompt_truncation
    assert report.model_dump() == {
        "side": "left", "limit": 496, "prompt_tokens_before": report.prompt_tokens_before,
        "tokens_removed": report.prompt_tokens_before - len(job.prompt.token_ids), "messages_truncated": [], "messages_dropped": [],
        "documents_truncated": [0],
    }  # fmt: skip
    right = prepare_chat(body.model_copy(update={"truncation_side": "right"}), engine, Settings(model="m"), TEMPLATE)
    assert "Text: w0 w1 " in right.prompt.text and "w399" not in right.prompt.text


def test_old_exchanges_go_whole_before_the_question_is_touched(engine):
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"question {i} " * 20}, {"role": "assistant", "content": f"answer {i} " * 20}]
    body = ChatCompletionRequest.model_validate({
        "model": "m", "max_tokens": 8, "truncate_prompt_tokens": 300,
        "messages": [{"role": "system", "content": "Be brief."}, *history, {"role": "user", "content": "And now?"}],
    })  # fmt: skip
    job = prepare_chat(body, engine, Settings(model="m"), TEMPLATE)
    report = job.renderers.accumulator("chatcmpl-1", "m").prompt_truncation
    assert len(job.prompt.token_ids) <= 300 and report.limit == 300
    assert report.messages_dropped == list(range(1, 1 + len(report.messages_dropped))) and report.messages_dropped
    assert len(report.messages_dropped) % 2 == 0  # whole exchanges
    assert job.prompt.text.startswith("<|startoftext|><|bom|><|system|> Be brief.<|eom|>")
    assert job.prompt.text.endswith("<|bom|><|user|> And now?<|eom|><|bom|><|assistant|>")
    assert "answer 5" in job.prompt.text and "question 0" not in job.prompt.text


def test_a_prompt_that_fits_is_left_alone_and_reported(engine):
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], "truncate_prompt_tokens": 100})
    job = prepare_chat(body, engine, Settings(model="m"), TEMPLATE)
    plain = prepare_chat(body.model_copy(update={"truncate_prompt_tokens": None}), engine, Settings(model="m"), TEMPLATE)
    assert job.prompt == plain.prompt
    built = job.renderers.accumulator("chatcmpl-1", "m").build().model_dump(mode="json")
    assert built["prompt_truncation"]["tokens_removed"] == 0 and built["prompt_truncation"]["limit"] == 100
    assert "prompt_truncation" not in plain.renderers.accumulator("chatcmpl-1", "m").build().model_dump(mode="json")


def test_the_stream_reports_the_cut_on_its_first_chunk_only(engine):
    body = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "x " * 600}], "truncate_prompt_tokens": 200, "stream": True,
    })  # fmt: skip
    job = prepare_chat(body, engine, Settings(model="m"), TEMPLATE)
    streamer = job.renderers.streamer("chatcmpl-1", "m")
    first = json.loads(job.renderers.opening(streamer)[0])
    assert first["prompt_truncation"]["messages_truncated"] == [0] and first["choices"][0]["delta"]["role"] == "assistant"
    later = streamer.step(EngineStep((ChoiceDelta(0, "ok", (5,), None, None),), len(job.prompt.token_ids), False))
    assert all("prompt_truncation" not in json.loads(chunk) for chunk in later)


def test_what_is_never_cut_must_fit(engine):
    body = ChatCompletionRequest.model_validate({
        "model": "m", "truncate_prompt_tokens": 20,
        "messages": [{"role": "user", "content": "hello " * 100}],
        "tools": [{"type": "function", "function": {"name": "f", "description": "a tool " * 20}}],
    })  # fmt: skip
    with pytest.raises(ContextLengthExceededError) as refused:
        prepare_chat(body, engine, Settings(model="m"), TEMPLATE)
    assert refused.value.param == "truncate_prompt_tokens" and "never cut" in refused.value.message


# ---- the budget


@pytest.mark.parametrize(
    "truncate, max_tokens, cap, budget",
    [
        (None, 10, None, None),
        (-1, 10, None, 502),  # room left for max_tokens
        (-1, None, None, 511),  # vLLM's: one token of room
        (-1, None, 64, 448),  # no max_tokens: room for the default the server gives (its cap)
        (100, 10, None, 100),
        (510, 10, None, 502),  # never so long that max_tokens no longer fits
        (512, None, None, 511),
    ],
)
def test_the_budget(truncate, max_tokens, cap, budget):
    assert prompt_budget(truncate, max_tokens, 512, cap) == budget


def test_budgets_out_of_range_name_their_param():
    with pytest.raises(InvalidRequestError) as too_long:
        prompt_budget(513, None, 512, None)
    assert too_long.value.param == "truncate_prompt_tokens" and "max_model_len=512" in too_long.value.message
    with pytest.raises(ContextLengthExceededError) as no_room:
        prompt_budget(-1, 512, 512, None, "max_completion_tokens")
    assert no_room.value.param == "max_completion_tokens"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": 2**63}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": "all"}, "truncate_prompt_tokens"),
        ({"truncation_side": "middle"}, "truncation_side"),
    ],
)
def test_invalid_truncation_fields_name_themselves(fields, param):
    for model, base in ((ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}]}), (CompletionRequest, {"prompt": "hi"})):
        with pytest.raises(ValidationError) as info:
            model.model_validate({"model": "m", **base, **fields})
        assert info.value.errors()[0]["loc"][0] == param


def test_a_chat_request_longer_than_the_context_names_truncate_prompt_tokens(engine):
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], "truncate_prompt_tokens": 600})
    with pytest.raises(InvalidRequestError) as refused:
        prepare_chat(body, engine, Settings(model="m"), TEMPLATE)
    assert refused.value.param == "truncate_prompt_tokens"



def test_truncation_refuses_a_prefill_it_could_cut(engine):
    body = ChatCompletionRequest.model_validate({
        "model": "m", "max_tokens": 8, "truncate_prompt_tokens": -1, "add_generation_prompt": False,
        "continue_final_message": True,
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}],
    })  # fmt: skip
    with pytest.raises(InvalidRequestError) as refused:
        prepare_chat(body, engine, Settings(model="m"), TEMPLATE)
    assert refused.value.param == "truncate_prompt_tokens" and "continue_final_message" in str(refused.value)
    untruncated = prepare_chat(body.model_copy(update={"truncate_prompt_tokens": None}), engine, Settings(model="m"), TEMPLATE)
    assert untruncated.prompt.text.endswith("The answer is")

# ---- completions


def test_truncate_ids():
    ids = list(range(10))
    assert truncate_ids(ids, 4, "left") == [6, 7, 8, 9]
    assert truncate_ids(ids, 4, "right") == [0, 1, 2, 3]
    assert truncate_ids(ids, 4, "left", keep_first=1) == [0, 7, 8, 9]
    assert truncate_ids(ids, 1, "left", keep_first=1) == [9]  # no room beside the BOS: the last token
    assert truncate_ids(ids, 20, "left") == ids


def test_completion_token_ids_cut_left_keep_the_last(engine):
    body = CompletionRequest(model="m", prompt=list(range(20, 620)), max_tokens=12, truncate_prompt_tokens=-1, echo=True)
    job = prepare_completion(body, engine, Settings(model="m"))
    assert job.prompt.token_ids == list(range(620 - 500, 620)) and job.spec.max_tokens == 12
    built = job.renderers.accumulator("cmpl-1", "m").build().model_dump(mode="json")
    assert built["prompt_truncation"] == {"side": "left", "limit": 500, "prompt_tokens_before": 600, "tokens_removed": 100}
    assert built["choices"][0]["text"] == engine.tokenizer.decode(job.prompt.token_ids)  # the echo is what the model saw
    right = prepare_completion(body.model_copy(update={"truncation_side": "right"}), engine, Settings(model="m"))
    assert right.prompt.token_ids == list(range(20, 520))


def test_a_completion_text_prompt_keeps_its_bos(engine):
    text = " ".join(f"w{i}" for i in range(400))
    job = prepare_completion(CompletionRequest(model="m", prompt=text, max_tokens=12, truncate_prompt_tokens=100), engine, Settings(model="m"))
    full = engine.tokenizer.encode(text)
    assert job.prompt.token_ids == [full[0], *full[-99:]] and full[0] == engine.tokenizer.bos_token_id
    assert text.endswith(job.prompt.text)


def test_the_completion_stream_reports_on_its_first_chunk(engine):
    body = CompletionRequest(model="m", prompt=[30] * 600, max_tokens=4, truncate_prompt_tokens=-1, stream=True)
    job = prepare_completion(body, engine, Settings(model="m"))
    streamer = job.renderers.streamer("cmpl-1", "m")
    assert job.renderers.opening(streamer) == []
    chunks = [
        *streamer.step(EngineStep((ChoiceDelta(0, "a", (5,), None, None),), 508, False)),
        *streamer.step(EngineStep((ChoiceDelta(0, "b", (6,), None, None),), 508, False)),
    ]
    assert [("prompt_truncation" in json.loads(c)) for c in chunks] == [True, False]
    assert [json.loads(c)["choices"][0]["text"] for c in chunks] == ["a", "b"]


# ---- the Responses API


def test_responses_truncation_auto_cuts_to_leave_room_for_the_answer(engine):
    store = ResponseStore(10, 10**6, 60)
    body = ResponsesRequest.model_validate({"model": "m", "input": "tell me " * 600, "truncation": "auto", "max_output_tokens": 20})
    job = responses_api.prepare_responses(body, engine, Settings(model="m"), TEMPLATE, store)
    assert 512 - 20 - 3 <= len(job.prompt.token_ids) <= 512 - 20 and job.prompt.text.endswith("<|eom|><|bom|><|assistant|>")
    accumulator = job.renderers.accumulator("resp_1", "m")
    accumulator.add(EngineStep((ChoiceDelta(0, "Hi", (5,), None, "stop"),), len(job.prompt.token_ids), True))
    assert accumulator.build().truncation == "auto"
    with pytest.raises(ContextLengthExceededError):
        responses_api.prepare_responses(body.model_copy(update={"truncation": None}), engine, Settings(model="m"), TEMPLATE, store)
    too_much = body.model_copy(update={"max_output_tokens": 512})
    with pytest.raises(ContextLengthExceededError) as refused:
        responses_api.prepare_responses(too_much, engine, Settings(model="m"), TEMPLATE, store)
    assert refused.value.param == "max_output_tokens"
    error = responses_api.in_responses_terms(InvalidRequestError("x", param="truncate_prompt_tokens"), ["input"])
    assert error.param == "truncation"


def test_a_list_of_prompts_is_cut_prompt_by_prompt_and_reported_summed(engine):
    long, short = list(range(20, 620)), list(range(20, 120))
    body = CompletionRequest(model="m", prompt=[long, short], max_tokens=12, truncate_prompt_tokens=-1, echo=True)
    job = prepare_completion(body, engine, Settings(model="m"))
    assert job.prompt.token_ids == long[-500:] and job.more_prompts[0].prompt.token_ids == short
    built = job.renderers.accumulator("cmpl-1", "m").build().model_dump(mode="json")
    assert built["prompt_truncation"] == {"side": "left", "limit": 500, "prompt_tokens_before": 700, "tokens_removed": 100}
    assert [c["text"] for c in built["choices"]] == [engine.tokenizer.decode(long[-500:]), engine.tokenizer.decode(short)]
