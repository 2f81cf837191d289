"""Benchmark: (a) jamba-server, (b) vLLM's own OpenAI server, (c) the bare engine, one after another
on this machine with the dev model and identical engine arguments; then the bulk point, `jamba-server
run-batch` against vLLM's `run_batch` on the same chat-only file. `make bench [QUICK=1]`.

Writes bench/results/latest.json and bench/results/latest.png; prints progress as it goes.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import uvloop

import client
import rag

from jamba_server.child_server import free_port, stop

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MODEL = str(REPO / "models" / "jamba-tiny-dev")
NAME = "jamba-tiny-dev"
MAX_TOKENS = 64
REQUEST_TIMEOUT_S = 600
ENGINE_ARGS = {
    "model": MODEL, "served_model_name": NAME, "dtype": "float32", "max_model_len": 4096, "max_num_seqs": 32,
    "enforce_eager": True, "enable_prefix_caching": False,
    "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
}  # fmt: skip
PROMPT = [{"role": "user", "content": "Write a short story about a fox who learns to read the weather. " * 2}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London"]}},
    "required": ["city"], "additionalProperties": False}}}]  # fmt: skip
SCHEMA = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 99},
          "name": {"type": "string", "maxLength": 8}}, "required": ["age", "name"], "additionalProperties": False}  # fmt: skip
ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
SERVER_ARGS: list[str] = []  # extra jamba-server flags (--server-arg)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def workloads(quick: bool, system: str, only: str | None = None) -> list[dict]:
    """The points a system runs; `only`: "stream" (c=1, 16, 64) or "nonstream" (non-streaming, tool
    and JSON requests), for both servers alone."""
    levels = (1, 16, 64) if only == "stream" or not quick else (1, 16)
    stream = [{"name": f"stream_c{c}", "concurrency": c, "stream": True} for c in levels]
    points = [] if only == "nonstream" else [*stream]
    if system != "engine" and only != "stream":
        points += [
            {"name": "nonstream_c16", "concurrency": 16, "stream": False},
            {"name": "tools_required_c16", "concurrency": 16, "stream": False, "extra": {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}},
            {"name": "json_schema_c16", "concurrency": 16, "stream": False, "extra": {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}}},
        ]  # fmt: skip
    for p in points:  # full runs: ~5-15 s per point, long enough to average out this machine's jitter
        p["requests"] = max(8, p["concurrency"] * 2) if quick else max(8, p["concurrency"] * 6, 256 if p["concurrency"] >= 64 else 0)
    return points


# ------------------------------------------------------------------ HTTP client


def request_body(point: dict) -> dict:
    body = {"model": NAME, "messages": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 1.0, **point.get("extra", {})}
    if "extra" not in point:
        body["ignore_eos"] = True
    if point["stream"]:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


async def http_point(base_url: str, point: dict) -> tuple[float, list[dict]]:
    """`requests` requests over `concurrency` keep-alive connections, each taking the next request
    as soon as its last one ends (a closed loop, like the bare engine's driver)."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    body = request_body(point)
    send = client.chat_stream if point["stream"] else client.chat
    remaining = point["requests"]
    samples: list[dict] = []

    async def worker() -> None:
        nonlocal remaining
        conn = client.Connection(host, int(port))
        try:
            while remaining > 0:
                remaining -= 1
                try:
                    async with asyncio.timeout(REQUEST_TIMEOUT_S):
                        samples.append(await send(conn, body))
                except (client.HTTPError, OSError, ValueError, KeyError, TimeoutError):
                    conn.close()
                    samples.append({"ttft": None, "gaps": [], "tokens": 0, "ok": False, "end": 0.0})
        finally:
            conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(point["concurrency"], point["requests"]))))
    return time.perf_counter() - start, samples


# ------------------------------------------------------------------ systems


def server_command(system: str, port: int) -> list[str]:
    if system == "jamba-server":
        return [sys.executable, "-m", "jamba_server.cli", "--config", str(REPO / "configs" / "dev-cpu.yaml"),
                "--model", MODEL, "--port", str(port), "--log-level", "warning", "--max-queued-requests", "4096",
                "--no-enable-prefix-caching", *SERVER_ARGS]  # fmt: skip
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", MODEL, "--served-model-name", NAME,
        "--dtype", "float32", "--max-model-len", "4096", "--max-num-seqs", "32", "--enforce-eager",
        "--no-enable-prefix-caching", "--port", str(port), "--uvicorn-log-level", "warning",
        "--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
        "--enable-auto-tool-choice", "--tool-call-parser", "jamba",
    ]  # fmt: skip


