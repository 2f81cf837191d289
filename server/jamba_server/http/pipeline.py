"""The one generation pipeline, whatever the wire protocol: a route checks the model and readiness
(`begin_generation`), prepares its protocol's `GenerationJob` (`prepare_job`, off the event loop when
large) and hands it to `run_job`, which names the request, meters it, runs it on the engine through
the runner and streams or collects the protocol's output with the job's renderers.

`collect` and `stream` hold the HTTP side of running a request: a client that goes away cancels
its work; a stream's first engine step comes before its headers, so errors until then are HTTP
errors and later ones an error event.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, AsyncIterator, Callable

from starlette.requests import Request

from jamba_server.core.outputs import EngineStep
from jamba_server.core.prepare import GenerationJob
from jamba_server.core.tenancy import scoped_cache_salt
from jamba_server.errors import APIError, InvalidRequestError
from jamba_server.http.middleware import request_info, request_tenant
from jamba_server.http.sse import FRAMINGS, Framing, TrackedStreamingResponse, until_disconnect
from jamba_server.metrics import ABORTED
from jamba_server.runtime.generation import engine_request_for, prepare_sized, record_result, run_to_end
from jamba_server.runtime.runner import EngineRequest, Runner
from jamba_server.runtime.server import Server

logger = logging.getLogger(__name__)

TIMEOUT_HEADER = "x-request-timeout"


def server_of(request: Request) -> Server:
    return request.app.state.server


def note(request: Request, **fields: Any) -> None:
    """Facts for the request's access-log line."""
    request_info(request.scope).update(fields)


def begin_generation(request: Request, server: Server, model: str | None) -> None:
    """Checks every generation request passes first, cheapest first, before any tokenizing."""
    note(request, model=server.model_name)
    server.check_model(model)
    request_timeout_s(request, server.settings.request_timeout)
    server.readiness.check()
    server.admission.check_open()


async def prepare_job(request: Request, prepare: Callable[..., Any], *args: Any) -> Any:
    """`prepare(*args)`, in a worker thread when the body is large (or has no length)."""
    length = request.headers.get("content-length", "")
    return await prepare_sized(int(length) if length.isdigit() else None, prepare, *args)


def request_deadline(request: Request, request_timeout: float | None) -> float | None:
    """The request's deadline (event-loop time), from now."""
    timeout = request_timeout_s(request, request_timeout)
    return None if timeout is None else asyncio.get_running_loop().time() + timeout


def request_timeout_s(request: Request, request_timeout: float | None) -> float | None:
    """X-Request-Timeout can shorten the operator's `request_timeout`, never extend it."""
    raw = request.headers.get(TIMEOUT_HEADER)
    timeout = request_timeout
    if raw is not None:
        try:
            asked = float(raw)
        except ValueError:
            asked = -1.0
        if not 0 < asked < 1e7:
            raise InvalidRequestError("X-Request-Timeout must be a positive number of seconds", param="X-Request-Timeout")
        timeout = asked if timeout is None else min(asked, timeout)
    return timeout


async def run_job(request: Request, server: Server, job: GenerationJob) -> Any:
    # Every protocol's job passes here: its prefix-cache salt becomes its tenant's (core/tenancy.py).
    job = replace(job, cache_salt=scoped_cache_salt(job.cache_salt, request_tenant(request.scope)))
    deadline = request_deadline(request, server.settings.request_timeout)
    request_id, engine_request = engine_request_for(server, job, request_info(request.scope)["arrived"], deadline)
    prompt_ids = job.prompt.token_ids
    note(request, engine_request_id=request_id, prompt_tokens=job.prompt_tokens, stream=job.stream)
    if job.stream:
        streamer = job.renderers.streamer(request_id, server.model_name)
        events = EventSource(
            on_step=streamer.step,
            opening=job.renderers.opening(streamer),
            closing=partial(job.renderers.closing, streamer),
            on_finish=_outcome(request, server, job, streamer),
            framing=FRAMINGS[job.renderers.protocol],
            on_error=partial(job.renderers.failed, streamer) if job.renderers.failed else None,
        )
        return await stream(request, server.runner, engine_request, events, server.settings.stream_write_timeout)
    result = job.renderers.accumulator(request_id, server.model_name)
    await collect(request, server.runner, engine_request, result.add)
    response = result.build(prompt_ids if job.return_token_ids else None)
    _outcome(request, server, job, result)()
    return response


def _outcome(request: Request, server: Server, job: GenerationJob, result: Any) -> Callable[[], None]:
    """At the end of a request: outcome metrics, token counts for the access-log line, and prompt
    and raw outputs with `log_request_content`."""

    def record() -> None:
        record_result(server, job, result)
        note(request, completion_tokens=result.usage().completion_tokens)
        if server.settings.log_request_content:
            note(request, prompt=job.prompt.text, outputs=["".join(c.text) for c in result.choices])

    return record


async def collect(request: Request, runner: Runner, engine_request: EngineRequest, on_step: Callable[[EngineStep], Any]) -> None:
    """Run a non-streaming request to the end; a client that goes away cancels it."""
    await until_disconnect(request, run_to_end(runner, engine_request, on_step))


@dataclass(frozen=True)
class EventSource:
    """A protocol's stream: serialized events for each step, opening events (sent with the first
    step's), closing ones (after the last), `on_finish` before the last write, and the protocol's
    framing."""

    on_step: Callable[[EngineStep], list[str]]
    opening: list[str] = field(default_factory=list)
    closing: Callable[[], list[str]] | None = None
    on_finish: Callable[[], None] | None = None
    framing: Framing = FRAMINGS["openai"]
    on_error: Callable[[APIError], list[str]] | None = None  # the protocol's own end of a failed stream


async def stream(
    request: Request, runner: Runner, engine_request: EngineRequest, source: EventSource, write_timeout: float
) -> TrackedStreamingResponse:
    """Admit and start the request, then stream it as SSE. Events that are ready together go out in
    one write: the opening with the first step's, the last step's with the closing and the end
    marker (OpenAI's `[DONE]`)."""

    async def start() -> tuple[Any, EngineStep | None]:
        running = await runner.start(engine_request)
        try:
            return running, await anext(running.steps, None)
        except BaseException:
            await running.close()
            raise

    running, first = await until_disconnect(request, start())

    async def events() -> AsyncIterator[bytes]:
        framing = source.framing
        pending = list(source.opening)
        try:
            step = first
            while step is not None:
                pending += source.on_step(step)
                if not step.finished and pending:
                    yield framing.write(pending)
                    pending = []
                step = await anext(running.steps, None)
            if source.closing is not None:
                pending += source.closing()
        except APIError as exc:
            logger.warning("stream %s ended with error: %s", engine_request.request_id, exc.message)
            pending += source.on_error(exc) if source.on_error else [framing.error_event(exc)]
        finally:
            await running.steps.aclose()
        if source.on_finish is not None:
            source.on_finish()  # before the last write, which emits the access-log line
        response.sent_whole = True
        yield framing.write(pending) + framing.end

    async def cut(cause: str) -> None:
        for request_id in engine_request.request_ids:  # each counted there, once, if still running
            await runner.engine.abort(request_id, cause)

    async def closed(cause: str | None) -> None:
        if cause == "client_disconnect":
            ABORTED.labels(cause).inc()
        # Ends the engine request too: if the client left before the first write, events() never
        # started and so never closed the steps.
        await running.close()

    response = TrackedStreamingResponse(
        events(), closed, cut, write_timeout=write_timeout, deadline=engine_request.deadline
    )
    return response
