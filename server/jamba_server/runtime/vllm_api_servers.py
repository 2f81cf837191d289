"""The engine adapter's multi-process half: vLLM's multi-API-server layout (`api_server_count` N > 1)
with jamba-server's own app in every API process. Besides vllm_engine.py, the only module that
imports vllm.

The supervisor (the process `jamba-server` started) does what `vllm serve --api-server-count N` does
(vllm/entrypoints/cli/serve.py, `run_multi_api_server`): it builds the engine's config once, binds
the HTTP socket and one ZMQ listener pair per API process, launches the engine core and starts N API
workers. Each worker runs the normal app (`cli.serve`) with its share of the admission limits
(admission.py, `worker_settings`), attached to the engine core as client i, accepting connections
on the shared socket with vLLM's accept (the least-loaded worker takes each new connection).

The supervisor restarts nothing: an API worker or the engine core exiting ends everything (exit 1,
logged naming which); SIGTERM or SIGINT drains every worker (their own drain), then stops the
engine core (exit 0).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from multiprocessing import connection
from typing import Any, Callable

from vllm.entrypoints.launchers.launcher import NoSignalServer, create_server_socket
from vllm.v1.engine.utils import bind_engine_zmq_listeners, launch_core_engines
from vllm.v1.executor import Executor
from vllm.v1.utils import APIServerProcessManager

# Imported before the supervisor sets PROMETHEUS_MULTIPROC_DIR: prometheus_client picks file-backed
# values when it is imported, so the supervisor's own (unused) metrics stay out of the merged view.
from jamba_server import metrics
from jamba_server.runtime.admission import running_limit, worker_settings
from jamba_server.runtime.vllm_engine import USAGE_CONTEXT, SharedEngineSeat, engine_args
from jamba_server.settings import Settings

logger = logging.getLogger(__name__)

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# After SIGTERM a worker drains for up to drain_timeout, then aborts what is left and waits up to
# 5 s for the aborts (runner.py); past this much more it is killed.
WORKER_EXIT_GRACE_S = 10.0
# A worker stopped because another process failed gets this long before it is killed.
FAILURE_EXIT_TIMEOUT_S = 5.0
# The engine core, once its clients are gone, stops its own workers (~5 s here) before it exits;
# vLLM's default wait (5 s) kills it midway.
ENGINE_EXIT_TIMEOUT_S = 15.0


class _StopWhileStarting(BaseException):
    """SIGTERM or SIGINT before the engine core is up: nothing to drain, stop at once."""


class _StopSignal:
    """The supervisor's SIGTERM and SIGINT: while starting, stop at once; once serving, note it
    (the watch loop then drains the workers)."""

    def __init__(self) -> None:
        self.requested = False
        self.starting = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            return
        self.requested = True
        logger.info("%s: draining the API workers, then stopping the engine core", signal.Signals(signum).name)
        if self.starting:
            raise _StopWhileStarting()


@dataclass
class _Layout:
    """What the supervisor started, for the watch and the shutdown (None: not started yet)."""

    workers: APIServerProcessManager | None = None
    engines: Any = None  # vLLM's CoreEngineProcManager (or its Ray actor manager)
    coordinator: Any = None  # vLLM's data-parallel coordinator, if the engine config has one

    def watched(self) -> dict[Any, tuple[str, Any]]:
        """Sentinel → (what it is, its process) for every process whose exit ends the server."""
        assert self.workers is not None
        watched = {p.sentinel: (f"API worker {i}", p) for i, p in enumerate(self.workers.processes)}
        for process in getattr(self.engines, "processes", ()):
            watched[process.sentinel] = (f"engine core {process.name}", process)
        if self.coordinator is not None:
            watched[self.coordinator.proc.sentinel] = ("data-parallel coordinator", self.coordinator.proc)
        return watched


def supervise(settings: Settings) -> int:
    """Run the layout until stopped (0: every worker drained and exited cleanly) or until a process
    of it fails (1)."""
    metrics_dir = _fresh_metrics_dir()
    stop = _StopSignal()
    try:
        return _serve(settings, stop)
    except _StopWhileStarting:
        return 0
    except Exception:  # noqa: BLE001 - the engine core or a worker failed to start, or the bind failed
        logger.exception("the server failed to start")
        return 1
    finally:
        metrics_dir.cleanup()


def _fresh_metrics_dir() -> tempfile.TemporaryDirectory:
    """A new PROMETHEUS_MULTIPROC_DIR for the workers (inherited by every process started from
    here), removed on exit: values left by an earlier run would add to this one's."""
    if METRICS_DIR_ENV in os.environ:
        logger.warning("%s is set; the API workers get a fresh directory instead", METRICS_DIR_ENV)
    directory = tempfile.TemporaryDirectory(prefix="jamba-metrics-")
    os.environ[METRICS_DIR_ENV] = directory.name
    return directory