def start_http_system(system: str, *extra_args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log_file = (RESULTS / f"{system}.log").open("wb")
    command = [*server_command(system, port), *extra_args]
    proc = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{system} exited {proc.returncode}; see {log_file.name}")
        try:
            if httpx.get(base + ("/ready" if system == "jamba-server" else "/health"), timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{system} did not start")


def cpu_seconds(pid: int) -> float:
    """CPU time of one process, all its threads, not its children (the engine core and worker)."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def rss_mb(pid: int) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return float("nan")


def prompt_ids() -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------ stats


def pct(values: list[float], q: float) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(wall: float, samples: list[dict], frontend_cpu: float, client_cpu: float | None) -> dict:
    """`frontend_cpu`: CPU seconds of the process that talks to the engine core (the API server, or
    the bare engine's driver); `client_cpu`: of the benchmark client (None for the bare engine)."""
    ok = [s for s in samples if s["ok"]]
    tokens = sum(s["tokens"] for s in ok)
    gaps = [g for s in ok for g in s["gaps"]]
    per_token_ms = lambda cpu: None if cpu is None or not tokens else 1000 * cpu / tokens  # noqa: E731
    return {
        "requests_per_s": len(ok) / wall, "output_tokens_per_s": tokens / wall, "errors": len(samples) - len(ok),
        "ttft_p50_s": pct([s["ttft"] for s in ok], 0.5), "ttft_p99_s": pct([s["ttft"] for s in ok], 0.99),
        "itl_p50_s": pct(gaps, 0.5), "itl_p99_s": pct(gaps, 0.99),
        "frontend_cpu_ms_per_token": per_token_ms(frontend_cpu), "client_cpu_ms_per_token": per_token_ms(client_cpu),
    }  # fmt: skip


def median_of(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    return out


# ------------------------------------------------------------------ main


class HttpSystem:
    """A server process: jamba-server or vLLM's own."""

    def __init__(self, name: str):
        self.name = name
        self.proc, self.base = start_http_system(name)

    def run(self, point: dict) -> dict:
        gc.collect()
        gc.freeze()  # this process holds transformers (for the engine's prompt): keep it out of collections
        server, me = cpu_seconds(self.proc.pid), cpu_seconds(os.getpid())
        wall, samples = uvloop.run(http_point(self.base, point))
        return summarize(wall, samples, cpu_seconds(self.proc.pid) - server, cpu_seconds(os.getpid()) - me)

    def rss(self) -> float:
        return rss_mb(self.proc.pid)

    def close(self) -> None:
        stop(self.proc)


class EngineSystem:
    """The bare engine: AsyncLLM in a driver process, fed one workload point at a time over stdin."""

    name = "engine"

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "engine_driver.py"), "--engine-args", json.dumps(ENGINE_ARGS),
             "--prompt-ids", json.dumps(prompt_ids()), "--max-tokens", str(MAX_TOKENS)],
            cwd=REPO, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=(RESULTS / "engine.log").open("wb"), text=True, start_new_session=True,
        )  # fmt: skip
        self._event("ready")

    def _event(self, kind: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith('{"event"'):  # anything else is vLLM's own output
                event = json.loads(line)
                if event["event"] == kind:
                    return event
        raise RuntimeError(f"engine driver exited {self.proc.wait()}; see {RESULTS / 'engine.log'}")

    def run(self, point: dict) -> dict:
        driver = cpu_seconds(self.proc.pid)
        self.proc.stdin.write(json.dumps([point["concurrency"], point["requests"]]) + "\n")
        self.proc.stdin.flush()
        event = self._event("point")
        return summarize(event["wall"], event["samples"], cpu_seconds(self.proc.pid) - driver, None)

    def rss(self) -> float:
        return rss_mb(self.proc.pid)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the driver and vLLM's engine processes
            self.proc.wait()
        self.proc.stdout.close()


def run_rounds(quick: bool, repeats: int, only: str | None = None) -> tuple[dict, dict]:
    """Each round starts every system afresh, one at a time (two vLLM engines loaded side by side
    disturb each other's streams here, even idle), and runs all its points; the order rotates
    between rounds so drift on a noisy machine favours no system. Returns (per-system medians over
    rounds, per-point ratios: the median of each round's a/b and a/c)."""
    factories = {"jamba-server": lambda: HttpSystem("jamba-server"), "vllm-server": lambda: HttpSystem("vllm-server"),
                 "engine": EngineSystem}  # fmt: skip
    names = ["jamba-server", "vllm-server"] if only else list(factories)
    runs: dict[str, dict[str, list[dict]]] = {name: {} for name in names}
    rss: dict[str, dict[str, float]] = {name: {} for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            log(f"round {r + 1}/{repeats}: starting {name}")
            system = factories[name]()
            try:
                system.run({"name": "warmup", "concurrency": 16, "stream": True, "requests": 32})  # untimed
                for point in workloads(quick, name, only):
                    summary = system.run(point)
                    runs[name].setdefault(point["name"], []).append(summary)
                    rss[name][point["name"]] = max(rss[name].get(point["name"], 0.0), system.rss())
                    log(f"round {r + 1}/{repeats}: {name} {point['name']}: {summary['output_tokens_per_s']:.0f} tok/s, "
                        f"TTFT p99 {summary['ttft_p99_s'] or 0:.3f} s, ITL p50 {summary['itl_p50_s'] or 0:.3f} s, "
                        f"front end {summary['frontend_cpu_ms_per_token'] or 0:.3f} ms/token, {summary['errors']} errors")  # fmt: skip
            finally:
                system.close()
    results = {
        name: {point: {**median_of(r), "server_rss_mb": rss[name][point], "runs": r} for point, r in points.items()}
        for name, points in runs.items()
    }  # fmt: skip
    ratios = {}
    for point, a_runs in runs["jamba-server"].items():
        b_runs, c_runs = runs["vllm-server"].get(point, []), runs.get("engine", {}).get(point, [])
        ratios[point] = {
            "frontend_cpu_per_token_a_over_b": paired(a_runs, b_runs, "frontend_cpu_ms_per_token"),
            "frontend_cpu_per_token_a_over_b_per_round": [
                ratio(a["frontend_cpu_ms_per_token"], b["frontend_cpu_ms_per_token"]) for a, b in zip(a_runs, b_runs)
            ],
            "tokens_per_s_a_over_b": paired(a_runs, b_runs, "output_tokens_per_s"),
            "tokens_per_s_a_over_c": paired(a_runs, c_runs, "output_tokens_per_s"),
            "ttft_p99_a_over_b": paired(a_runs, b_runs, "ttft_p99_s"),
        }
    return results, ratios


def paired(a_runs: list[dict], b_runs: list[dict], key: str) -> float | None:
    """Median over rounds of a/b, each from the same round."""
    values = [ratio(a[key], b[key]) for a, b in zip(a_runs, b_runs)]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for system, points in results["systems"].items():
        concs = sorted(int(k.removeprefix("stream_c")) for k in points if k.startswith("stream_c"))
        ax1.plot(concs, [points[f"stream_c{c}"]["output_tokens_per_s"] for c in concs], marker="o", label=system)
        ax2.plot(concs, [points[f"stream_c{c}"]["ttft_p50_s"] for c in concs], marker="o", label=system)
    ax1.set(xlabel="concurrency", ylabel="output tokens/s", title="Streaming throughput", xscale="log")
    ax2.set(xlabel="concurrency", ylabel="TTFT p50 (s)", title="Time to first token", xscale="log")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"tiny Jamba dev model, {MAX_TOKENS} streamed tokens, {results['machine']['cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ------------------------------------------------------------------ bulk: run-batch vs vLLM's run_batch

BULK_LINES = {True: 256, False: 512}  # quick, full
BULK_READY = {"jamba-server": "engine ready", "vllm": "Reading batch from"}  # logged once the engine is up


def bulk_input(path: Path, lines: int) -> None:
    """Chat-only lines (vLLM's run_batch has no /v1/completions), the non-streaming point's body."""
    body = request_body({"stream": False})
    path.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n"
                            for i in range(lines)))  # fmt: skip


def bulk_command(system: str, source: Path, output: Path) -> list[str]:
    if system == "jamba-server":
        return [sys.executable, "-m", "jamba_server.cli", "run-batch", "--config", str(REPO / "configs" / "dev-cpu.yaml"),
                "--model", MODEL, "--log-level", "info", "--no-enable-prefix-caching", "-i", str(source), "-o", str(output)]  # fmt: skip
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(source), "-o", str(output), "--model", MODEL,
        "--served-model-name", NAME, "--dtype", "float32", "--max-model-len", "4096", "--max-num-seqs", "32",
        "--enforce-eager", "--no-enable-prefix-caching",
        "--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
    ]  # fmt: skip


