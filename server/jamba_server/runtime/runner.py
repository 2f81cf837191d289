"""Running requests on the engine: admit → generate → release, and the drain.

The invariant every caller relies on: an admitted request's ticket is released exactly once and its
engine request is ended, however the request ends (finished, failed, past its deadline, its client
gone, cancelled while queued, aborted by a drain). `RunningRequest.close` does both and may be
called any number of times; nothing between admission and the caller holding a `RunningRequest`
awaits, so a cancellation cannot strand a ticket.

A multi-prompt request (`EngineRequest.more`) is one engine request per prompt, admitted together
on one ticket and run concurrently; their steps merge into the request's (`batch_step`), and any
one failing, or the request ending early, ends them all.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from contextlib import aclosing
from typing import Any, AsyncIterator, Protocol

from jamba_server.core.outputs import EngineStep, batch_step
from jamba_server.core.sampling import SamplingSpec
from jamba_server.errors import RequestTimeoutError
from jamba_server.metrics import ABORTED
from jamba_server.runtime.admission import AdmissionController, Ticket
from jamba_server.runtime.backend import Engine

logger = logging.getLogger(__name__)


class StepObserver(Protocol):
    """Told when the request is admitted and of each engine step (the request's metrics)."""

    def admitted(self) -> None: ...

    def step(self, step: EngineStep) -> None: ...


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_ids: list[int]
    spec: SamplingSpec
    params: Any  # the engine's parameters for `spec` (`Engine.engine_params`)
    deadline: float | None  # event-loop time
    observer: StepObserver
    priority: int = 0  # lower first: orders admission's queue and the engine's
    cache_salt: str | None = None
    stream: bool = False  # a client reads the steps as they come (the engine may gather tokens per step)
    # A multi-prompt request's other prompts (their own ids, specs, params), run with this one.
    more: tuple[EngineRequest, ...] = ()

    @property
    def parts(self) -> tuple[EngineRequest, ...]:
        return (self, *self.more)

    @property
    def request_ids(self) -> list[str]:
        return [part.request_id for part in self.parts]

    @property
    def budget(self) -> int:
        """What admission counts against `max_tokens_in_flight`: prompts plus every choice's maximum."""
        return sum(len(p.prompt_ids) + p.spec.max_tokens * p.spec.n for p in self.parts)

    @property
    def sequences(self) -> int:
        return sum(p.spec.n for p in self.parts)


@dataclass(eq=False)
class RunningRequest:
    """An admitted request: its engine steps, and `close()` to end it and give back its slot."""

    steps: AsyncIterator[EngineStep]
    ticket: Ticket = field(repr=False)

    def release(self) -> None:
        self.ticket.issuer.release(self.ticket)  # idempotent

    async def close(self) -> None:
        try:
            await self.steps.aclose()  # ends the engine request now, not at garbage collection
        finally:
            self.release()


class Runner:
    def __init__(self, engine: Engine, admission: AdmissionController, drain_timeout: float):
        self.engine = engine
        self.admission = admission
        self.drain_timeout = drain_timeout

    async def start(self, request: EngineRequest) -> RunningRequest:
        """Wait for admission (up to the deadline: 504), then start the engine request."""
        try:
            async with asyncio.timeout_at(request.deadline):
                ticket = await self.admission.acquire(request.budget, request.sequences, request.priority)
        except TimeoutError:
            ABORTED.labels("deadline").inc()
            raise RequestTimeoutError("The request timed out waiting for capacity.") from None
        request.observer.admitted()
        return RunningRequest(self._observed(request), ticket)

    def _generate(self, request: EngineRequest) -> AsyncIterator[EngineStep]:
        return self.engine.generate(
            request.prompt_ids, request.params, request.request_id, request.deadline,
            priority=request.priority, cache_salt=request.cache_salt, stream=request.stream,
        )  # fmt: skip

    async def _observed(self, request: EngineRequest) -> AsyncIterator[EngineStep]:
        steps = self._merged(request) if request.more else self._generate(request)
        try:
            async for step in steps:
                request.observer.step(step)
                yield step
        finally:
            await steps.aclose()

    async def _merged(self, request: EngineRequest) -> AsyncIterator[EngineStep]:
        """Every prompt's steps as the request's, in the order they come. A failing prompt ends the
        others; closing this ends them all (each engine request closed before this returns)."""
        parts = request.parts
        arrivals: asyncio.Queue[tuple[int, EngineStep | Exception | None]] = asyncio.Queue()

        async def pump(index: int, part: EngineRequest) -> None:
            try:
                async with aclosing(self._generate(part)) as steps:
                    async for step in steps:
                        arrivals.put_nowait((index, step))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                arrivals.put_nowait((index, exc))
            else:
                arrivals.put_nowait((index, None))

        pumps = [asyncio.create_task(pump(i, part)) for i, part in enumerate(parts)]
        prompt_tokens = sum(len(p.prompt_ids) for p in parts)
        running, finished = len(parts), 0
        try:
            while running:
                index, item = await arrivals.get()
                if item is None:
                    running -= 1
                    continue
                if isinstance(item, Exception):
                    raise item
                finished += item.finished
                yield batch_step(item, index, parts[index].spec.n, prompt_tokens, finished == len(parts))
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def collect(self, request: EngineRequest) -> AsyncIterator[EngineStep]:
        """Every step of a request, from admission to release, as one iterator (close it to end)."""
        running = await self.start(request)
        try:
            async for step in running.steps:
                yield step
        finally:
            await running.close()

    async def drain(self) -> None:
        """Stop admitting, let in-flight requests finish (up to drain_timeout), abort the rest."""
        self.admission.start_draining()
        loop = asyncio.get_running_loop()
        logger.info("draining: %d requests in flight", self.admission.in_flight)
        give_up = loop.time() + self.drain_timeout
        while self.admission.in_flight and loop.time() < give_up:
            await asyncio.sleep(0.05)
        if self.admission.in_flight:
            aborted = await self.engine.abort_all("shutdown")
            logger.warning("drain timeout: aborted %d engine requests", aborted)
            settle = loop.time() + 5.0
            while self.admission.in_flight and loop.time() < settle:
                await asyncio.sleep(0.05)
        logger.info("drained")
