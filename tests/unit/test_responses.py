import json

from hypothesis import given, settings, strategies as st

from jamba_server.core.outputs import ChoiceDelta, EngineStep, PromptTokenLogprob, TokenLogprob, batch_step
from jamba_server.core.responses import (
    ChatAccumulator,
    ChatStreamer,
    CompletionAccumulator,
    CompletionStreamer,
)
from jamba_server.protocol import ChatChunkChoice, ChatCompletionChunk, Completion, DeltaMessage


def chat_chunks(serialized: list[str]) -> list[ChatCompletionChunk]:
    return [ChatCompletionChunk.model_validate_json(c) for c in serialized]


def steps_from(pieces_per_choice, finish="stop", prompt_tokens=4):
    """Interleave per-choice text pieces into engine steps, one token per piece."""
    steps = []
    longest = max(len(p) for p in pieces_per_choice)
    for i in range(longest):
        deltas = []
        for index, pieces in enumerate(pieces_per_choice):
            if i < len(pieces):
                last = i == len(pieces) - 1
                deltas.append(ChoiceDelta(index, pieces[i], (100 + i,), None, finish if last else None))
        steps.append(EngineStep(tuple(deltas), prompt_tokens, i == longest - 1))
    return steps


def test_chat_accumulator_builds_choices_and_usage():
    acc = ChatAccumulator("id", "m", 2, want_logprobs=False)
    for step in steps_from([["He", "llo"], ["Yo"]]):
        acc.add(step)
    done = acc.build(prompt_token_ids=[1, 2])
    assert [c.message.content for c in done.choices] == ["Hello", "Yo"]
    assert [c.finish_reason for c in done.choices] == ["stop", "stop"]
    assert done.usage.model_dump() == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert done.choices[0].token_ids == [100, 101] and done.prompt_token_ids == [1, 2]


def test_stream_chunks_open_with_role_and_close_with_empty_delta():
    streamer = ChatStreamer("id", "m", 1, want_logprobs=False, created=0)
    opening = json.loads(streamer.opening())
    assert opening["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    chunks = [c for s in steps_from([["a", ""]], finish="length") for c in streamer.step(s)]
    last = json.loads(chunks[-1])
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "length"
    assert json.loads(streamer.usage_chunk())["usage"]["completion_tokens"] == 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.text(max_size=5), min_size=1, max_size=12), min_size=1, max_size=3))
def test_streamed_text_equals_accumulated_text(pieces_per_choice):
    n = len(pieces_per_choice)
    steps = steps_from(pieces_per_choice)
    acc = ChatAccumulator("id", "m", n, want_logprobs=False)
    streamer = ChatStreamer("id", "m", n, want_logprobs=False, created=0)
    streamed = [""] * n
    finish = [None] * n
    for step in steps:
        acc.add(step)
        for choice in [c for chunk in chat_chunks(streamer.step(step)) for c in chunk.choices]:
            streamed[choice.index] += choice.delta.content or ""
            finish[choice.index] = choice.finish_reason or finish[choice.index]
    built = acc.build()
    assert streamed == [c.message.content for c in built.choices]
    assert finish == [c.finish_reason for c in built.choices]
    assert ChatCompletionChunk.model_validate_json(streamer.usage_chunk()).usage == built.usage


def test_chat_logprobs_shape():
    lp = (TokenLogprob("a", -0.5, (("a", -0.5), ("b", -1.0))),)
    acc = ChatAccumulator("id", "m", 1, want_logprobs=True)
    acc.add(EngineStep((ChoiceDelta(0, "a", (5,), lp, "stop"),), 1, True))
    content = acc.build().choices[0].logprobs.content
    assert content[0].token == "a" and content[0].bytes == [97]
    assert [t.token for t in content[0].top_logprobs] == ["a", "b"]


def test_completion_echo_and_offsets():
    lp1 = (TokenLogprob("lo", -1.0, (("lo", -1.0),)),)
    lp2 = (TokenLogprob("!", -2.0, (("!", -2.0),)),)
    acc = CompletionAccumulator("id", "m", 1, want_logprobs=True, echo_text="Hel")
    streamer = CompletionStreamer("id", "m", 1, want_logprobs=True, created=0)
    streamer.echo("Hel")
    steps = [
        EngineStep((ChoiceDelta(0, "lo", (1,), lp1, None),), 2, False),
        EngineStep((ChoiceDelta(0, "!", (2,), lp2, "length"),), 2, True),
    ]
    offsets = []
    for step in steps:
        acc.add(step)
        offsets += Completion.model_validate_json(streamer.step(step)[0]).choices[0].logprobs.text_offset
    choice = acc.build().choices[0]
    assert choice.text == "Hello!"
    assert choice.logprobs.text_offset == [3, 5] == offsets
    assert choice.logprobs.top_logprobs == [{"lo": -1.0}, {"!": -2.0}]


