"""Streams whose chunks carry several tokens (the adaptive stream interval, core/coalescing.py) through
the live server: the same text, logprobs and tool calls as the non-streaming answer, the first token
alone in its chunk, and later chunks carrying more than the fixed interval. (Citations cannot be
forced from the random-weight model; tests/unit/test_responses.py streams them coalesced.)"""

from __future__ import annotations

import openai
import pytest

from tests.support import MODEL_NAME, start_server

FIXED = 2  # --stream-interval
ASK = [{"role": "user", "content": "What's the weather like in Paris?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 14}},
    "required": ["city", "days"], "additionalProperties": False}}}  # fmt: skip


@pytest.fixture(scope="module")
def client(dev_model):
    """Every stream coalesced: a gap far above any step, from the first stream on."""
    proc = start_server("--stream-interval", str(FIXED), "--stream-coalesce-gap", "30", "--stream-coalesce-min-streams", "1")
    with openai.OpenAI(base_url=proc.base_url + "/v1", api_key="unused", max_retries=0, timeout=300) as c:
        yield c
    assert proc.stop() == 0, proc.log_tail()


def both(client, **request):
    """The non-streaming answer (it also gives the server its first measure of the engine's pace),
    then the same request streamed, assembled: (message, finish, per-chunk token counts, logprobs)."""
    body = {"model": MODEL_NAME, "messages": ASK, "temperature": 0, **request}
    whole = client.chat.completions.create(**body)
    content, calls, finish, sizes, logprobs = "", {}, None, [], []
    for chunk in client.chat.completions.create(**body, stream=True):
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for call in delta.tool_calls or ():
                into = calls.setdefault(call.index, {"name": "", "arguments": ""})
                into["name"] += call.function.name or ""
                into["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
            if choice.logprobs is not None and choice.logprobs.content:
                sizes.append(len(choice.logprobs.content))
                logprobs += choice.logprobs.content
    streamed = {"content": content or None, "calls": [calls[i] for i in sorted(calls)]}
    return whole.choices[0], streamed, finish, sizes, logprobs


def test_coalesced_text_and_logprobs_equal_non_streaming(client):
    whole, streamed, finish, sizes, logprobs = both(
        client, max_tokens=40, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True}
    )
    assert streamed["content"] == whole.message.content and finish == whole.finish_reason
    assert [(t.token, t.logprob) for t in logprobs] == [(t.token, t.logprob) for t in whole.logprobs.content]
    assert [len(t.top_logprobs) for t in logprobs] == [2] * 40
    assert sizes[0] == 1, sizes  # the first token is never held back
    assert max(sizes) > FIXED, sizes  # the adaptive interval, beyond the fixed one
    assert sum(sizes) == 40


def test_coalesced_tool_calls_equal_non_streaming(client):
    whole, streamed, finish, _, _ = both(client, tools=[WEATHER], tool_choice="required", max_tokens=200)
    assert finish == whole.finish_reason == "tool_calls"
    expected = [{"name": c.function.name, "arguments": c.function.arguments} for c in whole.message.tool_calls]
    assert streamed["calls"] == expected and streamed["content"] is None
