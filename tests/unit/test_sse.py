"""SSE framing, and the streaming response's write bound (a client that stops reading), with the
engine left out."""

import asyncio
import json

from jamba_server.http.sse import TrackedStreamingResponse, sse


def test_sse_event_is_one_line_whatever_the_content():
    payload = json.dumps({"content": "a\u2028b\u2029c\x85d\ne"}, ensure_ascii=False)
    event = sse(payload).decode()
    assert event.endswith("\n\n")
    line = event[:-2]
    assert line.splitlines() == [line]
    assert json.loads(line.removeprefix("data: "))["content"] == "a\u2028b\u2029c\x85d\ne"


def _run_stream(
    write_timeout: float, deadline_in: float | None, client_reads: bool, closing_fails: bool = False
) -> tuple[list[str | None], list[str]]:
    """Serve a never-ending stream to a client that reads (until 3 events) or never reads; returns
    the causes `on_close` got and what happened, in order."""
    closed: list[str | None] = []
    events: list[str] = []

    async def body():
        try:
            while True:
                yield b"data: x\n\n"
                await asyncio.sleep(0)
        finally:
            events.append("engine request ended")
            if closing_fails:
                raise RuntimeError("the engine is gone")

    async def cut(cause):
        events.append(f"aborted: {cause}")

    async def main():
        loop = asyncio.get_running_loop()
        deadline = None if deadline_in is None else loop.time() + deadline_in
        async def on_close(cause):
            closed.append(cause)

        response = TrackedStreamingResponse(body(), on_close, cut, write_timeout, deadline)
        sent = 0
        stuck = asyncio.Event()

        async def send(message):
            nonlocal sent
            if message["type"] == "http.response.body" and message.get("body"):
                sent += 1
                if not client_reads or sent > 3:
                    await stuck.wait()  # a full socket: the write never completes

        async def receive():
            await stuck.wait()  # the client never disconnects

        scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
        await response(scope, receive, send)

    asyncio.run(main())
    return closed, events


def test_a_client_that_stops_reading_is_cut_and_its_request_ended():
    closed, events = _run_stream(write_timeout=0.05, deadline_in=None, client_reads=True)
    assert closed == ["slow_client"]
    assert events == ["aborted: slow_client", "engine request ended"]


def test_the_deadline_bounds_writes_too():
    closed, events = _run_stream(write_timeout=3600, deadline_in=0.05, client_reads=False)
    assert closed == ["deadline"]
    assert events == ["aborted: deadline", "engine request ended"]


def test_the_slot_is_released_even_if_ending_the_engine_request_fails():
    closed, events = _run_stream(write_timeout=0.05, deadline_in=None, client_reads=True, closing_fails=True)
    assert closed == ["slow_client"]
    assert events == ["aborted: slow_client", "engine request ended"]


def test_a_client_that_reads_past_the_write_timeout_then_stops_is_cut_a_write_timeout_after():
    """Writes keep coming for longer than the write timeout (the one timer per stream re-arms for
    each later write); the write that then never completes is cut no sooner than its timeout."""
    cut_after: list[float] = []

    async def main():
        loop = asyncio.get_running_loop()
        stalled_at: list[float] = []
        stuck = asyncio.Event()

        async def body():
            while True:
                yield b"data: x\n\n"
                await asyncio.sleep(0.01)

        async def send(message):
            if message["type"] == "http.response.body" and loop.time() - started > 0.23:  # off the timer's 0.05 s phase
                stalled_at.append(loop.time())
                await stuck.wait()

        async def receive():
            await stuck.wait()

        async def cut(cause):
            cut_after.append(loop.time() - stalled_at[0])

        async def on_close(cause):
            cut_after.append(cause)

        started = loop.time()
        response = TrackedStreamingResponse(body(), on_close, cut, 0.05, None)
        await response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)

    asyncio.run(main())
    waited, cause = cut_after
    assert cause == "slow_client"
    assert 0.05 <= waited < 1.0


def test_the_last_chunk_ends_the_response_in_the_same_write():
    messages: list[dict] = []
    closed: list[str | None] = []

    async def main():
        response: TrackedStreamingResponse

        async def body():
            yield b"data: 1\n\n"
            response.sent_whole = True
            yield b"data: 2\n\ndata: [DONE]\n\n"

        async def send(message):
            messages.append(message)

        async def receive():
            await asyncio.Event().wait()

        async def on_close(cause):
            closed.append(cause)

        async def cut(cause):
            raise AssertionError("not cut")

        response = TrackedStreamingResponse(body(), on_close, cut, 1.0, None)
        await response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)

    asyncio.run(main())
    bodies = [(m["body"], m["more_body"]) for m in messages if m["type"] == "http.response.body"]
    assert bodies == [(b"data: 1\n\n", True), (b"data: 2\n\ndata: [DONE]\n\n", False)]
    assert closed == [None]
