"""Running a prepared `GenerationJob` to its response object, without HTTP: what the server's
pipeline (http/pipeline.py) and the batch runner (runtime/batch.py) share. The request is named,
metered and admitted the same way whichever of them runs it."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from contextlib import aclosing
from typing import Any, Callable

from jamba_server.core.outputs import EngineStep
from jamba_server.core.prepare import GenerationJob
from jamba_server.metrics import GENERATION_REQUESTS, GenerationMetrics, record_outcome
from jamba_server.runtime.runner import EngineRequest, Runner
from jamba_server.runtime.server import Server

# Requests with a larger body than this are prepared off the event loop.
INLINE_BODY_BYTES = 16_384


async def prepare_sized(body_bytes: int | None, prepare: Callable[..., Any], *args: Any) -> Any:
    """`prepare(*args)`, in a worker thread when the body is large or of unknown size (rendering and
    tokenizing a long prompt would stall every other request on the event loop)."""
    if body_bytes is None or body_bytes > INLINE_BODY_BYTES:
        return await asyncio.to_thread(prepare, *args)
    return prepare(*args)


def engine_request_for(
    server: Server, job: GenerationJob, arrived: float, deadline: float | None
) -> tuple[str, EngineRequest]:
    """The job's id and its engine request, its metrics started (`arrived`: perf_counter time). A
    multi-prompt job's prompts are engine requests `{id}-{i}`, as vLLM names them."""
    request_id = f"{job.id_prefix}{job.id_separator}{uuid.uuid4().hex}"
    metrics = GenerationMetrics(server.model_name, arrived, job.features + (("stream",) if job.stream else ()))
    metrics.prompt(job.prompt_tokens)
    GENERATION_REQUESTS.labels(server.model_name, job.endpoint).inc()
    runs = job.runs
    parts = [
        EngineRequest(
            request_id if len(runs) == 1 else f"{request_id}-{i}", run.prompt.token_ids, run.spec, run.engine_params,
            deadline, metrics, priority=job.priority, cache_salt=job.cache_salt, stream=job.stream,
        )  # fmt: skip
        for i, run in enumerate(runs)
    ]
    return request_id, replace(parts[0], more=tuple(parts[1:]))


async def run_to_end(runner: Runner, engine_request: EngineRequest, on_step: Callable[[EngineStep], Any]) -> None:
    """Run a non-streaming request to the end (admitted, then released), feeding every step to `on_step`."""
    async with aclosing(runner.collect(engine_request)) as steps:
        async for step in steps:
            on_step(step)


def record_result(server: Server, job: GenerationJob, result: Any) -> None:
    """Outcome metrics of a finished request (finish reasons, JSON validity)."""
    record_outcome(server.model_name, result.outcomes(), getattr(result, "parsers", ()), job.json_mode)
