"""Typed API errors and their envelopes (OpenAI's, Anthropic's). Mapped to HTTP once, in the app
(http/errors.py), and for the few errors the request middleware answers itself, there."""

from __future__ import annotations

from typing import Any, Sequence


class APIError(Exception):
    status_code = 400
    error_type = "invalid_request_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = headers

    def envelope(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def anthropic_envelope(self) -> dict[str, Any]:
        """Anthropic's shape: no param field, so a param goes into the message."""
        message = self.message
        if self.param and self.param not in message:
            message = f"{self.param}: {message}"
        kind = _ANTHROPIC_TYPES.get(self.status_code, "invalid_request_error" if self.status_code < 500 else "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}

    def envelope_for(self, protocol: str) -> dict[str, Any]:
        return self.anthropic_envelope() if protocol == "anthropic" else self.envelope()


# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors); its overloaded_error is
# a 529, which no other client knows: this server keeps 503 and uses the type.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 503: "overloaded_error", 504: "timeout_error",
}  # fmt: skip


def protocol_for_path(path: str) -> str:
    """Whose envelope an error on `path` gets (the Responses API uses OpenAI's)."""
    return "anthropic" if path == "/v1/messages" or path.startswith("/v1/messages/") else "openai"


class InvalidRequestError(APIError):
    """The request is well-formed JSON but asks for something invalid (400)."""


def _param_path(loc: tuple[Any, ...]) -> str | None:
    parts = [p for p in loc if p != "body"]
    if not parts or not isinstance(parts[0], str):
        return None
    path = parts[0]
    for part in parts[1:]:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def invalid_body(errors: Sequence[Any]) -> InvalidRequestError:
    """A request body that failed validation (pydantic's `errors()`; FastAPI's put `body` first in
    each location) → the 400 naming the first error's field."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return InvalidRequestError(f"The request body is not valid JSON: {first.get('msg')}")
    param = _param_path(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return InvalidRequestError(f"{param}: {message}" if param else message, param=param)


class ContextLengthExceededError(InvalidRequestError):
    default_code = "context_length_exceeded"


class ModelNotFoundError(APIError):
    status_code = 404
    default_code = "model_not_found"


class NotFoundError(APIError):
    status_code = 404
    default_code = "not_found"


class ServiceUnavailableError(APIError):
    """The engine is not loaded, has died, or the server is shutting down (503)."""

    status_code = 503
    error_type = "service_unavailable"
    default_code = "service_unavailable"


def shutting_down(retry_after: int) -> ServiceUnavailableError:
    """The draining server's refusal, wherever a request meets it (readiness, admission)."""
    return ServiceUnavailableError(
        "The server is shutting down; retry on another replica.",
        code="shutting_down",
        headers={"Retry-After": str(retry_after)},
    )


class AuthenticationError(APIError):
    status_code = 401
    default_code = "invalid_api_key"


class RequestTooLargeError(APIError):
    status_code = 413
    default_code = "request_too_large"


class RateLimitError(APIError):
    """Admission control: the server is at capacity; retry after `Retry-After` (429)."""

    status_code = 429
    error_type = "rate_limit_exceeded"
    default_code = "rate_limit_exceeded"


class RequestTimeoutError(APIError):
    """The request's deadline passed before it finished (504)."""

    status_code = 504
    error_type = "timeout_error"
    default_code = "request_timeout"


class InternalServerError(APIError):
    status_code = 500
    error_type = "server_error"
    default_code = "internal_error"


class ClientDisconnected(APIError):
    """The client went away before the response; nothing is sent, only logged and counted."""

    status_code = 499  # nginx's "client closed request"
    default_code = "client_disconnected"
