"""The per-request latency metrics: a streamed request is timed step by step as its tokens arrive;
a non-streaming one, whose output comes once at the end, by the engine's own first-to-last time."""

import time

from prometheus_client import REGISTRY

from jamba_server.core.outputs import ChoiceDelta, EngineStep
from jamba_server.metrics import GenerationMetrics


def _histogram(family: str, model: str) -> tuple[float, float]:
    labels = {"model": model}
    return (REGISTRY.get_sample_value(f"{family}_count", labels) or 0.0, REGISTRY.get_sample_value(f"{family}_sum", labels) or 0.0)


def _step(tokens: int, finished: bool, generation_seconds: float | None = None) -> EngineStep:
    choice = ChoiceDelta(0, "x" * tokens, tuple(range(tokens)), finish_reason="length" if finished else None)
    return EngineStep((choice,), prompt_tokens=3, finished=finished, generation_seconds=generation_seconds)


def test_a_whole_output_is_timed_by_the_engine_first_token_before_now():
    model = "metrics-whole"
    metrics = GenerationMetrics(model, arrived=time.perf_counter() - 2.0, features=())
    metrics.step(_step(5, finished=True, generation_seconds=1.5))
    ttft_count, ttft_sum = _histogram("jamba_time_to_first_token_seconds", model)
    itl_count, itl_sum = _histogram("jamba_inter_token_latency_seconds", model)
    assert ttft_count == 1 and 0.45 < ttft_sum < 0.6  # 2 s ago it arrived, its first token 1.5 s ago
    assert itl_count == 1 and abs(itl_sum - 1.5 / 4) < 1e-9  # four gaps between five tokens
    assert _histogram("jamba_e2e_request_latency_seconds", model)[0] == 1


def test_streamed_steps_are_timed_as_they_arrive():
    model = "metrics-steps"
    metrics = GenerationMetrics(model, arrived=time.perf_counter(), features=())
    for i in range(3):
        metrics.step(_step(2, finished=i == 2))
    assert _histogram("jamba_time_to_first_token_seconds", model)[0] == 1
    assert _histogram("jamba_inter_token_latency_seconds", model)[0] == 2
    assert REGISTRY.get_sample_value("jamba_generation_tokens_total", {"model": model}) == 6


_WORKER = """
import sys
from jamba_server import metrics
metrics.merge_processes()
running = int(sys.argv[1])
metrics.track_admission(lambda: running, lambda: 0)
metrics.ADMISSION_LIMIT.labels("running").set(16)
metrics.observed_gauge(metrics.ENGINE_READY, lambda: 1.0)
metrics.HTTP_REQUESTS.labels("/v1/chat/completions", "POST", "200", "m").inc(running)
print(metrics.exposition_registry() is not metrics.REGISTRY)
"""


def test_api_processes_metrics_merge_whichever_process_is_scraped(tmp_path):
    """With PROMETHEUS_MULTIPROC_DIR set (by the supervisor), each process writes its values and a
    scrape of any of them sums counters and in-flight gauges, and takes the least of readiness."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for running in (2, 3):
        done = subprocess.run([sys.executable, "-c", _WORKER, str(running)], env=env, capture_output=True, text=True, check=True)
        assert done.stdout.strip() == "True"
    scrape = "from jamba_server import metrics; from prometheus_client import generate_latest; metrics.merge_processes(); print(generate_latest(metrics.exposition_registry()).decode())"
    text = subprocess.run([sys.executable, "-c", scrape], env=env, capture_output=True, text=True, check=True).stdout
    from tests.support import sample

    assert sample(text, "jamba_requests_running") == 5
    assert sample(text, "jamba_admission_limit", 'kind="running"') == 32
    assert sample(text, "jamba_http_requests_total", 'method="POST",model="m",route="/v1/chat/completions",status="200"') == 5
    # The scraping process has not started its engine: readiness merged over live processes is 0.
    assert sample(text, "jamba_engine_ready") == 0


def test_one_process_gauges_read_their_values_at_each_scrape():
    from prometheus_client import Gauge

    from jamba_server import metrics

    value = [1.0]
    publish = metrics.observed_gauge(Gauge("jamba_test_observed", "test"), lambda: value[0])
    value[0] = 7.0
    publish()  # nothing to publish: the scrape reads the value
    assert REGISTRY.get_sample_value("jamba_test_observed") == 7.0