def test_stream_citations_arrive_in_final_chunk_only():
    from jamba_server.core.parsing import ParserConfig

    config = ParserConfig(document_titles=("A", "B"), citation_mode=True)
    streamer = ChatStreamer("id", "m", 1, want_logprobs=False, created=0, parser=config)
    pieces = ["Answer", "<citations>[1]</citations>", " tail", ""]
    chunks = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        chunks += chat_chunks(
            streamer.step(EngineStep((ChoiceDelta(0, piece, (i,), None, "stop" if last else None),), 1, last))
        )
    with_citations = [c for c in chunks if c.choices[0].delta.citations is not None]
    assert len(with_citations) == 1 and with_citations[0] is chunks[-1]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert [c.document_id for c in chunks[-1].choices[0].delta.citations] == [1]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Answer tail"


@given(st.text(), st.integers(0, 3))
def test_text_chunks_are_the_models_own_json(text, index):
    """The per-token fast path writes exactly what building and serializing the models would."""
    chat = ChatStreamer("chatcmpl-1", "m", 4, want_logprobs=False, created=7)
    step = EngineStep((ChoiceDelta(index, text, (1,), None, None),), 1, False)
    expected = ChatCompletionChunk(
        id="chatcmpl-1", created=7, model="m", choices=[ChatChunkChoice(index=index, delta=DeltaMessage(content=text))]
    ).model_dump_json()
    if "<" not in text:  # no marker in play: all of it is content at once
        assert chat.step(step) == ([expected] if text else [])
    completion = CompletionStreamer("cmpl-1", "m", 4, want_logprobs=False, created=7)
    got = completion.step(step)
    assert got == ([Completion(id="cmpl-1", created=7, model="m", choices=[{"index": index, "text": text}]).model_dump_json()] if text else [])


def test_a_model_named_like_the_text_slot_still_streams_its_text():
    chat = ChatStreamer("chatcmpl-1", "__text_slot__", 1, want_logprobs=False, created=7)
    [chunk] = chat.step(EngineStep((ChoiceDelta(0, "hi", (1,), None, None),), 1, False))
    parsed = ChatCompletionChunk.model_validate_json(chunk)
    assert parsed.model == "__text_slot__" and parsed.choices[0].delta.content == "hi"


def test_continuous_usage_puts_the_usage_so_far_on_every_chat_chunk():
    streamer = ChatStreamer("id", "m", 2, want_logprobs=False, created=0, continuous_usage=True, prompt_tokens=4)
    opening = json.loads(streamer.opening())
    assert opening["usage"] == {"prompt_tokens": 4, "completion_tokens": 0, "total_tokens": 4}
    seen = []
    for step in steps_from([["a", "b", "c"], ["x"]]):
        seen += [json.loads(c)["usage"]["completion_tokens"] for c in streamer.step(step)]
    assert seen == [2, 2, 3, 4]  # both choices' first tokens, then one more per step
    assert json.loads(streamer.usage_chunk())["usage"]["total_tokens"] == 8


def test_without_continuous_usage_chunks_carry_no_usage():
    streamer = ChatStreamer("id", "m", 1, want_logprobs=False, created=0, prompt_tokens=4)
    chunks = [streamer.opening()] + [c for s in steps_from([["a", "b"]]) for c in streamer.step(s)]
    assert all(json.loads(c)["usage"] is None for c in chunks)


def test_continuous_usage_on_completion_chunks_counts_each_new_token():
    streamer = CompletionStreamer("id", "m", 1, want_logprobs=False, created=0, continuous_usage=True, prompt_tokens=3)
    echo = json.loads(streamer.echo("hi"))
    assert echo["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}
    usages = [json.loads(c)["usage"] for s in steps_from([["a", "b", "c"]], prompt_tokens=3) for c in streamer.step(s)]
    assert [u["completion_tokens"] for u in usages] == [1, 2, 3]
    assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] == 3 + u["completion_tokens"] for u in usages)


PROMPT_LOGPROBS = (
    None,
    (PromptTokenLogprob(7, -1.5, 3, " a"), PromptTokenLogprob(9, -0.5, 1, " b")),
)


def test_prompt_logprobs_in_vllms_shape_on_chat_and_on_each_completion_choice():
    first = EngineStep((ChoiceDelta(0, "x", (100,), None, None), ChoiceDelta(1, "y", (101,), None, None)), 2, False, PROMPT_LOGPROBS)
    last = EngineStep((ChoiceDelta(0, "", (102,), None, "stop"), ChoiceDelta(1, "", (103,), None, "stop")), 2, True)
    expected = [None, {"7": {"logprob": -1.5, "rank": 3, "decoded_token": " a"}, "9": {"logprob": -0.5, "rank": 1, "decoded_token": " b"}}]
    chat = ChatAccumulator("id", "m", 2, want_logprobs=False)
    completion = CompletionAccumulator("id", "m", 2, want_logprobs=False)
    for step in (first, last):  # a later step without them keeps the first's
        chat.add(step)
        completion.add(step)
    assert json.loads(chat.build().model_dump_json())["prompt_logprobs"] == expected
    assert [c["prompt_logprobs"] for c in json.loads(completion.build().model_dump_json())["choices"]] == [expected, expected]


