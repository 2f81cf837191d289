"""One ASGI middleware for what every HTTP request shares: request id, body-size limit, API-key
check, one structured access-log line when the response has been sent (streams included), and the
last resort for an exception no handler mapped (a 500 with the request id, its traceback logged once)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Awaitable, Callable, Sequence

from starlette.exceptions import HTTPException

from jamba_server.core.tenancy import Tenant
from jamba_server.http.auth import ApiKeyChecker
from jamba_server.errors import APIError, AuthenticationError, InternalServerError, RequestTooLargeError, protocol_for_path
from jamba_server.logs import ACCESS_LOGGER, bounded_traceback
from jamba_server.metrics import HTTP_DURATION, HTTP_IN_FLIGHT, HTTP_REQUESTS, record_rejection

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

access_log = logging.getLogger(ACCESS_LOGGER)
logger = logging.getLogger(__name__)
_MAX_REQUEST_ID = 128
TENANT = "tenant"  # the scope-state key of the request's Tenant
ROUTES = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/messages/count_tokens", "/v1/responses", "/v1/models",
     "/tokenize", "/detokenize", "/health", "/ready", "/metrics", "/version", "/openapi.json", "/docs", "/redoc"}
)  # fmt: skip


def route_label(path: str) -> str:
    """A bounded label for the route: known paths as they are, anything else as `other`."""
    if path in ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path.startswith("/v1/responses/"):
        return "/v1/responses/{response_id}"
    return "other"


def request_info(scope: Scope) -> dict[str, Any]:
    """Per-request facts routes add for the access log (token counts, model, ...)."""
    return scope.setdefault("state", {}).setdefault("jamba", {})


def request_tenant(scope: Scope) -> Tenant | None:
    """The prefix-cache tenant of the key the request was authenticated with (None: no tenants)."""
    return scope.get("state", {}).get(TENANT)


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a body without Content-Length outgrows the limit; FastAPI passes
    HTTP exceptions from body parsing through, and the app maps this one to 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"The request body is larger than {limit} bytes.")


class RequestContextMiddleware:
    def __init__(self, app: Any, *, max_body_bytes: int, auth: ApiKeyChecker, tenants: Sequence[Tenant | None] = ()):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.auth = auth
        self.tenants = tenants  # of each of auth's keys, in their order

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = (headers.get("x-request-id") or "")[:_MAX_REQUEST_ID] or uuid.uuid4().hex
        info = request_info(scope)
        info["request_id"] = request_id
        info["arrived"] = started
        status = {"code": 0}
        header_id = (b"x-request-id", request_id.encode("latin-1", errors="replace"))

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], header_id]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._finish(scope, info, status["code"], started)

        error = self._authenticate(scope, headers)
        length = headers.get("content-length")
        if error is None and length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            error = self._too_large()
        if error is not None:
            record_rejection(error.status_code, error.code)
            await self._send_error(error, scope["path"], send_wrapper)
            return

        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    record_rejection(413, "request_too_large")
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        HTTP_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive_limited, send_wrapper)
        except Exception as exc:  # noqa: BLE001 - the last resort: an exception no handler mapped
            await self._unhandled(exc, scope, info, bool(status["code"]), send_wrapper, started)
        finally:
            HTTP_IN_FLIGHT.dec()
            if not info.get("_finished"):  # the client left before the end (the task was cancelled)
                self._finish(scope, info, status["code"] or 499, started)

    def _authenticate(self, scope: Scope, headers: dict[str, str]) -> APIError | None:
        """The 401 for a protected path without a configured key; else None, the request's tenant
        (core/tenancy.py: whose prefix cache it may share, never the key) left in its scope's state."""
        if self.auth.is_open(scope["path"]):
            return None
        position = self.auth.match(headers.get("authorization"), headers.get("x-api-key"))
        if position is None:
            how = "`x-api-key: <key>`" if protocol_for_path(scope["path"]) == "anthropic" else "`Authorization: Bearer <key>`"
            return AuthenticationError(f"Incorrect or missing API key: send {how}.")
        tenant = self.tenants[position] if position < len(self.tenants) else None
        scope.setdefault("state", {})[TENANT] = tenant
        if tenant is not None:
            request_info(scope)["tenant"] = tenant.name
        return None

    async def _unhandled(
        self, exc: Exception, scope: Scope, info: dict[str, Any], started_response: bool, send: Send, started: float
    ) -> None:
        """Handled here, inside this middleware, so the 500 carries the request id and is counted as
        one; not re-raised, so neither Starlette nor uvicorn logs the traceback again."""
        info["error"] = type(exc).__name__
        logger.error(
            "unhandled %s in %s %s (request %s)\n%s",
            type(exc).__name__, scope["method"], scope["path"], info["request_id"], bounded_traceback(exc),
        )  # fmt: skip
        try:
            if not started_response:
                error = InternalServerError("The server had an error while processing your request.")
                await self._send_error(error, scope["path"], send)
        finally:
            # Counted as a 500 also when the response had started (a stream cut short);
            # uvicorn then closes the connection.
            self._finish(scope, info, 500, started)

    def _too_large(self) -> RequestTooLargeError:
        return RequestTooLargeError(f"The request body is larger than {self.max_body_bytes} bytes.")

    @staticmethod
    async def _send_error(error: APIError, path: str, send: Send) -> None:
        body = json.dumps(error.envelope_for(protocol_for_path(path))).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if error.status_code == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _finish(scope: Scope, info: dict[str, Any], status: int, started: float) -> None:
        """Once per request: HTTP metrics and the access-log line."""
        if info.get("_finished"):
            return
        info["_finished"] = True
        duration = time.perf_counter() - started
        route = route_label(scope["path"])
        HTTP_REQUESTS.labels(route, scope["method"], str(status), info.get("model", "")).inc()
        HTTP_DURATION.labels(route, scope["method"]).observe(duration)
        if not access_log.isEnabledFor(logging.INFO):
            return
        fields = {"method": scope["method"], "path": scope["path"], "status": status, "duration_s": round(duration, 6)}
        fields.update((k, v) for k, v in info.items() if not k.startswith("_") and k != "arrived")
        access_log.info("request", extra=fields)
