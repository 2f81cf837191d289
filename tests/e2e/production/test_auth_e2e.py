"""API keys against the production server: missing, wrong and right keys; which paths need none."""

from __future__ import annotations

import httpx

from tests.e2e.production.config import KEY, chat_body


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
