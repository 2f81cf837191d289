"""Every invalid request gets OpenAI's error envelope with the right status, and the server lives on."""

from __future__ import annotations

import re

import openai
import pytest

from tests.support import MODEL_NAME

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


# ------------------------------------------------ client input that gave 500s (through the openai client)


def _nested_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def _nested_args(depth: int) -> str:
    return "{" + '"a": {' * (depth - 1) + "}" * depth


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


def _status_counts(server) -> tuple[float, float]:
    """Requests answered 5xx, and recorded as 499, so far (all routes)."""
    samples = re.findall(r'^jamba_http_requests_total\{[^}]*status="(\d+)"[^}]*\} (\S+)$', server.metrics_text(), re.M)
    return (
        sum(float(v) for status, v in samples if status.startswith("5")),
        sum(float(v) for status, v in samples if status == "499"),
    )


_GROUPS = "(" * 500 + "a" + ")" * 500
_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": _nested_args(900)}}
_HISTORY = [MSG[0], {"role": "assistant", "tool_calls": [_CALL]}, {"role": "tool", "tool_call_id": "c1", "content": "ok"}]


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"logit_bias": {"²": 1}}, "logit_bias"),
        ({"response_format": _schema_format(_nested_schema(150))}, "response_format.json_schema.schema"),
        ({"response_format": _schema_format({"type": "string", "pattern": _GROUPS})}, "response_format.json_schema.schema"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": _nested_schema(150)}}], "tool_choice": "required"}, "tools[0].function.parameters"),
        ({"messages": _HISTORY}, "messages[1].tool_calls[0].function.arguments"),
    ],
    ids=["logit_bias_superscript", "schema_depth_150", "pattern_500_groups", "tool_schema_depth_150", "tool_call_arguments_depth_900"],
)
def test_input_that_gave_500s_is_a_400(client, server, http, fields, param):
    before = _status_counts(server)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**{"model": MODEL_NAME, "messages": MSG, "max_tokens": 2, **fields})
    assert info.value.status_code == 400
    assert info.value.param == param
    assert info.value.type == "invalid_request_error"
    assert info.value.response.headers.get("x-request-id")
    assert _status_counts(server) == before  # no 5xx, and nothing miscounted as a client that left
    still_serving(http)
