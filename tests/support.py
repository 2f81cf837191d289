"""Shared test helpers: paths and constants, waiting on state, metrics samples, golden cases, and
live `jamba-server` processes (`ServerProcess`, `start_server`). Fixtures live in conftest.py."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import httpx
import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
DEV_MODEL = REPO / "models" / "jamba-tiny-dev"
TRAINED_MODEL = REPO / "models" / "jamba-tiny-dev-trained"  # same architecture, trained weights (issue 18)
DEV_CONFIG = REPO / "configs" / "dev-cpu.yaml"
GOLDEN = REPO.parent / "shared" / "jamba-chat-format" / "template_cases.json"
MODEL_NAME = "jamba-tiny-dev"
STARTUP_TIMEOUT_S = 600  # a bound on a broken start, not a guess at load time (~45 s here)
# Our JSON lines ("level": "ERROR"), uvicorn's ("ERROR:"), vLLM's ("(EngineCore pid=1) WARNING 11-27 ...").
NOTABLE_LOG_LINE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback|Error\b")
# vLLM's counter of prompt tokens found in its prefix cache (it shares our /metrics registry).
PREFIX_CACHE_HITS = "vllm:prefix_cache_hits_total"
# float32 runs of the dev model agree on a token's logprob to ~1e-6 whatever the batching, chunking or
# implementation (vLLM or transformers); a Mamba state restored wrong (the block-boundary copy skipped)
# moves them by ~2e-5 to 1e-4 while greedy tokens stay the same: random weights barely let a Mamba
# state move the logits, so comparisons that must see the state compare logprobs.
LOGPROB_ATOL = 1e-5
T = TypeVar("T")

# A request that must outlast an action (a disconnect, a deadline, SIGTERM, an engine kill) is long
# by construction, never by the machine's pace: a server with Jamba's whole 256K context and a
# max_tokens no machine generates within a test (a stream makes ~100 tokens/s here: 40 minutes of
# generation, where a test acts within a second of seeing the request run). The test always ends
# such a request itself.
# A small bounded JSON schema: constrained output finishes within a few dozen tokens on any weights.
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "born": {"type": "integer", "minimum": 1700, "maximum": 2000},
        "role": {"type": "string", "enum": ["president", "general", "farmer"]},
    },
    "required": ["name", "born", "role"],
    "additionalProperties": False,
}


def answer_tag(tag: str, schema: dict) -> dict:
    """A structural tag (vLLM's `structured_outputs.structural_tag`): `Answer: ` then `<tag>`, a JSON
    value of `schema`, `</tag>`."""
    return {
        "type": "structural_tag",
        "format": {
            "type": "sequence",
            "elements": [
                {"type": "const_string", "value": "Answer: "},
                {"type": "tag", "begin": f"<{tag}>", "content": {"type": "json_schema", "json_schema": schema}, "end": f"</{tag}>"},
            ],
        },
    }
CONTROL_IDS = set(range(14))  # the dev tokenizer's added tokens: <|pad|> ... </citations>
LONG_CONTEXT_ARGS = ("--max-model-len", "262144")
LONG_MAX_TOKENS = 250_000
# While the engine generates flat out, this 2-vCPU machine now and then holds a loopback HTTP
# exchange for 10-45 s (measured on a stream of LONG_MAX_TOKENS: the server's access log times the
# same requests in milliseconds and a process that only sleeps sees no stall). A wait for state that
# must come while the engine is busy allows for that.
BUSY_ENGINE_WAIT_S = 120


def wait_for(predicate: Callable[[], Any], within: float, what: str | Callable[[], str]) -> float:
    """Poll `predicate` until it is true and return the seconds that took; fail naming `what` (a
    callable is asked at the failure, for the state then) after `within` seconds. Tests wait on state
    with this; `within` bounds a state change that must come, not the machine's pace."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > within:
            pytest.fail(f"{what() if callable(what) else what}: not within {within}s")
        time.sleep(0.02)
    return time.monotonic() - start


def sample(metrics_text: str, name: str, labels: str | None = None) -> float:
    """A sample of `name` in a /metrics text: the one with exactly `labels` (`cause="deadline"`),
    or the first whatever its labels."""
    label_part = rf"\{{{re.escape(labels)}\}}" if labels else r"(?:\{[^}]*\})?"
    match = re.search(rf"^{re.escape(name)}{label_part} (\S+)$", metrics_text, re.M)
    assert match, f"{name}{{{labels or ''}}} not in /metrics"
    return float(match.group(1))


def assert_logprobs_close(got: list[float], expected: list[float]) -> None:
    assert len(got) == len(expected)
    worst = max(abs(g - e) for g, e in zip(got, expected))
    assert worst < LOGPROB_ATOL, f"logprobs differ by up to {worst:.2e}: {got} vs {expected}"


def control_ids(ids: list[int]) -> list[int]:
    """The control tokens among prompt ids, in order."""
    return [i for i in ids if i in CONTROL_IDS]


def golden_cases() -> list[dict]:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))["cases"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A `jamba-server` child process on a free loopback port."""

    def __init__(self, *extra_args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = REPO / "build" / f"server-{self.port}.log"
        self.log_path.parent.mkdir(exist_ok=True)
        args = [
            sys.executable, "-m", "jamba_server.cli",
            "--config", str(DEV_CONFIG),
            "--model", str(DEV_MODEL),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            *extra_args,
        ]  # fmt: skip
        self._log = self.log_path.open("wb")
        SERVERS.append(self)
        self.proc = subprocess.Popen(
            args, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )  # fmt: skip

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready in {STARTUP_TIMEOUT_S}s:\n{self.log_tail()}")

    def metrics_text(self) -> str:
        return httpx.get(self.base_url + "/metrics", timeout=30).text

    def metric(self, name: str, labels: str | None = None) -> float:
        return sample(self.metrics_text(), name, labels)

    def cold_then_warm(self, send: Callable[[str], T], prompt_tokens: Callable[[T], int]) -> tuple[T, T]:
        """`send(cache_salt)` twice with one salt no request has used: the first run finds none of its
        prompt in vLLM's prefix cache, the second finds most of it (vLLM's hit counter says so; run
        with nothing else in flight). Returns both runs' results."""
        salt = f"cold-{uuid.uuid4().hex}"
        start = self.metric(PREFIX_CACHE_HITS)
        cold = send(salt)
        assert self.metric(PREFIX_CACHE_HITS) == start, "a first request under a fresh salt hit the cache"
        warm = send(salt)
        wanted = prompt_tokens(cold) / 2
        wait_for(
            lambda: self.metric(PREFIX_CACHE_HITS) - start > wanted, 30,
            lambda: f"the second request found {self.metric(PREFIX_CACHE_HITS) - start} cached prompt tokens, want > {wanted}",
        )  # fmt: skip
        return cold, warm

    def request_gauges(self) -> str:
        """Our request and admission gauges and vLLM's, to explain a wrong count."""
        prefixes = ("jamba_requests_", "jamba_admission_limit", "vllm:num_requests_")
        return "\n".join(line for line in self.metrics_text().splitlines() if line.startswith(prefixes))

    def requests_running(self, count: int) -> bool:
        """Our running gauge and vLLM's both read `count`: the engine holds exactly those requests."""
        text = self.metrics_text()
        return sample(text, "jamba_requests_running") == count and sample(text, "vllm:num_requests_running") == count

    def wait_idle(self, within: float) -> float:
        """Seconds until no request runs, by our gauge and by vLLM's (the engine has let go of them)."""
        return wait_for(lambda: self.requests_running(0), within, "requests still running")

    def access_log(self) -> dict[str, dict]:
        """The server's access-log lines so far, by request id (a line still being written is left out)."""
        lines = self.log_path.read_text(errors="replace").splitlines(keepends=True)
        entries = [json.loads(line) for line in lines if line.startswith("{") and line.endswith("\n")]
        return {entry["request_id"]: entry for entry in entries if "request_id" in entry}

    def engine_processes(self) -> list[psutil.Process]:
        """vLLM's engine core and workers (they name themselves `VLLM::...`)."""
        found = [p for p in psutil.Process(self.proc.pid).children(recursive=True) if p.name().startswith("VLLM::")]
        assert found, "no engine processes under the server"
        return found

    @contextlib.contextmanager
    def engine_paused(self) -> Iterator[None]:
        """Stop the engine's processes for the block (SIGSTOP; SIGCONT on the way out, however the
        block ends): requests admitted meanwhile are in flight and can neither progress nor finish,
        however fast the machine. The API process keeps serving."""
        stopped: list[psutil.Process] = []
        try:
            for process in self.engine_processes():
                process.suspend()
                stopped.append(process)
            for process in stopped:  # SIGSTOP is asynchronous: be sure before the block runs
                wait_for(lambda: process.status() == psutil.STATUS_STOPPED, 10, f"{process.name()} stopped")
            yield
        finally:
            for process in reversed(stopped):
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.resume()

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def notable_log_lines(self, since: int = 0, lines: int = 30, width: int = 1200) -> str:
        """The last warnings, errors and tracebacks logged after byte `since`; a long line keeps its
        head and its tail (a JSON line's exception is at its end)."""
        with self.log_path.open("rb") as log:
            log.seek(since)
            text = log.read().decode(errors="replace")
        notable = [line for line in text.splitlines() if NOTABLE_LOG_LINE.search(line)][-lines:]
        half = width // 2
        return "\n".join(line if len(line) <= width else f"{line[:half]} ... {line[-half:]}" for line in notable)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


