"""Process lifecycle against real server processes: graceful SIGTERM drain, engine death."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import MODEL_NAME, start_server

STREAM = {
    "model": MODEL_NAME, "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 1200,
    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
}  # fmt: skip


def consume_stream(base_url: str, sink: list, body: dict = STREAM, started: threading.Event | None = None) -> None:
    try:
        with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=120) as resp:
            events = []
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if started is not None and len(events) >= 2:
                        started.set()
            sink.append((resp.status_code, events))
    except httpx.HTTPError as exc:
        sink.append((None, [repr(exc)]))


def running(base_url: str) -> float:
    for line in httpx.get(base_url + "/metrics").text.splitlines():
        if line.startswith("jamba_requests_running "):
            return float(line.split()[1])
    raise AssertionError("no jamba_requests_running")


def request_gauges(base_url: str) -> str:
    """The request and admission gauges, to explain a wrong running count."""
    lines = httpx.get(base_url + "/metrics").text.splitlines()
    return "\n".join(l for l in lines if l.startswith(("jamba_requests_", "jamba_admission_limit", "vllm:num_requests_")))


def wait_for(predicate, within: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.02)
    pytest.fail(f"{what} not within {within}s")


def curl_stream(base_url: str, out: Path) -> subprocess.Popen:
    """A stream consumed by a separate curl process, so this test process stays free to probe the
    server while the engine saturates the machine's cores."""
    return subprocess.Popen(
        ["curl", "-sN", "--noproxy", "*", "-o", str(out), "-w", "%{http_code}", "-H", "Content-Type: application/json",
         "-d", json.dumps(STREAM), base_url + "/v1/chat/completions"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def streaming(curl: subprocess.Popen, out: Path) -> bool:
    """The stream has sent its first chunk and is still open."""
    return curl.poll() is None and out.exists() and out.read_bytes().count(b"data: ") >= 2


def test_sigterm_drains_in_flight_streams(dev_model, tmp_path):
    server = start_server("--drain-timeout", "120", "--log-request-content")
    try:
        outputs = [tmp_path / f"stream-{i}.txt" for i in range(3)]
        curls = [curl_stream(server.base_url, out) for out in outputs]
        try:
            wait_for(lambda: all(streaming(c, out) for c, out in zip(curls, outputs)), 60, "3 streams in flight")
        except BaseException:
            for curl, out in zip(curls, outputs):
                print(f"curl exit={curl.poll()} output head={out.read_bytes()[:300] if out.exists() else None!r}")
            print(server.log_tail())
            raise
        assert running(server.base_url) == 3, request_gauges(server.base_url) + "\n" + server.log_tail(20)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(server.base_url + "/ready").status_code == 503, 1.0, "/ready 503")
        refused = httpx.post(server.base_url + "/v1/chat/completions", json={**STREAM, "stream": False, "stream_options": None})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "shutting_down"
        assert httpx.get(server.base_url + "/health").status_code == 200  # alive while draining
        statuses = [c.communicate(timeout=120)[0] for c in curls]
        exit_code = server.proc.wait(60)
        drain_s = time.monotonic() - signalled
    finally:
        server.stop()
    assert exit_code == 0
    assert statuses == ["200"] * 3
    for out in outputs:
        events = [line[6:] for line in out.read_text().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["usage"]["completion_tokens"] == 1200
        assert any(c["choices"] and c["choices"][0]["finish_reason"] == "length" for c in chunks)
    print(f"drain took {drain_s:.2f}s with 3 streams in flight")
    logged = [json.loads(l) for l in server.log_path.read_text().splitlines() if '"path": "/v1/chat/completions"' in l]
    streamed = [l for l in logged if l["status"] == 200]
    assert len(streamed) == 3
    for line in streamed:  # --log-request-content puts prompt and output in the access line
        assert line["prompt"].endswith("<|bom|><|user|> Go on.<|eom|><|bom|><|assistant|>")
        assert line["completion_tokens"] == 1200 and len(line["outputs"]) == 1


def engine_core(server) -> psutil.Process:
    for child in psutil.Process(server.proc.pid).children(recursive=True):
        if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
            return child
    raise AssertionError("no engine core process")


def test_engine_death_fails_fast_and_exits_non_zero(dev_model):
    server = start_server()
    try:
        results: list = []
        non_stream: list = []

        def call():
            body = {**STREAM, "stream": False, "stream_options": None, "max_tokens": 2000}
            started = time.monotonic()
            resp = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)
            non_stream.append((resp.status_code, resp.json(), time.monotonic() - started))

        streaming = threading.Event()
        threads = [
            threading.Thread(
                target=consume_stream, args=(server.base_url, results, {**STREAM, "max_tokens": 2000}, streaming)
            ),
            threading.Thread(target=call),
        ]
        for t in threads:
            t.start()
        assert streaming.wait(60), "stream did not start"
        wait_for(lambda: running(server.base_url) == 2, 30, "2 running requests")
        engine_core(server).kill()
        killed = time.monotonic()
        for t in threads:
            t.join(30)
        ended = time.monotonic() - killed
        wait_for(lambda: httpx.get(server.base_url + "/health").status_code == 503, 2.0, "/health 503")
        new = httpx.post(server.base_url + "/v1/chat/completions", json={**STREAM, "stream": False, "stream_options": None})
        assert new.status_code == 503
        exit_code = server.proc.wait(30)
    finally:
        server.stop()
    assert exit_code not in (0, None)
    status, body, _ = non_stream[0]
    assert status == 503 and body["error"]["type"] == "service_unavailable"
    stream_status, events = results[0]
    assert stream_status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "service_unavailable"
    assert ended < 5.0
    print(f"in-flight requests failed {ended:.2f}s after the engine died; exit code {exit_code}")
