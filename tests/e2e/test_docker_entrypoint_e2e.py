"""The CPU image's command, run directly on this machine: ENTRYPOINT + CMD and ENV from
docker/Dockerfile.cpu, /app mapped to the repository root. It serves the dev model to the official
openai client, passes the image's HEALTHCHECK, and drains and exits 0 on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import openai
import psutil
import pytest

from tests.support import REPO, ServerProcess, free_port
from tests.deploy.dockerfile import CPU_DOCKERFILE, env, exec_form, final_stage, healthcheck, host_path, last

STAGE = final_stage(CPU_DOCKERFILE)
IMAGE_ENV = env(STAGE)
VENV_BIN = str(Path(sys.executable).parent)


def image_environment(port: int) -> dict[str, str]:
    """This machine's environment with the image's ENV on top; the venv stands in for /opt/venv and
    the server listens on loopback on a free port instead of 0.0.0.0:8000."""
    variables = {k: v for k, v in IMAGE_ENV.items() if k not in {"PATH", "VIRTUAL_ENV"}}
    return {
        **os.environ, **variables,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        "JAMBA_HOST": "127.0.0.1", "JAMBA_PORT": str(port),
    }  # fmt: skip


class ImageCommand(ServerProcess):
    """ServerProcess whose command is the image's ENTRYPOINT + CMD."""

    def __init__(self) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = REPO / "build" / f"docker-entrypoint-{self.port}.log"
        self.log_path.parent.mkdir(exist_ok=True)
        self.command = [host_path(a) for a in exec_form(last(STAGE, "ENTRYPOINT")) + exec_form(last(STAGE, "CMD"))]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.command, cwd=host_path(last(STAGE, "WORKDIR")), stdout=self._log, stderr=subprocess.STDOUT,
            env=image_environment(self.port), start_new_session=True,
        )  # fmt: skip


@pytest.fixture(scope="module")
def image_server(dev_model):
    server = ImageCommand()
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    yield server
    server.stop()
    try:  # whatever the command left behind in its session (there should be nothing)
        os.killpg(server.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_the_command_is_the_image_default(image_server):
    assert image_server.command == [str(REPO / "docker" / "entrypoint.sh")]
    assert IMAGE_ENV["JAMBA_PRESET"] == "dev-cpu"


def test_entrypoint_execs_jamba_server(image_server):
    """No shell stays in between: the started process is jamba-server, so signals reach it."""
    cmdline = psutil.Process(image_server.proc.pid).cmdline()
    assert any(Path(part).name == "jamba-server" for part in cmdline), cmdline
    assert "--config" in cmdline and "configs/dev-cpu.yaml" in cmdline


def test_chat_completion_with_the_openai_client(image_server):
    with openai.OpenAI(base_url=image_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        resp = client.chat.completions.create(
            model="jamba-tiny-dev", messages=[{"role": "user", "content": "Hello from the container!"}], max_tokens=8,
        )  # fmt: skip
    assert resp.object == "chat.completion" and resp.model == "jamba-tiny-dev"
    assert resp.choices[0].message.role == "assistant"
    assert 0 < resp.usage.completion_tokens <= 8 and resp.usage.prompt_tokens > 0


def test_image_healthcheck_passes_and_fails_when_nothing_listens(image_server):
    _, command = healthcheck(STAGE)
    assert subprocess.run(command, env=image_environment(image_server.port), timeout=30).returncode == 0
    closed = subprocess.run(command, env=image_environment(free_port()), capture_output=True, timeout=30)
    assert closed.returncode != 0


def test_sigterm_drains_and_exits_zero(image_server):
    """Last in the module: stops the shared server."""
    assert image_server.stop() == 0, image_server.log_tail()
