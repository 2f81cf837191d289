"""ServerState's deadlines and the streaming response's write bound, with the engine left out."""

import asyncio

import pytest
from starlette.requests import Request

from jamba_server.errors import InvalidRequestError
from jamba_server.lifecycle import ServerState, TrackedStreamingResponse
from jamba_server.settings import Settings


def _request(headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw})


def _state(**settings) -> ServerState:
    return ServerState(Settings(model="m", **settings), adapter=None)


def _seconds_left(state: ServerState, headers: dict[str, str]) -> float | None:
    async def left():
        deadline = state.deadline(_request(headers))
        return None if deadline is None else deadline - asyncio.get_running_loop().time()

    return asyncio.run(left())


def test_header_may_shorten_the_servers_timeout_but_never_extend_it():
    state = _state(request_timeout=5)
    assert _seconds_left(state, {"X-Request-Timeout": "1000000"}) <= 5
    assert _seconds_left(state, {"X-Request-Timeout": "2"}) <= 2
    assert _seconds_left(state, {}) <= 5
    assert 900 < _seconds_left(_state(), {"X-Request-Timeout": "1000"}) <= 1000
    assert _seconds_left(_state(), {}) is None


@pytest.mark.parametrize("raw", ["0", "-1", "nan", "inf", "1e7", "soon"])
def test_header_must_be_a_positive_number(raw):
    with pytest.raises(InvalidRequestError):
        _seconds_left(_state(request_timeout=5), {"X-Request-Timeout": raw})


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
        response = TrackedStreamingResponse(body(), closed.append, cut, write_timeout, deadline)
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
