"""Tenant isolation of the prefix cache (core/tenancy.py) on a real engine with prefix caching on:
keys do not share cached blocks unless a group joins them, and a request's own cache_salt does not
reach another tenant's. Read through vLLM's prefix-cache counters on /metrics, one server for all."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from tests.support import MODEL_NAME, sample, start_server, wait_for

A, B, C = "sk-tenant-a-0123456789abcdef", "sk-tenant-b-0123456789abcdef", "sk-tenant-c-0123456789abcdef"
TEAM = ",".join(hashlib.sha256(key.encode()).hexdigest() for key in (A, C))  # A and C share; B is alone
# Several of the engine's cache blocks (128 tokens on the CPU dev engine) of one prompt.
PROMPT = " ".join(f"item{i}" for i in range(150))
MESSAGES = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def server(dev_model):
    proc = start_server(
        "--enable-prefix-caching", "--api-key", A, "--api-key", B, "--api-key", C,
        "--prefix-cache-isolation", "group", "--prefix-cache-group", f"team={TEAM}",
    )  # fmt: skip
    yield proc
    assert proc.stop() == 0, proc.log_tail()


@pytest.fixture(scope="module")
def cached(server):
    """`cached(path, key, body)`: sends the request and returns how many of its prompt tokens the
    engine found in its prefix cache (vLLM's counters, once they count this request)."""

    def counters() -> tuple[float, float]:
        text = server.metrics_text()
        return sample(text, "vllm:prefix_cache_queries_total"), sample(text, "vllm:prefix_cache_hits_total")

    def send(path: str, key: str, body: dict) -> float:
        queries, hits = counters()
        headers = {"x-api-key": key} if path == "/v1/messages" else {"Authorization": f"Bearer {key}"}
        response = httpx.post(server.base_url + path, json={"model": MODEL_NAME, **body}, headers=headers, timeout=300)
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        prompt_tokens = usage.get("prompt_tokens", usage.get("input_tokens"))
        wait_for(lambda: counters()[0] >= queries + prompt_tokens, 60, "vLLM counting the request's prompt")
        assert counters()[0] == queries + prompt_tokens, "another request ran meanwhile"
        return counters()[1] - hits

    return send


def test_keys_do_not_share_cached_blocks_unless_grouped(cached):
    completion = {"prompt": PROMPT, "max_tokens": 1}
    assert cached("/v1/completions", A, completion) == 0
    warm = cached("/v1/completions", A, completion)
    assert warm >= 256, "the same key's second request hits its cached blocks"
    assert cached("/v1/completions", B, completion) == 0  # another key: nothing of A's
    assert cached("/v1/completions", C, completion) == warm  # C is in A's group: A's blocks


def test_a_request_salt_stays_within_its_tenant(cached):
    salted = {"prompt": PROMPT, "max_tokens": 1, "cache_salt": "shared-salt"}
    assert cached("/v1/completions", A, salted) == 0  # a salt of its own: not A's unsalted blocks
    assert cached("/v1/completions", B, salted) == 0  # the same salt from B: not A's salted blocks
    assert cached("/v1/completions", C, salted) > 0  # but the group's
    assert cached("/v1/completions", B, salted) > 0  # and B's own


def test_chat_and_messages_are_isolated_too(cached):
    assert cached("/v1/chat/completions", A, {"messages": MESSAGES, "max_tokens": 1}) == 0
    # The Messages API renders the same prompt: C shares A's group, B does not.
    assert cached("/v1/messages", C, {"messages": MESSAGES, "max_tokens": 1}) > 0
    assert cached("/v1/messages", B, {"messages": MESSAGES, "max_tokens": 1}) == 0
