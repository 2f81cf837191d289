"""What the server needs of an inference engine, as TGI's router states it in its `Backend` trait.

`vllm_engine.EngineAdapter` is the one implementation (and the only module that imports vllm); unit
tests put fakes in its place. Everything above this line — preparing, running, rendering — speaks
only the core's types: token ids and a `SamplingSpec` in (as the engine's checked parameters),
`EngineStep`s out.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Protocol

from jamba_server.core.outputs import EngineStep
from jamba_server.core.sampling import SamplingSpec


class Engine(Protocol):
    tokenizer: Any  # the tokenizer prompts are rendered with (a transformers fast tokenizer)
    max_model_len: int
    vocab_size: int

    @property
    def ready(self) -> bool:
        """Started and not failed."""

    @property
    def dead(self) -> bool:
        """Started, then failed: the process should exit for its orchestrator to restart it."""

    @property
    def max_num_seqs(self) -> int | None:
        """How many sequences the engine batches at once (None before it has started)."""

    def start(self) -> None:
        """Load the tokenizer and the model (blocking: run it off the event loop)."""

    def shutdown(self) -> None: ...

    def engine_params(self, spec: SamplingSpec) -> Any:
        """The engine's own parameters for `spec`, checked as the engine would check them (a bad
        grammar is an `InvalidRequestError`); what `generate` takes."""

    def generate(
        self,
        prompt_token_ids: list[int],
        params: Any,
        request_id: str,
        deadline: float | None = None,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        stream: bool = False,
    ) -> AsyncIterator[EngineStep]:
        """The request's outputs, step by step. Closing the iterator ends the engine request; past
        `deadline` (an event-loop time) it raises `RequestTimeoutError`; the engine's own failures
        are `APIError`s (a bad request 400, a failed engine 503). `priority` (lower first) matters
        to an engine scheduling by priority; `cache_salt` keeps its prefix cache to equal salts. With
        `stream` (a client reads the steps as they come) a step may carry several tokens (the
        engine's stream interval), the first never delayed."""

    async def abort(self, request_id: str, cause: str) -> None:
        """End one running request; its `generate` raises the error for `cause`."""

    async def abort_all(self, cause: str) -> int:
        """End every running request; returns how many there were."""
