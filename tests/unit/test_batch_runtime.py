"""The batch runner (runtime/batch.py) against a fake engine with the dev tokenizer: one output line
per input line through the server's own validation, prepare and runner; bounded concurrency; the
output file's resume repair; a dead engine stops the run without writing the lines it failed."""

from __future__ import annotations

import asyncio
import io
import json
import os

import pytest
from transformers import AutoTokenizer

from jamba_server.core.batch import BATCH_URLS, LineSelector
from jamba_server.core.outputs import ChoiceDelta, EngineStep
from jamba_server.errors import ServiceUnavailableError
from jamba_server.metrics import GENERATION_REQUESTS
from jamba_server.runtime.batch import ENDPOINTS, ENGINE_BACKLOG, BatchRun, EngineFailed, LineWriter, Progress, open_output
from jamba_server.runtime.server import Server
from jamba_server.settings import Settings


class FakeEngine:
    """Answers every request with `tokens` one-token steps; counts requests in generation at once.
    With `die_after`, the engine dies once that many requests have started."""

    max_num_seqs = 2
    max_model_len = 1024
    vocab_size = 1024
    ready = True

    def __init__(self, tokenizer, tokens: int = 3, die_after: int | None = None):
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.die_after = die_after
        self.started = 0
        self.running = 0
        self.most_running = 0
        self.dead = False
        self.specs: list = []
        self.streamed: list[bool] = []  # each request's `stream` flag, as the adapter got it

    def engine_params(self, spec):
        self.specs.append(spec)
        return spec

    async def generate(self, prompt_ids, params, request_id, deadline=None, **options):
        self.streamed.append(options.get("stream", False))
        self.started += 1
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            for i in range(self.tokens):
                await asyncio.sleep(0)
                if self.die_after is not None and self.started > self.die_after:
                    self.dead = True
                    raise ServiceUnavailableError("The engine has failed.")
                last = i == self.tokens - 1
                choice = ChoiceDelta(0, "x", (5,), finish_reason="length" if last else None)
                yield EngineStep(choices=(choice,), prompt_tokens=len(prompt_ids), finished=last)
        finally:
            self.running -= 1

    async def abort(self, request_id, cause):
        pass


@pytest.fixture(scope="module")
def tokenizer(dev_model):
    return AutoTokenizer.from_pretrained(dev_model)


def make_run(tmp_path, engine, **settings) -> tuple[BatchRun, str]:
    server = Server(Settings(model="m", served_model_name="tiny", **settings), engine)
    server.engine_started()
    path = str(tmp_path / "out.jsonl")
    fd, written = open_output(path, resume=False)
    return BatchRun(server, LineWriter(fd), LineSelector(written), Progress(None, enabled=False)), path


def run_lines(batch: BatchRun, lines: list[str], tmp_path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(text + "\n" for text in lines), encoding="utf-8")
    with source.open("rb") as file:
        asyncio.run(batch.run(file))


def read_output(path: str) -> dict[str, dict]:
    entries = [json.loads(text) for text in open(path, encoding="utf-8")]
    by_id = {entry["custom_id"]: entry for entry in entries}
    assert len(by_id) == len(entries), "one output line per custom_id"
    return by_id


def request(custom_id: str, url: str, body: dict) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def test_endpoints_are_the_batch_urls():
    assert {url: endpoint.protocol for url, endpoint in ENDPOINTS.items()} == BATCH_URLS


def test_every_line_gets_one_output_line_with_the_servers_answer(tmp_path, tokenizer):
    engine = FakeEngine(tokenizer)
    batch, path = make_run(tmp_path, engine)
    run_lines(batch, [
        request("chat", "/v1/chat/completions", CHAT),
        request("completion", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 3}),
        request("responses", "/v1/responses", {"model": "tiny", "input": "hi", "max_output_tokens": 3}),
        request("messages", "/v1/messages", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
        request("invalid", "/v1/chat/completions", {**CHAT, "temperature": 9}),
        request("unknown-model", "/v1/chat/completions", {**CHAT, "model": "gpt-4"}),
        request("messages-invalid", "/v1/messages", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
        "not json",
        "",
    ], tmp_path)  # fmt: skip
    out = read_output(path)
    assert set(out) == {"chat", "completion", "responses", "messages", "invalid", "unknown-model", "messages-invalid", "line-8"}
    for custom_id in ("chat", "completion", "responses", "messages"):
        response = out[custom_id]["response"]
        assert response["status_code"] == 200 and response["request_id"] == response["body"]["id"]
    assert out["chat"]["response"]["body"]["choices"][0]["message"]["content"] == "xxx"
    assert out["completion"]["response"]["body"]["usage"]["completion_tokens"] == 3
    assert out["responses"]["response"]["body"]["object"] == "response"
    assert out["messages"]["response"]["body"]["type"] == "message"
    invalid = out["invalid"]["response"]
    assert invalid["status_code"] == 400 and invalid["body"]["error"]["param"] == "temperature"
    assert out["unknown-model"]["response"]["status_code"] == 404
    anthropic = out["messages-invalid"]["response"]
    assert anthropic["status_code"] == 400 and anthropic["body"]["type"] == "error"  # Anthropic's envelope
    assert out["line-8"]["response"] is None and out["line-8"]["error"]["code"] == "invalid_json"
    assert batch.counts == {"ok": 4, "failed": 3, "invalid": 1, "skipped": 0}
    assert len(engine.specs) == 4
    assert engine.streamed == [False] * 4  # never streamed: the adapter asks vLLM for whole outputs


def test_a_line_larger_than_the_body_limit_is_a_413(tmp_path, tokenizer):
    batch, path = make_run(tmp_path, FakeEngine(tokenizer), max_body_bytes=1024)
    run_lines(batch, [request("big", "/v1/completions", {"model": "tiny", "prompt": "x" * 2000, "max_tokens": 1})], tmp_path)
    assert read_output(path)["big"]["response"]["status_code"] == 413


def test_concurrency_is_bounded_by_admission_and_keeps_the_engine_full(tmp_path, tokenizer):
    engine = FakeEngine(tokenizer, tokens=20)
    batch, path = make_run(tmp_path, engine)
    run_lines(batch, [request(f"r{i}", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 20}) for i in range(12)], tmp_path)
    assert len(read_output(path)) == 12
    assert engine.most_running == engine.max_num_seqs  # full, and never beyond admission's slots
    assert batch.concurrency() == 2 * engine.max_num_seqs


