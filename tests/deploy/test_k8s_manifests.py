"""Offline checks of the Kubernetes manifests in deploy/k8s/ (one directory per GPU preset).

1. Every manifest validates: built-in kinds with kubernetes-validate (strict, at a pinned Kubernetes
   version), custom resources against their CRD's openAPIV3Schema kept in deploy/k8s/schemas/.
2. Each target agrees with its preset and with the container contract: GPUs = TP x PP, no
   contradicting flags or env, probes on /health and /ready, grace period above the drain, /dev/shm
   in memory, the model cache on a shared PVC, selectors that select, a queue metric that exists.
3. Nothing is open by default: the server takes its API keys from a Secret (never a value in the
   manifest), caps max_tokens, and a multi-node group runs Ray with token authentication from a
   Secret behind a NetworkPolicy.

Deliberately broken copies (a wrong field, a contradicting flag, a mismatched selector, ...) show
that validation and the main consistency checks can fail.
"""

from __future__ import annotations

import copy
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jamba_server.metrics
import jsonschema
import kubernetes_validate
import pytest
import yaml
from jamba_server.settings import Settings, SettingsError, load_settings
from kubernetes_validate.utils import all_versions
from prometheus_client.metrics import MetricWrapperBase

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
SCHEMAS = K8S / "schemas"

K8S_VERSION = "1.33.0"  # pinned; kubernetes-validate ships it (see test_pinned_version_is_shipped)

# The container contract (docker/): image, entrypoint, listen port, model cache, user.
IMAGE = "ghcr.io/jamba-server/jamba-server:0.1.0"
ENTRYPOINT = ["jamba-server", "--config", "/app/configs/{preset}.yaml", "--host", "0.0.0.0", "--port", "8000"]
PORT = 8000
CACHE = "/models"
HF_HOME = "/models/hf"
UID = 1000
SERVER = "jamba-server"  # name of the server's container
RAY_PORT = 6379
INIT = ["/usr/bin/tini", "--"]  # the image's PID 1; a container `command` must keep it
# Nodes a GPU pod may land on (NVIDIA GPU Feature Discovery labels): a driver for CUDA 13.0 (R580+),
# compute capability 8 or newer, and the 80 GB per GPU every preset is sized for (MiB).
DRIVER_LABELS = ("nvidia.com/cuda.driver-version.major", "nvidia.com/cuda.driver.major")
MIN_DRIVER_MAJOR = 580
MIN_COMPUTE_MAJOR = 8
MIN_GPU_MEMORY_MIB = 79_000
HPA_MAX_STABILIZATION_S = 3600  # autoscaling/v2's limit on behavior.*.stabilizationWindowSeconds
# Startup probe budget: download + load of ~104 GB (Mini) or ~800 GB (Large) of BF16 weights.
MIN_STARTUP_S = {"ai21labs/AI21-Jamba-1.5-Mini": 30 * 60, "ai21labs/AI21-Jamba-1.5-Large": 60 * 60}
# Settings a manifest must not change relative to its preset (through env or flags).
PINNED = ("model", "revision", "served_model_name", "dtype", "quantization", "max_model_len",
          "tensor_parallel_size", "pipeline_parallel_size", "engine_args")  # fmt: skip
# Secrets the operator creates (README, "Security model"); the manifests only reference them.
API_KEY_SECRET = "jamba-api-keys"
RAY_TOKEN_SECRET = "jamba-ray-token"
MIN_RAY_FOR_TOKEN_AUTH = (2, 52, 0)  # RAY_AUTH_MODE=token appeared in Ray 2.52.0
CONSTRAINTS_GPU = REPO / "docker" / "constraints-gpu.txt"

TARGETS = sorted(p.name for p in K8S.iterdir() if p.is_dir() and p.name != "schemas")


