"""Requests that end before they finish, against real server processes: the client disconnects, the
deadline passes, SIGTERM drains the server, the engine dies.

Every request that must outlast an action is long by construction (`LONG_MAX_TOKENS` on a server
with the whole context), or is admitted while the engine is paused; each test waits for the server
to report the request running before it acts. Nothing here depends on how fast the machine
generates; the time bounds left are the behaviour under test (abort within a second, fail fast).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support import BUSY_ENGINE_WAIT_S, LONG_CONTEXT_ARGS, LONG_MAX_TOKENS, MODEL_NAME, start_server, wait_for

MESSAGES = [{"role": "user", "content": "Go on."}]
LONG = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": LONG_MAX_TOKENS, "ignore_eos": True}
LONG_STREAM = {**LONG, "stream": True, "stream_options": {"include_usage": True}}
SHORT_TOKENS = 64
SHORT_STREAM = {**LONG_STREAM, "max_tokens": SHORT_TOKENS}


@pytest.fixture(scope="module")
def server(dev_model):
    """Shared by the module's tests; the drain test, last, stops it. Warmed by one request, so no
    test measures the engine's first step."""
    # The drain test's long stream must outlive its checks: a CI run took 120 s from SIGTERM to them
    # (the stream 16,000 tokens long, its output file re-read on every poll) and the drain timed out.
    proc = start_server(*LONG_CONTEXT_ARGS, "--drain-timeout", "600", "--log-request-content")
    try:
        httpx.post(proc.base_url + "/v1/chat/completions", json={**LONG, "max_tokens": 4}, timeout=120).raise_for_status()
    except BaseException:
        proc.stop()
        raise
    yield proc
    assert proc.stop() == 0, proc.log_tail()


def running(server) -> float:
    return server.metric("jamba_requests_running")


def aborted(server, cause: str) -> float:
    return server.metric("jamba_requests_aborted_total", f'cause="{cause}"')


# ---- client disconnects and deadlines


def test_streaming_disconnect_aborts_within_a_second(server):
    before = aborted(server, "client_disconnect")
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json=LONG_STREAM) as resp:
            events = (line for line in resp.iter_lines() if line)
            seen = [next(events) for _ in range(3)]
            assert all('"content"' in e for e in seen), seen
            wait_for(lambda: server.requests_running(1), BUSY_ENGINE_WAIT_S, server.request_gauges)
        # leaving the block closes the connection with the body unread
    elapsed = server.wait_idle(within=1.0)
    assert aborted(server, "client_disconnect") == before + 1
    print(f"stream abort latency {elapsed:.3f}s")


def open_request(server, body: dict) -> socket.socket:
    """A chat request sent on a fresh connection whose response is never read: closing the socket
    is the client going away."""
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(head.encode() + payload)
    return sock


def test_non_streaming_disconnect_aborts_within_a_second(server):
    before = aborted(server, "client_disconnect")
    with open_request(server, LONG):
        wait_for(lambda: server.requests_running(1), BUSY_ENGINE_WAIT_S, server.request_gauges)
    elapsed = server.wait_idle(within=1.0)
    assert aborted(server, "client_disconnect") == before + 1
    print(f"non-stream abort latency {elapsed:.3f}s")


def test_deadline_ends_a_request_with_504(server):
    before = aborted(server, "deadline")
    resp = httpx.post(server.base_url + "/v1/chat/completions", json=LONG, headers={"X-Request-Timeout": "0.3"}, timeout=60)
    assert resp.status_code == 504
    assert resp.json()["error"]["code"] == "request_timeout"
    server.wait_idle(within=1.0)
    assert aborted(server, "deadline") == before + 1


def test_deadline_before_a_streams_first_token_is_a_504(server):
    """The engine is paused, so the deadline passes before any output: an HTTP error, no stream."""
    before = aborted(server, "deadline")
    with ThreadPoolExecutor(1) as pool:
        with server.engine_paused():
            pending = pool.submit(
                httpx.post, server.base_url + "/v1/chat/completions", json=LONG_STREAM,
                headers={"X-Request-Timeout": "0.5"}, timeout=60,
            )  # fmt: skip
            wait_for(lambda: aborted(server, "deadline") == before + 1, 30, "the deadline's abort")
        resp = pending.result()
    assert resp.status_code == 504, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json()["error"]["code"] == "request_timeout"
    server.wait_idle(within=1.0)


def test_deadline_mid_stream_ends_it_with_an_error_event(server):
    """The deadline (3 s) only has to come after the first token of a warm server (~0.05 s here)."""
    with httpx.stream(
        "POST", server.base_url + "/v1/chat/completions", json=LONG_STREAM, headers={"X-Request-Timeout": "3"}, timeout=60
    ) as resp:
        assert resp.status_code == 200, "the stream had not started within its 3 s deadline"
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "request_timeout"
    assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
    server.wait_idle(within=1.0)


def test_deadline_header_must_be_a_positive_number(server):
    for raw in ("soon", "0", "-1"):
        bad = httpx.post(server.base_url + "/v1/chat/completions", json={**LONG, "max_tokens": 4}, headers={"X-Request-Timeout": raw})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Timeout"


# ---- SIGTERM


