"""Typed API errors and OpenAI's error envelope. Mapped to HTTP once, in the app."""

from __future__ import annotations

from typing import Any


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


class InvalidRequestError(APIError):
    """The request is well-formed JSON but asks for something invalid (400)."""


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
