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
