"""`jamba-server` command: settings → engine adapter → FastAPI app → uvicorn (with `api_server_count`
N > 1: a supervisor, the engine core and N such API processes, runtime/vllm_api_servers.py);
`jamba-server run-batch`: the same engine and pipeline over a batch file (runtime/batch.py)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, Callable, Sequence

from jamba_server.logs import configure_logging
from jamba_server.settings import Settings, SettingsError, build_arg_parser, settings_from_args

if TYPE_CHECKING:
    from jamba_server.runtime.vllm_api_servers import ApiWorker

BATCH_COMMAND = "run-batch"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [BATCH_COMMAND]:
        return run_batch_command(argv[1:])
    settings, _ = checked_settings(build_arg_parser(), argv, "jamba-server")
    if settings is None:
        return 2
    prepare_process(settings)
    if settings.api_server_count > 1:
        from jamba_server.runtime.vllm_api_servers import supervise

        return supervise(settings)
    return serve(settings)


def checked_settings(parser: argparse.ArgumentParser, argv: Sequence[str], command: str) -> tuple[Settings | None, argparse.Namespace]:
    """Settings from the flags `parser` parses, the chat template readable; None (the error said on
    stderr) when they cannot be used."""
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
        settings.chat_template_text()
    except SettingsError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return None, args
    return settings, args


def prepare_process(settings: Settings, api_worker: int | None = None) -> None:
    configure_logging(settings.log_level, settings.log_format, api_worker)
    # Preset environment (e.g. VLLM_CPU_KVCACHE_SPACE) must be in place before vLLM is imported;
    # a variable already set in the real environment wins.
    for name, value in settings.env.items():
        os.environ.setdefault(name, value)


def batch_arg_parser() -> argparse.ArgumentParser:
    parser = build_arg_parser(
        prog=f"jamba-server {BATCH_COMMAND}",
        description="Run an OpenAI batch file (JSONL: custom_id, method, url, body per line) on the embedded engine, "
        "without an HTTP server; one output line per input line, in OpenAI's batch output format. "
        "Exit status: 0 every line written (error lines included), 1 the engine failed, 2 bad arguments or files.",
    )
    group = parser.add_argument_group("batch")
    group.add_argument("-i", "--input", required=True, metavar="PATH", help="batch input file (JSONL); - for stdin")
    group.add_argument("-o", "--output", required=True, metavar="PATH", help="output file (JSONL); - for stdout")
    group.add_argument(
        "--resume", action="store_true",
        help="keep the output's whole lines, skip the input lines they answer and append the rest (a cut last line is removed)",
    )  # fmt: skip
    return parser


def run_batch_command(argv: Sequence[str]) -> int:
    settings, args = checked_settings(batch_arg_parser(), argv, f"jamba-server {BATCH_COMMAND}")
    if settings is None:
        return 2
    if args.resume and args.output == "-":
        print(f"jamba-server {BATCH_COMMAND}: --resume needs an output file, not stdout", file=sys.stderr)
        return 2
    prepare_process(settings)
    from jamba_server.runtime.batch import run_batch

    return run_batch(settings, args.input, args.output, args.resume)


def serve(settings: Settings, worker: ApiWorker | None = None) -> int:
    """Run the server until it is stopped (0) or its engine fails (1); a `worker` (one API process
    of several) serves on the supervisor's socket, attached to the engine core they share."""
    import uvicorn

    from jamba_server.http.app import create_app
    from jamba_server.runtime.vllm_engine import EngineAdapter

    failed: list[str] = []
    server: Any = None

    def on_fatal(reason: str) -> None:
        failed.append(reason)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, EngineAdapter(settings, worker and worker.seat), on_fatal=on_fatal)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        loop="uvloop",
        http="httptools",
        access_log=False,
        timeout_keep_alive=settings.timeout_keep_alive,
        limit_concurrency=settings.limit_concurrency,
    )
    if worker is not None:
        server = worker.server(config, app.state.server, lambda: bool(failed))
        worker.run(server)
        return 1 if failed else 0
    server = draining_server(config, app.state.server, lambda: bool(failed))
    # uvicorn re-raises the signal it stopped on once it has shut down; a drained SIGTERM/SIGINT
    # is a clean exit (status 0), so make that re-raise a no-op.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 1 if failed else 0


def draining_server(config: Any, runtime: Any, failed: Callable[[], bool], base: type | None = None, **kwargs: Any) -> Any:
    """A uvicorn server whose first SIGTERM/SIGINT drains `runtime` (ready → 503, new requests 503,
    in-flight finish), then exits; a second one, or one after a failure, exits at once. `base` (a
    `uvicorn.Server` subclass, built with `kwargs`) in place of uvicorn's own."""
    import uvicorn

    class DrainingServer(base or uvicorn.Server):  # type: ignore[misc]
        drain_started = False
        loop: asyncio.AbstractEventLoop | None = None

        async def serve(self, sockets: list | None = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame: object) -> None:
            if self.drain_started or failed() or self.loop is None:
                return super().handle_exit(sig, frame)
            self.drain_started = True
            # Runs as a signal handler: hand the drain to the event loop thread-safely.
            loop = self.loop
            loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

        async def _drain(self) -> None:
            await runtime.drain()
            self.should_exit = True

    return DrainingServer(config, **kwargs)


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
