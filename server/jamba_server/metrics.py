"""The server's own Prometheus metrics. vLLM's `vllm:*` families share the same default registry,
so one `/metrics` serves both. Naming follows Prometheus: base units, `_total` counters,
`_seconds` histograms.

An API process of a multi-process server (`api_server_count` > 1) calls `merge_processes()` first:
every process then writes its values to files in PROMETHEUS_MULTIPROC_DIR (prometheus_client's
multiprocess mode; the supervisor sets it before any process starts) and `/metrics`, whichever
process answers, merges them all, vLLM's included. Counters and histograms add up; each gauge says
how (`multiprocess_mode`; the `live` modes drop a process that has exited)."""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess

from jamba_server.core.outputs import EngineStep

# Buckets that resolve both a CPU dev model (milliseconds) and 200K-token prompts on GPUs (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1800)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5)

BUILD_INFO = Gauge(
    "jamba_build_info",
    "Build information of the running server (value is always 1).",
    ["version", "vllm_version", "model", "tensor_parallel_size", "quantization"],
    multiprocess_mode="max",
)
# Merged over API processes: 1 only while every one of them is attached to a live engine.
ENGINE_READY = Gauge("jamba_engine_ready", "1 when the engine is loaded and alive, else 0.", multiprocess_mode="livemin")

# ---- HTTP
HTTP_REQUESTS = Counter(
    "jamba_http_requests_total", "HTTP requests by route, method, status and model.", ["route", "method", "status", "model"]
)
HTTP_DURATION = Histogram(
    "jamba_http_request_duration_seconds", "HTTP request duration until the response is sent.",
    ["route", "method"], buckets=LATENCY_BUCKETS,
)  # fmt: skip
HTTP_IN_FLIGHT = Gauge("jamba_http_requests_in_flight", "HTTP requests being handled.", multiprocess_mode="livesum")

# ---- generation
TTFT = Histogram("jamba_time_to_first_token_seconds", "Time from request arrival to the first output token.", ["model"], buckets=LATENCY_BUCKETS)
INTER_TOKEN = Histogram("jamba_inter_token_latency_seconds", "Time between consecutive output tokens.", ["model"], buckets=TOKEN_LATENCY_BUCKETS)
E2E_LATENCY = Histogram("jamba_e2e_request_latency_seconds", "Time from request arrival to the last output token.", ["model"], buckets=LATENCY_BUCKETS)
STREAM_INTERVAL = Histogram(
    "jamba_stream_interval_tokens", "Tokens per streamed chunk chosen for a stream as it starts (the stream interval).",
    ["model"], buckets=(1, 2, 3, 4, 6, 8, 12, 16),
)  # fmt: skip
QUEUE_TIME = Histogram("jamba_queue_time_seconds", "Time a request waited in this server's admission queue.", ["model"], buckets=LATENCY_BUCKETS)
PROMPT_TOKENS = Counter("jamba_prompt_tokens_total", "Prompt tokens of requests sent to the engine.", ["model"])
GENERATION_TOKENS = Counter("jamba_generation_tokens_total", "Output tokens generated.", ["model"])
FINISHED = Counter("jamba_request_finish_total", "Finished choices by finish reason.", ["model", "reason"])
GENERATION_REQUESTS = Counter(
    "jamba_generation_requests_total",
    "Generation requests sent to the engine, by API endpoint (chat, completions, messages).",
    ["model", "endpoint"],
)
FEATURES = Counter(
    "jamba_requests_by_feature_total",
    "Generation requests using a feature (tools, documents, json_mode, json_schema, structured_outputs, stream).",
    ["model", "feature"],
)

# ---- admission
REQUESTS_RUNNING = Gauge(
    "jamba_requests_running", "Requests admitted to the engine and not yet finished (this server's count).",
    multiprocess_mode="livesum",
)  # fmt: skip
REQUESTS_QUEUED = Gauge("jamba_requests_queued", "Requests waiting in this server's admission queue.", multiprocess_mode="livesum")
# Merged over API processes: the whole server's limits, the sum of the processes' shares.
ADMISSION_LIMIT = Gauge("jamba_admission_limit", "Configured admission limits.", ["kind"], multiprocess_mode="livesum")
REJECTED = Counter(
    "jamba_requests_rejected_total", "Requests rejected before generation, by reason.", ["reason"]
)  # reasons: overloaded (429), draining (503), too_large (413), unauthorized (401)
ABORTED = Counter(
    "jamba_requests_aborted_total", "Engine requests aborted, by cause.", ["cause"]
)  # causes: client_disconnect, slow_client, deadline, shutdown

# ---- Jamba semantics
TOOL_CALL_PARSES = Counter(
    "jamba_tool_call_parse_total", "Tool-call blocks in model output, by outcome (parsed, fell_back).", ["outcome"]
)
CITATIONS = Counter("jamba_citations_returned_total", "Citations returned to clients.")
JSON_PARSE_FAILURES = Counter(
    "jamba_json_output_parse_failures_total", "Finished JSON-mode outputs that did not parse as JSON (should stay 0)."
)

