"""/metrics scraped by a real Prometheus: known traffic in, PromQL over Prometheus' HTTP API out."""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import anthropic
import httpx
import openai
import pytest
import yaml

from tests.support import MODEL_NAME, REPO, free_port, start_server, wait_for
from tests.deploy.test_prometheus_rules import RULES, dashboard_exprs

ASK = [{"role": "user", "content": "Weather in Paris?"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London"]}},
    "required": ["city"], "additionalProperties": False}}}  # fmt: skip
PERSON = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["age"], "additionalProperties": False}  # fmt: skip


@pytest.fixture(scope="module")
def server(dev_model):
    proc = start_server()
    yield proc
    assert proc.stop() == 0, proc.log_tail()


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus missing: `make install` installs Debian's prometheus package")
    workdir = tmp_path_factory.mktemp("prometheus")
    target = server.base_url.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "jamba-server", "static_configs": [{"targets": [target]}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (REPO / "build" / f"prometheus-{port}.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}/api/v1"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            targets = httpx.get(api + "/targets").json()["data"]["activeTargets"]
            if targets and targets[0]["health"] == "up":
                break
        except (httpx.TransportError, KeyError, IndexError, ValueError):
            pass
        time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail("prometheus never scraped the server")
    yield api
    proc.terminate()
    proc.wait(30)
    log.close()


def query(api: str, promql: str) -> list[dict]:
    body = httpx.get(api + "/query", params={"query": promql}).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def scalar(api: str, promql: str) -> float:
    result = query(api, promql)
    return float(result[0]["value"][1]) if result else 0.0


def eventually_equal(api: str, promql: str, expected: float, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while True:
        got = scalar(api, promql)
        if got == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got == expected, f"{promql}: {got} != {expected}"


@pytest.fixture(scope="module")
def traffic(server, prometheus):
    """Send known traffic once; return what the responses themselves say."""
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    usage = {"prompt": 0, "completion": 0, "ok": 0, "generations": 0}

    def count(resp_usage):
        usage["prompt"] += resp_usage.prompt_tokens
        usage["completion"] += resp_usage.completion_tokens
        usage["ok"] += 1
        usage["generations"] += 1

    for i in range(5):
        count(client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=5 + i, temperature=0).usage)
    for _ in range(3):
        stream = client.chat.completions.create(
            model=MODEL_NAME, messages=ASK, max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
        count([c for c in stream if c.usage][0].usage)
    count(client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=[TOOL], tool_choice="required", parallel_tool_calls=False, max_tokens=100, temperature=1.0, seed=1).usage)
    count(client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=40, temperature=1.0, seed=2,
          response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}).usage)  # fmt: skip
    count(client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=6, extra_body={"documents": [{"text": "d"}], "citation_mode": "fast"}).usage)
    claude = anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)
    message = claude.messages.create(model=MODEL_NAME, max_tokens=4, messages=ASK)
    usage["prompt"] += message.usage.input_tokens
    usage["completion"] += message.usage.output_tokens
    usage["generations"] += 1
    for bad in ({"temperature": -1}, {"n": 0}):
        assert httpx.post(server.base_url + "/v1/chat/completions", json={"model": MODEL_NAME, "messages": ASK, **bad}).status_code == 400
    assert httpx.post(server.base_url + "/v1/chat/completions", json={"model": "nope", "messages": ASK}).status_code == 404
    return usage


def test_request_counts_by_status(prometheus, traffic):
    chat = 'jamba_http_requests_total{job="jamba-server",route="/v1/chat/completions",method="POST"'
    eventually_equal(prometheus, f'sum({chat},status="200"}})', traffic["ok"])
    eventually_equal(prometheus, f'sum({chat},status="400"}})', 2)
    eventually_equal(prometheus, f'sum({chat},status="404"}})', 1)
    eventually_equal(prometheus, 'sum(jamba_http_request_duration_seconds_count{route="/v1/chat/completions"})', traffic["ok"] + 3)


