"""Fuzzed input against the production server: hypothesis chat bodies, hostile raw bodies and
schemathesis over every operation in /openapi.json; none gets a 5xx."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.e2e.production.config import KEY, MSG
from tests.support import MODEL_NAME


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30))
json_values = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "bogus"]),
         "content": st.one_of(st.text(max_size=200), st.none(), json_values)},
        optional={"name": st.text(max_size=10), "tool_calls": json_values, "citations": json_values},
    ),
    max_size=6,
)  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    messages,
    st.dictionaries(
        st.sampled_from(["temperature", "top_p", "n", "stop", "logit_bias", "tools", "tool_choice", "documents",
                         "response_format", "citation_mode", "seed", "logprobs", "top_logprobs", "stream",
                         "continue_final_message", "add_generation_prompt", "echo", "truncate_prompt_tokens",
                         "truncation_side"]),
        json_values, max_size=3,
    ),  # fmt: skip
)
def test_fuzzed_chat_requests_never_5xx(http, msgs, extra):
    body = {"model": MODEL_NAME, "messages": msgs, "max_tokens": 2, **extra}
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code < 500, (resp.text, body)
    if resp.status_code != 200:
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "raw",
    [
        "[" * 100_000 + "]" * 100_000,
        json.dumps({"model": MODEL_NAME, "messages": [{"role": "user", "content": "\ud800 \x00 \u202e" * 50}], "max_tokens": 2}),
        json.dumps({"model": MODEL_NAME, "messages": MSG, "max_tokens": 2, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"a": [[[[[[[[[[{"b": 1}]]]]]]]]]]}}}]}),
        json.dumps({"model": MODEL_NAME, "messages": MSG, "max_tokens": 1e308}),
        json.dumps({"model": MODEL_NAME, "messages": MSG, "seed": 2**80}),
        json.dumps({"model": MODEL_NAME, "messages": MSG, "logit_bias": {"-5": 1}}),
        '{"model": "' + "m" * 60000 + '"}',
    ],
    ids=["deep-nesting", "bad-unicode", "nested-schema", "huge-number", "huge-seed", "negative-bias", "huge-string"],
)
def test_hostile_bodies_never_5xx(http, raw):
    resp = http.post("/v1/chat/completions", content=raw.encode("utf-8", "surrogatepass"), headers={"content-type": "application/json"})
    assert resp.status_code < 500, resp.text
    assert http.get("/health").status_code == 200


def test_schemathesis_every_endpoint(server, tmp_path):
    """Property-based fuzzing of every operation in /openapi.json: no 5xx, responses match the schema."""
    import subprocess
    import sys
    from pathlib import Path

    st = Path(sys.executable).with_name("schemathesis")
    result = subprocess.run(
        [
            str(st), "run", server.base_url + "/openapi.json",
            "--header", f"Authorization: Bearer {KEY}",
            "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance",
            "--max-examples", "25", "--seed", "1", "--no-color", "--generation-database", "none",
            "--request-timeout", "60", "--report-dir", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    summary = result.stdout[-3000:]
    assert result.returncode == 0, summary
    assert re.search(r"\d+ generated, \d+ passed", summary), summary
    assert "Tested: 14" in summary, summary
