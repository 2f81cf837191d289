"""Stored responses for the Responses API (`store`, `previous_response_id`, GET / DELETE): bounded,
in memory, per process.

vLLM's server keeps every stored response in a dict that is never evicted (marked FIXME there): a
long-running server grows until it is killed. This store holds at most `max_entries` responses and
`max_bytes` of them (their encoded JSON, which is what is kept), each for at most `ttl` seconds; the
least recently used goes first. A response evicted, expired, deleted or stored by another replica is
simply not found (404), which clients of a load-balanced deployment must expect anyway (README:
"OpenAI's Responses API").

Thread-safe: a large request is prepared (its history read) in a worker thread while the event loop
stores finished responses.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

from jamba_server.core.responses_api import StoredResponse


@dataclass
class _Entry:
    value: StoredResponse
    expires: float


@dataclass
class ResponseStore:
    max_entries: int
    max_bytes: int
    ttl: float
    clock: Callable[[], float] = time.monotonic
    _entries: OrderedDict[str, _Entry] = field(default_factory=OrderedDict)  # least recently used first
    _expiry: deque[tuple[float, str]] = field(default_factory=deque)  # in put order, which is expiry order
    _bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response_id: str, value: StoredResponse) -> None:
        with self._lock:
            self._remove(response_id)
            now = self.clock()
            self._expire(now)
            if value.size > self.max_bytes or self.max_entries == 0:
                return
            entry = _Entry(value, now + self.ttl)
            self._entries[response_id] = entry
            self._expiry.append((entry.expires, response_id))
            if len(self._expiry) > 2 * len(self._entries) + 64:  # evicted and deleted ones still queued
                self._expiry = deque(sorted((e.expires, key) for key, e in self._entries.items()))
            self._bytes += value.size
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                self._remove(next(iter(self._entries)))

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            self._expire(self.clock())
            entry = self._entries.get(response_id)
            if entry is None:
                return None
            self._entries.move_to_end(response_id)
            return entry.value

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._remove(response_id)

    def _expire(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            expires, response_id = self._expiry.popleft()
            entry = self._entries.get(response_id)
            if entry is not None and entry.expires == expires:  # not replaced since
                self._remove(response_id)

    def _remove(self, response_id: str) -> bool:
        entry = self._entries.pop(response_id, None)
        if entry is None:
            return False
        self._bytes -= entry.value.size
        return True
