"""The supervisor of a multi-process server (`api_server_count` > 1) restarts nothing: any worker or
engine core process exiting ends the watch, naming it; a stop request ends it too, and the exit is
clean only if every worker exited 0. Real child processes stand in for the workers and the engine."""

from __future__ import annotations

import multiprocessing
import signal
import sys
import time

from jamba_server.runtime import vllm_api_servers as supervisor

FORK = multiprocessing.get_context("fork")


def _sleep_then_exit(seconds: float, code: int) -> None:
    time.sleep(seconds)
    sys.exit(code)


def _exit_0_on_sigterm() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    time.sleep(60)


def _started(target, *args) -> multiprocessing.Process:
    process = FORK.Process(target=target, args=args)
    process.start()
    return process


class _Processes:
    """What the supervisor uses of vLLM's process managers: `processes` and `shutdown(timeout)`."""

    def __init__(self, *processes: multiprocessing.Process):
        self.processes = list(processes)
        self.shutdown_timeout: float | None = None

    def shutdown(self, timeout: float) -> None:
        self.shutdown_timeout = timeout
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.join(timeout)


def test_a_worker_exiting_ends_the_watch_naming_it_and_the_exit_is_not_clean(caplog):
    layout = supervisor._Layout(
        _Processes(_started(_exit_0_on_sigterm), _started(_sleep_then_exit, 0.2, 3)),
        _Processes(_started(_sleep_then_exit, 60, 0)),
    )
    assert supervisor._watch(layout, lambda: False) is True
    assert "API worker 1" in caplog.text and "exited with code 3" in caplog.text
    assert supervisor._shut_down(layout, 5) is False
    assert layout.engines.shutdown_timeout == supervisor.ENGINE_EXIT_TIMEOUT_S
    assert not any(p.is_alive() for p in layout.workers.processes + layout.engines.processes)


def test_the_engine_core_exiting_ends_the_watch(caplog):
    layout = supervisor._Layout(_Processes(_started(_exit_0_on_sigterm)), _Processes(_started(_sleep_then_exit, 0.2, 1)))
    assert supervisor._watch(layout, lambda: False) is True
    assert "engine core" in caplog.text and "exited with code 1" in caplog.text
    supervisor._shut_down(layout, 5)


def test_a_stop_request_ends_the_watch_and_workers_exiting_0_are_a_clean_exit():
    layout = supervisor._Layout(_Processes(_started(_exit_0_on_sigterm), _started(_exit_0_on_sigterm)), _Processes(_started(_sleep_then_exit, 60, 0)))
    time.sleep(0.5)  # the workers' SIGTERM handlers in place
    assert supervisor._watch(layout, lambda: True) is False
    assert supervisor._shut_down(layout, 7) is True
    assert layout.workers.shutdown_timeout == 7