for _labels in (("overloaded",), ("draining",), ("too_large",), ("unauthorized",)):
    REJECTED.labels(*_labels)
for _cause in ("client_disconnect", "slow_client", "deadline", "shutdown"):
    ABORTED.labels(_cause)
for _outcome in ("parsed", "fell_back"):
    TOOL_CALL_PARSES.labels(_outcome)

REJECTION_REASONS = {429: "overloaded", 503: "draining", 413: "too_large", 401: "unauthorized"}


_merged_registry: CollectorRegistry | None = None


def merge_processes() -> None:
    """From now on this process's gauges are published as they change and `/metrics` serves every
    API process's metrics merged (call it before the app is built)."""
    global _merged_registry
    _merged_registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(_merged_registry)


def exposition_registry() -> CollectorRegistry:
    """What `/metrics` serves: this process's registry, or every API process's merged."""
    return _merged_registry or REGISTRY


def observed_gauge(gauge: Gauge, value: Callable[[], float]) -> Callable[[], None]:
    """`gauge` reads `value()`: at each scrape, or, when processes are merged (a scrape cannot call
    into the other processes), whenever the returned function is called (called once here)."""
    if _merged_registry is None:
        gauge.set_function(value)
        return lambda: None

    def publish() -> None:
        gauge.set(value())

    publish()
    return publish


def track_admission(running: Callable[[], float], queued: Callable[[], float]) -> Callable[[], None]:
    """The running and queued gauges read these; call the returned function when either changes."""
    publish_running = observed_gauge(REQUESTS_RUNNING, running)
    publish_queued = observed_gauge(REQUESTS_QUEUED, queued)

    def publish() -> None:
        publish_running()
        publish_queued()

    return publish


def record_rejection(status: int, code: str | None) -> None:
    if status == 503 and code != "shutting_down":
        return  # loading / engine failed: not an admission decision
    reason = REJECTION_REASONS.get(status)
    if reason is not None:
        REJECTED.labels(reason).inc()


class GenerationMetrics:
    """Timing and token accounting for one request; `arrived` is its perf_counter arrival time."""

    def __init__(self, model: str, arrived: float, features: Iterable[str]):
        self.model = model
        self.arrived = arrived
        self._last: float | None = None
        self._ttft = TTFT.labels(model)
        self._itl = INTER_TOKEN.labels(model)
        self._generated = GENERATION_TOKENS.labels(model)
        for feature in features:
            FEATURES.labels(model, feature).inc()

    def admitted(self) -> None:
        QUEUE_TIME.labels(self.model).observe(time.perf_counter() - self.arrived)

    def prompt(self, tokens: int) -> None:
        PROMPT_TOKENS.labels(self.model).inc(tokens)

    def step(self, step: EngineStep) -> None:
        """Account one engine step as it arrives: first token, inter-token gaps, end to end, tokens.
        A non-streaming request's single output is timed by the engine (`generation_seconds`): its
        first token came that long before now, and its gaps average over its tokens."""
        now = time.perf_counter()
        new_tokens = sum(len(c.token_ids) for c in step.choices)
        if new_tokens:
            if step.generation_seconds is not None:
                if self._last is None:
                    self._ttft.observe(max(0.0, now - step.generation_seconds - self.arrived))
                per_choice = max(len(c.token_ids) for c in step.choices)
                if per_choice > 1:
                    self._itl.observe(step.generation_seconds / (per_choice - 1))
            elif self._last is None:
                self._ttft.observe(now - self.arrived)
            else:
                self._itl.observe((now - self._last) / new_tokens)
            self._last = now
            self._generated.inc(new_tokens)
        if step.finished:
            E2E_LATENCY.labels(self.model).observe(now - self.arrived)


def record_outcome(model: str, choices: Iterable[tuple[str | None, str]], parsers: Iterable[Any], json_mode: bool) -> None:
    """Finish reasons and Jamba-semantics counters for a finished request.

    `choices` holds (API finish reason, raw output text) per choice; `parsers` the chat output parsers.
    """
    for reason, text in choices:
        FINISHED.labels(model, reason or "unfinished").inc()
        if json_mode and reason == "stop":
            try:
                json.loads(text)
            except ValueError:
                JSON_PARSE_FAILURES.inc()
    for parser in parsers:
        if parser.tool_blocks_parsed:
            TOOL_CALL_PARSES.labels("parsed").inc(parser.tool_blocks_parsed)
        if parser.tool_blocks_rejected:
            TOOL_CALL_PARSES.labels("fell_back").inc(parser.tool_blocks_rejected)
        if parser.citations_returned:
            CITATIONS.inc(parser.citations_returned)
