"""The batch file format (core/batch.py): line parsing and validation, duplicate and resume
selection, output lines as OpenAI's batch output writes them."""

from __future__ import annotations

import json

import pytest

from jamba_server.core.batch import (
    BatchRequest,
    LineError,
    LineSelector,
    encode_line,
    error_line,
    parse_line,
    result_line,
    written_lines,
)


def line(**fields) -> bytes:
    base = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}
    return json.dumps({**base, **fields}).encode()


def test_a_well_formed_line_is_a_request_with_its_size():
    raw = line(url="/v1/completions", body={"prompt": "hi"})
    parsed = parse_line(raw, 3)
    assert parsed == BatchRequest("a", "/v1/completions", {"prompt": "hi"}, 3, len(raw))


@pytest.mark.parametrize("url", ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"])
def test_every_batch_url_is_accepted(url):
    assert isinstance(parse_line(line(url=url), 1), BatchRequest)


@pytest.mark.parametrize(
    ("raw", "code", "custom_id"),
    [
        (b"{not json", "invalid_json", "line-7"),
        (b"\xff\xfe{}", "invalid_json", "line-7"),  # not UTF-8
        (b"[1, 2]", "invalid_json", "line-7"),
        (json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}).encode(), "missing_custom_id", "line-7"),
        (line(custom_id=""), "missing_custom_id", "line-7"),
        (line(custom_id=12), "missing_custom_id", "line-7"),
        (line(method="GET"), "invalid_method", "a"),
        (line(url="/v1/embeddings"), "invalid_url", "a"),
        (line(url="/v1/chat/completions/"), "invalid_url", "a"),
        (line(body=[1]), "invalid_body", "a"),
        (line(body={"messages": [], "stream": True}), "stream_not_supported", "a"),
        (line(extra=1), "invalid_line", "a"),
    ],
)
def test_a_malformed_line_is_an_error_naming_its_custom_id_or_its_line(raw, code, custom_id):
    parsed = parse_line(raw, 7)
    assert isinstance(parsed, LineError)
    assert (parsed.code, parsed.custom_id, parsed.line_number) == (code, custom_id, 7)
    assert parsed.message


def test_stream_false_is_a_request():
    assert isinstance(parse_line(line(body={"messages": [], "stream": False}), 1), BatchRequest)


def test_a_repeated_custom_id_runs_once_and_later_lines_are_duplicate_errors():
    selector = LineSelector()
    first = selector.select(parse_line(line(), 1))
    again = selector.select(parse_line(line(), 2))
    assert isinstance(first, BatchRequest)
    assert isinstance(again, LineError) and again.code == "duplicate_custom_id" and again.custom_id == "a"


def test_a_request_after_an_error_line_with_its_custom_id_is_a_duplicate():
    selector = LineSelector()
    assert isinstance(selector.select(parse_line(line(method="GET"), 1)), LineError)
    repeated = selector.select(parse_line(line(), 2))
    assert isinstance(repeated, LineError) and repeated.code == "duplicate_custom_id"


def test_synthesized_ids_never_make_duplicates():
    selector = LineSelector()
    assert selector.select(parse_line(b"nope", 4)).custom_id == "line-4"
    assert isinstance(selector.select(parse_line(line(custom_id="line-4"), 5)), BatchRequest)


def output(lines: list[dict]) -> list[bytes]:
    return [encode_line(entry) for entry in lines]


def test_resume_skips_what_the_output_holds_and_selects_the_rest():
    inputs = [parse_line(line(custom_id=c), n) for n, c in enumerate(["a", "b", "c"], 1)] + [parse_line(b"{", 4)]
    written = written_lines(output([result_line("b", 200, "r", {}), error_line(inputs[3])]))
    selector = LineSelector(written)
    chosen = [selector.select(parsed) for parsed in inputs]
    assert [c.custom_id if c else None for c in chosen] == ["a", None, "c", None]


def test_resume_keeps_a_duplicate_error_apart_from_its_first_line():
    """A duplicate's error line can be written before its first line's result (which runs on the
    engine): resuming then still runs the first line and does not write the duplicate twice."""
    first, duplicate = parse_line(line(), 1), parse_line(line(), 2)
    fresh = LineSelector()
    fresh.select(first)
    duplicate_error = fresh.select(duplicate)
    selector = LineSelector(written_lines(output([error_line(duplicate_error)])))
    assert selector.select(first) == first
    assert selector.select(duplicate) is None


def test_written_lines_ignores_lines_that_are_not_ours():
    written = written_lines([b"garbage\n", b"[1]\n", b'{"custom_id": 3}\n'] + output([result_line("x", 400, "r", {})]))
    assert written.custom_ids == {"x"} and not written.error_lines


def test_a_result_line_has_openai_batch_output_fields():
    entry = result_line("x", 400, "req_1", {"error": {"message": "no"}})
    assert entry["id"].startswith("batch_req_") and entry["custom_id"] == "x" and entry["error"] is None
    assert entry["response"] == {"status_code": 400, "request_id": "req_1", "body": {"error": {"message": "no"}}}
    assert result_line("x", 200, "r", {})["id"] != entry["id"]


def test_an_error_line_has_no_response_and_names_its_code_and_line():
    entry = error_line(LineError("line-2", "invalid_json", "bad", 2))
    assert entry["response"] is None
    assert entry["error"] == {"code": "invalid_json", "message": "bad", "line": 2}


def test_an_encoded_line_is_one_line_whatever_its_text():
    encoded = encode_line(result_line("x\ny", 200, "r", {"text": "a\nb\u2028c é"}))
    assert encoded.endswith(b"\n") and encoded.count(b"\n") == 1
    assert json.loads(encoded)["response"]["body"]["text"] == "a\nb\u2028c é"
