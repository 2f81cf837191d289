"""Typed server settings: YAML preset < environment (JAMBA_*) < CLI flags.

Engine fields use vLLM's own names so a preset reads like `vllm serve` arguments.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jamba_server.core.tenancy import Isolation, check_groups_match_keys, check_prefix_cache_groups
from jamba_server.http.auth import MIN_API_KEY_LENGTH, check_api_keys

ENV_PREFIX = "JAMBA_"
DEFAULT_TEMPLATE = Path(__file__).parent / "templates" / "jamba-1.5.jinja"


class SettingsError(ValueError):
    """A preset, environment variable or flag that cannot be used."""


class Settings(BaseModel):
    # Inputs stay out of validation errors: a rejected API key must not reach a log. load_settings
    # words its own errors and shows the value only for settings that are not secret.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)

    # Engine (vLLM names)
    model: str
    served_model_name: str | None = None
    # A Hugging Face commit (or tag) of `model`: the engine, its tokenizer and ours load exactly it.
    revision: str | None = None
    tokenizer: str | None = None
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    quantization: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = Field(None, ge=16)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_num_seqs: int | None = Field(None, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    enforce_eager: bool = False
    trust_remote_code: bool = False
    enable_prefix_caching: bool | None = None
    seed: int | None = None
    # `priority`: requests' `priority` field orders the engine's queue and ours (lower first).
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    engine_args: dict[str, Any] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)

    # Server
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    chat_template: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    log_request_content: bool = False  # prompts and outputs stay out of logs unless enabled
    # Idle keep-alive connections close after this many seconds. It must exceed the idle timeout of
    # any proxy in front (ALB 60 s, nginx upstream 60 s): a proxy or pooled client that reuses a
    # connection the server has just closed gets a reset (uvicorn's and vLLM's default is 5 s).
    timeout_keep_alive: int = Field(75, ge=1)
    # Open connections (idle ones included) beyond this get uvicorn's plain 503: a bound on what
    # clients that connect and never send, or never read, can hold. Put a proxy's own limits in front.
    limit_concurrency: int | None = Field(4096, ge=1)
    # A stream whose client accepts no data for this long is cut and its engine request aborted, so a
    # client that stops reading cannot keep an admission slot.
    stream_write_timeout: float = Field(30.0, gt=0)
    # Streamed tokens per chunk (core/coalescing.py). `stream_interval` is vLLM's engine argument: at
    # least this many per chunk, always (the first token and the last chunk are never held back).
    # Beyond it, while `stream_coalesce_min_streams` or more streams run, a stream starting takes as
    # many tokens per chunk as the engine's recent steps fit in `stream_coalesce_gap` seconds (0: off),
    # which cuts the API process's CPU per token under load.
    stream_interval: int = Field(1, ge=1)
    stream_coalesce_gap: float = Field(0.05, ge=0)
    stream_coalesce_min_streams: int = Field(4, ge=1)
    # vLLM's multi-API-server layout: this many API processes over one engine core, on one socket,
    # each with its share of the admission limits (runtime/vllm_api_servers.py). 1: one process.
    api_server_count: int = Field(1, ge=1)

    # Admission control (see runtime/admission.py)
    # Engine slots, in sequences (a request with n choices takes n); default the engine's max_num_seqs.
    max_concurrent_requests: int | None = Field(None, ge=1)
    max_queued_requests: int = Field(256, ge=0)
    max_tokens_in_flight: int | None = Field(None, ge=1)  # prompt + max_tokens of running requests
    retry_after_seconds: int = Field(1, ge=1)
    request_timeout: float | None = Field(None, gt=0)  # seconds; header X-Request-Timeout may shorten it
    drain_timeout: float = Field(30.0, ge=0)

    # Request limits
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_messages: int = Field(2048, ge=1)
    max_n: int = Field(16, ge=1)
    max_tokens_limit: int | None = Field(None, ge=1)  # cap on max_tokens / max_completion_tokens
    max_stop_sequences: int = Field(4, ge=0)
    max_stop_length: int = Field(256, ge=1)
    max_tools: int = Field(128, ge=0)
    max_schema_bytes: int = Field(64 * 1024, ge=16)
    max_documents: int = Field(512, ge=0)
    max_document_chars: int = Field(4_000_000, ge=1)  # total text over all documents

    # Responses API store (per process; see runtime/response_store.py): at most this many responses,
    # this many bytes of them, each kept this many seconds; the least recently used goes first.
    responses_store_max_entries: int = Field(10_000, ge=0)
    responses_store_max_bytes: int = Field(256 * 1024 * 1024, ge=0)
    responses_store_ttl: float = Field(3600.0, gt=0)

    # Auth: a list of keys of at least MIN_API_KEY_LENGTH characters (never a string, which would
    # iterate as one-character keys); empty means an open server.
    api_keys: list[str] = Field(default_factory=list, repr=False)
    metrics_require_auth: bool = False
    # Prefix-cache tenants (core/tenancy.py): with 2+ keys, each key's requests share cached blocks
    # only among themselves (`key`), or among the keys of a group (`group`); `off` is vLLM's sharing.
    prefix_cache_isolation: Isolation = "key"
    # Group name -> the SHA-256 fingerprints (hex) of its keys: the keys themselves stay in one place.
    prefix_cache_groups: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("prefix_cache_groups")
    @classmethod
    def _groups_name_fingerprints(cls, groups: dict[str, list[str]]) -> dict[str, list[str]]:
        return check_prefix_cache_groups(groups)

    @model_validator(mode="after")
    def _groups_name_configured_keys(self) -> "Settings":
        check_groups_match_keys(self.prefix_cache_groups, self.prefix_cache_isolation, self.api_keys)
        return self

    @field_validator("api_keys", mode="before")
    @classmethod
    def _api_keys_are_a_list_of_long_keys(cls, value: Any) -> Any:
        try:
            check_api_keys(value)
        except TypeError as exc:  # pydantic reports ValueErrors; a TypeError would escape it
            raise ValueError(str(exc)) from None
        return value

    @property
    def public_model_name(self) -> str:
        return self.served_model_name or self.model

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for vLLM's `AsyncEngineArgs`."""
        kwargs: dict[str, Any] = {
            "model": self.model,
            "served_model_name": self.public_model_name,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "dtype": self.dtype,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "enforce_eager": self.enforce_eager,
            "trust_remote_code": self.trust_remote_code,
            "scheduling_policy": self.scheduling_policy,
            "stream_interval": self.stream_interval,
        }
        optional = {
            "tokenizer": self.tokenizer,
            "revision": self.revision,
            "quantization": self.quantization,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "enable_prefix_caching": self.enable_prefix_caching,
            "seed": self.seed,
        }
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        overlap = set(kwargs) & set(self.engine_args)
        if overlap:
            raise SettingsError(
                f"engine_args repeats typed settings {sorted(overlap)}; set them directly"
            )
        kwargs.update(self.engine_args)
        return kwargs

    def chat_template_text(self) -> str:
        path = Path(self.chat_template) if self.chat_template else DEFAULT_TEMPLATE
        try:
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsError(f"cannot read chat template {path}: {exc}") from exc


