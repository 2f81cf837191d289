"""Soak: 2,500 streams at 64 concurrent (about a minute here); every stream completes and is
valid, and the server's memory stays bounded. A fixed number of streams, not a fixed time, so the
leak the bound can see does not depend on the machine's speed. Streams are short (`TOKENS`): what a
leak would keep is per request and per chunk, and a stream of 8 tokens still has its role chunk,
content chunks, finish, usage and `[DONE]`; longer streams only cost CI time in decoding."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import psutil

from tests.support import MODEL_NAME

CONCURRENCY = 64
STREAMS = 2_500
WARM_UP_STREAMS = 4 * CONCURRENCY
# The server keeps no per-request state once a request ends, so after a warm-up round (allocator
# pools, tokenizer and grammar caches, uvicorn buffers at full concurrency) RSS should be flat. The
# bound allows allocator fragmentation and CPython's arenas under 64 concurrent streams; a leak of
# 27 KiB per request would exceed it.
MAX_RSS_GROWTH_MB = 64
TOKENS = 8
BODY = {
    "model": MODEL_NAME, "messages": [{"role": "user", "content": "Tell me something."}], "max_tokens": TOKENS,
    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "temperature": 1.0,
}  # fmt: skip


async def one_stream(client: httpx.AsyncClient) -> None:
    async with client.stream("POST", "/v1/chat/completions", json=BODY) as resp:
        assert resp.status_code == 200
        events = [line[6:] async for line in resp.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == TOKENS
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] == "length") == 1


def exception_chain(exc: BaseException | None) -> str:
    """Every exception in a chain, outermost first: a transport error's root (errno) shows in CI's
    truncated output."""
    links = []
    while exc is not None and len(links) < 8:
        links.append(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc!r}")
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(links)


async def run_streams(base_url: str, count: int) -> None:
    """`count` streams, `CONCURRENCY` at a time."""
    started = time.monotonic()
    remaining = count
    done = 0
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            nonlocal remaining, done
            while remaining > 0:
                remaining -= 1
                try:
                    await one_stream(client)
                except httpx.TransportError as exc:
                    raise AssertionError(
                        f"a stream failed {time.monotonic() - started:.1f}s into the run, after {done} completed: "
                        f"{exception_chain(exc)}"
                    ) from exc
                done += 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    assert done == count


def test_soak_64_streams(server):
    process = psutil.Process(server.proc.pid)
    asyncio.run(run_streams(server.base_url, WARM_UP_STREAMS))
    before = process.memory_info().rss
    started = time.monotonic()
    asyncio.run(run_streams(server.base_url, STREAMS))
    took = time.monotonic() - started
    after = process.memory_info().rss
    growth_mb = (after - before) / 2**20
    print(f"soak: {STREAMS} streams in {took:.0f}s at concurrency {CONCURRENCY}; "
          f"RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB ({growth_mb:+.1f} MiB)")  # fmt: skip
    assert growth_mb < MAX_RSS_GROWTH_MB
