"""Clients that try to hold the server: a stream nobody reads, a deadline asked longer than the
operator allows. Against live servers; nothing here depends on how fast the machine generates (the
stalled stream generates until the socket is full, which it must be in the end; the deadline test
keeps the engine paused, so only the deadline can end the request)."""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support import LONG_CONTEXT_ARGS, LONG_MAX_TOKENS, MODEL_NAME, start_server, wait_for

MESSAGES = [{"role": "user", "content": "Go on."}]
WRITE_TIMEOUT_S = 2
SERVER_TIMEOUT_S = 5


@pytest.fixture(scope="module")
def slow_server(dev_model):
    """One engine slot, so a client holding it would hold the whole server."""
    proc = start_server(*LONG_CONTEXT_ARGS, "--stream-write-timeout", str(WRITE_TIMEOUT_S), "--max-concurrent-requests", "1")
    yield proc
    assert proc.stop() == 0, proc.log_tail()


@pytest.fixture(scope="module")
def deadline_server(dev_model):
    proc = start_server("--request-timeout", str(SERVER_TIMEOUT_S))
    yield proc
    assert proc.stop() == 0, proc.log_tail()


def aborted(server, cause: str) -> float:
    return server.metric("jamba_requests_aborted_total", f'cause="{cause}"')


def _stalled_stream(port: int) -> socket.socket:
    """Start a long stream with a big event per token (4 choices, 20 logprobs each) and never read it."""
    body = json.dumps({
        "model": MODEL_NAME, "messages": MESSAGES, "max_tokens": LONG_MAX_TOKENS, "ignore_eos": True,
        "stream": True, "n": 4, "logprobs": True, "top_logprobs": 20,
    }).encode()  # fmt: skip
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.connect(("127.0.0.1", port))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def test_a_client_that_stops_reading_loses_its_slot(slow_server):
    before = aborted(slow_server, "slow_client")
    sock = _stalled_stream(slow_server.port)
    try:
        wait_for(lambda: slow_server.metric("jamba_requests_running") == 1, 120, "the stalled stream admitted")
        # The engine generates until the socket and uvicorn's buffer are full; the next write then
        # waits WRITE_TIMEOUT_S and the stream is cut. Before, it waited forever, holding the slot.
        wait_for(lambda: aborted(slow_server, "slow_client") == before + 1, 600, "the stalled stream cut")
        slow_server.wait_idle(60)
        resp = httpx.post(
            slow_server.base_url + "/v1/chat/completions",
            json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 4},
            timeout=120,
        )
        assert resp.status_code == 200, resp.text  # the server's only slot is free again
    finally:
        sock.close()
    assert "stream cut: the client did not accept data (slow_client)" in slow_server.log_tail(200)


def test_the_deadline_header_cannot_extend_the_servers_timeout(deadline_server):
    """With the engine paused the request cannot finish: only a deadline ends it, and the header's
    (11 days) must not replace the server's 5 s. (4,000 tokens: the abort, sent during the pause,
    reaches the engine long before such a request could finish once it resumes.)"""
    before = aborted(deadline_server, "deadline")
    with ThreadPoolExecutor(1) as pool:
        with deadline_server.engine_paused():
            pending = pool.submit(
                httpx.post, deadline_server.base_url + "/v1/chat/completions",
                json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 4000, "ignore_eos": True},
                headers={"X-Request-Timeout": "1000000"}, timeout=300,
            )  # fmt: skip
            wait_for(lambda: aborted(deadline_server, "deadline") == before + 1, 120, "the server's deadline abort")
        resp = pending.result()
    assert resp.status_code == 504, resp.text
    assert resp.json()["error"]["code"] == "request_timeout"