# Fields settable from flags/env, with the parser type for their string form.
_SCALAR_FIELDS: dict[str, Any] = {
    "model": str,
    "served_model_name": str,
    "revision": str,
    "tokenizer": str,
    "tensor_parallel_size": int,
    "pipeline_parallel_size": int,
    "quantization": str,
    "dtype": str,
    "max_model_len": int,
    "gpu_memory_utilization": float,
    "max_num_seqs": int,
    "max_num_batched_tokens": int,
    "enforce_eager": bool,
    "trust_remote_code": bool,
    "enable_prefix_caching": bool,
    "seed": int,
    "scheduling_policy": str,
    "host": str,
    "port": int,
    "chat_template": str,
    "log_level": str,
    "log_format": str,
    "log_request_content": bool,
    "timeout_keep_alive": int,
    "limit_concurrency": int,
    "stream_write_timeout": float,
    "stream_interval": int,
    "stream_coalesce_gap": float,
    "stream_coalesce_min_streams": int,
    "api_server_count": int,
    "max_concurrent_requests": int,
    "max_queued_requests": int,
    "max_tokens_in_flight": int,
    "retry_after_seconds": int,
    "request_timeout": float,
    "drain_timeout": float,
    "max_body_bytes": int,
    "max_messages": int,
    "max_n": int,
    "max_tokens_limit": int,
    "max_stop_sequences": int,
    "max_stop_length": int,
    "max_tools": int,
    "max_schema_bytes": int,
    "max_documents": int,
    "max_document_chars": int,
    "responses_store_max_entries": int,
    "responses_store_max_bytes": int,
    "responses_store_ttl": float,
    "metrics_require_auth": bool,
    "prefix_cache_isolation": str,
}


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"not a boolean: {text!r}")


