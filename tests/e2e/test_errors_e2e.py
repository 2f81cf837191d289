"""Every invalid request gets OpenAI's error envelope with the right status, and the server lives on."""

from __future__ import annotations

import pytest

from tests.conftest import MODEL_NAME

MSG = [{"role": "user", "content": "hi"}]
CHAT = {"model": MODEL_NAME, "messages": MSG, "max_tokens": 2}




def still_serving(http):
    resp = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 1


CASES = [
    ("/v1/chat/completions", {**CHAT, "temperature": -1}, 400, "temperature", None),
    ("/v1/chat/completions", {**CHAT, "n": 0}, 400, "n", None),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", None),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {**CHAT, "messages": "hello"}, 400, "messages", None),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400, "temperature", None),
    ("/v1/chat/completions", {"model": MODEL_NAME}, 400, "messages", None),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 10**6}, 400, "max_tokens", "context_length_exceeded"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "word " * 5000}]}, 400, "messages", "context_length_exceeded"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"999999": 1}}, 400, "logit_bias", None),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {**CHAT, "bogus": True}, 400, "bogus", None),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": [1, 99999999]}, 400, "prompt", None),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model", "model_not_found"),
    ("/tokenize", {"prompt": "x", "messages": MSG}, 400, None, None),
]


@pytest.mark.parametrize("path, body, status, param, code", CASES)
def test_error_envelope(http, path, body, status, param, code):
    resp = http.post(path, json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] == code
    still_serving(http)


@pytest.mark.parametrize("raw", [b'{"model": "x", "messages": [', b"not json", b""])
def test_malformed_json(http, raw):
    resp = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"
    still_serving(http)


def test_unknown_route_and_method(http):
    resp = http.get("/v1/nothing")
    assert resp.status_code == 404 and resp.json()["error"]["message"]
    resp = http.get("/v1/chat/completions")
    assert resp.status_code == 405 and resp.json()["error"]["message"]


def test_streaming_request_errors_before_stream_starts(http):
    resp = http.post("/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 10**6})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "context_length_exceeded"
    still_serving(http)
