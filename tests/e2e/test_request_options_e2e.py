"""vLLM's request options through the live server and the openai client (extensions in
`extra_body`): stream_options.continuous_usage_stats, priority, cache_salt, prompt_logprobs."""

from __future__ import annotations

import openai
import pytest

from tests.support import MODEL_NAME

MESSAGES = [{"role": "user", "content": "Hello there"}]
CONTINUOUS = {"include_usage": True, "continuous_usage_stats": True}


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chat_chunk(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=5, temperature=0, stream=True, stream_options=CONTINUOUS,
            extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    assert all(c.usage is not None for c in chunks)
    prompt_tokens = {c.usage.prompt_tokens for c in chunks}
    counts = [c.usage.completion_tokens for c in chunks]
    assert len(prompt_tokens) == 1 and prompt_tokens.pop() > 0
    assert counts[0] == 0 and counts == sorted(counts) and counts[-1] == 5
    assert chunks[-1].choices == []  # the closing usage chunk still comes


def test_continuous_usage_stats_on_completions(client):
    chunks = list(
        client.completions.create(
            model=MODEL_NAME, prompt="Hello there", max_tokens=4, temperature=0, stream=True, stream_options=CONTINUOUS,
            extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 4 and len(chunks) >= 5
    plain = list(
        client.completions.create(
            model=MODEL_NAME, prompt="Hello there", max_tokens=4, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    assert [c.usage is not None for c in plain] == [False] * (len(plain) - 1) + [True]


def test_priority_on_an_fcfs_server_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2, extra_body={"priority": 1})
    assert refused.value.body["param"] == "priority" and "scheduling-policy" in refused.value.body["message"]
    zero = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2, extra_body={"priority": 0})
    assert zero.choices[0].text is not None


def test_cache_salt_is_accepted_and_bad_salts_are_400s(client, http):
    body = {"model": MODEL_NAME, "prompt": "Hello there", "max_tokens": 3, "temperature": 0, "return_token_ids": True}
    salted = http.post("/v1/completions", json={**body, "cache_salt": "tenant-a"})
    plain = http.post("/v1/completions", json=body)
    assert salted.status_code == 200 and salted.json()["choices"][0]["token_ids"] == plain.json()["choices"][0]["token_ids"]
    for bad in ["", "a/b", "x" * 129]:
        refused = http.post("/v1/completions", json={**body, "cache_salt": bad})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "cache_salt", refused.text


def _check_prompt_logprobs(positions, prompt_ids, top):
    assert len(positions) == len(prompt_ids) and positions[0] is None
    for token_id, position in zip(prompt_ids[1:], positions[1:]):
        assert str(token_id) in position and top <= len(position) <= top + 1  # the prompt's own token, and the top ones
        assert sorted(v["rank"] for v in position.values())[:top] == list(range(1, top + 1))
        assert all(v["logprob"] <= 0 and isinstance(v["decoded_token"], str) for v in position.values())


def test_prompt_logprobs_on_completions_and_chat(client):
    done = client.completions.create(
        model=MODEL_NAME, prompt="Hello there, you dog", max_tokens=2, extra_body={"prompt_logprobs": 2, "return_token_ids": True}
    )
    _check_prompt_logprobs(done.choices[0].prompt_logprobs, done.prompt_token_ids, 2)
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=2, extra_body={"prompt_logprobs": 1, "return_token_ids": True}
    )
    _check_prompt_logprobs(chat.prompt_logprobs, chat.prompt_token_ids, 1)
    plain = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=1)
    assert getattr(plain.choices[0], "prompt_logprobs", None) is None


def test_prompt_logprobs_with_stream_are_a_400(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2, stream=True, extra_body={"prompt_logprobs": 1})
    assert refused.value.body["param"] == "prompt_logprobs"
