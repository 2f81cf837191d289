"""`jamba-server run-batch`: an OpenAI batch file through the embedded engine, no HTTP.

Each line goes through the same steps as a server request: the protocol's pydantic model, the model
check, its `prepare_*`, admission and the runner (runtime/generation.py), its renderers; a failure
is the protocol's error envelope under its status code, as the server would have answered. Lines run
with bounded concurrency (admission's running slots plus as many queued), each finished line is one
write to the output (fsync'd about once a second), and `--resume` skips what a killed run wrote.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import IO, Any, AsyncIterator, Callable, Iterator

from pydantic import BaseModel, ValidationError

from jamba_server.anthropic_protocol import MessagesRequest
from jamba_server.core.anthropic import prepare_messages
from jamba_server.core.batch import (
    BatchRequest,
    LineError,
    LineSelector,
    Written,
    encode_line,
    error_line,
    parse_line,
    result_line,
    written_lines,
)
from jamba_server.core.outputs import EngineStep
from jamba_server.core.prepare import EngineFacts, GenerationJob, prepare_chat, prepare_completion
from jamba_server.core.responses_api import prepare_responses
from jamba_server.errors import APIError, InternalServerError, RateLimitError, RequestTooLargeError, invalid_body
from jamba_server.metrics import record_rejection
from jamba_server.protocol import ChatCompletionRequest, CompletionRequest
from jamba_server.responses_protocol import ResponsesRequest
from jamba_server.runtime.generation import engine_request_for, prepare_sized, record_result, run_to_end
from jamba_server.runtime.runner import EngineRequest
from jamba_server.runtime.server import Server

logger = logging.getLogger(__name__)

FSYNC_INTERVAL_S = 1.0
ENGINE_BACKLOG = 2  # lines in the engine per engine slot, unless max_concurrent_requests says


@dataclass(frozen=True)
class Endpoint:
    """A batch URL: its request model and how to prepare its job (body, runtime, engine facts)."""

    model: type[BaseModel]
    prepare: Callable[[Any, Server, EngineFacts], GenerationJob]
    protocol: str  # whose error envelope its failures get


ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat/completions": Endpoint(
        ChatCompletionRequest, lambda body, s, facts: prepare_chat(body, facts, s.settings, s.chat_template), "openai"
    ),
    "/v1/completions": Endpoint(
        CompletionRequest, lambda body, s, facts: prepare_completion(body, facts, s.settings), "openai"
    ),
    "/v1/responses": Endpoint(
        ResponsesRequest,
        lambda body, s, facts: prepare_responses(body, facts, s.settings, s.chat_template, s.responses),
        "openai",
    ),
    "/v1/messages": Endpoint(
        MessagesRequest, lambda body, s, facts: prepare_messages(body, facts, s.settings, s.chat_template), "anthropic"
    ),
}


class EngineFailed(Exception):
    """The engine died mid-batch: the run stops (fatal), unfinished lines are not written."""


@dataclass
class Outcome:
    line: dict[str, Any]
    completion_tokens: int = 0


async def run_request(server: Server, request: BatchRequest) -> Outcome:
    """One request line → its output line, whatever happens to it (a dead engine is `EngineFailed`)."""
    endpoint = ENDPOINTS[request.url]
    try:
        return await _generate(server, endpoint, request)
    except APIError as exc:
        if server.engine.dead:
            raise EngineFailed("the engine died") from exc
        record_rejection(exc.status_code, exc.code)
        return _failed(request, endpoint, exc)
    except Exception as exc:  # noqa: BLE001 - a line's own failure never ends the batch
        logger.exception("batch line %d (%s) failed", request.line_number, request.custom_id)
        if server.engine.dead:
            raise EngineFailed("the engine died") from exc
        return _failed(request, endpoint, InternalServerError("The request failed inside the server."))


def _failed(request: BatchRequest, endpoint: Endpoint, error: APIError) -> Outcome:
    body = error.envelope_for(endpoint.protocol)
    return Outcome(result_line(request.custom_id, error.status_code, f"req_{uuid.uuid4().hex}", body))


async def _generate(server: Server, endpoint: Endpoint, request: BatchRequest) -> Outcome:
    settings = server.settings
    if request.size > settings.max_body_bytes:
        raise RequestTooLargeError(f"The request body is larger than {settings.max_body_bytes} bytes.")
    try:
        body = endpoint.model.model_validate(request.body)
    except ValidationError as exc:
        raise invalid_body(exc.errors()) from None
    server.check_model(getattr(body, "model", None))
    server.readiness.check()
    job = await prepare_sized(request.size, endpoint.prepare, body, server, server.engine)
    loop = asyncio.get_running_loop()
    deadline = None if settings.request_timeout is None else loop.time() + settings.request_timeout
    request_id, engine_request = engine_request_for(server, job, time.perf_counter(), deadline)
    result = job.renderers.accumulator(request_id, server.model_name)
    await _run_when_admitted(server, engine_request, result.add)
    response = result.build(engine_request.prompt_ids if job.return_token_ids else None)
    record_result(server, job, result)
    body_json = response.model_dump(mode="json", by_alias=True)
    line = result_line(request.custom_id, 200, request_id, body_json)
    return Outcome(line, result.usage().completion_tokens)


async def _run_when_admitted(server: Server, engine_request: EngineRequest, on_step: Callable[[EngineStep], Any]) -> None:
    """Run the prepared request to the end. Admission's 429 (its queue full: lines of several
    sequences each can fill it) is transient here: wait and ask again, never an error line, and the
    line is prepared and counted once."""
    while True:
        try:
            return await run_to_end(server.runner, engine_request, on_step)
        except RateLimitError:
            await asyncio.sleep(server.admission.retry_after)


# ------------------------------------------------------------------ files


class LineWriter:
    """Output lines, each one `write` (so a kill can cut only the last line), fsync'd at most once
    per `FSYNC_INTERVAL_S` and at the end (pipes and terminals are not fsync'd)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.syncable = stat.S_ISREG(os.fstat(fd).st_mode)
        self._last_sync = time.monotonic()
        self.lines = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.lines += 1
        if self.syncable and time.monotonic() - self._last_sync >= FSYNC_INTERVAL_S:
            self.sync()

    def sync(self) -> None:
        if self.syncable:
            os.fsync(self.fd)
        self._last_sync = time.monotonic()


def scan_output(file: IO[bytes]) -> tuple[Written, int]:
    """What an output file's whole lines hold, and their length in bytes (a cut last line, from a
    kill mid-write, is neither)."""
    length = 0

    def whole_lines() -> Iterator[bytes]:
        nonlocal length
        for line in file:
            if not line.endswith(b"\n"):
                return
            length += len(line)
            yield line

    return written_lines(whole_lines()), length


def open_output(path: str, resume: bool) -> tuple[int, Written]:
    """The output's file descriptor (appending) and, on resume, what it already holds, its cut last
    line truncated away first. Without resume the file starts empty."""
    if not resume:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644), Written()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    with open(path, "rb") as existing:
        written, whole = scan_output(existing)
    size = os.fstat(fd).st_size
    if whole < size:
        logger.warning("output %s ended in a cut line (%d bytes): truncated before resuming", path, size - whole)
        os.ftruncate(fd, whole)
    return fd, written


