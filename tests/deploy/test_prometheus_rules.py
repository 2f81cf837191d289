"""Alert/recording rules and the Grafana dashboard, checked with Prometheus' own promtool."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "jamba-server-rules.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "jamba-server-rules.test.yaml"
DASHBOARD = DEPLOY / "grafana" / "jamba-server.json"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool missing: `make install` installs Debian's prometheus package")
    return path


def test_rules_are_valid(promtool):
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rules_unit_tests(promtool):
    result = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_unit_tested():
    import yaml

    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    tested = {t["alertname"] for case in yaml.safe_load(RULE_TESTS.read_text())["tests"] for t in case.get("alert_rule_test", [])}
    assert alerts == tested
    assert {"JambaHighErrorRatio", "JambaSustainedOverload", "JambaTimeToFirstTokenHigh", "JambaQueueSaturated",
            "JambaEngineDown", "JambaServerAbsent", "JambaKVCacheNearFull"} <= alerts  # fmt: skip


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_is_valid_json_with_queries():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "jamba-server" and dashboard["panels"]
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    families = ["jamba_http_requests_total", "jamba_time_to_first_token_seconds", "jamba_inter_token_latency_seconds",
                "jamba_e2e_request_latency_seconds", "jamba_queue_time_seconds", "jamba_generation_tokens_total",
                "jamba_prompt_tokens_total", "jamba_requests_rejected_total", "jamba_requests_aborted_total",
                "jamba_request_finish_total", "jamba_requests_by_feature_total", "jamba_tool_call_parse_total",
                "jamba_citations_returned_total", "jamba_json_output_parse_failures_total", "jamba_requests_running",
                "jamba_requests_queued", "vllm:kv_cache_usage_perc", "vllm:num_requests_waiting", "jamba_build_info"]  # fmt: skip
    text = "\n".join(exprs)
    assert [f for f in families if f not in text] == []
