"""Request limits against the production server: per-field limits on chat and /tokenize, and the body
size limit with and without a Content-Length."""

from __future__ import annotations

import json

import pytest

from tests.e2e.production.config import MSG, chat_body
from tests.support import MODEL_NAME


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
