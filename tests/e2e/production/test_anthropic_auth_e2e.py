"""Anthropic's client against the production server: `x-api-key` (what it sends) and Bearer both
work; a wrong key is a 401 in Anthropic's envelope; limits answer in it too."""

from __future__ import annotations

import anthropic
import pytest

from tests.e2e.production.config import KEY
from tests.support import MODEL_NAME

HI = [{"role": "user", "content": "hi"}]


def client(server, **auth) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, max_retries=0, timeout=120, **auth)


def test_x_api_key_and_bearer_are_accepted(server):
    for auth in ({"api_key": KEY}, {"auth_token": KEY}):
        message = client(server, **auth).messages.create(model=MODEL_NAME, max_tokens=4, messages=HI)
        assert message.type == "message" and message.usage.output_tokens >= 1


def test_wrong_key_is_a_401_in_anthropics_envelope(server):
    with pytest.raises(anthropic.AuthenticationError) as refused:
        client(server, api_key="wrong-key-0123456789abcdef").messages.create(model=MODEL_NAME, max_tokens=4, messages=HI)
    assert refused.value.status_code == 401
    assert refused.value.body == {"type": "error", "error": {"type": "authentication_error", "message": refused.value.body["error"]["message"]}}


def test_limits_answer_in_anthropics_envelope(server):
    with pytest.raises(anthropic.BadRequestError) as refused:
        client(server, api_key=KEY).messages.create(model=MODEL_NAME, max_tokens=4, messages=HI, stop_sequences=["a", "b", "c"])
    assert refused.value.body["error"]["type"] == "invalid_request_error"
    assert refused.value.body["error"]["message"].startswith("stop_sequences")
    with pytest.raises(anthropic.BadRequestError) as refused:
        client(server, api_key=KEY).messages.create(model=MODEL_NAME, max_tokens=10_000, messages=HI)
    assert "max_tokens" in refused.value.body["error"]["message"]
