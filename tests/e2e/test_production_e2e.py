"""Production behaviour against a live server with small limits: admission, limits, auth, keep-alive,
request ids, logs, fuzzed input. (Disconnects, deadlines and drains: test_lifecycle_e2e.py.)"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.support import MODEL_NAME, start_server, wait_for

KEY = "test-key-1-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
SLOTS, QUEUE = 4, 4
FLAGS = [
    "--max-num-seqs", str(SLOTS), "--max-concurrent-requests", str(SLOTS), "--max-queued-requests", str(QUEUE),
    "--api-key", KEY, "--api-key", "test-key-2-0123456789abcdef", "--retry-after-seconds", "2",
    "--max-tokens-limit", "256", "--max-body-bytes", "65536",
    "--max-messages", "8", "--max-n", "2", "--max-stop-sequences", "2", "--max-stop-length", "10",
    "--max-tools", "2", "--max-schema-bytes", "512", "--max-documents", "2", "--max-document-chars", "100",
]  # fmt: skip
MSG = [{"role": "user", "content": "Tell me a long story."}]


def chat_body(**fields):
    return {"model": MODEL_NAME, "messages": MSG, "max_tokens": 4, **fields}


@pytest.fixture(scope="module")
def server(dev_model):
    proc = start_server(*FLAGS)
    yield proc
    assert proc.stop() == 0, proc.log_tail()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=120) as c:
        yield c


# ---- auth


def test_auth_missing_wrong_right(server):
    url = server.base_url + "/v1/chat/completions"
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEY}"}):
        resp = httpx.post(url, json=chat_body(), headers=headers)
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key"
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    for key in (KEY, "test-key-2-0123456789abcdef"):
        assert httpx.post(url, json=chat_body(), headers={"Authorization": f"Bearer {key}"}, timeout=60).status_code == 200
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(server.base_url + path).status_code == 200
    assert httpx.get(server.base_url + "/v1/models").status_code == 401


# ---- limits


@pytest.mark.parametrize(
    "fields, status, param",
    [
        ({"messages": MSG * 9}, 400, "messages"),
        ({"n": 3}, 400, "n"),
        ({"max_tokens": 257}, 400, "max_tokens"),
        ({"stop": ["a", "b", "c"]}, 400, "stop"),
        ({"stop": "x" * 11}, 400, "stop"),
        ({"tools": [{"type": "function", "function": {"name": n}} for n in "abc"]}, 400, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "description": "d" * 600}}}]}, 413, "tools[0].function.parameters"),
        ({"documents": [{"text": "a"}] * 3}, 400, "documents"),
        ({"documents": [{"text": "a" * 101}]}, 413, "documents"),
    ],
)
def test_request_limits(http, fields, status, param):
    resp = http.post("/v1/chat/completions", json=chat_body(**fields))
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["param"] == param
    if param in ("n", "max_tokens", "stop"):
        return
    # /tokenize renders the same prompt, so it obeys the same input limits
    resp = http.post("/tokenize", json={"model": MODEL_NAME, "messages": MSG, **fields})
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["param"] == param


def test_body_size_limit_with_and_without_content_length(http):
    big = json.dumps(chat_body(messages=[{"role": "user", "content": "x" * 70000}])).encode()
    resp = http.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"

    def chunks():
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    resp = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert resp.status_code == 413
    assert http.post("/v1/chat/completions", json=chat_body()).status_code == 200


# ---- admission control


def test_burst_gets_only_200s_and_429s(server):
    """The burst arrives while the engine is paused, so no admitted request can finish and free a
    slot before the last one arrives, however fast the machine."""
    burst = 24
    admitted = SLOTS + QUEUE

    async def fire():
        limits = httpx.Limits(max_connections=burst, max_keepalive_connections=burst)
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH, timeout=300, limits=limits) as client:
            body = chat_body(max_tokens=32, ignore_eos=True, temperature=0)
            with server.engine_paused():
                requests = [asyncio.create_task(client.post("/v1/chat/completions", json=body)) for _ in range(burst)]
                while sum(r.done() for r in requests) < burst - admitted:
                    await asyncio.wait(requests, timeout=0.05)
                assert server.metric("jamba_requests_running") == SLOTS, server.request_gauges()
                assert server.metric("jamba_requests_queued") == QUEUE, server.request_gauges()
                tokenize = await client.post("/tokenize", json={"model": MODEL_NAME, "messages": MSG})
                assert tokenize.status_code == 429, "/tokenize passes the same admission gate"
            return await asyncio.gather(*requests)

    responses = asyncio.run(fire())
    statuses = [r.status_code for r in responses]
    ok = [r for r in responses if r.status_code == 200]
    rejected = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(rejected) == burst, statuses
    assert len(ok) == admitted, statuses  # exactly what the limits admit, not fewer
    for r in rejected:
        assert r.headers["Retry-After"] == "2"
        assert r.json()["error"]["type"] == "rate_limit_exceeded"
    for r in ok:
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 32
    print(f"burst {burst}: {len(ok)} x 200, {len(rejected)} x 429")


def test_choices_count_as_engine_sequences(server):
    """Two requests with n=2 fill the 4 engine slots (vLLM runs each choice as a sequence); a third
    request waits in the queue. Sent while the engine is paused, so none can finish meanwhile."""

    async def until(predicate, what):
        for _ in range(600):
            if predicate():
                return
            await asyncio.sleep(0.05)
        pytest.fail(f"{what}: {server.request_gauges()}")

    async def fire():
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH, timeout=300) as client:
            with server.engine_paused():
                pairs = [
                    asyncio.create_task(client.post("/v1/chat/completions", json=chat_body(n=2, max_tokens=8, ignore_eos=True)))
                    for _ in range(2)
                ]
                await until(lambda: server.metric("jamba_requests_running") == 2, "the two n=2 requests admitted")
                single = asyncio.create_task(client.post("/v1/chat/completions", json=chat_body(max_tokens=8)))
                await until(lambda: server.metric("jamba_requests_queued") == 1, "the third request queued")
                assert server.metric("jamba_requests_running") == 2, server.request_gauges()
            return await asyncio.gather(*pairs, single)

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert [len(r.json()["choices"]) for r in responses] == [2, 2, 1]


def _get_health(sock: socket.socket, port: int) -> bytes:
    """One GET /health on an open connection; returns the status line."""
    sock.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the keep-alive connection"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        body += chunk
    return head.split(b"\r\n", 1)[0]


def test_idle_keep_alive_connection_outlives_uvicorns_default(server):
    """A pooled client or proxy reuses a connection after it sat idle; uvicorn's default (5 s) would
    have closed it by then, and the reuse would fail with a reset."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        assert _get_health(sock, server.port) == b"HTTP/1.1 200 OK"
        time.sleep(7.0)
        assert _get_health(sock, server.port) == b"HTTP/1.1 200 OK"


def test_request_id_is_echoed_or_generated(http):
    resp = http.post("/v1/chat/completions", json=chat_body(), headers={"X-Request-ID": "my-id-42"})
    assert resp.headers["X-Request-ID"] == "my-id-42"
    assert len(http.get("/v1/models").headers["X-Request-ID"]) == 32


def test_logs_are_json_and_hold_no_content(server, http):
    secret = "zebra-secret-prompt-text"
    http.post("/v1/chat/completions", json=chat_body(messages=[{"role": "user", "content": secret}], ignore_eos=True), headers={"X-Request-ID": "log-check"})
    # the access line is written once the response has gone out
    wait_for(lambda: "log-check" in server.access_log(), 10, "the access-log line")
    entry = server.access_log()["log-check"]
    assert entry["status"] == 200 and entry["prompt_tokens"] > 0 and entry["completion_tokens"] == 4
    assert entry["duration_s"] > 0
    assert secret not in server.log_path.read_text()


# ---- fuzzed input


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
                         "response_format", "citation_mode", "seed", "logprobs", "top_logprobs", "stream"]),
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
    assert "Tested: 8" in summary, summary