def test_no_prompt_logprobs_unless_asked():
    acc = CompletionAccumulator("id", "m", 1, want_logprobs=False)
    for step in steps_from([["a"]]):
        acc.add(step)
    assert acc.build().choices[0].prompt_logprobs is None


def test_batch_step_indexes_choices_as_openai_orders_them():
    step = EngineStep((ChoiceDelta(1, "b", (5,)), ChoiceDelta(0, "a", (6,))), 3, True, PROMPT_LOGPROBS)
    merged = batch_step(step, 2, 2, prompt_tokens=11, finished=False)
    assert [c.index for c in merged.choices] == [5, 4] and [c.text for c in merged.choices] == ["b", "a"]
    assert (merged.prompt_tokens, merged.finished, merged.prompt_index, merged.prompt_logprobs) == (11, False, 2, PROMPT_LOGPROBS)


def test_multi_prompt_completion_choices_get_their_own_prompts_logprobs_and_echo():
    acc = CompletionAccumulator("id", "m", 4, want_logprobs=False, echo_text=["A", "A", "B", "B"], prompts=[[1], [2, 3]])
    acc.add(batch_step(EngineStep((ChoiceDelta(0, "x", (9,), None, "stop"),), 1, False, PROMPT_LOGPROBS), 1, 2, 3, False))
    done = acc.build([1])
    assert [c.text for c in done.choices] == ["A", "A", "Bx", "B"]
    assert [c.prompt_logprobs is not None for c in done.choices] == [False, False, True, True]
    assert [c.prompt_token_ids for c in done.choices] == [[1], [1], [2, 3], [2, 3]] and done.prompt_token_ids is None


def test_streamed_echo_is_each_choices_own():
    streamer = CompletionStreamer("id", "m", 2, want_logprobs=False, created=0)
    assert [c["text"] for c in json.loads(streamer.echo(["A", "BB"]))["choices"]] == ["A", "BB"]


# ---- coalesced streams (core/coalescing.py): a step may carry several tokens


TOKENS = ["Hi", " there", "<", "tool", "<tool_calls>", '[{"name": "f", ', '"arguments": {"a": 1}}]', "</tool_calls>",
          "<citations>", "[1", ", 0]", "</citations>", "<|eom|>", " é", "\n"]  # fmt: skip


def _stream(streamer: ChatStreamer, groups: list[list[int]]) -> tuple[str, list, list, list, list[int]]:
    """Stream tokens (indexes into TOKENS) a group per step: content, tool calls (name, arguments),
    citations, logprob tokens, finish reasons, and how many logprobs each chunk carried."""
    content, calls, citations, logprobs, sizes = "", [], [], [], []
    for g, group in enumerate(groups):
        last = g == len(groups) - 1
        text = "".join(TOKENS[t] for t in group)
        lps = tuple(TokenLogprob(TOKENS[t], -float(t), ((TOKENS[t], -float(t)),)) for t in group)
        step = EngineStep((ChoiceDelta(0, text, tuple(group), lps, "stop" if last else None),), 3, last)
        for chunk in chat_chunks(streamer.step(step)):
            for choice in chunk.choices:
                content += choice.delta.content or ""
                calls += [(c.function.name, c.function.arguments) for c in choice.delta.tool_calls or ()]
                citations += [c.document_id for c in choice.delta.citations or ()]
                if choice.logprobs is not None:
                    logprobs += [(t.token, t.logprob) for t in choice.logprobs.content]
                    sizes.append(len(choice.logprobs.content))
    return content, calls, citations, logprobs, sizes


@given(st.lists(st.integers(0, len(TOKENS) - 1), min_size=1, max_size=24), st.data())
def test_a_coalesced_stream_equals_the_token_by_token_one(tokens, data):
    """Whatever tokens a step gathers, the stream carries the same content, tool calls, citations
    and every token's logprobs as one token per step (and the output parser's view is unchanged)."""
    from jamba_server.core.parsing import ParserConfig

    config = ParserConfig(tool_names=frozenset({"f"}), document_titles=("A", "B"), citation_mode=True)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(tokens) - 1), max_size=len(tokens))) if len(tokens) > 1 else [])
    groups = [tokens[a:b] for a, b in zip([0, *cuts], [*cuts, len(tokens)])]
    one_by_one = _stream(ChatStreamer("id", "m", 1, want_logprobs=True, created=0, parser=config), [[t] for t in tokens])
    coalesced = _stream(ChatStreamer("id", "m", 1, want_logprobs=True, created=0, parser=config), groups)
    assert coalesced[:4] == one_by_one[:4]
    assert len(coalesced[3]) == len(tokens)  # every token's logprobs, once
