"""The server's own Prometheus metrics (vLLM's `vllm:*` families share the same registry)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import Gauge

BUILD_INFO = Gauge(
    "jamba_build_info",
    "Build information of the running server (value is always 1).",
    ["version", "vllm_version", "model", "tensor_parallel_size", "quantization"],
)
REQUESTS_RUNNING = Gauge(
    "jamba_requests_running", "Requests admitted to the engine and not yet finished (this server's count)."
)
REQUESTS_QUEUED = Gauge("jamba_requests_queued", "Requests waiting in this server's admission queue.")


def track_admission(running: Callable[[], float], queued: Callable[[], float]) -> None:
    REQUESTS_RUNNING.set_function(running)
    REQUESTS_QUEUED.set_function(queued)