async def input_lines(file: IO[bytes]) -> AsyncIterator[tuple[int, bytes]]:
    """(line number, line without its newline) for each non-blank line; a pipe or terminal is read
    in a worker thread so a slow producer never stalls the requests running."""
    regular = stat.S_ISREG(os.fstat(file.fileno()).st_mode)
    number = 0
    while True:
        raw = file.readline() if regular else await asyncio.to_thread(file.readline)
        if not raw:
            return
        number += 1
        if raw.strip():
            yield number, raw.rstrip(b"\r\n")


def count_requests(path: str) -> int | None:
    """Non-blank lines of a regular input file (the progress bar's total); None for a stream."""
    if path == "-" or not os.path.isfile(path):
        return None
    with open(path, "rb") as file:
        return sum(1 for line in file if line.strip())


class Progress:
    """A tqdm bar with output tokens/s on stderr when it is a terminal; nothing otherwise."""

    def __init__(self, total: int | None, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="line", desc="run-batch", file=sys.stderr, disable=not enabled, dynamic_ncols=True)
        self.started = time.monotonic()
        self.tokens = 0

    def advance(self, completion_tokens: int = 0) -> None:
        self.tokens += completion_tokens
        rate = self.tokens / max(time.monotonic() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{rate:.0f} tok/s", refresh=False)
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


# ------------------------------------------------------------------ the run


@dataclass
class BatchRun:
    """One run over an input: its server runtime, output, duplicate/resume selection and counts."""

    server: Server
    writer: LineWriter
    selector: LineSelector
    progress: Progress
    counts: dict[str, int] = field(default_factory=lambda: {"ok": 0, "failed": 0, "invalid": 0, "skipped": 0})
    fatal: BaseException | None = None

    def give_the_engine_a_backlog(self) -> None:
        """Unless `max_concurrent_requests` says otherwise, admit `ENGINE_BACKLOG` lines per engine
        slot. A batch has no clients to be fair to, and an engine with lines waiting (as vLLM's
        run_batch, which hands it every line, has) fills a freed slot at its next step rather than
        after a round trip through this process: a wave of equal-length lines ends at once."""
        if self.server.settings.max_concurrent_requests is None:
            self.server.admission.resize(ENGINE_BACKLOG * self.server.admission.max_running)

    def concurrency(self) -> int:
        """Admission's running slots plus as many queued (within its queue bound): the engine always
        has the next request waiting, and admission never has to refuse one."""
        admission = self.server.admission
        return max(1, admission.max_running + min(admission.max_queued, admission.max_running))

    async def run(self, file: IO[bytes]) -> None:
        """Every input line to the output; cancelled (SIGINT, SIGTERM), the lines in flight are
        cancelled and unwritten before the engine is shut down, so `--resume` runs them again."""
        tasks: set[asyncio.Task[None]] = set()
        try:
            await self._run_lines(file, tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.fatal is not None:
            raise self.fatal

    async def _run_lines(self, file: IO[bytes], tasks: set[asyncio.Task[None]]) -> None:
        slots = asyncio.Semaphore(self.concurrency())
        async for number, raw in input_lines(file):
            chosen = self.selector.select(parse_line(raw, number))
            if chosen is None:
                self.counts["skipped"] += 1
                self.progress.advance()
            elif isinstance(chosen, LineError):
                self._write(error_line(chosen), "invalid")
            else:
                await slots.acquire()
                if self.fatal is not None:
                    break
                task = asyncio.create_task(self._run_line(chosen, slots))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if self.fatal is not None:
                break
        await asyncio.gather(*tasks)

    async def _run_line(self, request: BatchRequest, slots: asyncio.Semaphore) -> None:
        try:
            outcome = await run_request(self.server, request)
            status = outcome.line["response"]["status_code"]
            self._write(outcome.line, "ok" if status == 200 else "failed", outcome.completion_tokens)
        except (EngineFailed, OSError) as exc:  # no engine, or no output: nothing more can be done
            self.fatal = self.fatal or exc
        finally:
            slots.release()

    def _write(self, line: dict[str, Any], kind: str, completion_tokens: int = 0) -> None:
        self.writer.write(encode_line(line))
        self.counts[kind] += 1
        self.progress.advance(completion_tokens)


# ------------------------------------------------------------------ entry


EXIT_DONE, EXIT_FATAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def run_batch(settings: Any, input_path: str, output_path: str, resume: bool) -> int:
    """Run a batch file to its output file ("-": stdin / stdout). 0: every line has its output line;
    1: the engine failed (or the output could not be written); 2: unusable input or output."""
    try:
        source = sys.stdin.buffer if input_path == "-" else open(input_path, "rb")
        if output_path == "-":
            out_fd, written = _claim_stdout(), Written()
        else:
            out_fd, written = open_output(output_path, resume)
    except OSError as exc:
        logger.error("run-batch: %s", exc)
        print(f"jamba-server run-batch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    enabled = sys.stderr.isatty()
    progress = Progress(count_requests(input_path) if enabled else None, enabled)
    try:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(_run(settings, source, LineWriter(out_fd), LineSelector(written), progress))
    except (KeyboardInterrupt, asyncio.CancelledError):  # SIGINT, SIGTERM: in-flight lines are lost
        return EXIT_INTERRUPTED
    finally:
        progress.close()
        source.close()
        os.close(out_fd)


def _claim_stdout() -> int:
    """The real stdout for the output lines alone: everything else printing to fd 1 (vLLM's logs,
    its engine processes) goes to stderr instead."""
    out_fd = os.dup(1)
    sys.stdout.flush()
    os.dup2(2, 1)
    return out_fd


async def _run(settings: Any, source: IO[bytes], writer: LineWriter, selector: LineSelector, progress: Progress) -> int:
    from jamba_server.runtime.vllm_engine import VLLM_VERSION, EngineAdapter

    engine = EngineAdapter(settings)
    server = Server(settings, engine, engine_version=VLLM_VERSION)
    batch = BatchRun(server, writer, selector, progress)
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    try:
        await server.start_engine()
    except Exception as exc:  # noqa: BLE001 - logged by start_engine
        print(f"jamba-server run-batch: the engine failed to start: {exc}", file=sys.stderr)
        await asyncio.to_thread(engine.shutdown)
        return EXIT_FATAL
    batch.give_the_engine_a_backlog()
    started = progress.started = time.monotonic()  # tokens/s counts from the engine being up
    try:
        await batch.run(source)
        code = EXIT_DONE
    except (EngineFailed, OSError) as exc:
        logger.error("run-batch stopped: %s; rerun with --resume to finish", exc)
        code = EXIT_FATAL
    finally:
        writer.sync()
        seconds = time.monotonic() - started
        await asyncio.to_thread(engine.shutdown)
    logger.info(
        "run-batch %s: %d lines written in %.1fs (%d ok, %d failed requests, %d invalid lines), %d already written, %d output tokens",
        "done" if code == EXIT_DONE else "stopped", writer.lines, seconds, batch.counts["ok"],
        batch.counts["failed"], batch.counts["invalid"], batch.counts["skipped"], progress.tokens,
    )  # fmt: skip
    return code
