"""The request middleware's last resort: an exception no handler mapped is a 500 with the request id,
counted as 500 (not as a client that left), and its traceback logged once, bounded; the key check's
401s, and the tenant an accepted key leaves for the routes."""

import logging

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from jamba_server.core.tenancy import cache_tenants
from jamba_server.http.auth import ApiKeyChecker
from jamba_server.logs import MAX_TRACEBACK_CHARS, bounded_traceback
from jamba_server.http.middleware import RequestContextMiddleware, request_tenant


def _recurse(n: int) -> int:
    """Mutual recursion, as jsonschema's: Python cannot fold its traceback into one repeated line."""
    return _recurse_again(n + 1) + 1


def _recurse_again(n: int) -> int:
    return _recurse(n + 1) + 1


def _app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(RequestContextMiddleware, max_body_bytes=1 << 20, auth=ApiKeyChecker([]))

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("a bug")

    @app.get("/deep")
    async def deep() -> dict:
        return {"n": _recurse(0)}  # a RecursionError: ~1000 frames, a ~100 KB traceback

    @app.get("/midstream")
    async def midstream() -> StreamingResponse:
        async def chunks():
            yield b"data: first\n\n"
            raise RuntimeError("a bug mid-stream")

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return app


def _count(status: str) -> float:
    labels = {"route": "other", "method": "GET", "status": status, "model": ""}
    return REGISTRY.get_sample_value("jamba_http_requests_total", labels) or 0.0


@pytest.fixture
def client():
    with TestClient(_app(), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("path, error", [("/boom", "RuntimeError"), ("/deep", "RecursionError")])
def test_unhandled_exception_is_a_500_with_request_id(client, caplog, path, error):
    before_500, before_499 = _count("500"), _count("499")
    with caplog.at_level(logging.INFO):
        resp = client.get(path, headers={"x-request-id": "req-123"})
    assert resp.status_code == 500
    assert resp.headers["x-request-id"] == "req-123"
    assert resp.json() == {
        "error": {
            "message": "The server had an error while processing your request.",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    assert (_count("500"), _count("499")) == (before_500 + 1, before_499)
    tracebacks = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(tracebacks) == 1, [r.getMessage()[:200] for r in tracebacks]  # logged once, by us
    logged = tracebacks[0].getMessage()
    assert error in logged and "req-123" in logged and "Traceback" in logged
    assert len(logged) < MAX_TRACEBACK_CHARS + 500
    (access,) = [r for r in caplog.records if r.name == "jamba_server.access"]
    assert access.status == 500 and access.error == error


def test_exception_after_the_response_started_counts_as_500(client, caplog):
    before = _count("500")
    with caplog.at_level(logging.INFO):
        client.get("/midstream")  # the 200 head went out; the stream is cut short
    assert _count("500") == before + 1
    (access,) = [r for r in caplog.records if r.name == "jamba_server.access"]
    assert access.status == 500
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


def test_bounded_traceback_keeps_both_ends():
    try:
        _recurse(0)
    except RecursionError as exc:
        text = bounded_traceback(exc)
    assert len(text) <= MAX_TRACEBACK_CHARS + 100
    assert text.startswith("Traceback") and text.rstrip().endswith("maximum recursion depth exceeded")
    assert "characters omitted" in text
    try:
        raise ValueError("short")
    except ValueError as exc:
        assert "omitted" not in bounded_traceback(exc)


def test_errors_the_middleware_answers_speak_the_paths_protocol():
    """A 401 under /v1/messages is Anthropic's envelope and names `x-api-key`; elsewhere OpenAI's."""
    app = FastAPI()
    app.add_middleware(RequestContextMiddleware, max_body_bytes=1 << 20, auth=ApiKeyChecker(["k" * 16]))
    with TestClient(app) as client:
        anthropic = client.post("/v1/messages", json={})
        openai = client.post("/v1/responses", json={})
        allowed = client.post("/v1/messages", json={}, headers={"x-api-key": "k" * 16})
    assert anthropic.status_code == 401 and anthropic.json()["type"] == "error"
    assert anthropic.json()["error"]["type"] == "authentication_error" and "x-api-key" in anthropic.json()["error"]["message"]
    assert openai.status_code == 401 and openai.json()["error"]["code"] == "invalid_api_key"
    assert "Authorization: Bearer" in openai.json()["error"]["message"]
    assert allowed.status_code == 404  # through the key check to the (empty) app


def test_the_key_sent_leaves_its_tenant_for_the_routes_and_its_name_in_the_access_log(caplog):
    keys = ["sk-tenant-a-0123456789abcdef", "sk-tenant-b-0123456789abcdef"]
    tenants = cache_tenants(keys, "key")
    app = FastAPI()
    app.add_middleware(RequestContextMiddleware, max_body_bytes=1 << 20, auth=ApiKeyChecker(keys), tenants=tenants)

    @app.get("/v1/models")
    async def whose(request: Request) -> dict:
        return {"salt": request_tenant(request.scope).cache_salt}

    with TestClient(app) as client, caplog.at_level(logging.INFO):
        seen = [client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).json()["salt"] for key in keys]
        seen.append(client.get("/v1/models", headers={"x-api-key": keys[1]}).json()["salt"])
    assert seen == [tenants[0].cache_salt, tenants[1].cache_salt, tenants[1].cache_salt]
    logged = [r for r in caplog.records if r.name == "jamba_server.access"]
    assert [r.tenant for r in logged] == [tenants[0].name, tenants[1].name, tenants[1].name]
    assert not any(key in r.getMessage() + str(vars(r)) for r in logged for key in keys)
