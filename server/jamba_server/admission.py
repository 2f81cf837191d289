"""Admission control and request limits: what the server accepts, and how much at once.

- `AdmissionController`: at most `max_running` sequences (a request with `n` choices is `n` of the
  engine's `max_num_seqs`; and optionally `max_tokens_in_flight` prompt + max_tokens) in the engine
  at once, a FIFO queue of at most `max_queued` requests behind them, 429 with Retry-After beyond
  that, 503 while draining. Decided before any engine work.
- `check_chat_limits` / `check_completion_limits`: per-request size limits, each naming its param.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass, field

from jamba_server.errors import InvalidRequestError, RateLimitError, RequestTooLargeError, ServiceUnavailableError
from jamba_server.protocol import ChatCompletionRequest, ChatFeatures, CompletionRequest, SamplingFields
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
        self._queue: deque[_Waiter] = deque()

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
        return Ticket(tokens, self, sequences)

    def _retry_headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}

    def check_open(self) -> None:
        """Fail fast (before tokenizing) when draining or when even the queue is full."""
        if self.draining:
            raise ServiceUnavailableError(
                "The server is shutting down; retry on another replica.",
                code="shutting_down",
                headers=self._retry_headers(),
            )
        if self.running_sequences >= self.max_running and len(self._queue) >= self.max_queued:
            self._reject()

    def _reject(self) -> None:
        raise RateLimitError(
            f"The server is at capacity ({self.max_running} running, {self.max_queued} queued); "
            f"retry after {self.retry_after}s.",
            headers=self._retry_headers(),
        )

    async def acquire(self, tokens: int, sequences: int = 1) -> Ticket:
        """Admit now, or queue (FIFO) until capacity frees; 429 when the queue is full."""
        self.check_open()
        if not self._queue and self._fits(tokens, sequences):
            return self._start(tokens, sequences)
        if len(self._queue) >= self.max_queued:
            self._reject()
        waiter = _Waiter(tokens, sequences)
        self._queue.append(waiter)
        try:
            return await waiter.future
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(waiter.future.result())  # admitted just as we were cancelled
            elif waiter in self._queue:
                self._queue.remove(waiter)
                self._wake()  # the next waiter may fit where this one did not
            raise

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        self.running -= 1
        self.running_sequences -= ticket.sequences
        self.running_tokens -= ticket.tokens
        self._wake()

    def _wake(self) -> None:
        while self._queue and self._fits(self._queue[0].tokens, self._queue[0].sequences):
            waiter = self._queue.popleft()
            if not waiter.future.done():
                waiter.future.set_result(self._start(waiter.tokens, waiter.sequences))

    def start_draining(self) -> None:
        self.draining = True


def controller_for(settings: Settings, engine_slots: int | None) -> AdmissionController:
    return AdmissionController(
        max_running=settings.max_concurrent_requests or engine_slots or 256,
        max_queued=settings.max_queued_requests,
        max_tokens=settings.max_tokens_in_flight,
        retry_after=settings.retry_after_seconds,
    )


# ------------------------------------------------------------------------------- limits


def _too_many(what: str, count: int, limit: int, param: str) -> InvalidRequestError:
    return InvalidRequestError(f"too many {what}: {count} (limit {limit})", param=param)


def _check_sampling(request: SamplingFields, max_tokens: int | None, settings: Settings, param: str) -> None:
    if request.n > settings.max_n:
        raise _too_many("choices", request.n, settings.max_n, "n")
    if settings.max_tokens_limit is not None and max_tokens is not None and max_tokens > settings.max_tokens_limit:
        raise InvalidRequestError(
            f"{param} is {max_tokens}; this server allows at most {settings.max_tokens_limit}", param=param
        )
    stops = request.stop_list()
    if len(stops) > settings.max_stop_sequences:
        raise _too_many("stop sequences", len(stops), settings.max_stop_sequences, "stop")
    for stop in stops:
        if len(stop) > settings.max_stop_length:
            raise InvalidRequestError(
                f"a stop sequence is {len(stop)} characters (limit {settings.max_stop_length})", param="stop"
            )


def _schema_bytes(schema: object) -> int:
    return len(json.dumps(schema, ensure_ascii=False).encode("utf-8"))


def check_chat_limits(request: ChatCompletionRequest, settings: Settings) -> None:
    max_param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
    _check_sampling(request, request.requested_max_tokens(), settings, max_param)
    check_chat_input_limits(request, settings)


def check_chat_input_limits(request: ChatFeatures, settings: Settings) -> None:
    """The limits on what a chat request renders into the prompt (also for /tokenize)."""
    if len(request.messages) > settings.max_messages:
        raise _too_many("messages", len(request.messages), settings.max_messages, "messages")
    tools = request.tools or []
    if len(tools) > settings.max_tools:
        raise _too_many("tools", len(tools), settings.max_tools, "tools")
    for i, tool in enumerate(tools):
        if tool.function.parameters is not None and _schema_bytes(tool.function.parameters) > settings.max_schema_bytes:
            raise RequestTooLargeError(
                f"tool schema over {settings.max_schema_bytes} bytes", param=f"tools[{i}].function.parameters"
            )
    fmt = request.response_format
    if fmt is not None and fmt.json_schema is not None:
        if _schema_bytes(fmt.json_schema.schema_) > settings.max_schema_bytes:
            raise RequestTooLargeError(
                f"response schema over {settings.max_schema_bytes} bytes", param="response_format.json_schema.schema"
            )
    documents = request.documents or []
    if len(documents) > settings.max_documents:
        raise _too_many("documents", len(documents), settings.max_documents, "documents")
    total = sum(len(d.text) for d in documents)
    if total > settings.max_document_chars:
        raise RequestTooLargeError(
            f"documents hold {total} characters of text (limit {settings.max_document_chars})", param="documents"
        )


def check_completion_limits(request: CompletionRequest, settings: Settings) -> None:
    _check_sampling(request, request.max_tokens, settings, "max_tokens")