@pytest.mark.parametrize("max_concurrent", [None, 3])
def test_the_engine_gets_a_backlog_unless_the_operator_caps_it(tmp_path, tokenizer, max_concurrent):
    engine = FakeEngine(tokenizer, tokens=20)
    batch, path = make_run(tmp_path, engine, max_concurrent_requests=max_concurrent)
    batch.give_the_engine_a_backlog()
    run_lines(batch, [request(f"r{i}", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 20}) for i in range(12)], tmp_path)
    assert len(read_output(path)) == 12
    assert engine.most_running == (ENGINE_BACKLOG * engine.max_num_seqs if max_concurrent is None else max_concurrent)


def test_a_dead_engine_stops_the_run_and_leaves_its_lines_unwritten(tmp_path, tokenizer):
    batch, path = make_run(tmp_path, FakeEngine(tokenizer, die_after=2))
    with pytest.raises(EngineFailed):
        run_lines(batch, [request(f"r{i}", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 3}) for i in range(8)], tmp_path)
    out = read_output(path)
    assert all(entry["response"]["status_code"] == 200 for entry in out.values())
    assert 0 < len(out) < 8


def test_resume_truncates_a_cut_last_line_and_reports_what_was_written(tmp_path):
    path = tmp_path / "out.jsonl"
    whole = b'{"custom_id":"a","response":{"status_code":200},"error":null}\n'
    error = b'{"custom_id":"line-3","response":null,"error":{"code":"invalid_json","message":"m","line":3}}\n'
    path.write_bytes(whole + error + b'{"custom_id":"b","respo')
    fd, written = open_output(str(path), resume=True)
    try:
        assert path.read_bytes() == whole + error
        assert written.custom_ids == {"a"} and written.error_lines == {3}
        LineWriter(fd).write(b'{"custom_id":"b"}\n')
    finally:
        os.close(fd)
    assert path.read_bytes() == whole + error + b'{"custom_id":"b"}\n'


def test_resume_on_a_missing_output_starts_it(tmp_path):
    fd, written = open_output(str(tmp_path / "new.jsonl"), resume=True)
    os.close(fd)
    assert not written.custom_ids and (tmp_path / "new.jsonl").exists()


def test_without_resume_the_output_starts_empty(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"old\n")
    fd, _ = open_output(str(path), resume=False)
    os.close(fd)
    assert path.read_bytes() == b""


def test_the_progress_bar_shows_lines_and_output_tokens_per_second(monkeypatch):
    shown = io.StringIO()
    monkeypatch.setattr("sys.stderr", shown)
    progress = Progress(2, enabled=True)
    progress.advance(40)
    progress.advance(0)
    progress.close()
    text = shown.getvalue()
    assert "2/2" in text and "tok/s" in text


def test_no_progress_bar_when_disabled(monkeypatch):
    shown = io.StringIO()
    monkeypatch.setattr("sys.stderr", shown)
    progress = Progress(2, enabled=False)
    progress.advance(40)
    progress.close()
    assert shown.getvalue() == ""


def test_a_full_admission_queue_is_waited_out_and_each_line_counted_once(tmp_path, tokenizer):
    """Lines of two prompts each fill a one-place queue faster than the line bound expects: the 429s
    are waited out inside the line, which is prepared and counted once."""
    counted = GENERATION_REQUESTS.labels("tiny", "completions")
    before = counted._value.get()
    batch, path = make_run(tmp_path, FakeEngine(tokenizer, tokens=20), max_queued_requests=1)
    lines = [request(f"r{i}", "/v1/completions", {"model": "tiny", "prompt": ["hi", "yo"], "max_tokens": 20}) for i in range(6)]
    run_lines(batch, lines, tmp_path)
    out = read_output(path)
    assert sorted(out) == [f"r{i}" for i in range(6)] and all(line["response"]["status_code"] == 200 for line in out.values())
    assert all(len(line["response"]["body"]["choices"]) == 2 for line in out.values())
    assert counted._value.get() - before == 6


def test_a_cancelled_run_ends_its_lines_in_flight_unwritten_before_it_returns(tmp_path, tokenizer):
    """SIGTERM cancels the run: the lines in generation are cancelled (none written half-way, none
    left running into the engine's shutdown)."""
    engine = FakeEngine(tokenizer, tokens=10**9)
    batch, path = make_run(tmp_path, engine)
    source = tmp_path / "in.jsonl"
    lines = [request(f"r{i}", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 1000}) for i in range(6)]
    source.write_text("".join(text + "\n" for text in lines), encoding="utf-8")

    async def cancelled_midway() -> None:
        with source.open("rb") as file:
            run = asyncio.create_task(batch.run(file))
            while engine.running < engine.max_num_seqs:
                await asyncio.sleep(0)
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run
        assert engine.running == 0

    asyncio.run(cancelled_midway())
    assert read_output(path) == {}
