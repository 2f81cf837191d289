"""What the routes share for one server: settings, engine adapter, admission, drain and deadlines."""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse

from jamba_server.admission import AdmissionController, Ticket, controller_for
from jamba_server.core.outputs import EngineStep
from jamba_server.core.sampling import SamplingSpec
from jamba_server.engine import EngineAdapter
from jamba_server.errors import (
    APIError,
    InvalidRequestError,
    ModelNotFoundError,
    RequestTimeoutError,
    ServiceUnavailableError,
)
from jamba_server.metrics import (
    ABORTED,
    ADMISSION_LIMIT,
    ENGINE_READY,
    GenerationMetrics,
)
from jamba_server.protocol import ErrorResponse
from jamba_server.settings import Settings

logger = logging.getLogger(__name__)
T = TypeVar("T")
TIMEOUT_HEADER = "x-request-timeout"
_SSE_DONE = b"data: [DONE]\n\n"


class ClientDisconnected(APIError):
    status_code = 499  # nginx's "client closed request"; only ever seen in logs
    default_code = "client_disconnected"


# Valid raw inside JSON strings, but line breaks to clients that split with str.splitlines()
# (httpx, openai-python): escape them so one event is always one line.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(payload: str) -> bytes:
    if "\x85" in payload or "\u2028" in payload or "\u2029" in payload:
        payload = payload.translate(_LINE_BREAKS)
    return b"data: " + payload.encode() + b"\n\n"


def sse_events(payloads: list[str]) -> bytes:
    """Several events in one write."""
    return b"".join(sse(p) for p in payloads)


class _WriteTimeout(Exception):
    """A write the client did not accept in time (not a TimeoutError: that is an OSError, which
    Starlette takes for a disconnect)."""


