"""Connections, request ids and logs against the production server: an idle keep-alive connection
stays usable, the request id is echoed or generated, the access log is JSON and holds no content."""

from __future__ import annotations

import re
import socket
import time

from tests.e2e.production.config import chat_body
from tests.support import wait_for


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
