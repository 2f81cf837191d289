"""The pipeline's request deadline (the operator's timeout and the X-Request-Timeout header), and the
prefix-cache salt it gives every protocol's job from the tenant the request authenticated as."""

import asyncio

import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request

from jamba_server.core.outputs import ChoiceDelta, EngineStep
from jamba_server.core.tenancy import cache_tenants, key_fingerprint, scoped_cache_salt
from jamba_server.errors import InvalidRequestError
from jamba_server.http.app import create_app
from jamba_server.http.pipeline import request_deadline
from jamba_server.settings import Settings
from tests.support import wait_for


def _request(headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw})


def _state(request_timeout: float | None = None) -> float | None:
    return request_timeout  # the one setting a deadline depends on


def _seconds_left(request_timeout: float | None, headers: dict[str, str]) -> float | None:
    async def left():
        deadline = request_deadline(_request(headers), request_timeout)
        return None if deadline is None else deadline - asyncio.get_running_loop().time()

    return asyncio.run(left())


def test_header_may_shorten_the_servers_timeout_but_never_extend_it():
    state = _state(request_timeout=5)
    assert _seconds_left(state, {"X-Request-Timeout": "1000000"}) <= 5
    assert _seconds_left(state, {"X-Request-Timeout": "2"}) <= 2
    assert _seconds_left(state, {}) <= 5
    assert 900 < _seconds_left(_state(), {"X-Request-Timeout": "1000"}) <= 1000
    assert _seconds_left(_state(), {}) is None


@pytest.mark.parametrize("raw", ["0", "-1", "nan", "inf", "1e7", "soon"])
def test_header_must_be_a_positive_number(raw):
    with pytest.raises(InvalidRequestError):
        _seconds_left(_state(request_timeout=5), {"X-Request-Timeout": raw})


# ---- prefix-cache tenants: the key a request was authenticated with decides its engine cache_salt


class SaltEngine:
    """Records each engine request's cache_salt and answers with one token (the dev tokenizer)."""

    max_num_seqs, max_model_len, ready, dead = 4, 1024, False, False

    def __init__(self, tokenizer):
        self.tokenizer, self.vocab_size = tokenizer, len(tokenizer)
        self.salts: list[str | None] = []

    def start(self) -> None:
        self.ready = True

    def shutdown(self) -> None:
        pass

    def engine_params(self, spec):
        return spec

    async def generate(self, prompt_ids, params, request_id, deadline=None, *, priority=0, cache_salt=None, stream=False):
        self.salts.append(cache_salt)
        yield EngineStep(choices=(ChoiceDelta(0, "x", (5,), finish_reason="length"),), prompt_tokens=len(prompt_ids), finished=True)

    async def abort(self, request_id, cause):
        pass

    async def abort_all(self, cause):
        return 0


A, B, C = "sk-tenant-a-0123456789abcdef", "sk-tenant-b-0123456789abcdef", "sk-tenant-c-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "hi"}]
BODIES = {  # every generation protocol, each asking for one token
    "/v1/chat/completions": {"messages": MESSAGES, "max_tokens": 1},
    "/v1/completions": {"prompt": "hi", "max_tokens": 1},
    "/v1/responses": {"input": "hi", "max_output_tokens": 1, "store": False},
    "/v1/messages": {"messages": MESSAGES, "max_tokens": 1},
}


@pytest.fixture(scope="module")
def tokenizer(dev_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(dev_model)


def _salts(tokenizer, settings: Settings, sends: list[tuple[str, str | None, dict]]) -> list[str | None]:
    """The engine's cache_salt for each (path, key, extra body fields) sent to a fresh app."""
    engine = SaltEngine(tokenizer)
    with TestClient(create_app(settings, engine)) as client:
        wait_for(lambda: client.get("/ready").status_code == 200, 60, "the app ready")
        for path, key, extra in sends:
            headers = {"x-api-key": key} if path == "/v1/messages" else {"Authorization": f"Bearer {key}"} if key else {}
            response = client.post(path, json={"model": "m", **BODIES[path], **extra}, headers=headers)
            assert response.status_code == 200, response.text
    return engine.salts


def test_every_protocol_gets_its_keys_tenant_salt(tokenizer):
    team = {"team": [key_fingerprint(A), key_fingerprint(C)]}
    settings = Settings(model="m", api_keys=[A, B, C], prefix_cache_isolation="group", prefix_cache_groups=team)
    tenants = cache_tenants([A, B, C], "group", settings.prefix_cache_groups)
    sends = [(path, key, {}) for path in BODIES for key in (A, B, C)]
    expected = [tenants[i].cache_salt for _ in BODIES for i in range(3)]
    assert _salts(tokenizer, settings, sends) == expected
    assert expected[0] == expected[2] != expected[1]  # A and C share the group's; B has its own


def test_a_request_salt_is_joined_to_the_tenants_unless_there_is_none(tokenizer):
    salted = [("/v1/completions", A, {"cache_salt": "s"}), ("/v1/chat/completions", B, {"cache_salt": "s"})]
    a, b = cache_tenants([A, B], "key")
    expected = [scoped_cache_salt("s", a), scoped_cache_salt("s", b)]
    assert _salts(tokenizer, Settings(model="m", api_keys=[A, B]), salted) == expected
    # isolation off, one key, an open server: the request's own salt, as vLLM takes it
    assert _salts(tokenizer, Settings(model="m", api_keys=[A, B], prefix_cache_isolation="off"), salted) == ["s", "s"]
    assert _salts(tokenizer, Settings(model="m", api_keys=[A]), salted[:1]) == ["s"]
    open_server = [("/v1/completions", None, {"cache_salt": "s"}), ("/v1/completions", None, {})]
    assert _salts(tokenizer, Settings(model="m"), open_server) == ["s", None]