def _parse_key_value(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise SettingsError(f"expected KEY=VALUE, got {item!r}")
    return key.strip().replace("-", "_"), yaml.safe_load(raw)


def _cache_groups(items: list[str]) -> dict[str, list[str]]:
    """`NAME=SHA256[,SHA256...]` items (flags, or the environment's `;`-separated list) → groups;
    a name given again replaces its earlier list, as a later setting wins."""
    groups: dict[str, list[str]] = {}
    for item in filter(None, (item.strip() for item in items)):
        name, sep, fingerprints = item.partition("=")
        if not sep or not name.strip():
            raise SettingsError("prefix cache groups: expected NAME=SHA256[,SHA256...] (the value is not shown)")
        groups[name.strip()] = [fp for fp in (part.strip() for part in fingerprints.split(",")) if fp]
    return groups


def _read_key_file(path: str) -> list[tuple[str, str]]:
    """(key, where it came from) for each key line; a file given but without keys is an error, so
    an empty Secret cannot leave the server open."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SettingsError(f"cannot read API key file {path}: {exc}") from exc
    keys = [
        (line.strip(), f"API key file {path}, line {number}")
        for number, line in enumerate(lines, 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not keys:
        raise SettingsError(f"api_keys: the API key file {path} holds no key (one key per line)")
    return keys


def _preset_api_keys(value: Any, config_path: str | None) -> list[tuple[str, str]]:
    """`api_keys` of a preset: a YAML list of strings. A string would iterate as one-character keys."""
    where = f"config {config_path}" if config_path else "settings"
    if value is None:
        return []
    if not isinstance(value, list):
        raise SettingsError(
            f"api_keys in {where} must be a list of keys (api_keys: [KEY, ...]), "
            f"not a {type(value).__name__}; the value is not shown"
        )
    return [(key, f"{where}, api_keys[{i}]") for i, key in enumerate(value)]


def _check_key_sources(keys: list[tuple[Any, str]]) -> None:
    """Refuse, naming the field and where the key came from but never the key itself."""
    for key, source in keys:
        if not isinstance(key, str):
            raise SettingsError(f"api_keys: the key from {source} is a {type(key).__name__}, not a string")
        if len(key) < MIN_API_KEY_LENGTH:
            raise SettingsError(
                f"api_keys: the key from {source} is shorter than {MIN_API_KEY_LENGTH} characters "
                "(the key is not shown); use a long random key, e.g. `openssl rand -hex 32`"
            )


# Settings whose values may appear in an error message: the scalars (not api_keys, env, engine_args).
_SHOWN_IN_ERRORS = frozenset(_SCALAR_FIELDS)

# One line of help per flag, grouped as `vllm serve --help` groups its own.
_FLAG_HELP: dict[str, tuple[str, str]] = {
    "model": ("engine", "Hugging Face model id or local model directory"),
    "served_model_name": ("engine", "the name clients send as `model`"),
    "revision": ("engine", "the model's Hugging Face commit or tag; the tokenizer follows it"),
    "tokenizer": ("engine", "tokenizer source"),
    "tensor_parallel_size": ("engine", "GPUs per model replica (tensor parallel)"),
    "pipeline_parallel_size": ("engine", "pipeline stages"),
    "quantization": ("engine", "vLLM quantization method, e.g. experts_int8"),
    "dtype": ("engine", "weights dtype; auto means float32 on the CPU backend"),
    "max_model_len": ("engine", "context length"),
    "gpu_memory_utilization": ("engine", "fraction of GPU memory vLLM may use"),
    "max_num_seqs": ("engine", "engine batch slots"),
    "max_num_batched_tokens": ("engine", "tokens per engine step"),
    "enforce_eager": ("engine", "disable CUDA graphs and compilation"),
    "trust_remote_code": ("engine", "allow the model's own Hugging Face code"),
    "enable_prefix_caching": ("engine", "prefix caching"),
    "seed": ("engine", "engine seed"),
    "scheduling_policy": ("engine", "fcfs, or priority: requests' `priority` orders the queue (lower first)"),
    "host": ("server", "listen address"),
    "port": ("server", "listen port"),
    "chat_template": ("server", "Jinja chat template file"),
    "timeout_keep_alive": ("server", "seconds an idle keep-alive connection stays open (keep above your proxy's)"),
    "limit_concurrency": ("server", "open connections before uvicorn answers 503"),
    "stream_write_timeout": ("server", "seconds a stream may wait for its client to read before it is cut"),
    "stream_interval": ("server", "vLLM's: at least this many tokens per streamed chunk"),
    "stream_coalesce_gap": ("server", "under load, streamed chunks gather the tokens of up to this many seconds of engine steps (0: off)"),
    "stream_coalesce_min_streams": ("server", "streams running before stream_coalesce_gap applies"),
    "api_server_count": ("server", "API processes over one engine core (vLLM's layout); each gets its share of the admission limits"),
    "responses_store_max_entries": ("server", "Responses API store: most responses kept"),
    "responses_store_max_bytes": ("server", "Responses API store: most bytes kept"),
    "responses_store_ttl": ("server", "Responses API store: seconds a response is kept"),
    "max_concurrent_requests": ("admission", "engine sequences at once (a request with n choices takes n)"),
    "max_queued_requests": ("admission", "requests waiting for a slot; beyond: 429"),
    "max_tokens_in_flight": ("admission", "cap on prompt + max_tokens x n of running requests"),
    "retry_after_seconds": ("admission", "Retry-After on 429 and 503"),
    "request_timeout": ("admission", "request deadline in seconds (X-Request-Timeout may shorten it)"),
    "drain_timeout": ("admission", "seconds in-flight requests get after SIGTERM"),
    "max_body_bytes": ("limits", "request body size"),
    "max_messages": ("limits", "messages per request"),
    "max_n": ("limits", "choices per request (n)"),
    "max_tokens_limit": ("limits", "cap on max_tokens"),
    "max_stop_sequences": ("limits", "stop sequences per request"),
    "max_stop_length": ("limits", "characters per stop sequence"),
    "max_tools": ("limits", "tools per request"),
    "max_schema_bytes": ("limits", "bytes per JSON schema (response format, tool parameters) or structured_outputs constraint"),
    "max_documents": ("limits", "documents per request"),
    "max_document_chars": ("limits", "characters of document text per request"),
    "metrics_require_auth": ("auth", "require an API key for /metrics"),
    "prefix_cache_isolation": ("auth", "prefix cache shared per API key (key), per --prefix-cache-group (group), or by all (off)"),
    "log_level": ("logging", "debug, info, warning or error"),
    "log_format": ("logging", "json or text"),
    "log_request_content": ("logging", "log prompts and outputs (off: only counts and ids)"),
}
_GROUPS = ("engine", "server", "admission", "limits", "auth", "logging")
# What an unset (None) default means, where it means more than "none".
_UNSET_MEANS = {
    "served_model_name": "--model",
    "tokenizer": "--model",
    "max_model_len": "the model's",
    "max_num_seqs": "vllm serve's",
    "max_num_batched_tokens": "vllm serve's",
    "enable_prefix_caching": "vLLM's (on for Jamba)",
    "max_concurrent_requests": "max_num_seqs",
    "chat_template": "the built-in Jamba 1.5 template",
}
_HF_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")


def check_model_reference(model: str) -> None:
    """A model is an existing directory or a Hugging Face model id; anything else is a one-line
    error here, not a hub library's traceback at engine start."""
    path = Path(model).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise SettingsError(f"model {model!r} is a file; expected a model directory or a Hugging Face model id (owner/name)")
    if model.startswith(("/", ".", "~")) or not _HF_MODEL_ID.fullmatch(model):
        raise SettingsError(f"model {model!r}: no such directory, and not a Hugging Face model id (owner/name)")


def _flag_help(name: str) -> str:
    field = Settings.model_fields[name]
    default = field.default
    if field.is_required():
        shown = "required"
    else:
        shown = _UNSET_MEANS.get(name, "none") if default is None else str(default).lower() if isinstance(default, bool) else default
    return f"{_FLAG_HELP[name][1]} (default: {shown}; env {ENV_PREFIX}{name.upper()})"


def _describe(exc: ValidationError) -> str:
    lines = [f"{exc.error_count()} invalid setting(s):"]
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"]) or "settings"
        shown = error["loc"] and error["loc"][0] in _SHOWN_IN_ERRORS and error["type"] != "extra_forbidden"
        suffix = f" (got {error['input']!r})" if shown and "input" in error else ""
        lines.append(f"  {field}: {error['msg']}{suffix}")
    return "\n".join(lines)


def load_preset(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"cannot read config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise SettingsError(f"config {path} must be a mapping")
    return data


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in _SCALAR_FIELDS:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _parse_bool(raw) if _SCALAR_FIELDS[name] is bool else raw
    return values


SERVER_DESCRIPTION = (
    "OpenAI-compatible server for Jamba 1.5 on vLLM. Precedence: --config preset < JAMBA_* environment < flags. "
    "Bulk jobs without a server: `jamba-server run-batch --help`."
)


def build_arg_parser(prog: str = "jamba-server", description: str = SERVER_DESCRIPTION) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help=f"YAML preset (see configs/); env {ENV_PREFIX}CONFIG")
    groups = {name: parser.add_argument_group(name) for name in _GROUPS}
    for name, kind in _SCALAR_FIELDS.items():
        flag = "--" + name.replace("_", "-")
        group = groups[_FLAG_HELP[name][0]]
        if kind is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=_flag_help(name))
        else:
            group.add_argument(flag, dest=name, type=kind, default=None, metavar=kind.__name__.upper(), help=_flag_help(name))
    groups["auth"].add_argument(
        "--api-key", dest="api_key", action="append", default=[], metavar="KEY",
        help=f"accepted API key, at least {MIN_API_KEY_LENGTH} characters (repeatable); env {ENV_PREFIX}API_KEYS (comma-separated)",
    )  # fmt: skip
    groups["auth"].add_argument(
        "--api-key-file", dest="api_key_file", default=None, metavar="PATH",
        help=f"file with one API key per line; env {ENV_PREFIX}API_KEY_FILE",
    )  # fmt: skip
    groups["auth"].add_argument(
        "--prefix-cache-group", dest="prefix_cache_group", action="append", default=[], metavar="NAME=SHA256[,SHA256...]",
        help="with --prefix-cache-isolation group: keys (by SHA-256 fingerprint, `printf %%s KEY | sha256sum`) "
        f"that share one prefix cache (repeatable); env {ENV_PREFIX}PREFIX_CACHE_GROUPS (groups separated by ;)",
    )  # fmt: skip
    groups["engine"].add_argument(
        "--engine-arg", dest="engine_arg", action="append", default=[], metavar="KEY=VALUE",
        help="any other vLLM engine argument (value parsed as YAML), repeatable",
    )  # fmt: skip
    return parser


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build settings from a preset, the environment and CLI flags (highest wins)."""
    return settings_from_args(build_arg_parser().parse_args(argv), environ)


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from parsed flags (`build_arg_parser`'s, and any a subcommand adds), the preset they
    name and the environment."""
    environ = os.environ if environ is None else environ
    config_path = args.config or environ.get(ENV_PREFIX + "CONFIG")
    values: dict[str, Any] = load_preset(config_path) if config_path else {}
    values.update(env_overrides(environ))
    values.update({k: v for k, v in vars(args).items() if k in _SCALAR_FIELDS and v is not None})
    if args.engine_arg:
        engine_args = dict(values.get("engine_args") or {})
        engine_args.update(_parse_key_value(item) for item in args.engine_arg)
        values["engine_args"] = engine_args
    groups = _cache_groups(environ.get(ENV_PREFIX + "PREFIX_CACHE_GROUPS", "").split(";") + list(args.prefix_cache_group))
    if groups:
        values["prefix_cache_groups"] = {**(values.get("prefix_cache_groups") or {}), **groups}
    keys = _preset_api_keys(values.pop("api_keys", None), config_path)
    env_keys = environ.get(ENV_PREFIX + "API_KEYS", "").split(",")
    keys += [(k.strip(), f"{ENV_PREFIX}API_KEYS, item {i}") for i, k in enumerate(env_keys, 1) if k.strip()]
    key_file = args.api_key_file or environ.get(ENV_PREFIX + "API_KEY_FILE")
    if key_file:
        keys += _read_key_file(key_file)
    keys += [(k, f"--api-key #{i}") for i, k in enumerate(args.api_key, 1)]
    _check_key_sources(keys)
    if keys:
        values["api_keys"] = [key for key, _ in keys]
    if "model" not in values:
        raise SettingsError("no model: give --config PRESET or --model")
    check_model_reference(str(values["model"]))
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from exc
