"""Server-sent events: framing, a streaming response that bounds every write and knows how it
ended, and cancelling work whose client has gone."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Send

from jamba_server.errors import APIError, ClientDisconnected
from jamba_server.metrics import ABORTED
from jamba_server.protocol import ErrorResponse

logger = logging.getLogger(__name__)
T = TypeVar("T")
SSE_DONE = b"data: [DONE]\n\n"


# Valid raw inside JSON strings, but line breaks to clients that split with str.splitlines()
# (httpx, openai-python): escape them so one event is always one line.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(payload: str) -> bytes:
    return b"data: " + _one_line_json(payload).encode() + b"\n\n"


def sse_events(payloads: list[str]) -> bytes:
    """Several events in one write."""
    return b"".join(sse(p) for p in payloads)


def named_events(frames: list[str]) -> bytes:
    """Several `event: NAME\ndata: JSON` events (Anthropic's stream) in one write."""
    return b"".join(_one_line_json(f).encode() + b"\n\n" for f in frames)


def _one_line_json(frame: str) -> str:
    if "\x85" in frame or "\u2028" in frame or "\u2029" in frame:
        frame = frame.translate(_LINE_BREAKS)
    return frame


@dataclass(frozen=True)
class Framing:
    """How a protocol writes its stream: several events in one write, what follows the last event,
    and the event an error mid-stream becomes."""

    write: Callable[[list[str]], bytes]
    end: bytes
    error_event: Callable[[APIError], str]


FRAMINGS = {
    "openai": Framing(sse_events, SSE_DONE, lambda exc: ErrorResponse.model_validate(exc.envelope()).model_dump_json()),
    "anthropic": Framing(
        named_events,
        b"",
        lambda exc: "event: error\ndata: " + json.dumps(exc.anthropic_envelope(), ensure_ascii=False, separators=(",", ":")),
    ),
    # The Responses API's typed events; its renderers end a failed stream themselves (response.failed).
    "responses": Framing(
        named_events,
        b"",
        lambda exc: "event: error\ndata: " + json.dumps({"type": "error", **exc.envelope()["error"]}, separators=(",", ":")),
    ),
}


class _WriteTimeout(Exception):
    """A write the client did not accept in time (not a TimeoutError: that is an OSError, which
    Starlette takes for a disconnect)."""


class _WriteWatch:
    """Bounds each write of one stream (by `write_timeout` after it began, and by the deadline)
    with one timer per stream, re-armed only when it fires, instead of a timeout per write: a
    timer per chunk was a measurable part of the API process's CPU per streamed token.

    `begin`/`end` bracket a write; a write still pending at its limit gets its task cancelled,
    which `cut` (called where the write's CancelledError lands) turns into `_WriteTimeout`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, write_timeout: float, deadline: float | None):
        self._loop = loop
        self._write_timeout = write_timeout
        self._deadline = deadline
        self._since: float | None = None  # when the pending write began
        self._timer: asyncio.TimerHandle | None = None
        self._writer: asyncio.Task | None = None
        self._fired = False

    def begin(self) -> None:
        self._since = self._loop.time()
        if self._timer is None:
            self._writer = asyncio.current_task()
            self._timer = self._loop.call_at(self._limit(self._since), self._check)

    def end(self) -> None:
        self._since = None

    def cut(self) -> bool:
        """Whether a CancelledError in a write is this watch's (and so a write timeout)."""
        return self._fired and self._writer is not None and self._writer.uncancel() == 0

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _limit(self, since: float) -> float:
        limit = since + self._write_timeout
        return limit if self._deadline is None else min(limit, self._deadline)

    def _check(self) -> None:
        self._timer = None
        if self._since is None:
            return  # no write pending: the next one arms the timer again
        if self._loop.time() < self._limit(self._since):
            self._timer = self._loop.call_at(self._limit(self._since), self._check)  # a later write
        elif self._writer is not None:
            self._fired = True
            self._writer.cancel()


class TrackedStreamingResponse(StreamingResponse):
    """A streaming response that knows how it ended: sent whole, or cut (`client_disconnect`,
    `slow_client`, `deadline`); `on_close(cause)` runs exactly once however it ends.

    A client that stops reading must not hold its admission slot while the engine generates into
    memory: a write the client does not accept within `write_timeout` seconds, or by the request's
    deadline, cuts the stream; `on_cut(cause)` then aborts the engine request (uvicorn itself waits on
    a full socket forever).

    The body's last chunk (the iterator sets `sent_whole` before yielding it) ends the response in
    the same write, not in one more empty one.
    """

    def __init__(
        self,
        content: AsyncIterator[bytes],
        on_close: Callable[[str | None], Awaitable[None]],
        on_cut: Callable[[str], Awaitable[None]],
        write_timeout: float,
        deadline: float | None,
    ):
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close
        self._on_cut = on_cut
        self._write_timeout = write_timeout
        self._deadline = deadline
        self.sent_whole = False

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            await send({"type": "http.response.body", "body": chunk, "more_body": not self.sent_whole})
        if not self.sent_whole:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        loop = asyncio.get_running_loop()
        watch = _WriteWatch(loop, self._write_timeout, self._deadline)
        cause: str | None = "client_disconnect"

        async def send_within(message: Any) -> None:
            watch.begin()
            try:
                await send(message)
            except asyncio.CancelledError:
                if watch.cut():
                    raise _WriteTimeout from None
                raise
            finally:
                watch.end()

        try:
            await super().__call__(scope, receive, send_within)
            if self.sent_whole:
                cause = None
        except _WriteTimeout:
            past_deadline = self._deadline is not None and loop.time() >= self._deadline
            cause = "deadline" if past_deadline else "slow_client"
            logger.warning("stream cut: the client did not accept data (%s)", cause)
        finally:
            watch.close()
            try:
                if cause in ("slow_client", "deadline"):
                    await self._on_cut(cause)
                await self.body_iterator.aclose()  # ends the engine request now, not at garbage collection
            except Exception:
                logger.exception("closing a stream's engine request failed")
            finally:
                await self._on_close(cause)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it (and so aborting its engine request) if the client goes away."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
    if task.cancelled() or not task.done():
        await asyncio.gather(task, return_exceptions=True)
        ABORTED.labels("client_disconnect").inc()
        raise ClientDisconnected("The client closed the connection.")
    return task.result()
