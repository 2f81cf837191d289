"""Just enough Dockerfile reading for the tests: instructions, ENV, exec-form commands, /app paths."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
GPU_DOCKERFILE = DOCKER / "Dockerfile"
CPU_DOCKERFILE = DOCKER / "Dockerfile.cpu"
APP_DIR = "/app"  # the images' WORKDIR; the repository root plays it on this machine


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        keyword, _, args = (pending + text).partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    return result


def final_stage(path: Path) -> list[tuple[str, str]]:
    """The instructions of the last stage (the image that runs)."""
    items = instructions(path)
    start = max(i for i, (keyword, _) in enumerate(items) if keyword == "FROM")
    return items[start:]


def last(stage: list[tuple[str, str]], keyword: str) -> str:
    values = [args for kw, args in stage if kw == keyword]
    assert values, f"no {keyword} instruction"
    return values[-1]


def exec_form(args: str) -> list[str]:
    """An exec-form (JSON array) command; fails on shell form."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def env(stage: list[tuple[str, str]]) -> dict[str, str]:
    """ENV KEY=VALUE pairs of a stage (later ones win)."""
    values: dict[str, str] = {}
    for keyword, args in stage:
        if keyword == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"ENV without '=': {item}"
                values[key] = value
    return values


def healthcheck(stage: list[tuple[str, str]]) -> tuple[dict[str, str], list[str]]:
    """HEALTHCHECK options (e.g. {'start-period': '10m'}) and its exec-form command."""
    options, sep, command = last(stage, "HEALTHCHECK").partition(" CMD ")
    assert sep, "HEALTHCHECK without CMD"
    parsed = dict(opt.removeprefix("--").split("=", 1) for opt in options.split())
    return parsed, exec_form(command)


def host_path(container_path: str) -> str:
    """A path under the images' /app as the same file in this checkout."""
    if container_path == APP_DIR or container_path.startswith(APP_DIR + "/"):
        return str(REPO) + container_path[len(APP_DIR) :]
    return container_path


def duration_seconds(text: str) -> float:
    """Docker/compose durations such as '90s', '10m', '1m30s'."""
    units = {"h": 3600, "m": 60, "s": 1}
    total, number = 0.0, ""
    for char in text:
        if char.isdigit() or char == ".":
            number += char
        else:
            total += float(number) * units[char]
            number = ""
    assert not number, f"duration without unit: {text}"
    return total