def load_docs(target: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((K8S / target).glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
    return docs


# ---------------------------------------------------------------- schema validation


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's OpenAPI v3 schema as JSON Schema, read the way the API server's strict field
    validation reads it: unknown fields are errors unless the schema preserves them."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict(sub) for sub in out[key]]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _validate_as(_validator: Any, spec: dict[str, str], instance: Any, _schema: Any):
    """`x-jamba-validate-as: {kind, at}`: validate a core type inlined in a CRD (e.g. the LWS pod
    templates' PodSpec) by placing it at `at` inside a v1 `kind` object, with kubernetes-validate."""
    wrapper: dict[str, Any] = {"apiVersion": "v1", "kind": spec["kind"], "metadata": {"name": "embedded"}}
    *parents, leaf = spec["at"].split(".")
    node = wrapper
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = instance
    try:
        kubernetes_validate.validate(wrapper, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(map(str, exc.path))
        yield jsonschema.ValidationError(f"as {spec['kind']} ({where}): {exc.message}")


CRValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-jamba-validate-as": _validate_as})


def _load_crds() -> dict[tuple[str, str], dict[str, Any]]:
    crds = {}
    for path in SCHEMAS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text(encoding="utf-8"))
        crds[(f"{crd['group']}/{crd['version']}", crd["kind"])] = crd
    return crds


CRDS = _load_crds()


def validate(doc: dict[str, Any]) -> str:
    """Raise if `doc` is invalid. Built-in kinds: kubernetes-validate, which raises
    SchemaNotFoundError for a kind it does not know, so nothing is skipped. Custom resources: the
    CRD schema from deploy/k8s/schemas/."""
    crd = CRDS.get((doc["apiVersion"], doc["kind"]))
    if crd is None:
        return "kubernetes " + kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    errors = sorted(CRValidator(strict(crd["openAPIV3Schema"])).iter_errors(doc), key=str)
    if errors:
        raise jsonschema.ValidationError("; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors))
    return "crd " + crd["group"]


# ---------------------------------------------------------------- consistency checks


def exported_metric_names() -> set[str]:
    """Names the server exposes for its own metrics (server/jamba_server/metrics.py)."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
    names: set[str] = set()
    for obj in vars(jamba_server.metrics).values():
        if isinstance(obj, MetricWrapperBase):
            for family in obj.describe():
                names |= {family.name + suffix for suffix in suffixes[family.type]}
    return names


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _match_labels(selector: dict[str, Any]) -> dict[str, str]:
    if set(selector) - {"matchLabels"}:
        raise ValueError(f"only matchLabels selectors are checked here, got {sorted(selector)}")
    return selector.get("matchLabels") or {}


def _container(pod: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = pod["spec"]["containers"]
    return next(c for c in containers if c["name"] == name) if name else containers[0]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _plain_env(container: dict[str, Any]) -> dict[str, str]:
    return {name: e["value"] for name, e in _env(container).items() if "value" in e}


def _gpus(container: dict[str, Any]) -> int:
    resources = container.get("resources", {})
    requested = resources.get("requests", {}).get("nvidia.com/gpu", 0)
    limited = resources.get("limits", {}).get("nvidia.com/gpu", 0)
    if int(requested) != int(limited):
        raise ValueError(f"{container['name']}: nvidia.com/gpu request {requested} != limit {limited}")
    return int(limited)


def _port_number(container: dict[str, Any], port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    return {p.get("name"): p["containerPort"] for p in container.get("ports", [])}.get(port)


def _prestop_sleep(container: dict[str, Any]) -> int:
    return container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)


def server_argv(container: dict[str, Any]) -> list[str]:
    """The jamba-server command line a container runs: the image's entrypoint with the container's
    args, or the `exec jamba-server ... "$@"` at the end of a `/bin/sh -c` command."""
    preset = _plain_env(container).get("JAMBA_PRESET", "")
    args = list(container.get("args", []))
    command = container.get("command")
    if command is None:
        return [word.format(preset=preset) for word in ENTRYPOINT] + args
    if command[: len(INIT)] == INIT:
        command = command[len(INIT) :]
    if command[:2] != ["/bin/sh", "-c"] or "exec jamba-server " not in command[2]:
        raise ValueError(f"{container['name']}: the command does not exec jamba-server: {command}")
    tail = command[2].split("exec jamba-server ", 1)[1].replace("${JAMBA_PRESET}", preset)
    argv = ["jamba-server"]
    for word in shlex.split(tail):
        argv += args if word == "$@" else [word]
    return argv


def effective_settings(container: dict[str, Any]) -> tuple[Settings, Settings]:
    """(the preset alone, what the server in this container ends up with), via the server's own
    settings loader: preset < JAMBA_* env < flags."""
    argv = server_argv(container)
    local = [str(REPO / "configs" / Path(a).name) if a.startswith("/app/configs/") else a for a in argv[1:]]
    preset_path = local[local.index("--config") + 1]
    if not Path(preset_path).is_file():
        raise ValueError(f"preset {Path(preset_path).relative_to(REPO)} does not exist")
    base = load_settings(["--config", preset_path], environ={})
    # The API key file exists in the pod only (a mounted Secret): _api_keys_from_secret checks it.
    environ = {k: v for k, v in _plain_env(container).items() if k != "JAMBA_API_KEY_FILE"}
    if "--api-key-file" in local:
        del local[local.index("--api-key-file") : local.index("--api-key-file") + 2]
    return base, load_settings(local, environ=environ)


def _secret_ref(var: dict[str, Any]) -> dict[str, Any] | None:
    """The secretKeyRef of an env var that takes its value from a (required) Secret, else None."""
    ref = var.get("valueFrom", {}).get("secretKeyRef")
    if "value" in var or not ref or ref.get("optional") or not ref.get("name") or not ref.get("key"):
        return None
    return ref


def _api_keys_from_secret(pod: dict[str, Any], container: dict[str, Any]) -> str | None:
    """The Secret the server's API keys come from: a key file on a mounted Secret volume
    (JAMBA_API_KEY_FILE or --api-key-file), or JAMBA_API_KEYS from a secretKeyRef. None otherwise,
    including a Secret marked optional (a pod without it would start with an open server)."""
    env = _env(container)
    ref = _secret_ref(env.get("JAMBA_API_KEYS", {}))
    if ref:
        return ref["name"]
    path = _flag_value(server_argv(container), "--api-key-file") or _plain_env(container).get("JAMBA_API_KEY_FILE")
    if not path:
        return None
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        directory = mount["mountPath"].rstrip("/") + "/"
        secret = volumes.get(mount["name"], {}).get("secret")
        if not path.startswith(directory) or not secret or secret.get("optional"):
            continue
        files = [item["path"] for item in secret.get("items", [])]
        if (not files or path[len(directory) :] in files) and secret.get("secretName"):
            return secret["secretName"]
    return None


def _ray_containers(pods: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every container of a multi-node group: each runs Ray (the head, a worker, `ray health-check`)."""
    return [(f"{role}/{c['name']}", c) for role, pod in pods.items()
            for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]]  # fmt: skip


def problems(target: str, docs: list[dict[str, Any]]) -> list[str]:
    """Everything wrong with one target directory's manifests (empty when consistent)."""
    try:
        return _problems(target, docs)
    except (KeyError, IndexError, StopIteration, TypeError, ValueError, SettingsError) as exc:
        return [f"malformed: {type(exc).__name__}: {exc}"]


def _problems(target: str, docs: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            out.append(message)

    kinds = [d["kind"] for d in docs]
    workloads = [d for d in docs if d["kind"] in ("Deployment", "LeaderWorkerSet")]
    check(len(workloads) == 1, f"expected one Deployment or LeaderWorkerSet, got {kinds}")
    for kind in ("Service", "ServiceMonitor", "PodDisruptionBudget", "ScaledObject", "PersistentVolumeClaim", "Job"):
        check(kinds.count(kind) == 1, f"expected one {kind}, got {kinds.count(kind)}")
    check("Secret" not in kinds, "a Secret in the manifests: reference the HF token, do not ship it")
    if out:
        return out
    workload = workloads[0]
    one = {kind: next(d for d in docs if d["kind"] == kind) for kind in kinds}
    lws = workload["kind"] == "LeaderWorkerSet"
    for doc in docs:
        check(bool(doc.get("metadata", {}).get("name")), f"{doc['kind']} without metadata.name")

    # Pods: the server pod (Deployment template or LWS leader), plus the LWS worker pod.
    if lws:
        group = workload["spec"]["leaderWorkerTemplate"]
        pods = {"server": group["leaderTemplate"], "worker": group["workerTemplate"]}
        size = group.get("size", 1)
    else:
        pods = {"server": workload["spec"]["template"]}
        size = 1
        check(_labels_match(_match_labels(workload["spec"]["selector"]), pods["server"]["metadata"]["labels"]),
              "Deployment selector does not match its pod template")  # fmt: skip
    check("replicas" not in workload["spec"], f"{workload['kind']} sets replicas: the ScaledObject owns them")
    server = _container(pods["server"], SERVER)

    # The preset, and what flags and env make of it.
    env = _env(server)
    check(env.get("JAMBA_PRESET", {}).get("value") == target,
          f"JAMBA_PRESET is {env.get('JAMBA_PRESET')}, the directory is {target}")  # fmt: skip
    base, eff = effective_settings(server)
    for field in PINNED:
        check(getattr(eff, field) == getattr(base, field),
              f"{field} is {getattr(eff, field)!r} in the manifest but {getattr(base, field)!r} in the preset")  # fmt: skip
    check(eff.port == PORT and eff.host == "0.0.0.0", f"server listens on {eff.host}:{eff.port}, not 0.0.0.0:{PORT}")

    # Not open by default: API keys from the operator's Secret, no key in the manifest, a max_tokens cap.
    check(_api_keys_from_secret(pods["server"], server) == API_KEY_SECRET,
          f"the server takes no API key from the Secret {API_KEY_SECRET} (a mounted key file or a "
          f"secretKeyRef): it would serve without authentication")  # fmt: skip
    argv = server_argv(server)
    check("value" not in env.get("JAMBA_API_KEYS", {}) and not any(a == "--api-key" or a.startswith("--api-key=") for a in argv),
          "an API key is written in the manifest (JAMBA_API_KEYS value or --api-key): use the Secret")  # fmt: skip
    check(eff.max_tokens_limit is not None and eff.max_tokens_limit < (eff.max_model_len or 0),
          f"max_tokens_limit is {eff.max_tokens_limit}: a request without max_tokens may decode the whole "
          f"context ({eff.max_model_len})")  # fmt: skip

    # GPUs: one pipeline stage of TP GPUs per pod, TP x PP GPUs per replica (pod or LWS group).
    tp, pp = eff.tensor_parallel_size, eff.pipeline_parallel_size
    gpus = {role: _gpus(_container(pod, SERVER if role == "server" else None)) for role, pod in pods.items()}
    per_group = gpus["server"] + gpus.get("worker", 0) * (size - 1)
    check(
        per_group == tp * pp, f"GPUs per replica {per_group} != tensor_parallel_size {tp} x pipeline_parallel_size {pp}"
    )
    check(all(n == tp for n in gpus.values()), f"GPUs per pod {gpus} != tensor_parallel_size {tp}")
    check(size == pp, f"pods per group {size} != pipeline_parallel_size {pp}")
    if pp > 1:
        backend = eff.engine_kwargs().get("distributed_executor_backend")
        check(lws and backend == "ray", f"multi-node needs a LeaderWorkerSet and the ray backend, got {backend}")

    # Probes, drain and grace period.
    def probe(name: str) -> tuple[str, int | None]:
        http = server.get(name, {}).get("httpGet", {})
        return http.get("path", ""), _port_number(server, http.get("port", ""))

    check(
        probe("livenessProbe") == ("/health", PORT), f"livenessProbe is {probe('livenessProbe')}, not /health on {PORT}"
    )
    check(
        probe("readinessProbe") == ("/ready", PORT),
        f"readinessProbe is {probe('readinessProbe')}, not /ready on {PORT}",
    )
    check(probe("startupProbe") == ("/ready", PORT), f"startupProbe is {probe('startupProbe')}, not /ready on {PORT}")
    startup = server.get("startupProbe", {})
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    check(budget >= MIN_STARTUP_S[eff.model], f"startupProbe allows {budget}s to load {eff.model}")
    check("JAMBA_DRAIN_TIMEOUT" in env, "JAMBA_DRAIN_TIMEOUT is not set explicitly")
    drain_end = _prestop_sleep(server) + eff.drain_timeout
    grace = pods["server"]["spec"].get("terminationGracePeriodSeconds", 30)
    check(grace > drain_end, f"terminationGracePeriodSeconds {grace} <= preStop sleep + drain_timeout = {drain_end}")

    # Every pod: image, user, service links, /dev/shm, model cache, HF token.
    pvcs = {one["PersistentVolumeClaim"]["metadata"]["name"]: one["PersistentVolumeClaim"]}
    for role, pod in pods.items():
        spec = pod["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        security = spec.get("securityContext", {})
        check(security.get("runAsUser") == UID and security.get("fsGroup") == UID, f"{role}: not uid/fsGroup {UID}")
        check(
            spec.get("enableServiceLinks") is False, f"{role}: enableServiceLinks is not false (JAMBA_<SERVICE>_PORT)"
        )
        for c in spec.get("initContainers", []) + spec["containers"]:
            check(c.get("image") == IMAGE, f"{role}/{c['name']}: image {c.get('image')} is not {IMAGE}")
        main = _container(pod, SERVER if role == "server" else None)
        mounts = {m["mountPath"]: volumes.get(m["name"], {}) for m in main.get("volumeMounts", [])}
        check(mounts.get("/dev/shm", {}).get("emptyDir", {}).get("medium") == "Memory",
              f"{role}: /dev/shm is not a memory-backed emptyDir")  # fmt: skip
        claim = mounts.get(CACHE, {}).get("persistentVolumeClaim", {}).get("claimName")
        check(claim in pvcs, f"{role}: {CACHE} is not the PVC of this directory ({claim})")
        if claim in pvcs:
            check("ReadWriteMany" in pvcs[claim]["spec"]["accessModes"], f"{claim} is not ReadWriteMany")
        hf_home = _plain_env(main).get("HF_HOME", HF_HOME)
        check(hf_home.startswith(CACHE + "/"), f"{role}: HF_HOME {hf_home} is not on the cache volume")
        token = _env(main).get("HF_TOKEN", {})
        check("secretKeyRef" in token.get("valueFrom", {}) and "value" not in token,
              f"{role}: HF_TOKEN is not a secretKeyRef")  # fmt: skip
        check(_plain_env(main).get("HF_HUB_OFFLINE") == "1", f"{role}: HF_HUB_OFFLINE is not 1 (the seed Job fills the cache)")
        compile_cache = _plain_env(main).get("VLLM_CACHE_ROOT", "")
        under = [volume for path, volume in mounts.items() if compile_cache.startswith(path.rstrip("/") + "/")]
        check(bool(under) and "emptyDir" in under[0],
              f"{role}: VLLM_CACHE_ROOT {compile_cache!r} is not on a per-pod emptyDir")  # fmt: skip
        check(_schedules_on_capable_nodes(spec), f"{role}: nodes are not required to have a CUDA 13.0 driver "
              f"(R{MIN_DRIVER_MAJOR}+), compute {MIN_COMPUTE_MAJOR}+ and {MIN_GPU_MEMORY_MIB} MiB GPUs")  # fmt: skip

    # The seed Job fills the same cache, as the servers' user, with what the servers load.
    seed = one["Job"]["spec"]["template"]
    seed_main = seed["spec"]["containers"][0]
    seed_mounts = {m["mountPath"]: m["name"] for m in seed_main.get("volumeMounts", [])}
    seed_volumes = {v["name"]: v for v in seed["spec"].get("volumes", [])}
    seed_claim = seed_volumes.get(seed_mounts.get(CACHE), {}).get("persistentVolumeClaim", {}).get("claimName")
    check(seed_claim in pvcs, f"the seed Job does not mount this directory's PVC at {CACHE} ({seed_claim})")
    check(_plain_env(seed_main).get("HF_HOME") == HF_HOME, "the seed Job's HF_HOME is not the servers'")
    check(seed_main.get("command", [])[:2] == ["hf", "download"] and eff.model in seed_main["command"],
          f"the seed Job does not download {eff.model}: {seed_main.get('command')}")  # fmt: skip
    seed_revision = _flag_value(seed_main.get("command", []), "--revision")
    check(seed_revision == eff.revision,
          f"the seed Job downloads revision {seed_revision}, the servers load {eff.revision}")  # fmt: skip
    check(seed["spec"].get("securityContext", {}).get("runAsUser") == UID
          and seed_main.get("securityContext", {}).get("runAsUser", UID) == UID,
          f"the seed Job does not download as uid {UID}")  # fmt: skip
    chown = [c for c in seed["spec"].get("initContainers", []) if "chown" in " ".join(c.get("command", []))]
    check(bool(chown) and "CHOWN" in chown[0].get("securityContext", {}).get("capabilities", {}).get("add", []),
          f"the seed Job does not chown the cache to uid {UID} first (fsGroup is ignored by many NFS drivers)")  # fmt: skip
    for c in seed["spec"].get("initContainers", []) + seed["spec"]["containers"]:
        check(c.get("image") == IMAGE, f"seed/{c['name']}: image {c.get('image')} is not {IMAGE}")

    # Multi-node: Ray head on the leader before the server, workers join it and outlive the drain.
    if lws:
        check(server["command"][: len(INIT)] == INIT, f"the leader's PID 1 is not tini: {server['command'][:2]}")
        script = server["command"][server["command"].index("-c") + 1]
        check(f"ray start --head --port={RAY_PORT}" in script.split("exec jamba-server")[0],
              "the leader does not start the Ray head before the server")  # fmt: skip
        worker = _container(pods["worker"])
        check(worker["command"] == [*INIT, "ray", "start", f"--address=$(LWS_LEADER_ADDRESS):{RAY_PORT}", "--block"],
              f"the worker does not join the leader's Ray head under tini: {worker['command']}")  # fmt: skip
        check(
            group.get("restartPolicy") == "RecreateGroupOnPodRestart", "restartPolicy is not RecreateGroupOnPodRestart"
        )
        check(workload["spec"].get("startupPolicy", "LeaderCreated") == "LeaderCreated",
              "startupPolicy LeaderReady deadlocks: the leader is only ready once the workers run")  # fmt: skip
        worker_grace = pods["worker"]["spec"].get("terminationGracePeriodSeconds", 30)
        check(_prestop_sleep(worker) >= drain_end, "the worker's preStop sleep ends before the leader's drain")
        check(worker_grace > _prestop_sleep(worker), "the worker's grace period is not above its preStop sleep")

    # Service, ServiceMonitor, PodDisruptionBudget.
    service, monitor, pdb = (one["Service"], one["ServiceMonitor"], one["PodDisruptionBudget"])
    selector = service["spec"]["selector"]
    check(_labels_match(selector, pods["server"]["metadata"]["labels"]), "the Service does not select the server pods")
    if lws:
        check(not _labels_match(selector, pods["worker"]["metadata"]["labels"]), "the Service selects LWS worker pods")
        check(service["metadata"]["name"] != workload["metadata"]["name"],
              "the Service has the LeaderWorkerSet's name, which LWS uses for its headless Service")  # fmt: skip
    ports = {p.get("name"): p for p in service["spec"]["ports"]}
    check(all(_port_number(server, p.get("targetPort", p["port"])) == PORT for p in ports.values()),
          f"the Service does not target port {PORT}")  # fmt: skip
    check(_labels_match(_match_labels(monitor["spec"]["selector"]), service["metadata"].get("labels", {})),
          "the ServiceMonitor does not select the Service")  # fmt: skip
    for endpoint in monitor["spec"]["endpoints"]:
        check(endpoint.get("port") in ports, f"ServiceMonitor port {endpoint.get('port')} is not a Service port")
        check(endpoint.get("path") == "/metrics", f"ServiceMonitor path {endpoint.get('path')} is not /metrics")
    pdb_selector = _match_labels(pdb["spec"]["selector"])
    for role, pod in pods.items():
        check(_labels_match(pdb_selector, pod["metadata"]["labels"]), f"the PodDisruptionBudget misses the {role} pods")
    seed_labels = seed["metadata"]["labels"]
    check(not _labels_match(selector, seed_labels) and not _labels_match(pdb_selector, seed_labels),
          "the Service or PodDisruptionBudget selects the seed Job's pod")  # fmt: skip

    # Rollouts bring a new replica up before taking an old one down.
    if lws:
        rolling = workload["spec"].get("rolloutStrategy", {}).get("rollingUpdateConfiguration", {})
    else:
        rolling = workload["spec"].get("strategy", {}).get("rollingUpdate", {})
    check(rolling.get("maxSurge", 0) >= 1 and rolling.get("maxUnavailable", 1) == 0,
          f"the rollout is not surge-first (maxSurge >= 1, maxUnavailable 0): {rolling}")  # fmt: skip

    # Multi-node: only the deployment's own pods reach Ray; others reach the HTTP port alone.
    if lws:
        policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
        check(any(_guards_ray(policy, pods) for policy in policies),
              "no NetworkPolicy keeps Ray's ports to the deployment's own pods")  # fmt: skip
        # ... and Ray itself wants a token, the same one everywhere, from the operator's Secret.
        for name, container in _ray_containers(pods):
            ray_env = _env(container)
            ref = _secret_ref(ray_env.get("RAY_AUTH_TOKEN", {})) or {}
            check(ray_env.get("RAY_AUTH_MODE", {}).get("value") == "token" and ref.get("name") == RAY_TOKEN_SECRET,
                  f"{name}: Ray token authentication is off (RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from the "
                  f"Secret {RAY_TOKEN_SECRET} are needed on every Ray process)")  # fmt: skip
        keys = {(r.get("name"), r.get("key")) for _, c in _ray_containers(pods)
                for r in [_env(c).get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})]}  # fmt: skip
        check(len(keys) == 1, f"the Ray processes of a group use different tokens: {sorted(map(str, keys))}")

    # Autoscaling on queue depth.
    scaled = one["ScaledObject"]["spec"]
    ref = scaled["scaleTargetRef"]
    check((ref.get("apiVersion"), ref.get("kind"), ref.get("name"))
          == (workload["apiVersion"], workload["kind"], workload["metadata"]["name"]),
          f"the ScaledObject targets {ref}, not the {workload['kind']}")  # fmt: skip
    if lws:
        crd = CRDS[(workload["apiVersion"], workload["kind"])]
        check("scale" in crd.get("subresources", {}), "the LeaderWorkerSet CRD has no scale subresource")
    check(scaled.get("minReplicaCount", 0) >= 2,
          "minReplicaCount below 2: with one replica, a node drain or a restart is an outage")  # fmt: skip
    check(scaled.get("maxReplicaCount", 100) > scaled.get("minReplicaCount", 0),
          "maxReplicaCount is not above minReplicaCount: nothing left to scale")  # fmt: skip
    scale_down = scaled.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior", {}).get("scaleDown", {})
    check(scale_down.get("stabilizationWindowSeconds", 300) >= min(budget, HPA_MAX_STABILIZATION_S),
          f"scale-down stabilizationWindowSeconds {scale_down.get('stabilizationWindowSeconds', 300)} is shorter than "
          f"a replica's load ({budget}s): a lull tears down what takes that long to bring back")  # fmt: skip
    queries = [t["metadata"].get("query", "") for t in scaled["triggers"] if t["type"] == "prometheus"]
    check(bool(queries), "the ScaledObject has no prometheus trigger")
    known = exported_metric_names()
    for query in queries:
        used = set(re.findall(r"\bjamba_[A-Za-z0-9_:]*", query))
        check(bool(used) and used <= known, f"query {query!r} uses no metric or an unknown one: {sorted(used - known)}")
        check(f'service="{service["metadata"]["name"]}"' in query, f"query {query!r} does not select this Service")
    check(any(f'vllm:num_requests_waiting{{service="{service["metadata"]["name"]}"}}' in q for q in queries),
          "no trigger counts vllm:num_requests_waiting (requests waiting inside vLLM for cache space)")  # fmt: skip
    return out


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value of `flag VALUE` or `flag=VALUE` in argv (None when absent)."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _at_least(expression: dict[str, Any], minimum: int) -> bool:
    """A node selector requirement that only admits integer labels >= minimum."""
    values = expression.get("values", [])
    try:
        if expression.get("operator") == "Gt":
            return len(values) == 1 and int(values[0]) >= minimum - 1
        if expression.get("operator") == "In":
            return bool(values) and all(int(v) >= minimum for v in values)
    except ValueError:
        return False
    return False


def _schedules_on_capable_nodes(spec: dict[str, Any]) -> bool:
    """Every required node selector term demands the driver, compute capability and GPU memory."""
    required = spec.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = required.get("nodeSelectorTerms", [])

    def capable(term: dict[str, Any]) -> bool:
        by_key = {e["key"]: e for e in term.get("matchExpressions", [])}
        return (
            any(_at_least(by_key.get(label, {}), MIN_DRIVER_MAJOR) for label in DRIVER_LABELS)
            and _at_least(by_key.get("nvidia.com/gpu.compute.major", {}), MIN_COMPUTE_MAJOR)
            and _at_least(by_key.get("nvidia.com/gpu.memory", {}), MIN_GPU_MEMORY_MIB)
        )

    return bool(terms) and all(capable(term) for term in terms)


def _guards_ray(policy: dict[str, Any], pods: dict[str, Any]) -> bool:
    """The policy selects every pod of the deployment and lets in, from elsewhere, only port 8000."""
    spec = policy["spec"]
    own = _match_labels(spec.get("podSelector", {}))
    if not all(_labels_match(own, pod["metadata"]["labels"]) for pod in pods.values()):
        return False
    if "Ingress" not in spec.get("policyTypes", ["Ingress"]):
        return False
    for rule in spec.get("ingress", []):
        sources = rule.get("from")
        from_own = bool(sources) and all(
            set(src) == {"podSelector"} and _match_labels(src["podSelector"]) == own for src in sources
        )
        ports = [(p.get("port"), p.get("protocol", "TCP")) for p in rule.get("ports", [])]
        if not from_own and ports != [(PORT, "TCP")]:
            return False
    return True


# ---------------------------------------------------------------- tests


def test_pinned_version_is_shipped():
    assert K8S_VERSION in all_versions()
    deployment = _doc(load_docs("jamba-1.5-mini-int8"), "Deployment")
    assert validate(deployment) == "kubernetes " + K8S_VERSION.rsplit(".", 1)[0]


def test_every_gpu_preset_has_a_target():
    presets = {p.stem for p in (REPO / "configs").glob("jamba-*.yaml")}
    assert set(TARGETS) == presets == {
        "jamba-1.5-mini-bf16-tp2", "jamba-1.5-mini-int8", "jamba-1.5-large-int8-tp8", "jamba-1.5-large-bf16-tp8-pp2",
    }  # fmt: skip


def test_crd_schemas_are_kept():
    assert set(CRDS) == {
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("keda.sh/v1alpha1", "ScaledObject"),
        ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"),
    }
    for crd in CRDS.values():
        jsonschema.Draft7Validator.check_schema(strict(crd["openAPIV3Schema"]))


@pytest.mark.parametrize(
    "doc", [d for t in TARGETS for d in load_docs(t)], ids=lambda d: f"{d['kind']}/{d['metadata']['name']}"
)
def test_manifest_validates(doc):
    validate(doc)


@pytest.mark.parametrize("target", TARGETS)
def test_target_is_consistent(target):
    assert problems(target, load_docs(target)) == []


def test_pinned_ray_has_token_authentication():
    """The multi-node manifest turns on RAY_AUTH_MODE=token: the image's Ray must know it."""
    pinned = re.search(r"^ray==([\d.]+)$", CONSTRAINTS_GPU.read_text(), re.M)
    assert pinned, "docker/constraints-gpu.txt pins no ray"
    assert tuple(int(p) for p in pinned.group(1).split(".")[:3]) >= MIN_RAY_FOR_TOKEN_AUTH, pinned.group(1)


def test_api_keys_may_also_come_from_a_secret_key_ref():
    docs = copy.deepcopy(load_docs("jamba-1.5-mini-int8"))
    server = _server(docs)
    server["env"] = [e for e in server["env"] if e["name"] != "JAMBA_API_KEY_FILE"] + [
        {"name": "JAMBA_API_KEYS", "valueFrom": {"secretKeyRef": {"name": API_KEY_SECRET, "key": "api-keys"}}}
    ]
    assert problems("jamba-1.5-mini-int8", docs) == []


def test_jamba_queue_metrics_exist():
    names = exported_metric_names()
    assert {"jamba_requests_queued", "jamba_requests_running", "jamba_http_requests_total"} <= names
    assert "jamba_requests_waiting" not in names


# Broken copies: (target, what, mutation, text expected in the validation error).
def _doc(docs, kind):
    return next(d for d in docs if d["kind"] == kind)


def _pod(docs, role="server"):
    workload = next(d for d in docs if d["kind"] in ("Deployment", "LeaderWorkerSet"))
    if workload["kind"] == "Deployment":
        return workload["spec"]["template"]
    return workload["spec"]["leaderWorkerTemplate"]["leaderTemplate" if role == "server" else "workerTemplate"]


def _server(docs):
    return _container(_pod(docs), SERVER)


INVALID: list[tuple[str, str, Callable[[list], None], str]] = [
    ("jamba-1.5-mini-int8", "unknown container field",
     lambda d: _server(d).update(imagePullPolicyy="Always"), "imagePullPolicyy"),
    ("jamba-1.5-mini-int8", "wrong type", lambda d: _doc(d, "Deployment")["spec"].update(replicas="two"), "two"),
    ("jamba-1.5-mini-int8", "unknown PDB field",
     lambda d: _doc(d, "PodDisruptionBudget")["spec"].update(minAvailabel=1), "minAvailabel"),
    ("jamba-1.5-mini-int8", "unknown ScaledObject field",
     lambda d: _doc(d, "ScaledObject")["spec"].update(maxReplicas=3), "maxReplicas"),
    ("jamba-1.5-mini-int8", "numeric trigger metadata",
     lambda d: _doc(d, "ScaledObject")["spec"]["triggers"][0]["metadata"].update(threshold=4), "is not of type 'string'"),
    ("jamba-1.5-mini-int8", "ServiceMonitor without selector",
     lambda d: _doc(d, "ServiceMonitor")["spec"].pop("selector"), "'selector' is a required property"),
    ("jamba-1.5-large-bf16-tp8-pp2", "unknown field in the LWS worker PodSpec",
     lambda d: _container(_pod(d, "worker")).update(imagePullPolicyy="Always"), "imagePullPolicyy"),
    ("jamba-1.5-large-bf16-tp8-pp2", "unknown field in the LWS leader template metadata",
     lambda d: _pod(d)["metadata"].update(generateName="x-"), "generateName"),
    ("jamba-1.5-large-bf16-tp8-pp2", "LWS enum",
     lambda d: _doc(d, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"].update(restartPolicy="Always"), "Always"),
]  # fmt: skip


@pytest.mark.parametrize("target,what,mutate,expected", INVALID, ids=[case[1] for case in INVALID])
def test_validation_rejects_broken_manifests(target, what, mutate, expected):
    docs = load_docs(target)
    mutate(docs)
    errors = []
    for doc in docs:
        try:
            validate(doc)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            errors.append(exc.message)
    assert any(expected in e for e in errors), errors


def test_validation_refuses_unknown_kinds():
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})


def _set_env(container, name, value):
    container["env"] = [e for e in container.get("env", []) if e["name"] != name] + [{"name": name, "value": value}]


def _env_var(container, name):
    return next(e for e in container["env"] if e["name"] == name)


def _api_volume(docs):
    return next(v for v in _pod(docs)["spec"]["volumes"] if v["name"] == "api-keys")


def _lws_group(docs):
    return _doc(docs, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]


def _node_terms(docs, role="server"):
    return _pod(docs, role)["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]


def _seed(docs):
    return _doc(docs, "Job")["spec"]["template"]


def _scaling(docs):
    return _doc(docs, "ScaledObject")["spec"]


INCONSISTENT: list[tuple[str, Callable[[list], None], str]] = [
    ("jamba-1.5-mini-int8", lambda d: _server(d)["resources"]["limits"].update({"nvidia.com/gpu": 2}), "request 1 != limit 2"),
    ("jamba-1.5-mini-int8", lambda d: [_server(d)["resources"][k].update({"nvidia.com/gpu": 2}) for k in ("requests", "limits")],
     "GPUs per replica 2"),
    ("jamba-1.5-mini-int8", lambda d: _set_env(_server(d), "JAMBA_PRESET", "jamba-1.5-mini-fp4"), "does not exist"),
    ("jamba-1.5-mini-bf16-tp2", lambda d: _set_env(_server(d), "JAMBA_QUANTIZATION", "experts_int8"), "quantization"),
    ("jamba-1.5-large-int8-tp8", lambda d: _server(d).update(args=["--max-model-len", "4096"]), "max_model_len"),
    ("jamba-1.5-large-int8-tp8", lambda d: _server(d).update(args=["--tensor-parallel-size", "4"]), "tensor_parallel_size"),
    ("jamba-1.5-mini-int8", lambda d: _server(d)["livenessProbe"]["httpGet"].update(path="/ready"), "livenessProbe"),
    ("jamba-1.5-mini-int8", lambda d: _server(d)["readinessProbe"]["httpGet"].update(port=8080), "readinessProbe"),
    ("jamba-1.5-mini-int8", lambda d: _server(d)["startupProbe"].update(failureThreshold=30), "startupProbe allows"),
    ("jamba-1.5-mini-int8", lambda d: _pod(d)["spec"].update(terminationGracePeriodSeconds=120), "terminationGracePeriodSeconds"),
    ("jamba-1.5-mini-int8", lambda d: _set_env(_server(d), "JAMBA_DRAIN_TIMEOUT", "600"), "terminationGracePeriodSeconds"),
    ("jamba-1.5-mini-int8", lambda d: _server(d).update(env=[e for e in _server(d)["env"] if e["name"] != "JAMBA_DRAIN_TIMEOUT"]),
     "JAMBA_DRAIN_TIMEOUT is not set"),
    ("jamba-1.5-mini-int8", lambda d: _pod(d)["spec"]["volumes"][0]["emptyDir"].pop("medium"), "/dev/shm"),
    ("jamba-1.5-mini-int8", lambda d: _doc(d, "PersistentVolumeClaim")["spec"].update(accessModes=["ReadWriteOnce"]),
     "not ReadWriteMany"),
    ("jamba-1.5-mini-int8", lambda d: _set_env(_server(d), "HF_HOME", "/tmp/hf"), "HF_HOME"),
    ("jamba-1.5-mini-int8", lambda d: _set_env(_server(d), "HF_TOKEN", "hf_xxx"), "HF_TOKEN"),
    ("jamba-1.5-mini-int8", lambda d: _server(d).update(image="vllm/vllm-openai:latest"), "image"),
    ("jamba-1.5-mini-int8", lambda d: _pod(d)["spec"].pop("enableServiceLinks"), "enableServiceLinks"),
    ("jamba-1.5-mini-int8", lambda d: _doc(d, "Deployment")["spec"].update(replicas=2), "ScaledObject owns"),
    ("jamba-1.5-mini-int8", lambda d: _doc(d, "Service")["spec"]["selector"].update({"app.kubernetes.io/instance": "x"}),
     "Service does not select"),
    ("jamba-1.5-mini-int8", lambda d: _doc(d, "Service")["spec"]["ports"][0].update(targetPort=9000), "does not target"),
    ("jamba-1.5-mini-int8", lambda d: _doc(d, "ServiceMonitor")["spec"]["endpoints"][0].update(port="metrics"),
     "not a Service port"),
    ("jamba-1.5-mini-int8", lambda d: _doc(d, "ServiceMonitor")["spec"]["selector"]["matchLabels"].update(app="other"),
     "ServiceMonitor does not select"),
    ("jamba-1.5-mini-int8", lambda d: _doc(d, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].update(x="y"),
     "PodDisruptionBudget misses"),
    ("jamba-1.5-mini-int8", lambda d: _doc(d, "ScaledObject")["spec"]["scaleTargetRef"].update(name="jamba-mini"),
     "ScaledObject targets"),
    ("jamba-1.5-mini-int8", lambda d: _doc(d, "ScaledObject")["spec"]["triggers"][0]["metadata"].update(
        query='sum(jamba_requests_waiting{service="jamba-mini-int8"})'), "unknown one"),
    ("jamba-1.5-mini-int8", lambda d: _doc(d, "ScaledObject")["spec"]["triggers"][0]["metadata"].update(
        query='sum(jamba_requests_queued{service="jamba-mini-bf16-tp2"})'), "does not select this Service"),
    ("jamba-1.5-large-bf16-tp8-pp2", lambda d: _lws_group(d).update(size=3), "pods per group 3"),
    ("jamba-1.5-large-bf16-tp8-pp2", lambda d: [_container(_pod(d, "worker"))["resources"][k].update({"nvidia.com/gpu": 4})
                                                for k in ("requests", "limits")], "GPUs per replica 12"),
    ("jamba-1.5-large-bf16-tp8-pp2", lambda d: _set_env(_server(d), "JAMBA_PIPELINE_PARALLEL_SIZE", "1"),
     "pipeline_parallel_size"),
    ("jamba-1.5-large-bf16-tp8-pp2", lambda d: _server(d).update(args=["--engine-arg", "distributed_executor_backend=mp"]),
     "engine_args"),
    ("jamba-1.5-large-bf16-tp8-pp2", lambda d: _server(d)["command"].__setitem__(4, "exec jamba-server --config /app/configs/${JAMBA_PRESET}.yaml --host 0.0.0.0 --port 8000"),
     "Ray head"),
    ("jamba-1.5-large-bf16-tp8-pp2", lambda d: _container(_pod(d, "worker")).update(command=["ray", "start", "--block"]),
     "does not join"),
    ("jamba-1.5-large-bf16-tp8-pp2", lambda d: _server(d).update(command=_server(d)["command"][2:]), "PID 1 is not tini"),
    ("jamba-1.5-large-bf16-tp8-pp2", lambda d: _container(_pod(d, "worker")).update(command=_container(_pod(d, "worker"))["command"][2:]),
     "does not join the leader's Ray head under tini"),
    ("jamba-1.5-large-bf16-tp8-pp2", lambda d: _doc(d, "LeaderWorkerSet")["spec"].update(startupPolicy="LeaderReady"),
     "deadlocks"),
    ("jamba-1.5-large-bf16-tp8-pp2", lambda d: _container(_pod(d, "worker"))["lifecycle"]["preStop"]["sleep"].update(seconds=30),
     "before the leader's drain"),
    ("jamba-1.5-large-bf16-tp8-pp2", lambda d: _doc(d, "Service")["spec"]["selector"].pop("role"), "selects LWS worker"),
    ("jamba-1.5-large-bf16-tp8-pp2", lambda d: _doc(d, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].update(role="leader"),
     "misses the worker pods"),
    ("jamba-1.5-large-bf16-tp8-pp2", lambda d: _doc(d, "Service")["metadata"].update(name="jamba-large-bf16-tp8-pp2"),
     "headless Service"),
    ("jamba-1.5-mini-int8", lambda d: _pod(d)["spec"].pop("affinity"), "nodes are not required"),
    ("jamba-1.5-mini-int8", lambda d: _node_terms(d)[1]["matchExpressions"][2].update(values=["40000"]), "nodes are not required"),
    ("jamba-1.5-large-int8-tp8", lambda d: _node_terms(d)[0]["matchExpressions"][0].update(values=["534"]),
     "nodes are not required"),
    ("jamba-1.5-large-bf16-tp8-pp2", lambda d: _pod(d, "worker")["spec"].pop("affinity"), "worker: nodes are not required"),
    ("jamba-1.5-large-bf16-tp8-pp2", lambda d: _node_terms(d, "worker")[0]["matchExpressions"].pop(1),
     "worker: nodes are not required"),
    ("jamba-1.5-mini-int8", lambda d: _server(d).update(env=[e for e in _server(d)["env"] if e["name"] != "HF_HUB_OFFLINE"]),
     "HF_HUB_OFFLINE"),
    ("jamba-1.5-large-bf16-tp8-pp2", lambda d: _set_env(_container(_pod(d, "worker")), "HF_HUB_OFFLINE", "0"),
     "worker: HF_HUB_OFFLINE"),
    ("jamba-1.5-mini-int8", lambda d: _set_env(_server(d), "VLLM_CACHE_ROOT", "/models/vllm"), "VLLM_CACHE_ROOT"),
    ("jamba-1.5-mini-bf16-tp2", lambda d: _seed(d)["spec"]["containers"][0].update(command=["hf", "download", "ai21labs/AI21-Jamba-1.5-Large"]),
     "does not download ai21labs/AI21-Jamba-1.5-Mini"),
    ("jamba-1.5-mini-int8", lambda d: _seed(d)["spec"]["volumes"][0]["persistentVolumeClaim"].update(claimName="other"),
     "seed Job does not mount"),
    ("jamba-1.5-mini-int8", lambda d: _set_env(_seed(d)["spec"]["containers"][0], "HF_HOME", "/models/cache"),
     "seed Job's HF_HOME"),
    ("jamba-1.5-mini-int8", lambda d: _seed(d)["spec"].pop("initContainers"), "does not chown"),
    ("jamba-1.5-mini-int8", lambda d: _seed(d)["spec"]["containers"][0]["command"].extend(["--revision", "abc123"]),
     "the seed Job downloads revision abc123, the servers load None"),
    ("jamba-1.5-mini-int8", lambda d: _set_env(_server(d), "JAMBA_REVISION", "abc123"), "revision"),
    ("jamba-1.5-mini-int8", lambda d: _seed(d)["spec"]["containers"][0]["securityContext"].update(runAsUser=0),
     "does not download as uid"),
    ("jamba-1.5-mini-int8", lambda d: _seed(d)["metadata"]["labels"].update({"app.kubernetes.io/instance": "jamba-mini-int8"}),
     "selects the seed Job"),
    ("jamba-1.5-mini-int8", lambda d: d.remove(_doc(d, "Job")), "expected one Job"),
    ("jamba-1.5-mini-int8", lambda d: _scaling(d).update(minReplicaCount=1), "minReplicaCount below 2"),
    ("jamba-1.5-large-int8-tp8", lambda d: _scaling(d).update(maxReplicaCount=2), "nothing left to scale"),
    ("jamba-1.5-large-int8-tp8", lambda d: _scaling(d)["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"].update(
        stabilizationWindowSeconds=900), "shorter than a replica's load"),
    ("jamba-1.5-mini-int8", lambda d: _scaling(d)["triggers"][0]["metadata"].update(
        query='sum(jamba_requests_queued{service="jamba-mini-int8"})'), "vllm:num_requests_waiting"),
    ("jamba-1.5-mini-int8", lambda d: _doc(d, "Deployment")["spec"]["strategy"]["rollingUpdate"].update(maxSurge=0, maxUnavailable=1),
     "not surge-first"),
    ("jamba-1.5-large-bf16-tp8-pp2", lambda d: _doc(d, "LeaderWorkerSet")["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"].update(
        maxSurge=0, maxUnavailable=1), "not surge-first"),
    ("jamba-1.5-large-bf16-tp8-pp2", lambda d: d.remove(_doc(d, "NetworkPolicy")), "no NetworkPolicy"),
    ("jamba-1.5-large-bf16-tp8-pp2", lambda d: _doc(d, "NetworkPolicy")["spec"]["ingress"][1].pop("ports"), "no NetworkPolicy"),
    ("jamba-1.5-large-bf16-tp8-pp2", lambda d: _doc(d, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"].update(role="leader"),
     "no NetworkPolicy"),
    # Open by default: no Secret-sourced API key, a key in the manifest, no max_tokens cap, Ray without a token.
    ("jamba-1.5-mini-int8", lambda d: _server(d).update(env=[e for e in _server(d)["env"] if e["name"] != "JAMBA_API_KEY_FILE"]),
     "takes no API key from the Secret"),
    ("jamba-1.5-mini-bf16-tp2", lambda d: _api_volume(d).update(secret=None, emptyDir={}), "takes no API key from the Secret"),
    ("jamba-1.5-large-int8-tp8", lambda d: _api_volume(d)["secret"].update(optional=True), "takes no API key from the Secret"),
    ("jamba-1.5-large-int8-tp8", lambda d: _api_volume(d)["secret"].update(secretName="other"), "takes no API key from the Secret"),
    ("jamba-1.5-mini-int8", lambda d: _set_env(_server(d), "JAMBA_API_KEY_FILE", "/tmp/keys"), "takes no API key from the Secret"),
    ("jamba-1.5-large-bf16-tp8-pp2", lambda d: _server(d)["volumeMounts"].pop(), "takes no API key from the Secret"),
    ("jamba-1.5-mini-int8", lambda d: _set_env(_server(d), "JAMBA_API_KEYS", "sk-in-the-repo-0123456789abcdef"),
     "an API key is written in the manifest"),
    ("jamba-1.5-mini-int8", lambda d: _server(d).update(args=["--api-key", "sk-in-the-repo-0123456789abcdef"]),
     "an API key is written in the manifest"),
    ("jamba-1.5-mini-int8", lambda d: _set_env(_server(d), "JAMBA_MAX_TOKENS_LIMIT", "102400"), "max_tokens_limit is 102400"),
    ("jamba-1.5-large-bf16-tp8-pp2", lambda d: _server(d).update(env=[e for e in _server(d)["env"] if e["name"] != "RAY_AUTH_MODE"]),
     "server/jamba-server: Ray token authentication is off"),
    ("jamba-1.5-large-bf16-tp8-pp2", lambda d: _set_env(_container(_pod(d, "worker")), "RAY_AUTH_TOKEN", "in-the-repo"),
     "worker/ray-worker: Ray token authentication is off"),
    ("jamba-1.5-large-bf16-tp8-pp2", lambda d: _pod(d, "worker")["spec"]["initContainers"][0].pop("env"),
     "worker/wait-for-ray-head: Ray token authentication is off"),
    ("jamba-1.5-large-bf16-tp8-pp2", lambda d: _env_var(_container(_pod(d, "worker")), "RAY_AUTH_TOKEN")["valueFrom"]["secretKeyRef"].update(
        key="other"), "use different tokens"),
]  # fmt: skip


@pytest.mark.parametrize("target,mutate,expected", INCONSISTENT, ids=[f"{c[0]}:{c[2]}" for c in INCONSISTENT])
def test_consistency_checks_catch_broken_copies(target, mutate, expected):
    docs = copy.deepcopy(load_docs(target))
    mutate(docs)
    found = problems(target, docs)
    assert any(expected in p for p in found), found
