"""Admission control against the production server (4 slots, 4 queued): a burst gets only 200s and
429s, and each choice counts as an engine sequence."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.e2e.production.config import AUTH, MSG, QUEUE, SLOTS, chat_body
from tests.support import MODEL_NAME


def test_burst_gets_only_200s_and_429s(server):
    """The burst arrives while the engine is paused, so no admitted request can finish and free a
    slot before the last one arrives, however fast the machine."""
    burst = 24
    admitted = SLOTS + QUEUE

    async def fire():
        limits = httpx.Limits(max_connections=burst, max_keepalive_connections=burst)
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH, timeout=300, limits=limits) as client:
            body = chat_body(max_tokens=32, ignore_eos=True, temperature=0)
            with server.engine_paused():
                requests = [asyncio.create_task(client.post("/v1/chat/completions", json=body)) for _ in range(burst)]
                while sum(r.done() for r in requests) < burst - admitted:
                    await asyncio.wait(requests, timeout=0.05)
                assert server.metric("jamba_requests_running") == SLOTS, server.request_gauges()
                assert server.metric("jamba_requests_queued") == QUEUE, server.request_gauges()
                tokenize = await client.post("/tokenize", json={"model": MODEL_NAME, "messages": MSG})
                assert tokenize.status_code == 429, "/tokenize passes the same admission gate"
            return await asyncio.gather(*requests)

    responses = asyncio.run(fire())
    statuses = [r.status_code for r in responses]
    ok = [r for r in responses if r.status_code == 200]
    rejected = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(rejected) == burst, statuses
    assert len(ok) == admitted, statuses  # exactly what the limits admit, not fewer
    for r in rejected:
        assert r.headers["Retry-After"] == "2"
        assert r.json()["error"]["type"] == "rate_limit_exceeded"
    for r in ok:
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 32
    print(f"burst {burst}: {len(ok)} x 200, {len(rejected)} x 429")


def test_choices_count_as_engine_sequences(server):
    """Two requests with n=2 fill the 4 engine slots (vLLM runs each choice as a sequence); a third
    request waits in the queue. Sent while the engine is paused, so none can finish meanwhile."""

    async def until(predicate, what):
        for _ in range(600):
            if predicate():
                return
            await asyncio.sleep(0.05)
        pytest.fail(f"{what}: {server.request_gauges()}")

    async def fire():
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH, timeout=300) as client:
            with server.engine_paused():
                pairs = [
                    asyncio.create_task(client.post("/v1/chat/completions", json=chat_body(n=2, max_tokens=8, ignore_eos=True)))
                    for _ in range(2)
                ]
                await until(lambda: server.metric("jamba_requests_running") == 2, "the two n=2 requests admitted")
                single = asyncio.create_task(client.post("/v1/chat/completions", json=chat_body(max_tokens=8)))
                await until(lambda: server.metric("jamba_requests_queued") == 1, "the third request queued")
                assert server.metric("jamba_requests_running") == 2, server.request_gauges()
            return await asyncio.gather(*pairs, single)

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert [len(r.json()["choices"]) for r in responses] == [2, 2, 1]
