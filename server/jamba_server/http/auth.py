"""API-key authentication: `Authorization: Bearer KEY` or `x-api-key: KEY`, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Iterable

OPEN_PATHS = frozenset({"/health", "/ready"})
# Shorter keys are refused at startup: guessable, and the sign of a string split into characters.
MIN_API_KEY_LENGTH = 16


def check_api_keys(keys: Any) -> None:
    """Raise unless `keys` is a list (or tuple) of strings of at least MIN_API_KEY_LENGTH characters.
    Messages name the position, never the key."""
    if isinstance(keys, (str, bytes)) or not isinstance(keys, (list, tuple)):
        raise TypeError(
            f"api_keys must be a list of keys, not a {type(keys).__name__} "
            "(a string would be taken as one-character keys)"
        )
    for i, key in enumerate(keys):
        if not isinstance(key, str):
            raise TypeError(f"api_keys[{i}] is a {type(key).__name__}, not a string")
        if len(key) < MIN_API_KEY_LENGTH:
            raise ValueError(
                f"api_keys[{i}] is shorter than {MIN_API_KEY_LENGTH} characters (the key is not shown)"
            )


class ApiKeyChecker:
    """Accepts any of the configured keys. With no keys configured, everything is open."""

    def __init__(self, keys: Iterable[str], metrics_require_auth: bool = False):
        keys = list(keys) if not isinstance(keys, (str, bytes)) else keys
        check_api_keys(keys)
        # Compare fixed-length digests so neither a key's length nor its content leaks through timing.
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]
        self.metrics_require_auth = metrics_require_auth

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def is_open(self, path: str) -> bool:
        if not self.enabled or path in OPEN_PATHS:
            return True
        return path == "/metrics" and not self.metrics_require_auth

    def accepts(self, authorization: str | None, x_api_key: str | None = None) -> bool:
        return self.match(authorization, x_api_key) is not None

    def match(self, authorization: str | None, x_api_key: str | None = None) -> int | None:
        """The position of the configured key sent as `Authorization: Bearer KEY` (OpenAI's clients)
        or `x-api-key: KEY` (Anthropic's), either being enough; None if neither is one. The position
        says whose request it is (its prefix-cache tenant) without the key going any further. Both
        headers with different keys: the bearer's counts (the client holds both anyway)."""
        scheme, _, token = (authorization or "").partition(" ")
        bearer = self._position(token.strip() if scheme.lower() == "bearer" else "")
        other = self._position((x_api_key or "").strip())
        return bearer if bearer is not None else other

    def _position(self, token: str) -> int | None:
        if not token:
            return None
        candidate = hashlib.sha256(token.encode()).digest()
        found = None
        for i, digest in enumerate(self._digests):  # no early exit: every key is compared
            if hmac.compare_digest(candidate, digest):
                found = i
        return found
