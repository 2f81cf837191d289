"""Soak: 64 concurrent streams for about a minute; every stream completes and is valid, and the
server's memory stays bounded."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import psutil

from tests.conftest import MODEL_NAME

CONCURRENCY = 64
DURATION_S = 60.0
# The server keeps no per-request state once a request ends, so after a warm-up round (allocator
# pools, tokenizer and grammar caches, uvicorn buffers at full concurrency) RSS should be flat. The
# bound allows allocator fragmentation and CPython's arenas under 64 concurrent streams; a leak of even
# 10 KiB per request (~8,000 requests here) would exceed it.
MAX_RSS_GROWTH_MB = 64
BODY = {
    "model": MODEL_NAME, "messages": [{"role": "user", "content": "Tell me something."}], "max_tokens": 24,
    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "temperature": 1.0,
}  # fmt: skip


async def one_stream(client: httpx.AsyncClient) -> None:
    async with client.stream("POST", "/v1/chat/completions", json=BODY) as resp:
        assert resp.status_code == 200
        events = [line[6:] async for line in resp.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == 24
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] == "length") == 1


def exception_chain(exc: BaseException | None) -> str:
    """Every exception in a chain, outermost first: a transport error's root (errno) shows in CI's
    truncated output."""
    links = []
    while exc is not None and len(links) < 8:
        links.append(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc!r}")
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(links)


async def run_for(base_url: str, seconds: float) -> int:
    done = 0
    started = time.monotonic()
    deadline = started + seconds
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                try:
                    await one_stream(client)
                except httpx.TransportError as exc:
                    raise AssertionError(
                        f"a stream failed {time.monotonic() - started:.1f}s into the run, after {done} completed: "
                        f"{exception_chain(exc)}"
                    ) from exc
                done += 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return done


def test_soak_64_streams(server):
    process = psutil.Process(server.proc.pid)
    asyncio.run(run_for(server.base_url, 10.0))  # warm-up at full concurrency
    before = process.memory_info().rss
    completed = asyncio.run(run_for(server.base_url, DURATION_S))
    after = process.memory_info().rss
    growth_mb = (after - before) / 2**20
    print(f"soak: {completed} streams in {DURATION_S:.0f}s at concurrency {CONCURRENCY}; "
          f"RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB ({growth_mb:+.1f} MiB)")  # fmt: skip
    assert completed >= CONCURRENCY
    assert growth_mb < MAX_RSS_GROWTH_MB
