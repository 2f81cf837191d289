"""OpenAI's batch file format, without I/O: an input line → a request to run or the error line it
gets, result and error lines as OpenAI's batch output writes them, and what a partly written output
file already holds (for `--resume`).

Input line: `{"custom_id": str, "method": "POST", "url": "/v1/...", "body": {...}}`.
Output line: `{"id": "batch_req_...", "custom_id", "response": {"status_code", "request_id", "body"},
"error": null}`; a line that cannot become a request at all has `"response": null` and
`"error": {"code", "message"}`. Every input line gets exactly one output line; a line without a
usable custom_id is named `line-N` (its 1-based line number).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

# The batch URLs and the protocol whose error envelope each one's failures get.
BATCH_URLS: dict[str, str] = {
    "/v1/chat/completions": "openai",
    "/v1/completions": "openai",
    "/v1/responses": "openai",
    "/v1/messages": "anthropic",
}


@dataclass(frozen=True)
class BatchRequest:
    """A well-formed line: what to run and how big its line was (for the body limit)."""

    custom_id: str
    url: str
    body: dict[str, Any]
    line_number: int
    size: int  # bytes of the input line


@dataclass(frozen=True)
class LineError:
    """A line that is not a request: its error line's custom_id, code and message."""

    custom_id: str
    code: str
    message: str
    line_number: int


def synthesized_id(line_number: int) -> str:
    return f"line-{line_number}"


def parse_line(raw: bytes, line_number: int) -> BatchRequest | LineError:
    """One input line (without its newline) → the request it asks for, or why it is not one."""
    fallback = synthesized_id(line_number)
    try:
        data = json.loads(raw)
    except ValueError as exc:  # invalid UTF-8 included (UnicodeDecodeError is a ValueError)
        return LineError(fallback, "invalid_json", f"line {line_number} is not valid JSON: {exc}", line_number)
    if not isinstance(data, dict):
        return LineError(fallback, "invalid_json", f"line {line_number} is not a JSON object", line_number)
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineError(fallback, "missing_custom_id", f"line {line_number} has no custom_id (a non-empty string)", line_number)
    problem = _line_problem(data)
    if problem is not None:
        return LineError(custom_id, problem[0], problem[1], line_number)
    return BatchRequest(custom_id, data["url"], data["body"], line_number, len(raw))


def _line_problem(data: dict[str, Any]) -> tuple[str, str] | None:
    """(code, message) for a line with a custom_id that still cannot be run."""
    unknown = sorted(set(data) - {"custom_id", "method", "url", "body"})
    if unknown:
        return "invalid_line", f"unknown field(s) {unknown}; a line has custom_id, method, url and body"
    if data.get("method") != "POST":
        return "invalid_method", f"method must be POST, got {data.get('method')!r}"
    url = data.get("url")
    if url not in BATCH_URLS:
        return "invalid_url", f"url {url!r} is not supported; use one of {', '.join(BATCH_URLS)}"
    body = data.get("body")
    if not isinstance(body, dict):
        return "invalid_body", "body must be a JSON object"
    if body.get("stream"):
        return "stream_not_supported", "streaming is not supported in a batch; leave out stream or set it false"
    return None


def duplicate_error(request: BatchRequest) -> LineError:
    return LineError(
        request.custom_id,
        "duplicate_custom_id",
        f"line {request.line_number} repeats custom_id {request.custom_id!r}; each line needs its own",
        request.line_number,
    )


def batch_request_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def result_line(custom_id: str, status_code: int, request_id: str, body: Any) -> dict[str, Any]:
    """A request that ran (or was refused as a request: 400, 404, ...), as OpenAI writes it."""
    return {
        "id": batch_request_id(),
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": request_id, "body": body},
        "error": None,
    }


def error_line(error: LineError) -> dict[str, Any]:
    """A line that never became a request."""
    return {
        "id": batch_request_id(),
        "custom_id": error.custom_id,
        "response": None,
        "error": {"code": error.code, "message": error.message, "line": error.line_number},
    }


def encode_line(line: dict[str, Any]) -> bytes:
    """One output line, newline included (written as one write)."""
    return (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


@dataclass(frozen=True)
class Written:
    """What whole output lines already hold: the custom_ids of requests that ran (one line each,
    only a custom_id's first line runs), and the input line numbers of error lines."""

    custom_ids: frozenset[str] = frozenset()
    error_lines: frozenset[int] = frozenset()


def written_lines(lines: Iterable[bytes]) -> Written:
    """What an output file's whole lines (a cut last line left out) already hold."""
    ids: set[str] = set()
    error_lines: set[int] = set()
    for raw in lines:
        try:
            line = json.loads(raw)
        except ValueError:
            continue  # not one of ours: it marks nothing done
        if not isinstance(line, dict):
            continue
        error = line.get("error")
        if line.get("response") is None and isinstance(error, dict) and isinstance(error.get("line"), int):
            error_lines.add(error["line"])
        elif isinstance(line.get("custom_id"), str):
            ids.add(line["custom_id"])
    return Written(frozenset(ids), frozenset(error_lines))


@dataclass
class LineSelector:
    """Which input lines still need an output line, and duplicate detection: only a custom_id's
    first request runs, a later line with it gets a duplicate error line. On `--resume`, `written`
    holds what the output file already has; those lines are skipped."""

    written: Written = field(default_factory=Written)
    seen: set[str] = field(default_factory=set)

    def select(self, parsed: BatchRequest | LineError) -> BatchRequest | LineError | None:
        """None: already written. Else the request to run or the error line to write."""
        if isinstance(parsed, BatchRequest):
            if parsed.custom_id in self.seen:
                parsed = duplicate_error(parsed)
            else:
                self.seen.add(parsed.custom_id)
                return None if parsed.custom_id in self.written.custom_ids else parsed
        elif parsed.custom_id != synthesized_id(parsed.line_number):
            self.seen.add(parsed.custom_id)
        return None if parsed.line_number in self.written.error_lines else parsed