def whole_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def run_bulk(system: str, source: Path, lines: int) -> dict:
    """One batch run: output tokens/s from the engine being up (its log line) to the last output
    line on disk, so engine loading, which both pay alike, is left out."""
    output = RESULTS / f"bulk-{system}.jsonl"
    output.unlink(missing_ok=True)
    log_file = (RESULTS / f"bulk-{system}.log").open("w")
    proc = subprocess.Popen(bulk_command(system, source, output), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    ready: list[float] = []
    cpu = CpuWatch(proc.pid)

    def follow() -> None:
        for text in proc.stdout:
            log_file.write(text)
            if not ready and BULK_READY[system] in text:
                ready.append(time.perf_counter())
                cpu.mark()

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    try:
        while whole_lines(output) < lines and proc.poll() is None:
            time.sleep(0.02)
            cpu.sample()
        done = time.perf_counter()
        cpu.sample()
        proc.wait(120)
    finally:
        stop(proc)
        reader.join(10)
        log_file.close()
    if not ready or whole_lines(output) < lines:
        raise RuntimeError(f"{system} run-batch failed (exit {proc.returncode}); see {log_file.name}")
    entries = [json.loads(text) for text in output.read_text().splitlines()]
    ok = [e for e in entries if e["response"] and e["response"]["status_code"] == 200]
    tokens = sum(e["response"]["body"]["usage"]["completion_tokens"] for e in ok)
    seconds = done - ready[0]
    return {"output_tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens, "errors": len(entries) - len(ok),
            "frontend_cpu_ms_per_token": 1000 * cpu.used() / tokens if tokens else None}  # fmt: skip


class CpuWatch:
    """CPU seconds of the batch runner's own process (not its engine core or worker) from `mark()`
    (the engine up) to the last `sample()` while it was alive: vLLM's runner writes its output at the
    end and exits, so the figure is the last one read before that."""

    def __init__(self, pid: int):
        self.pid, self.start, self.last = pid, None, None

    def mark(self) -> None:
        self.start = self._read()

    def sample(self) -> None:
        value = self._read()
        if value is not None:
            self.last = value

    def used(self) -> float:
        return (self.last or 0.0) - (self.start or 0.0)

    def _read(self) -> float | None:
        try:
            return cpu_seconds(self.pid)
        except psutil.Error:
            return None


def run_bulk_rounds(quick: bool, rounds: int) -> dict:
    """Both batch runners on the same input, one at a time, the order alternating between rounds;
    every round's numbers are kept (this machine's throughput moves 2-4x between runs)."""
    source = RESULTS / "bulk-input.jsonl"
    bulk_input(source, BULK_LINES[quick])
    names = ["jamba-server", "vllm"]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            result = run_bulk(name, source, BULK_LINES[quick])
            runs[name].append(result)
            log(f"bulk round {r + 1}/{rounds}: {name} run-batch {result['output_tokens_per_s']:.0f} tok/s "
                f"({result['tokens']} tokens in {result['seconds']:.1f} s, {result['errors']} errors)")  # fmt: skip
    ratios = [ratio(a["output_tokens_per_s"], b["output_tokens_per_s"]) for a, b in zip(runs["jamba-server"], runs["vllm"])]
    return {
        "lines": BULK_LINES[quick], "max_tokens": MAX_TOKENS, "runs": runs,
        "median_tokens_per_s": {name: statistics.median(r["output_tokens_per_s"] for r in rs) for name, rs in runs.items()},
        "a_over_b_per_round": ratios, "a_over_b": statistics.median(ratios),
        "frontend_cpu_a_over_b_per_round": [ratio(a["frontend_cpu_ms_per_token"], b["frontend_cpu_ms_per_token"])
                                            for a, b in zip(runs["jamba-server"], runs["vllm"])],
    }  # fmt: skip


def print_bulk(bulk: dict) -> None:
    rounds = ", ".join(f"{a['output_tokens_per_s']:.0f}/{b['output_tokens_per_s']:.0f}" for a, b in zip(bulk["runs"]["jamba-server"], bulk["runs"]["vllm"]))
    print(f"bulk ({bulk['lines']} chat lines x {bulk['max_tokens']} tokens): run-batch tok/s jamba-server/vLLM per round {rounds}; "
          f"a/b per round {', '.join(f'{r:.2f}' for r in bulk['a_over_b_per_round'])}; median a/b {bulk['a_over_b']:.2f}")  # fmt: skip
    cpu = ", ".join(f"{a['frontend_cpu_ms_per_token']:.3f}/{b['frontend_cpu_ms_per_token']:.3f}" for a, b in zip(bulk["runs"]["jamba-server"], bulk["runs"]["vllm"]))
    print(f"bulk front-end CPU ms per output token, jamba-server/vLLM per round: {cpu}")  # fmt: skip


# ------------------------------------------------------------------ multi-turn RAG: prefix cache on vs off


def rag_rounds(repeats: int) -> int:
    """Two server starts a round (~3 min here): 2 or 3 rounds."""
    return min(3, max(2, repeats))


def run_rag_rounds(rounds: int) -> dict:
    """jamba-server with the prefix cache on and off (fresh server each time, the order alternating
    between rounds), both document placements each time; every round's numbers are kept."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    docs = {p: [rag.document(100 * i + c, rag.DOC_TOKENS, count) for c in range(rag.CONVERSATIONS)]
            for i, p in enumerate(rag.PLACEMENTS)}  # fmt: skip
    modes = {"cache_on": "--enable-prefix-caching", "cache_off": "--no-enable-prefix-caching"}
    runs: dict[str, dict[str, list[dict]]] = {m: {p: [] for p in rag.PLACEMENTS} for m in modes}
    for r in range(rounds):
        for mode in list(modes) if r % 2 == 0 else list(modes)[::-1]:
            proc, base = start_http_system("jamba-server", modes[mode])
            try:
                for placement in rag.PLACEMENTS:
                    point = asyncio.run(rag.rag_point(base, NAME, docs[placement], placement))
                    runs[mode][placement].append(point)
                    log(f"rag round {r + 1}/{rounds}: {mode} {placement}: TTFT p50 by turn "
                        f"{', '.join(f'{v:.3f}' if v is not None else '-' for v in point['ttft_p50_by_turn'])} s, "
                        f"{point['failed_turns']} failed turns")  # fmt: skip
            finally:
                stop(proc)
    summary = {}
    for placement in rag.PLACEMENTS:
        per_round = [ratio(on["ttft_p50_turns_2_4"], off["ttft_p50_turns_2_4"])
                     for on, off in zip(runs["cache_on"][placement], runs["cache_off"][placement])]  # fmt: skip
        summary[placement] = {"on_over_off_turns_2_4_per_round": per_round,
                              "on_over_off_turns_2_4": statistics.median(v for v in per_round if v is not None)}  # fmt: skip
    return {"conversations": rag.CONVERSATIONS, "turns": rag.TURNS, "doc_tokens": rag.DOC_TOKENS,
            "reply_tokens": rag.REPLY_TOKENS, "runs": runs, "summary": summary}  # fmt: skip


def print_rag(result: dict) -> None:
    for placement, s in result["summary"].items():
        rounds = ", ".join(f"{v:.2f}" if v is not None else "-" for v in s["on_over_off_turns_2_4_per_round"])
        print(f"rag ({placement}): turns 2-4 TTFT p50 cache on / off per round {rounds}; median {s['on_over_off_turns_2_4']:.2f} "
              f"(goal <= 0.33)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--bulk-only", action="store_true", help="only the bulk point (run-batch vs vLLM's run_batch)")
    parser.add_argument("--rag-only", action="store_true", help="only the multi-turn RAG point (prefix cache on vs off)")
    parser.add_argument("--stream-only", action="store_true",
                        help="only the streaming points (c=1, 16, 64), jamba-server and vLLM's server, into stream.json")  # fmt: skip
    parser.add_argument("--nonstream-only", action="store_true",
                        help="only the non-streaming, tool and JSON points, jamba-server and vLLM's server, into nonstream.json")  # fmt: skip
    parser.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                        help="an extra jamba-server flag (repeatable; e.g. --server-arg=--stream-coalesce-gap=0)")  # fmt: skip
    args = parser.parse_args()
    SERVER_ARGS.extend(args.server_arg)
    repeats = args.repeats or (1 if args.quick else 5)
    bulk_rounds = max(2, repeats)  # at least one round in each order
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if args.stream_only or args.nonstream_only:
        only = "stream" if args.stream_only else "nonstream"
        systems, ratios = run_rounds(args.quick, repeats, only=only)
        (RESULTS / f"{only}.json").write_text(json.dumps({
            "when": time.strftime("%Y-%m-%d %H:%M:%S"), "repeats": repeats, "server_args": SERVER_ARGS,
            "systems": systems, "ratios": ratios}, indent=2))  # fmt: skip
        print_rounds(systems, ratios)
        return
    if args.bulk_only:
        bulk = run_bulk_rounds(args.quick, bulk_rounds)
        (RESULTS / "bulk.json").write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S"), **bulk}, indent=2))
        print_bulk(bulk)
        return
    if args.rag_only:
        rag_result = run_rag_rounds(rag_rounds(repeats))
        (RESULTS / "rag.json").write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S"), **rag_result}, indent=2))
        print_rag(rag_result)
        return
    systems, ratios = run_rounds(args.quick, repeats)
    bulk = run_bulk_rounds(args.quick, bulk_rounds)
    rag_result = run_rag_rounds(rag_rounds(repeats))
    results = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"), "duration_s": round(time.time() - started),
        "quick": args.quick, "repeats": repeats, "max_tokens": MAX_TOKENS, "engine_args": ENGINE_ARGS,
        "machine": {"cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30),
                    "cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "systems": systems, "ratios": ratios, "bulk": bulk, "rag": rag_result,
    }  # fmt: skip
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / "latest.png")
    log(f"wrote {RESULTS / 'latest.json'} and latest.png")
    header = f"{'point':22} {'system':13} {'tok/s':>8} {'req/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'err':>4} {'RSS MB':>7} {'front ms/tok':>12} {'client ms/tok':>13}"
    print(header)
    for system, points in systems.items():
        for name, s in points.items():
            fmt = lambda v, w, d=3: f"{v:{w}.{d}f}" if v is not None else " " * (w - 1) + "-"  # noqa: E731
            print(f"{name:22} {system:13} {fmt(s['output_tokens_per_s'], 8, 0)} {fmt(s['requests_per_s'], 7, 2)} "
                  f"{fmt(s['ttft_p50_s'], 9)} {fmt(s['ttft_p99_s'], 9)} {fmt(s['itl_p50_s'], 8)} {fmt(s['itl_p99_s'], 8)} "
                  f"{s['errors']:4.0f} {fmt(s['server_rss_mb'], 7, 0)} {fmt(s['frontend_cpu_ms_per_token'], 12)} {fmt(s['client_cpu_ms_per_token'], 13)}")  # fmt: skip
    print_rounds(systems, ratios)
    print_bulk(bulk)
    print_rag(rag_result)


def print_rounds(systems: dict, ratios: dict) -> None:
    """Every round's front-end CPU per token and ITL p50, a (jamba-server) and b (vLLM's server), and the ratios."""
    for name, r in ratios.items():
        a_runs, b_runs = systems["jamba-server"][name]["runs"], systems["vllm-server"].get(name, {}).get("runs", [])
        rounds = ", ".join(f"{a['frontend_cpu_ms_per_token']:.3f}/{b['frontend_cpu_ms_per_token']:.3f}" for a, b in zip(a_runs, b_runs))
        itl = ", ".join(f"{a['itl_p50_s'] or 0:.3f}/{b['itl_p50_s'] or 0:.3f}" for a, b in zip(a_runs, b_runs))
        print(f"{name:22} front ms/token a/b per round {rounds}; a/b median {r['frontend_cpu_per_token_a_over_b'] or 0:.2f}")
        print(f"{'':22} ITL p50 s a/b per round {itl}")
        print(f"{'':22} a/b tok/s {r['tokens_per_s_a_over_b'] or 0:.3f}   a/c tok/s {r['tokens_per_s_a_over_c'] or 0:.3f}   a/b TTFT p99 {r['ttft_p99_a_over_b'] or 0:.3f}")


if __name__ == "__main__":
    main()