def curl_stream(server, body: dict, out: Path, request_id: str) -> subprocess.Popen:
    """A stream consumed by a separate curl process, so this test process stays free to probe the
    server while the engine saturates the machine's cores."""
    return subprocess.Popen(
        ["curl", "-sN", "--noproxy", "*", "-o", str(out), "-w", "%{http_code}", "-H", "Content-Type: application/json",
         "-H", f"X-Request-ID: {request_id}", "-d", json.dumps(body), server.base_url + "/v1/chat/completions"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def data_events(out: Path) -> list[str]:
    """The complete events a curl has written so far (one still arriving is left out)."""
    text = out.read_bytes().decode(errors="replace") if out.exists() else ""
    complete = text[: text.rfind("\n\n") + 1]
    return [line[6:] for line in complete.splitlines() if line.startswith("data: ")]


def content_events(out: Path) -> int:
    """Content chunks a stream's client has received so far (no error, no usage-only chunk)."""
    count = 0
    for event in data_events(out):
        if event != "[DONE]" and '"error"' not in event:
            chunk = json.loads(event)
            count += bool(chunk["choices"] and chunk["choices"][0]["delta"].get("content"))
    return count


def test_sigterm_drains_in_flight_streams(server, tmp_path):
    """Last in the module: stops the shared server.

    In flight at SIGTERM: one stream mid-output (long by construction) and three admitted while the
    engine is paused (so none can have finished, however fast the machine). The drain refuses new
    work, lets the three run to their end and keeps the long one streaming, still draining, until its
    client leaves; then the process exits 0."""
    server.wait_idle(within=30)
    long_out = tmp_path / "long.txt"
    outputs = [tmp_path / f"stream-{i}.txt" for i in range(3)]
    curls = []
    try:
        curls.append(long_curl := curl_stream(server, LONG_STREAM, long_out, "drain-long"))
        wait_for(lambda: content_events(long_out) >= 2, BUSY_ENGINE_WAIT_S, "the long stream's first chunks")
        with server.engine_paused():
            curls += [curl_stream(server, SHORT_STREAM, out, f"drain-{i}") for i, out in enumerate(outputs)]
            wait_for(lambda: running(server) == 4, 30, lambda: f"4 requests admitted\n{server.request_gauges()}")
            server.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: httpx.get(server.base_url + "/ready").status_code == 503, 1.0, "/ready 503")
            refused = httpx.post(server.base_url + "/v1/chat/completions", json={**LONG, "max_tokens": 4})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "shutting_down"
        statuses = [c.communicate(timeout=120)[0] for c in curls[1:]]
        # The long stream is still generating, and the server still draining (not shutting down).
        streamed = content_events(long_out)
        wait_for(lambda: content_events(long_out) >= streamed + 5, BUSY_ENGINE_WAIT_S, "the long stream going on while draining")
        assert long_curl.poll() is None
        assert httpx.get(server.base_url + "/health").status_code == 200
        assert httpx.get(server.base_url + "/ready").status_code == 503
        assert running(server) == 1, server.request_gauges()
        assert '"drained"' not in server.log_path.read_text()
        long_curl.kill()  # its client goes away: the last in-flight request ends
        exit_code = server.proc.wait(60)
    finally:
        for curl in curls:
            if curl.poll() is None:
                curl.kill()
    assert exit_code == 0
    assert statuses == ["200"] * 3
    for out in outputs:
        events = data_events(out)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["usage"]["completion_tokens"] == SHORT_TOKENS
        assert any(c["choices"] and c["choices"][0]["finish_reason"] == "length" for c in chunks)
    logged = server.access_log()
    for i in range(3):  # --log-request-content puts prompt and output in the access line
        line = logged[f"drain-{i}"]
        assert line["status"] == 200 and line["completion_tokens"] == SHORT_TOKENS and len(line["outputs"]) == 1
        assert line["prompt"].endswith("<|bom|><|user|> Go on.<|eom|><|bom|><|assistant|>")


# ---- engine death


def engine_core(server) -> psutil.Process:
    for process in server.engine_processes():
        if "EngineCore" in process.name() or "EngineCore" in " ".join(process.cmdline()):
            return process
    raise AssertionError("no engine core process")


def consume_stream(base_url: str, sink: list, body: dict, started: threading.Event) -> None:
    try:
        with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=120) as resp:
            events = []
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) >= 2:
                        started.set()
            sink.append((resp.status_code, events, time.monotonic()))
    except httpx.HTTPError as exc:
        sink.append((None, [repr(exc)], time.monotonic()))


def test_engine_death_fails_fast_and_exits_non_zero(dev_model):
    server = start_server(*LONG_CONTEXT_ARGS)
    try:
        streamed: list = []
        non_stream: list = []

        def call():
            resp = httpx.post(server.base_url + "/v1/chat/completions", json=LONG, timeout=120)
            non_stream.append((resp.status_code, resp.json(), time.monotonic()))

        streaming = threading.Event()
        threads = [
            threading.Thread(target=consume_stream, args=(server.base_url, streamed, LONG_STREAM, streaming)),
            threading.Thread(target=call),
        ]
        threads[0].start()
        assert streaming.wait(BUSY_ENGINE_WAIT_S), "stream did not start"
        threads[1].start()
        wait_for(lambda: server.requests_running(2), BUSY_ENGINE_WAIT_S, server.request_gauges)
        engine_core(server).kill()
        killed = time.monotonic()
        # Probed before the requests end: the process exits about 2 s after the engine's death.
        wait_for(lambda: httpx.get(server.base_url + "/health").status_code == 503, 2.0, "/health 503")
        new = httpx.post(server.base_url + "/v1/chat/completions", json={**LONG, "max_tokens": 4})
        assert new.status_code == 503
        for t in threads:
            t.join(30)
        exit_code = server.proc.wait(30)
    finally:
        server.stop()
    assert exit_code not in (0, None)
    status, body, non_stream_ended = non_stream[0]
    assert status == 503 and body["error"]["type"] == "service_unavailable"
    stream_status, events, stream_ended = streamed[0]
    assert stream_status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "service_unavailable"
    ended = max(non_stream_ended, stream_ended) - killed
    assert ended < 5.0
    print(f"in-flight requests failed {ended:.2f}s after the engine died; exit code {exit_code}")
