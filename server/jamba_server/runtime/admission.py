"""Admission control: how much the server runs at once, and who waits.

- `AdmissionController`: at most `max_running` sequences (a request with `n` choices is `n` of the
  engine's `max_num_seqs`; and optionally `max_tokens_in_flight` prompt + max_tokens) in the engine
  at once, a queue of at most `max_queued` requests behind them, 429 with Retry-After beyond
  that, 503 while draining. Decided before any engine work.

The queue is ordered by the request's `priority` (lower first, as vLLM's priority scheduling), then
by arrival: with every priority 0 (the only one an fcfs server accepts) it is FIFO. Only the head is
admitted, so a large request at the head is not starved by smaller ones behind it; a request that
arrives with a lower priority than the head goes ahead of it, and may be admitted at once.

With `api_server_count` N > 1 each API process has its own controller holding its share of the
limits (`worker_settings`: a static split). The cost: one process may refuse (429) a request while
another has room, since a connection's requests all go to the process that accepted it.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from dataclasses import dataclass, field
from typing import Callable

from jamba_server.errors import RateLimitError, shutting_down
from jamba_server.settings import Settings


@dataclass(eq=False)
class Ticket:
    """One admitted request; release it exactly once, to `issuer`, when the request ends."""

    tokens: int
    issuer: AdmissionController = field(repr=False)
    sequences: int = 1
    released: bool = False


@dataclass(eq=False)
class _Waiter:
    tokens: int
    sequences: int
    order: tuple[int, int]  # (priority, arrival): the queue's sort key
    future: asyncio.Future[Ticket] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class AdmissionController:
    def __init__(self, max_running: int, max_queued: int, max_tokens: int | None, retry_after: int):
        self.max_running = max_running
        self.max_queued = max_queued
        self.max_tokens = max_tokens
        self.retry_after = retry_after
        self.running = 0  # requests
        self.running_sequences = 0
        self.running_tokens = 0
        self.draining = False
        self._queue: list[_Waiter] = []  # sorted by `order`
        self._arrivals = itertools.count()
        # Called after `running` or `queued` changes (the metrics of a multi-process server publish
        # their gauges then: its scrape cannot call into the other processes).
        self.on_change: Callable[[], None] = lambda: None

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return self.running + self.queued

    def _fits(self, tokens: int, sequences: int) -> bool:
        if self.running == 0:  # a lone large request may always run
            return True
        if self.running_sequences + sequences > self.max_running:
            return False
        return self.max_tokens is None or self.running_tokens + tokens <= self.max_tokens

    def _start(self, tokens: int, sequences: int) -> Ticket:
        self.running += 1
        self.running_sequences += sequences
        self.running_tokens += tokens
        self.on_change()
        return Ticket(tokens, self, sequences)

    def _retry_headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}

    def check_open(self) -> None:
        """Fail fast (before tokenizing) when draining or when even the queue is full."""
        if self.draining:
            raise shutting_down(self.retry_after)
        if self.running_sequences >= self.max_running and len(self._queue) >= self.max_queued:
            self._reject()

    def _reject(self) -> None:
        raise RateLimitError(
            f"The server is at capacity ({self.max_running} running, {self.max_queued} queued); "
            f"retry after {self.retry_after}s.",
            headers=self._retry_headers(),
        )

    async def acquire(self, tokens: int, sequences: int = 1, priority: int = 0) -> Ticket:
        """Admit now, or queue (by priority, then arrival) until capacity frees; 429 when the queue is full."""
        self.check_open()
        if not self._queue and self._fits(tokens, sequences):
            return self._start(tokens, sequences)
        if len(self._queue) >= self.max_queued:
            self._reject()
        waiter = _Waiter(tokens, sequences, (priority, next(self._arrivals)))
        bisect.insort(self._queue, waiter, key=lambda w: w.order)
        self.on_change()
        self._wake()  # at the head, it may fit where the previous head did not
        try:
            return await waiter.future
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(waiter.future.result())  # admitted just as we were cancelled
            elif waiter in self._queue:
                self._queue.remove(waiter)
                self.on_change()
                self._wake()  # the next waiter may fit where this one did not
            raise

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        self.running -= 1
        self.running_sequences -= ticket.sequences
        self.running_tokens -= ticket.tokens
        self.on_change()
        self._wake()

    def _wake(self) -> None:
        while self._queue and self._fits(self._queue[0].tokens, self._queue[0].sequences):
            waiter = self._queue.pop(0)
            if not waiter.future.done():
                waiter.future.set_result(self._start(waiter.tokens, waiter.sequences))

    def start_draining(self) -> None:
        self.draining = True

    def resize(self, max_running: int) -> None:
        """Size to the engine once it is up (`max_num_seqs`), keeping everything else (a drain begun
        while the model loaded stays begun)."""
        self.max_running = max_running
        self._wake()


def running_limit(settings: Settings, engine_slots: int | None) -> int:
    return settings.max_concurrent_requests or engine_slots or 256


def controller_for(settings: Settings, engine_slots: int | None) -> AdmissionController:
    return AdmissionController(
        max_running=running_limit(settings, engine_slots),
        max_queued=settings.max_queued_requests,
        max_tokens=settings.max_tokens_in_flight,
        retry_after=settings.retry_after_seconds,
    )


# The limits an API process of a multi-process server holds its share of.
SPLIT_LIMITS = ("max_concurrent_requests", "max_queued_requests", "max_tokens_in_flight", "limit_concurrency")


def worker_share(total: int, workers: int, index: int) -> int:
    """Worker `index`'s part of `total` over `workers`: equal parts, the remainder to the first
    workers, never below 1 (so the parts add up to more than a total below `workers`); a total of 0
    (no queue) stays 0."""
    if total == 0:
        return 0
    return max(1, total // workers + (index < total % workers))


def worker_settings(settings: Settings, index: int) -> Settings:
    """API process `index`'s settings: its share of each of `SPLIT_LIMITS` over `api_server_count`
    processes (an unset limit stays unset). `max_concurrent_requests` must be a number by then: its
    default, the engine's `max_num_seqs`, is resolved by whoever builds the engine's config."""
    shares = {
        name: worker_share(total, settings.api_server_count, index)
        for name in SPLIT_LIMITS
        if (total := getattr(settings, name)) is not None
    }
    return settings.model_copy(update=shares)
