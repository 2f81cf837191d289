"""Seeded sampling when a prompt is prefilled in chunks, or partly read from the prefix cache, against
real server processes.

A prompt longer than `max_num_batched_tokens` is prefilled over several engine steps, and prefix caching
(on in the dev preset, as vLLM has it for Jamba) stops prefill chunks at Mamba block boundaries; vLLM
samples a token after every partial chunk, discards it and rewinds the request's generator so the
first real token draws what an unchunked run draws. CPU generators cannot rewind by offset: before the
CPU plugin's fix that step raised `RuntimeError: CPU Generator does not use offset` and killed the
engine. Two servers: one with prefix caching off whose step budget (`CHUNK` tokens) splits every
prompt here, and the session's dev-preset server (prefix caching on), whose default budget (2048 on
CPU) takes the short prompt in one step.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.support import MODEL_NAME, assert_logprobs_close, start_server

CHUNK = 64  # vLLM's floor is max_num_seqs (32 in the dev preset)
DEFAULT_BUDGET = 2048  # vLLM's CPU default for max_num_batched_tokens (API server)
MAX_TOKENS = 24
SEED = 4242


def system_message(rules: int) -> str:
    """About 28 tokens of the dev tokenizer per rule."""
    return " ".join(f"rule {i} of the house says keep calm." for i in range(rules))


SHORT = system_message(12)  # ~340 prompt tokens: six CHUNKs, one step on the default budget
BLOCKS = system_message(30)  # ~860: several of the CPU backend's 128-token cache blocks
LONG = system_message(82)  # ~2,300: the case, over the default budget (chunked everywhere)


def seeded(client: openai.OpenAI, system: str, seed: int = SEED, max_tokens: int = MAX_TOKENS, cache_salt: str | None = None):
    return client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "Go on."}],
        max_tokens=max_tokens, temperature=1.0, top_p=1.0, seed=seed, logprobs=True,
        extra_body={"ignore_eos": True, **({"cache_salt": cache_salt} if cache_salt else {})},
    )  # fmt: skip


def tokens(resp) -> list[str]:
    return [entry.token for entry in resp.choices[0].logprobs.content]


def logprobs(resp) -> list[float]:
    return [entry.logprob for entry in resp.choices[0].logprobs.content]


def assert_same_draws(got, expected) -> None:
    assert tokens(got) == tokens(expected)
    assert_logprobs_close(logprobs(got), logprobs(expected))


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def chunked(dev_model):
    proc = start_server("--max-num-batched-tokens", str(CHUNK), "--no-enable-prefix-caching")
    yield proc
    assert proc.stop() == 0, proc.log_tail()


@pytest.fixture(scope="module")
def whole(server):
    """The session's dev-preset server (tests/conftest.py), shared with other modules."""
    return server


def assert_healthy(server, client: openai.OpenAI) -> None:
    assert server.proc.poll() is None, server.log_tail()
    assert httpx.get(server.base_url + "/ready", timeout=30).status_code == 200
    follow_up = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, seed=7, temperature=1.0
    )
    assert follow_up.choices[0].finish_reason == "length"


def test_chunked_seeded_prefill_completes_and_engine_survives(chunked):
    with client_for(chunked) as client:
        resp = seeded(client, SHORT)
        assert CHUNK < resp.usage.prompt_tokens < DEFAULT_BUDGET
        assert resp.usage.completion_tokens == MAX_TOKENS
        again = seeded(client, SHORT)  # the same seed on the same server: the same draws
        assert tokens(again) == tokens(resp)
        assert_healthy(chunked, client)


def test_long_seeded_prompt_on_default_budget_survives(whole):
    """The issue's measurement: a 2,300-token system message on the dev preset, one seeded request."""
    with client_for(whole) as client:
        resp = seeded(client, LONG, max_tokens=4)
        assert resp.usage.prompt_tokens > DEFAULT_BUDGET
        assert resp.usage.completion_tokens == 4
        assert_healthy(whole, client)


def test_chunked_prefill_samples_the_same_tokens_as_one_step(chunked, whole):
    with client_for(chunked) as in_chunks, client_for(whole) as in_one_step:
        reference = seeded(in_one_step, SHORT)
        assert CHUNK < reference.usage.prompt_tokens < DEFAULT_BUDGET
        assert tokens(seeded(in_chunks, SHORT)) == tokens(reference)
        # The comparison means something only if the seed decides the tokens at temperature 1.
        assert tokens(seeded(in_one_step, SHORT, seed=SEED + 1)) != tokens(reference)


def test_seeded_tokens_are_the_same_from_a_cold_and_a_warm_prefix_cache_and_without_one(chunked, whole):
    """Prefix caching on (the dev preset): the seeded request's prompt computed from scratch, then read
    mostly from cached blocks (Mamba state restored from a block boundary), gives the same tokens; so
    does a server without prefix caching. Both engines live on."""
    with client_for(whole) as cached, client_for(chunked) as uncached:
        cold, warm = whole.cold_then_warm(lambda salt: seeded(cached, BLOCKS, cache_salt=salt), lambda r: r.usage.prompt_tokens)
        assert_same_draws(warm, cold)
        assert_same_draws(seeded(uncached, BLOCKS), cold)
        assert tokens(seeded(cached, BLOCKS, seed=SEED + 1)) != tokens(cold)  # the seed decides them
        assert_healthy(whole, cached)
        assert_healthy(chunked, uncached)
