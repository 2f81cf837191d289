"""Logging setup: structured JSON lines (python-json-logger) or plain text."""

from __future__ import annotations

import logging
import sys
import traceback

from pythonjsonlogger.json import JsonFormatter

ACCESS_LOGGER = "jamba_server.access"
# A logged traceback keeps at most this many characters: a RecursionError's runs to ~150 KB.
MAX_TRACEBACK_CHARS = 8192


def bounded_traceback(exc: BaseException, max_chars: int = MAX_TRACEBACK_CHARS) -> str:
    """`exc`'s traceback (its causes included) in at most about `max_chars`: whole lines from its
    start (where the request entered) and from its end (where it failed, and the error)."""
    lines = traceback.format_exception(exc)
    total = sum(map(len, lines))
    if total <= max_chars:
        return "".join(lines)
    head: list[str] = []
    tail: list[str] = []
    room = max_chars // 4
    for line in lines:
        if len(line) > room:
            break
        head.append(line)
        room -= len(line)
    room = max_chars - max_chars // 4
    for line in reversed(lines[len(head) :]):
        if len(line) > room:
            break
        tail.append(line)
        room -= len(line)
    omitted = total - sum(map(len, head)) - sum(map(len, tail))
    return "".join(head) + f"  ... [{omitted} characters omitted] ...\n" + "".join(reversed(tail))


class _ApiWorkerField(logging.Filter):
    """Stamps each record with the API process that logged it (`api_server_count` > 1)."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.api_worker = self.index
        return True


def configure_logging(level: str, fmt: str, api_worker: int | None = None) -> None:
    """Log lines to stderr; an API process of a multi-process server (`api_worker`, its index) adds
    `api_worker` to each line."""
    handler = logging.StreamHandler(sys.stderr)
    if api_worker is not None:
        handler.addFilter(_ApiWorkerField(api_worker))
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        worker = "" if api_worker is None else " [api_worker %(api_worker)s]"
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s{worker} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
