"""Stored responses for the Responses API (`store`, `previous_response_id`, GET / DELETE): bounded,
in memory, per process.

vLLM's server keeps every stored response in a dict that is never evicted (marked FIXME there): a
long-running server grows until it is killed. This store holds at most `max_entries` responses and
`max_bytes` of them, each for at most `ttl` seconds; the least recently used goes first. A response
evicted, expired, deleted or stored by another replica is simply not found (404), which clients of
a load-balanced deployment must expect anyway (README: "Responses API").
"""

from __future__ import annotations

import time
from collections import OrderedDict
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
    _entries: OrderedDict[str, _Entry] = field(default_factory=OrderedDict)
    _bytes: int = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response_id: str, value: StoredResponse) -> None:
        self.delete(response_id)
        now = self.clock()
        while self._entries and next(iter(self._entries.values())).expires <= now:
            self._drop(next(iter(self._entries)))
        if value.size > self.max_bytes or self.max_entries == 0:
            return
        self._entries[response_id] = _Entry(value, now + self.ttl)
        self._bytes += value.size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        if entry is None:
            return None
        if entry.expires <= self.clock():
            self._drop(response_id)
            return None
        self._entries.move_to_end(response_id)
        return entry.value

    def delete(self, response_id: str) -> bool:
        if response_id not in self._entries:
            return False
        self._drop(response_id)
        return True

    def _drop(self, response_id: str) -> None:
        entry = self._entries.pop(response_id)
        self._bytes -= entry.value.size