SERVERS: list[ServerProcess] = []


def log_size(server: ServerProcess) -> int:
    try:
        return server.log_path.stat().st_size
    except OSError:
        return 0


def start_server(*extra_args: str, env: dict[str, str] | None = None) -> ServerProcess:
    server = ServerProcess(*extra_args, env=env)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def case_to_request(case: dict) -> dict:
    """A golden template case as an API request body (OpenAI shapes plus this server's extensions)."""
    messages = []
    for message in case["messages"]:
        message = dict(message)
        if message.get("tool_calls"):
            calls = []
            for i, call in enumerate(message["tool_calls"]):
                fn = call.get("function", call)
                args = fn["arguments"]
                calls.append({
                    "id": call.get("id", f"call_{i}"), "type": "function",
                    "function": {"name": fn["name"], "arguments": args if isinstance(args, str) else json.dumps(args)},
                })  # fmt: skip
            message["tool_calls"] = calls
        messages.append(message)
    body: dict = {"messages": messages}
    if "tools" in case:
        body["tools"] = case["tools"]
    if "documents" in case:
        body["documents"] = case["documents"]
    knobs = case.get("knobs") or {}
    if knobs.get("response_format") == "json_object":
        body["response_format"] = {"type": "json_object"}
    if knobs.get("citation_mode") == "fast":
        body["citation_mode"] = "fast"
    return body