def test_token_counters_equal_usage(prometheus, traffic):
    eventually_equal(prometheus, f'sum(jamba_generation_tokens_total{{model="{MODEL_NAME}"}})', traffic["completion"])
    eventually_equal(prometheus, f'sum(jamba_prompt_tokens_total{{model="{MODEL_NAME}"}})', traffic["prompt"])
    # vLLM's own engine counters, on the same /metrics, agree
    eventually_equal(prometheus, f'sum(vllm:generation_tokens_total{{model_name="{MODEL_NAME}"}})', traffic["completion"])


def test_latency_histograms_count_every_generation(prometheus, traffic):
    for family in ("jamba_time_to_first_token_seconds", "jamba_e2e_request_latency_seconds", "jamba_queue_time_seconds"):
        eventually_equal(prometheus, f"sum({family}_count)", traffic["generations"])
    itl = scalar(prometheus, "sum(jamba_inter_token_latency_seconds_count)")
    assert 0 < itl <= traffic["completion"] - traffic["generations"]


def test_features_finish_reasons_and_jamba_semantics(prometheus, traffic):
    eventually_equal(prometheus, 'sum(jamba_requests_by_feature_total{feature="stream"})', 3)
    eventually_equal(prometheus, 'sum(jamba_requests_by_feature_total{feature="tools"})', 1)
    eventually_equal(prometheus, 'sum(jamba_requests_by_feature_total{feature="json_schema"})', 1)
    eventually_equal(prometheus, 'sum(jamba_requests_by_feature_total{feature="documents"})', 1)
    eventually_equal(prometheus, 'sum(jamba_generation_requests_total{endpoint="messages"})', 1)
    eventually_equal(prometheus, 'sum(jamba_generation_requests_total{endpoint="chat"})', traffic["ok"])
    eventually_equal(prometheus, "sum(jamba_generation_requests_total)", traffic["generations"])
    eventually_equal(prometheus, 'sum(jamba_request_finish_total{reason="tool_calls"})', 1)
    eventually_equal(prometheus, "sum(jamba_request_finish_total)", traffic["generations"])
    eventually_equal(prometheus, 'jamba_tool_call_parse_total{outcome="parsed"}', 1)
    eventually_equal(prometheus, "jamba_json_output_parse_failures_total", 0)
    eventually_equal(prometheus, "jamba_requests_running", 0)
    eventually_equal(prometheus, "jamba_engine_ready", 1)
    build = query(prometheus, "jamba_build_info")[0]["metric"]
    assert build["model"] == MODEL_NAME and build["tensor_parallel_size"] == "1" and build["vllm_version"].startswith("0.32")


def test_rules_load_and_evaluate_in_prometheus(prometheus, traffic):
    def rules() -> list[dict]:
        return [r for g in httpx.get(prometheus + "/rules").json()["data"]["groups"] for r in g["rules"]]

    # "unknown" until a rule's first evaluation; then every one must be "ok"
    wait_for(lambda: all(r["health"] != "unknown" for r in rules()), 20, "the rules' first evaluation")
    assert len(rules()) == 14 and all(r["health"] == "ok" for r in rules()), rules()
    eventually_equal(prometheus, "count(jamba:queue_saturation)", 1)


def test_dashboard_queries_parse_in_prometheus(prometheus, traffic):
    for expr in dashboard_exprs():
        concrete = expr.replace("$__rate_interval", "1m").replace("$model", ".*")
        query(prometheus, concrete)  # asserts status == success


def test_promtool_check_metrics_on_our_families(server):
    text = httpx.get(server.base_url + "/metrics").text
    # vLLM's families keep vLLM's `vllm:` names (promtool flags the colon); only they are filtered out.
    ours = "\n".join(line for line in text.splitlines() if not re.match(r"^(# (HELP|TYPE) )?vllm:", line)) + "\n"
    assert "jamba_http_requests_total" in ours and "vllm:" not in ours
    result = subprocess.run(["promtool", "check", "metrics"], input=ours, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr
