"""A server child process for the repository's own tools (`eval_dev_model`, the benchmark): a free
loopback port to put it on, and stopping it with its engine processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM (the server drains and stops its engine), then SIGKILL to its whole process group (the
    child was started in a session of its own) if it has not exited within `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