def case_to_anthropic_request(case: dict) -> dict | None:
    """A golden template case as an Anthropic Messages request body, or None if the Messages API
    cannot say it (no generation prompt, message names, JSON mode without a schema)."""
    knobs = case.get("knobs") or {}
    if not case.get("add_generation_prompt") or "response_format" in knobs:
        return None
    if any("name" in m for m in case["messages"]):
        return None
    body: dict = {"messages": []}
    call_ids: list[str] = []
    for message in case["messages"]:
        if message["role"] == "system":
            body["system"] = message["content"]
        elif message["role"] == "user":
            body["messages"].append({"role": "user", "content": message["content"]})
        elif message["role"] == "assistant":
            body["messages"].append(_anthropic_assistant(message, call_ids))
        else:
            result = {"type": "tool_result", "tool_use_id": message.get("tool_call_id") or call_ids.pop(0), "content": message["content"]}
            previous = body["messages"][-1]
            if previous["role"] == "user" and isinstance(previous["content"], list):
                previous["content"].append(result)
            else:
                body["messages"].append({"role": "user", "content": [result]})
    if "tools" in case:
        body["tools"] = [
            {"name": t["function"]["name"], "description": t["function"].get("description"), "input_schema": t["function"]["parameters"]}
            for t in case["tools"]
        ]  # fmt: skip
    if "documents" in case:
        body["documents"] = case["documents"]
    if knobs.get("citation_mode") == "fast":
        body["citation_mode"] = "fast"
    return body


