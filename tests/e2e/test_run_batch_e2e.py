"""`jamba-server run-batch` as a subprocess on the dev model: 200 mixed lines (chat, completions,
Responses, Messages, and lines that are malformed or invalid) give 200 output lines with the
expected answers. The run is fed through stdin (`-i -`) and SIGKILLed while it still waits for more
input, after some lines are written (so the kill cannot come too late, however fast the machine);
`--resume` over the whole file then completes the output without repeating a line. `-i - -o -`
keeps stdout for the output lines alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import Counter

import pytest

from tests.support import MODEL_NAME, REPO, STARTUP_TIMEOUT_S, run_batch_args, wait_for, whole_lines

LINES = 200
FED_BEFORE_KILL = 120
WRITTEN_BEFORE_KILL = 40
URL_OBJECTS = {"/v1/chat/completions": "chat.completion", "/v1/completions": "text_completion", "/v1/responses": "response"}


def chat_body(i: int) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": f"Say {i}"}], "max_tokens": 4}


def mixed_line(i: int) -> tuple[str, str, tuple]:
    """(line text, the custom_id its output line has, what that line holds) for input line i + 1."""
    cid, kind = f"req-{i}", i % 20
    request = lambda url, body: json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})  # noqa: E731
    if kind <= 5 or kind == 19:
        return request("/v1/chat/completions", chat_body(i)), cid, ("ok", "chat.completion")
    if kind <= 8:
        return request("/v1/completions", {"model": MODEL_NAME, "prompt": f"Count {i}", "max_tokens": 4}), cid, ("ok", "text_completion")
    if kind <= 10:
        return request("/v1/responses", {"model": MODEL_NAME, "input": f"Say {i}", "max_output_tokens": 4}), cid, ("ok", "response")
    if kind == 11:
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": f"Say {i}"}], "max_tokens": 4}
        return request("/v1/messages", body), cid, ("ok", "message")
    if kind == 12:
        return '{"custom_id": "broken", "method": "POST", ', f"line-{i + 1}", ("error", "invalid_json")
    if kind == 13:
        return json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}), f"line-{i + 1}", ("error", "missing_custom_id")
    if kind == 14:
        return request("/v1/embeddings", {"model": MODEL_NAME, "input": "x"}), cid, ("error", "invalid_url")
    if kind == 15:
        return request("/v1/chat/completions", {**chat_body(i), "temperature": 5}), cid, ("status", 400, "temperature")
    if kind == 16:
        return request("/v1/completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": 0}), cid, ("status", 400, "max_tokens")
    if kind == 17:
        return request("/v1/chat/completions", {**chat_body(i), "stream": True}), cid, ("error", "stream_not_supported")
    dup = f"req-{i - 1}"  # kind 18 repeats the previous line's custom_id (a stream error line's)
    return json.dumps({"custom_id": dup, "method": "POST", "url": "/v1/chat/completions", "body": chat_body(i)}), dup, ("error", "duplicate_custom_id")


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> dict:
    """The killed run, then the resumed one: the output before and after, the expectations."""
    work = tmp_path_factory.mktemp("run-batch")
    lines = [mixed_line(i) for i in range(LINES)]
    source, output = work / "requests.jsonl", work / "results.jsonl"
    source.write_text("".join(text + "\n" for text, _, _ in lines), encoding="utf-8")
    killed_log = (work / "killed.log").open("wb")
    proc = subprocess.Popen(
        run_batch_args("-i", "-", "-o", str(output), "--log-level", "warning"),
        cwd=REPO, stdin=subprocess.PIPE, stdout=killed_log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        proc.stdin.write("".join(text + "\n" for text, _, _ in lines[:FED_BEFORE_KILL]).encode())
        proc.stdin.flush()
        wait_for(lambda: len(whole_lines(output)) >= WRITTEN_BEFORE_KILL or proc.poll() is not None, STARTUP_TIMEOUT_S, "lines written")
        assert proc.poll() is None, (work / "killed.log").read_text(errors="replace")[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its engine processes
        proc.wait()
        killed_log.close()
    before = b"".join(whole_lines(output))
    with output.open("ab") as out:
        out.write(b'{"id":"batch_req_cut","custom_id":"req-')  # as a kill mid-write leaves it
    resumed = subprocess.run(
        run_batch_args("-i", str(source), "-o", str(output), "--resume", "--log-level", "warning"),
        cwd=REPO, capture_output=True, timeout=STARTUP_TIMEOUT_S,
    )  # fmt: skip
    return {"lines": lines, "before": before, "after": output.read_bytes(), "resumed": resumed}


def test_resume_completes_the_killed_run_without_repeating_a_line(batch):
    resumed = batch["resumed"]
    assert resumed.returncode == 0, resumed.stderr.decode(errors="replace")[-3000:]
    before, after = batch["before"], batch["after"]
    assert WRITTEN_BEFORE_KILL <= before.count(b"\n") < FED_BEFORE_KILL
    assert after.startswith(before) and after.endswith(b"\n")  # kept as written; the cut line is gone
    assert b"batch_req_cut" not in after
    written = Counter(json.loads(line)["custom_id"] for line in after.splitlines())
    assert written == Counter(cid for _, cid, _ in batch["lines"])  # every line once, no more


def test_every_line_has_its_expected_output(batch):
    entries = [json.loads(line) for line in batch["after"].splitlines()]
    assert len(entries) == LINES
    by_id: dict[str, list[dict]] = {}
    for entry in entries:
        assert entry["id"].startswith("batch_req_")
        by_id.setdefault(entry["custom_id"], []).append(entry)
    for text, cid, expected in batch["lines"]:
        is_duplicate = expected[1] == "duplicate_custom_id"
        entry = next(e for e in by_id[cid] if ((e["error"] or {}).get("code") == "duplicate_custom_id") == is_duplicate)
        by_id[cid].remove(entry)
        check(entry, expected, text)


def check(entry: dict, expected: tuple, text: str) -> None:
    if expected[0] == "error":
        assert entry["response"] is None and entry["error"]["code"] == expected[1], (text, entry)
        return
    response = entry["response"]
    assert entry["error"] is None and response["request_id"], (text, entry)
    if expected[0] == "status":
        assert response["status_code"] == expected[1] and response["body"]["error"]["param"] == expected[2], (text, entry)
        return
    body = response["body"]
    assert response["status_code"] == 200, (text, entry)
    assert body.get("object", body.get("type")) == expected[1] and body["model"] == MODEL_NAME
    usage = body["usage"]
    assert 0 < usage.get("completion_tokens", usage.get("output_tokens", 0)) <= 4


def test_stdin_to_stdout_carries_only_the_output_lines():
    """With `-o -` vLLM's logs and its engine processes' output go to stderr: stdout is the JSONL."""
    lines = [mixed_line(i) for i in (0, 6, 12)]  # chat, completion, invalid JSON
    done = subprocess.run(
        run_batch_args("-i", "-", "-o", "-", "--log-level", "info"),
        cwd=REPO, input="".join(text + "\n" for text, _, _ in lines).encode(), capture_output=True, timeout=STARTUP_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    out = done.stdout.decode().splitlines()
    assert sorted(json.loads(text)["custom_id"] for text in out) == ["line-3", "req-0", "req-6"]  # the bad JSON is line 3 here
    assert b"engine ready" in done.stderr