class TrackedStreamingResponse(StreamingResponse):
    """A streaming response that knows how it ended: sent whole, or cut (`client_disconnect`,
    `slow_client`, `deadline`); `on_close(cause)` runs exactly once however it ends.

    A client that stops reading must not hold its admission slot while the engine generates into
    memory: a write the client does not accept within `write_timeout` seconds, or by the request's
    deadline, cuts the stream; `on_cut(cause)` then aborts the engine request (uvicorn itself waits on
    a full socket forever).
    """

    def __init__(
        self,
        content: AsyncIterator[bytes],
        on_close: Callable[[str | None], None],
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

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        loop = asyncio.get_running_loop()
        cause: str | None = "client_disconnect"

        async def send_within(message: Any) -> None:
            limit = loop.time() + self._write_timeout
            try:
                async with asyncio.timeout_at(limit if self._deadline is None else min(limit, self._deadline)):
                    await send(message)
            except TimeoutError:
                raise _WriteTimeout from None

        try:
            await super().__call__(scope, receive, send_within)
            if self.sent_whole:
                cause = None
        except _WriteTimeout:
            past_deadline = self._deadline is not None and loop.time() >= self._deadline
            cause = "deadline" if past_deadline else "slow_client"
            logger.warning("stream cut: the client did not accept data (%s)", cause)
        finally:
            try:
                if cause in ("slow_client", "deadline"):
                    await self._on_cut(cause)
                await self.body_iterator.aclose()  # ends the engine request now, not at garbage collection
            except Exception:
                logger.exception("closing a stream's engine request failed")
            finally:
                self._on_close(cause)


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


class ServerState:
    def __init__(self, settings: Settings, adapter: EngineAdapter):
        self.settings = settings
        self.adapter = adapter
        self.chat_template = settings.chat_template_text()
        self.model_name = settings.public_model_name
        self.model_aliases = {self.model_name, settings.model}
        self.start_error: BaseException | None = None
        self.admission: AdmissionController = controller_for(settings, None)
        self.started = False

    def engine_started(self) -> None:
        """Size admission to the engine, then open for requests. Readiness waits for this, not
        for the adapter alone: a request admitted before the swap would be invisible to the
        running gauge and to the drain."""
        draining = self.admission.draining  # a SIGTERM may have come while the model loaded
        self.admission = controller_for(self.settings, self.adapter.max_num_seqs)
        if draining:
            self.admission.start_draining()
        ADMISSION_LIMIT.labels("running").set(self.admission.max_running)
        ADMISSION_LIMIT.labels("queued").set(self.admission.max_queued)
        self.started = True
        ENGINE_READY.set_function(lambda: 1.0 if self.adapter.ready else 0.0)

    # -------------------------------------------------------------- checks

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.model_aliases:
            raise ModelNotFoundError(
                f"The model `{name}` does not exist. This server serves `{self.model_name}`.",
                param="model",
            )

    def check_ready(self) -> None:
        if self.adapter.dead:
            raise ServiceUnavailableError("The engine has failed; the server is restarting.")
        if self.start_error is not None:
            raise ServiceUnavailableError("The engine failed to start; the server is restarting.")
        if not self.started or not self.adapter.ready:
            raise ServiceUnavailableError("The model is still loading; retry shortly.")
        if self.admission.draining:
            raise ServiceUnavailableError(
                "The server is shutting down; retry on another replica.",
                code="shutting_down",
                headers={"Retry-After": str(self.settings.retry_after_seconds)},
            )

    def deadline(self, request: Request) -> float | None:
        """The request's deadline: X-Request-Timeout can shorten the operator's `request_timeout`,
        never extend it."""
        raw = request.headers.get(TIMEOUT_HEADER)
        timeout = self.settings.request_timeout
        if raw is not None:
            try:
                asked = float(raw)
            except ValueError:
                asked = -1.0
            if not 0 < asked < 1e7:
                raise InvalidRequestError(
                    "X-Request-Timeout must be a positive number of seconds", param="X-Request-Timeout"
                )
            timeout = asked if timeout is None else min(asked, timeout)
        return None if timeout is None else asyncio.get_running_loop().time() + timeout

    # -------------------------------------------------------------- running requests

    async def _admit(self, tokens: int, sequences: int, deadline: float | None) -> Ticket:
        try:
            async with asyncio.timeout_at(deadline):
                return await self.admission.acquire(tokens, sequences)
        except TimeoutError:
            ABORTED.labels("deadline").inc()
            raise RequestTimeoutError("The request timed out waiting for capacity.") from None

    @staticmethod
    def _budget(prompt_ids: list[int], spec: SamplingSpec) -> int:
        return len(prompt_ids) + spec.max_tokens * spec.n

    async def collect(
        self,
        request: Request,
        request_id: str,
        prompt_ids: list[int],
        spec: SamplingSpec,
        on_step: Callable[[EngineStep], Any],
        metrics: GenerationMetrics,
    ) -> None:
        """Run a non-streaming request to the end, feeding every step to `on_step`."""
        deadline = self.deadline(request)

        async def run() -> None:
            ticket = await self._admit(self._budget(prompt_ids, spec), spec.n, deadline)
            metrics.admitted()
            try:
                async with aclosing(self.adapter.generate(prompt_ids, spec, request_id, deadline)) as steps:
                    async for step in steps:
                        metrics.step(step)
                        on_step(step)
            finally:
                ticket.issuer.release(ticket)

        await until_disconnect(request, run())

    async def stream(
        self,
        request: Request,
        request_id: str,
        prompt_ids: list[int],
        spec: SamplingSpec,
        on_step: Callable[[EngineStep], list[str]],
        opening: str | None,
        closing: Callable[[], str] | None,
        metrics: GenerationMetrics,
        on_finish: Callable[[], None] | None = None,
    ) -> TrackedStreamingResponse:
        """Admit and start the request, then stream it as SSE. Errors before the first engine
        output are HTTP errors; later ones end the stream with an error event.

        `on_step` turns a step into serialized chunks. Chunks that are ready together go out in
        one write: the opening with the first step's, the last step's with usage and `[DONE]`."""
        deadline = self.deadline(request)

        async def start() -> tuple[Ticket, AsyncIterator[EngineStep], EngineStep | None]:
            ticket = await self._admit(self._budget(prompt_ids, spec), spec.n, deadline)
            metrics.admitted()
            steps = self.adapter.generate(prompt_ids, spec, request_id, deadline)
            try:
                first = await anext(steps, None)
            except BaseException:
                await steps.aclose()
                ticket.issuer.release(ticket)
                raise
            if first is not None:
                metrics.step(first)
            return ticket, steps, first

        ticket, steps, first = await until_disconnect(request, start())

        async def events() -> AsyncIterator[bytes]:
            pending = [opening] if opening is not None else []
            try:
                step = first
                while step is not None:
                    pending += on_step(step)
                    if not step.finished and pending:
                        yield sse_events(pending)
                        pending = []
                    step = await anext(steps, None)
                    if step is not None:
                        metrics.step(step)
                if closing is not None:
                    pending.append(closing())
            except APIError as exc:
                logger.warning("stream %s ended with error: %s", request_id, exc.message)
                pending.append(ErrorResponse.model_validate(exc.envelope()).model_dump_json())
            finally:
                await steps.aclose()
            if on_finish is not None:
                on_finish()  # before the last write, which emits the access-log line
            response.sent_whole = True
            yield sse_events(pending) + _SSE_DONE

        async def cut(cause: str) -> None:
            await self.adapter.abort(request_id, cause)  # counted there, once, if it was still running

        def closed(cause: str | None) -> None:
            if cause == "client_disconnect":
                ABORTED.labels(cause).inc()
            ticket.issuer.release(ticket)

        response = TrackedStreamingResponse(
            events(), closed, cut, write_timeout=self.settings.stream_write_timeout, deadline=deadline
        )
        return response

    # -------------------------------------------------------------- shutdown

    async def drain(self) -> None:
        """Stop admitting, let in-flight requests finish (up to drain_timeout), abort the rest."""
        self.admission.start_draining()
        loop = asyncio.get_running_loop()
        logger.info("draining: %d requests in flight", self.admission.in_flight)
        give_up = loop.time() + self.settings.drain_timeout
        while self.admission.in_flight and loop.time() < give_up:
            await asyncio.sleep(0.05)
        if self.admission.in_flight:
            aborted = await self.adapter.abort_all("shutdown")
            logger.warning("drain timeout: aborted %d engine requests", aborted)
            settle = loop.time() + 5.0
            while self.admission.in_flight and loop.time() < settle:
                await asyncio.sleep(0.05)
        logger.info("drained")
