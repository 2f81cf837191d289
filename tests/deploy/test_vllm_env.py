"""Every vLLM environment variable the project sets exists in the installed vLLM.

vLLM reads only the variables in `vllm.envs.environment_variables`; any other `VLLM_*` name is
ignored with a warning ("Unknown vLLM environment variable detected", vllm/platforms/interface.py,
`validate_environ`). A preset or manifest that relies on a renamed or removed variable (as the Mini
ExpertsInt8 preset once did on `VLLM_FUSED_MOE_CHUNK_SIZE`) silently does nothing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import vllm.envs
import yaml

from tests.deploy.dockerfile import DOCKER, REPO, env, instructions

VLLM_NAME = re.compile(r"^VLLM_[A-Z0-9_]+$")


def _env_names(node: Any) -> Iterator[str]:
    """Names under every `env:` list (Kubernetes containers) or mapping (presets, compose)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("env", "environment"):
                if isinstance(value, dict):
                    yield from value
                elif isinstance(value, list):
                    for item in value:
                        yield item["name"] if isinstance(item, dict) else str(item).partition("=")[0]
            else:
                yield from _env_names(value)
    elif isinstance(node, list):
        for item in node:
            yield from _env_names(item)


def yaml_env(path: Path) -> set[str]:
    return {name for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) for name in _env_names(doc)}


def set_by_the_project() -> dict[str, set[str]]:
    """Each VLLM_* variable the project sets → the files that set it."""
    found: dict[str, set[str]] = {}

    def add(names: set[str], path: Path) -> None:
        for name in names:
            if VLLM_NAME.match(name):
                found.setdefault(name, set()).add(str(path.relative_to(REPO)))

    for path in [*sorted((REPO / "configs").glob("*.yaml")), *sorted((REPO / "deploy").rglob("*.yaml")), DOCKER / "compose.yaml"]:
        add(yaml_env(path), path)
    for path in sorted(DOCKER.glob("Dockerfile*")):
        add(set(env(instructions(path))), path)
    for path in sorted((REPO / "server").rglob("*.py")):  # os.environ["VLLM_..."] / setdefault
        add(set(re.findall(r"environ(?:\.setdefault\(|\[)\"(VLLM_[A-Z0-9_]+)\"", path.read_text(encoding="utf-8"))), path)
    return found


def test_the_scan_sees_what_the_project_sets():
    found = set_by_the_project()
    assert "configs/dev-cpu.yaml" in found["VLLM_CPU_KVCACHE_SPACE"]
    assert "server/jamba_server/runtime/vllm_engine.py" in found["VLLM_CPU_OMP_THREADS_BIND"]
    assert "docker/Dockerfile" in found["VLLM_CACHE_ROOT"]
    assert any(path.startswith("deploy/k8s/") for path in found["VLLM_HOST_IP"])


@pytest.mark.parametrize("name", sorted(set_by_the_project()))
def test_variable_exists_in_the_installed_vllm(name):
    assert name in vllm.envs.environment_variables, f"{name} (set in {sorted(set_by_the_project()[name])}) is not a vLLM {vllm.__version__} variable"


def test_a_removed_variable_would_be_caught():
    assert "VLLM_FUSED_MOE_CHUNK_SIZE" not in vllm.envs.environment_variables
