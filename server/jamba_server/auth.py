"""API-key authentication: `Authorization: Bearer KEY`, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
from typing import Iterable

OPEN_PATHS = frozenset({"/health", "/ready"})


class ApiKeyChecker:
    """Accepts any of the configured keys. With no keys configured, everything is open."""

    def __init__(self, keys: Iterable[str], metrics_require_auth: bool = False):
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

    def accepts(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        candidate = hashlib.sha256(token.strip().encode()).digest()
        matched = False
        for digest in self._digests:  # no early exit: every key is compared
            matched |= hmac.compare_digest(candidate, digest)
        return matched
