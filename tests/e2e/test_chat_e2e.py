"""Chat generation end to end with the official `openai` client against a live server on the dev
model: non-streaming and streaming, n, stop sequences and end tokens, max_tokens, logprobs, seeds,
sampling extensions, ignore_eos."""

from __future__ import annotations

import pytest

from tests.support import MODEL_NAME

HI = [{"role": "user", "content": "Tell me about the weather in London."}]


def greedy(client, **kwargs):
    args = {"model": MODEL_NAME, "messages": HI, "temperature": 0, "max_tokens": 24}
    return client.chat.completions.create(**{**args, **kwargs})


def test_non_streaming_chat(client, http):
    resp = greedy(client, max_tokens=12)
    choice = resp.choices[0]
    assert resp.object == "chat.completion" and resp.model == MODEL_NAME
    assert resp.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    prompt_count = http.post("/tokenize", json={"messages": HI}).json()["count"]
    assert resp.usage.prompt_tokens == prompt_count
    assert resp.usage.completion_tokens == 12
    assert resp.usage.total_tokens == prompt_count + 12


def test_streaming_equals_non_streaming(client):
    whole = greedy(client)
    stream = greedy(client, stream=True, stream_options={"include_usage": True})
    text, finish, usage, roles = "", None, None, []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
            continue
        for choice in chunk.choices:
            roles.append(choice.delta.role)
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert roles[0] == "assistant"
    assert usage is not None and usage == whole.usage


def test_n_choices(client):
    resp = client.chat.completions.create(
        model=MODEL_NAME, messages=HI, n=2, max_tokens=6, temperature=1.0, seed=11
    )
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in resp.choices)
    assert resp.usage.completion_tokens == 12


def _ascii_window(text: str) -> str | None:
    for i in range(3, len(text) - 3):
        window = text[i : i + 3]
        if window.isascii() and window.isalpha() and text.index(window) == i:
            return window
    return None


def test_stop_sequence(client):
    text = greedy(client, max_tokens=40).choices[0].message.content
    stop = _ascii_window(text)
    assert stop is not None, f"no usable stop window in {text!r}"
    resp = greedy(client, max_tokens=40, stop=[stop])
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].message.content == text[: text.index(stop)]


@pytest.mark.parametrize("token", ["<|eom|>", "<|endoftext|>"])
def test_stops_on_end_tokens_and_hides_them(client, http, token):
    token_id = http.post("/tokenize", json={"prompt": token, "add_special_tokens": False}).json()["tokens"]
    assert len(token_id) == 1
    resp = greedy(client, logit_bias={str(token_id[0]): 100})
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].message.content == ""
    assert resp.usage.completion_tokens == 1


def test_max_tokens_length(client):
    resp = greedy(client, max_completion_tokens=3)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 3


def test_logprobs(client):
    resp = greedy(client, max_tokens=5, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)


def test_seeded_sampling_is_repeatable_and_engine_survives(client):
    args = dict(model=MODEL_NAME, messages=HI, temperature=1.0, max_tokens=16)
    first = client.chat.completions.create(seed=1234, **args).choices[0].message.content
    second = client.chat.completions.create(seed=1234, **args).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(seed=1234, stream=True, **args)
        if c.choices
    )
    assert first == second == streamed
    others = {client.chat.completions.create(seed=s, **args).choices[0].message.content for s in (1, 2, 3)}
    assert len(others | {first}) > 1  # the seed matters
    assert greedy(client, max_tokens=2).choices[0].finish_reason == "length"


def test_sampling_extensions_accepted(client):
    resp = greedy(
        client,
        max_tokens=4,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        user="tester",
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 4, "ignore_eos": True},
    )
    assert resp.usage.completion_tokens == 4


def test_ignore_eos_runs_to_max_tokens(client, http):
    eom = http.post("/tokenize", json={"prompt": "<|eom|>", "add_special_tokens": False}).json()["tokens"][0]
    resp = greedy(client, max_tokens=6, logit_bias={str(eom): 100}, extra_body={"ignore_eos": True})
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 6
