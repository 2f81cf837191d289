"""The pipeline's request deadline (the operator's timeout and the X-Request-Timeout header)."""

import asyncio

import pytest
from starlette.requests import Request

from jamba_server.errors import InvalidRequestError
from jamba_server.http.pipeline import request_deadline


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