def _serve(settings: Settings, stop: _StopSignal) -> int:
    args = engine_args(settings)
    args._api_process_count, args._api_process_rank = settings.api_server_count, -1
    vllm_config = args.create_engine_config(USAGE_CONTEXT)
    # Resolved once here, so every worker splits the same number (the engine's max_num_seqs by default).
    running = running_limit(settings, vllm_config.scheduler_config.max_num_seqs)
    settings = settings.model_copy(update={"max_concurrent_requests": running})
    sock = create_server_socket((settings.host, settings.port), reuse_port=False)
    listeners = bind_engine_zmq_listeners(vllm_config, settings.api_server_count)
    layout = _Layout()
    try:
        logger.info("starting the engine core and %d API workers on %s:%d", settings.api_server_count, settings.host, settings.port)
        executor = Executor.get_class(vllm_config)
        with launch_core_engines(vllm_config, executor, not args.disable_log_stats, listeners.addresses) as launch:
            layout.engines, layout.coordinator = launch.engine_manager, launch.coordinator
            layout.workers = _start_workers(settings, sock, listeners, launch)
            # The engine's start-up (this block's end) fails if a worker exits meanwhile.
            launch.watched_frontend_processes = layout.workers.processes
        stop.starting = False
        logger.info("engine core up; API worker pids %s", [p.pid for p in layout.workers.processes])
        failed = _watch(layout, lambda: stop.requested)
    except BaseException:
        _shut_down(layout, FAILURE_EXIT_TIMEOUT_S)
        raise
    finally:
        sock.close()
    clean = _shut_down(layout, settings.drain_timeout + WORKER_EXIT_GRACE_S if not failed else FAILURE_EXIT_TIMEOUT_S)
    return 1 if failed or not clean else 0


def _start_workers(settings: Settings, sock: socket.socket, listeners: Any, launch: Any) -> APIServerProcessManager:
    stats_address = launch.coordinator.get_stats_publish_address() if launch.coordinator else None
    return APIServerProcessManager(
        listen_address=f"http://{settings.host}:{settings.port}",
        sock=sock,
        args=settings,  # type: ignore[arg-type]  # handed to run_api_worker as it is
        num_servers=settings.api_server_count,
        input_listeners=listeners.inputs,
        output_listeners=listeners.outputs,
        target_server_fn=run_api_worker,
        stats_update_address=stats_address,
        tensor_queue=launch.tensor_queue,
    )


def _watch(layout: _Layout, stop_requested: Callable[[], bool]) -> bool:
    """Wait until asked to stop (False) or until a worker or the engine core exits (True, logged)."""
    watched = layout.watched()
    while not stop_requested():
        for sentinel in connection.wait(list(watched), timeout=0.5):
            what, process = watched[sentinel]
            process.join(5)  # its sentinel can be ready a moment before its exit code
            logger.error("%s (pid %s) exited with code %s: stopping the server", what, process.pid, process.exitcode)
            return True
    return False


def _shut_down(layout: _Layout, worker_timeout: float) -> bool:
    """SIGTERM the workers (each drains, then exits), kill those still running after
    `worker_timeout`, then stop the engine core. True if every worker exited with 0."""
    clean = True
    if layout.workers is not None:
        layout.workers.shutdown(timeout=worker_timeout)
        for index, process in enumerate(layout.workers.processes):
            if process.exitcode != 0:
                logger.error("API worker %d (pid %s) ended with code %s", index, process.pid, process.exitcode)
                clean = False
    if layout.engines is not None:
        layout.engines.shutdown(timeout=ENGINE_EXIT_TIMEOUT_S)
    if layout.coordinator is not None:
        layout.coordinator.shutdown()
    return clean


@dataclass
class ApiWorker:
    """One API process of several: its seat on the engine core, the supervisor's listening socket,
    and vLLM's shared array of open connections per worker (each accepts only while least loaded)."""

    seat: SharedEngineSeat
    sock: socket.socket
    loads: Any

    def server(self, config: Any, runtime: Any, failed: Callable[[], bool]) -> Any:
        """The draining server of one process, built on vLLM's least-loaded accept."""
        from jamba_server.cli import draining_server

        server = draining_server(config, runtime, failed, base=NoSignalServer, peer_loads=(self.loads, self.seat.index))
        # vLLM's server installs no signal handlers: the first SIGTERM/SIGINT drains, as in one process.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, server.handle_exit)
        return server

    def run(self, server: Any) -> None:
        try:
            server.run(sockets=[self.sock])
        finally:
            self.sock.close()


def run_api_worker(listen_address: str, sock: socket.socket, settings: Settings, client_config: dict[str, Any]) -> None:
    """An API worker process (spawned by vLLM's APIServerProcessManager): the normal server with
    its share of the admission limits, metrics merged over the workers, attached to the engine core."""
    from jamba_server.cli import prepare_process, serve

    index, count = client_config.pop("client_index"), client_config.pop("client_count")
    loads = client_config.pop("api_server_loads")
    share = worker_settings(settings, index)
    prepare_process(share, api_worker=index)
    metrics.merge_processes()
    logger.info(
        "API worker %d of %d (pid %d) on %s: up to %d sequences running, %d queued",
        index, count, os.getpid(), listen_address, share.max_concurrent_requests, share.max_queued_requests,
    )  # fmt: skip
    sys.exit(serve(share, ApiWorker(SharedEngineSeat(client_config, index, count), sock, loads)))