def _anthropic_assistant(message: dict, call_ids: list[str]) -> dict:
    if not message.get("tool_calls"):
        return {"role": "assistant", "content": message["content"]}
    blocks = [{"type": "text", "text": message["content"]}] if message.get("content") else []
    for i, call in enumerate(message["tool_calls"]):
        fn = call.get("function", call)
        args = fn["arguments"]
        call_id = call.get("id", f"toolu_{i}")
        call_ids.append(call_id)
        blocks.append({"type": "tool_use", "id": call_id, "name": fn["name"], "input": json.loads(args) if isinstance(args, str) else args})
    return {"role": "assistant", "content": blocks}


def case_to_responses_request(case: dict) -> dict | None:
    """A golden template case as an OpenAI Responses request body, or None if the Responses API
    cannot say it (no generation prompt, message names)."""
    if not case.get("add_generation_prompt") or any("name" in m for m in case["messages"]):
        return None
    body: dict = {"input": []}
    call_ids: list[str] = []
    for message in case["messages"]:
        if message["role"] == "system":
            body["instructions"] = message["content"]
        elif message["role"] == "tool":
            body["input"].append({"type": "function_call_output", "call_id": message.get("tool_call_id") or call_ids.pop(0), "output": message["content"]})
        elif message.get("tool_calls"):
            if message.get("content"):
                body["input"].append({"role": "assistant", "content": message["content"]})
            for i, call in enumerate(message["tool_calls"]):
                fn = call.get("function", call)
                args = fn["arguments"] if isinstance(fn["arguments"], str) else json.dumps(fn["arguments"])
                call_ids.append(call.get("id", f"call_{i}"))
                body["input"].append({"type": "function_call", "call_id": call_ids[-1], "name": fn["name"], "arguments": args})
        else:
            body["input"].append({"role": message["role"], "content": message["content"]})
    if "tools" in case:
        body["tools"] = [{"type": "function", **t["function"]} for t in case["tools"]]
    if "documents" in case:
        body["documents"] = case["documents"]
    knobs = case.get("knobs") or {}
    if knobs.get("response_format") == "json_object":
        body["text"] = {"format": {"type": "json_object"}}
    if knobs.get("citation_mode") == "fast":
        body["citation_mode"] = "fast"
    return body


class PrepareEngine:
    """What preparing a request needs of the engine (core/prepare.py `EngineFacts`), with the dev
    tokenizer and no engine: parameters are the spec itself."""

    def __init__(self, tokenizer_path: Path | str, max_model_len: int = 4096):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.max_model_len, self.vocab_size = max_model_len, len(self.tokenizer)

    def engine_params(self, spec):
        return spec


def run_batch_args(*args: str) -> list[str]:
    """`jamba-server run-batch` on the dev model (add -i, -o and anything else)."""
    return [sys.executable, "-m", "jamba_server.cli", "run-batch", "--config", str(DEV_CONFIG), "--model", str(DEV_MODEL), *args]


def whole_lines(path: Path) -> list[bytes]:
    """A JSONL file's whole lines so far (a line still being written is left out)."""
    if not path.exists():
        return []
    return [line for line in path.read_bytes().splitlines(keepends=True) if line.endswith(b"\n")]
