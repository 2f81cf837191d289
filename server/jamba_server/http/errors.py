"""Errors to responses, once for the whole app (as vLLM's `exception_handling/register.py`): typed
`APIError`s raised anywhere, FastAPI's validation errors and Starlette's HTTP errors all become the
error envelope of the protocol the request spoke (OpenAI's, or Anthropic's under /v1/messages) with
the right status.

An exception none of these maps is the request middleware's last resort (a 500 with the request id):
Starlette would run a handler for `Exception` outside every middleware (no request id, counted as
499, logged twice).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jamba_server.errors import APIError, InvalidRequestError, NotFoundError, RequestTooLargeError, invalid_body, protocol_for_path
from jamba_server.metrics import record_rejection


def validation_error(exc: RequestValidationError) -> APIError:
    return invalid_body(exc.errors())


def http_error(exc: StarletteHTTPException) -> APIError:
    error: APIError
    if exc.status_code == 404:
        error = NotFoundError(str(exc.detail))
    elif exc.status_code == 413:
        error = RequestTooLargeError(str(exc.detail))
    else:
        error = InvalidRequestError(str(exc.detail))
        error.status_code = exc.status_code
    error.headers = dict(exc.headers or {}) or None
    return error


def error_response(error: APIError, request: Request) -> JSONResponse:
    """The error in the envelope of the protocol the request spoke."""
    body = error.envelope_for(protocol_for_path(request.url.path))
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    record_rejection(exc.status_code, exc.code)
    return error_response(exc, request)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(validation_error(exc), request)


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(http_error(exc), request)


def register_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http)  # type: ignore[arg-type]
