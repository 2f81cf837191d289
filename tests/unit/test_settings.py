from pathlib import Path

import pytest
from pydantic import ValidationError

from jamba_server.settings import DEFAULT_TEMPLATE, Settings, SettingsError, load_settings

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def settings_for(preset: str, *argv: str, environ: dict | None = None):
    return load_settings(["--config", str(CONFIGS / preset), *argv], environ=environ or {})


def test_dev_preset_engine_args():
    kwargs = settings_for("dev-cpu.yaml").engine_kwargs()
    assert kwargs["model"] == "models/jamba-tiny-dev"
    assert kwargs["served_model_name"] == "jamba-tiny-dev"
    assert kwargs["dtype"] == "float32"
    assert kwargs["enable_prefix_caching"] is True  # as vLLM has it for Jamba: the production path
    assert kwargs["max_num_seqs"] == 32
    assert kwargs["tensor_parallel_size"] == 1


@pytest.mark.parametrize(
    "preset, model, tp, quantization, max_len, env",
    [
        ("jamba-1.5-mini-bf16-tp2.yaml", "ai21labs/AI21-Jamba-1.5-Mini", 2, None, 204800, {}),
        (
            "jamba-1.5-mini-int8.yaml",
            "ai21labs/AI21-Jamba-1.5-Mini",
            1,
            "experts_int8",
            102400,
            {},
        ),
        ("jamba-1.5-large-int8-tp8.yaml", "ai21labs/AI21-Jamba-1.5-Large", 8, "experts_int8", 262144, {}),
    ],
)
def test_gpu_presets(preset, model, tp, quantization, max_len, env):
    settings = settings_for(preset)
    kwargs = settings.engine_kwargs()
    assert kwargs["model"] == model
    assert kwargs["tensor_parallel_size"] == tp
    assert kwargs.get("quantization") == quantization
    assert kwargs["max_model_len"] == max_len
    assert kwargs["dtype"] == "bfloat16"
    assert settings.env == env


def test_precedence_preset_env_flags():
    environ = {"JAMBA_MAX_NUM_SEQS": "8", "JAMBA_TENSOR_PARALLEL_SIZE": "2"}
    settings = settings_for("dev-cpu.yaml", "--tensor-parallel-size", "4", environ=environ)
    assert settings.max_num_seqs == 8  # env over preset
    assert settings.tensor_parallel_size == 4  # flag over env


def test_vllm_flag_names():
    settings = settings_for(
        "dev-cpu.yaml",
        "--max-model-len", "1024",
        "--quantization", "experts_int8",
        "--pipeline-parallel-size", "2",
        "--gpu-memory-utilization", "0.5",
        "--no-enforce-eager",
        "--trust-remote-code",
        "--served-model-name", "x",
    )  # fmt: skip
    kwargs = settings.engine_kwargs()
    assert kwargs["max_model_len"] == 1024
    assert kwargs["quantization"] == "experts_int8"
    assert kwargs["pipeline_parallel_size"] == 2
    assert kwargs["gpu_memory_utilization"] == 0.5
    assert kwargs["enforce_eager"] is False
    assert kwargs["trust_remote_code"] is True
    assert kwargs["served_model_name"] == "x"


def test_keep_alive_outlasts_common_proxy_idle_timeouts():
    assert load_settings(["--model", "m"], environ={}).timeout_keep_alive > 60  # ALB, nginx upstream
    environ = {"JAMBA_TIMEOUT_KEEP_ALIVE": "650"}  # behind a proxy that keeps idle connections longer
    assert load_settings(["--model", "m"], environ=environ).timeout_keep_alive == 650


def test_engine_arg_passthrough_is_typed():
    settings = settings_for(
        "dev-cpu.yaml", "--engine-arg", "max_num_batched_tokens=2048", "--engine-arg", "swap-space=0.5"
    )
    kwargs = settings.engine_kwargs()
    assert kwargs["max_num_batched_tokens"] == 2048
    assert kwargs["swap_space"] == 0.5


def test_engine_arg_cannot_shadow_typed_setting():
    settings = settings_for("dev-cpu.yaml", "--engine-arg", "max_model_len=10")
    with pytest.raises(SettingsError, match="max_model_len"):
        settings.engine_kwargs()


@pytest.mark.parametrize(
    "argv, environ",
    [
        ([], {}),  # no model at all
        (["--model", "m", "--tensor-parallel-size", "0"], {}),
        (["--model", "m"], {"JAMBA_ENFORCE_EAGER": "maybe"}),
        (["--config", "/nonexistent.yaml"], {}),
        (["--model", "m", "--timeout-keep-alive", "0"], {}),
    ],
)
def test_bad_settings_are_settings_errors(argv, environ):
    with pytest.raises(SettingsError):
        load_settings(argv, environ=environ)


def test_unknown_preset_key_rejected(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model: m\ntensor_paralel_size: 2\n")
    with pytest.raises(SettingsError, match="tensor_paralel_size"):
        load_settings(["--config", str(preset)], environ={})


def test_chat_template_default_and_override(tmp_path):
    settings = load_settings(["--model", "m"], environ={})
    assert settings.chat_template_text() == DEFAULT_TEMPLATE.read_text()
    custom = tmp_path / "t.jinja"
    custom.write_text("{{ messages[0].content }}")
    settings = load_settings(["--model", "m", "--chat-template", str(custom)], environ={})
    assert settings.chat_template_text() == "{{ messages[0].content }}"
    settings = load_settings(["--model", "m", "--chat-template", str(tmp_path / "no")], environ={})
    with pytest.raises(SettingsError):
        settings.chat_template_text()


def test_revision_reaches_the_engine_from_flag_or_environment():
    assert "revision" not in settings_for("jamba-1.5-mini-int8.yaml").engine_kwargs()
    flagged = settings_for("jamba-1.5-mini-int8.yaml", "--revision", "abc123")
    assert flagged.engine_kwargs()["revision"] == "abc123"
    assert settings_for("jamba-1.5-mini-int8.yaml", environ={"JAMBA_REVISION": "v1"}).revision == "v1"


# ---- API keys: a list of long keys from every source; refusals name the field, never the key

LONG_KEYS = ["sk-test-preset-0123456789", "sk-test-env-a-0123456789", "sk-test-env-b-0123456789",
             "sk-test-file-0123456789ab", "sk-test-flag-0123456789ab"]  # fmt: skip
SHORT = "Zq9-short"  # 9 characters


def _preset(tmp_path, text: str) -> str:
    path = tmp_path / "p.yaml"
    path.write_text("model: m\n" + text)
    return str(path)


def test_api_keys_written_as_a_yaml_string_is_a_startup_error(tmp_path):
    """`api_keys: sk-live-SECRET` used to become one-character keys (`s`, `k`, ... all accepted)."""
    preset = _preset(tmp_path, "api_keys: sk-live-SECRET-0123456789\n")
    with pytest.raises(SettingsError, match="api_keys") as info:
        load_settings(["--config", preset], environ={})
    assert "must be a list" in str(info.value) and "SECRET" not in str(info.value)


def test_a_string_is_never_taken_as_a_list_of_keys():
    with pytest.raises(ValidationError, match="api_keys") as info:
        Settings(model="m", api_keys="sk-live-SECRET-0123456789")
    assert "SECRET" not in str(info.value)
    settings = Settings(model="m", api_keys=[LONG_KEYS[0]])
    with pytest.raises(ValidationError, match="api_keys") as info:
        settings.api_keys = "sk-live-SECRET-0123456789"
    assert "SECRET" not in str(info.value) and settings.api_keys == [LONG_KEYS[0]]
    assert LONG_KEYS[0] not in repr(settings)


@pytest.mark.parametrize("source", ["preset", "env", "file", "flag"])
def test_short_api_keys_are_refused_from_every_source(tmp_path, source):
    argv, environ = ["--model", "m"], {}
    if source == "preset":
        argv = ["--config", _preset(tmp_path, f"api_keys: [{LONG_KEYS[0]}, {SHORT}]\n")]
    elif source == "env":
        environ = {"JAMBA_API_KEYS": f"{LONG_KEYS[1]},{SHORT}"}
    elif source == "file":
        (tmp_path / "keys").write_text(f"{LONG_KEYS[3]}\n{SHORT}\n")
        environ = {"JAMBA_API_KEY_FILE": str(tmp_path / "keys")}
    else:
        argv += ["--api-key", SHORT]
    with pytest.raises(SettingsError, match="api_keys") as info:
        load_settings(argv, environ=environ)
    assert "16 characters" in str(info.value) and SHORT not in str(info.value)


def test_non_string_keys_and_misspelt_key_fields_are_not_echoed(tmp_path):
    with pytest.raises(SettingsError, match=r"api_keys.*int") as info:
        load_settings(["--config", _preset(tmp_path, "api_keys: [12345678901234567890]\n")], environ={})
    assert "12345678901234567890" not in str(info.value)
    with pytest.raises(SettingsError, match="api_key") as info:
        load_settings(["--config", _preset(tmp_path, f"api_key: {LONG_KEYS[0]}\n")], environ={})
    assert LONG_KEYS[0] not in str(info.value)
    with pytest.raises(SettingsError, match="tensor_parallel_size.*got 0"):  # other values are still shown
        load_settings(["--model", "m", "--tensor-parallel-size", "0"], environ={})


def test_api_keys_from_every_source_add_up(tmp_path):
    (tmp_path / "keys").write_text(f"# rotated 2024-01\n\n  {LONG_KEYS[3]}  \n")
    environ = {"JAMBA_API_KEYS": f" {LONG_KEYS[1]}, {LONG_KEYS[2]} ,", "JAMBA_API_KEY_FILE": str(tmp_path / "keys")}
    preset = _preset(tmp_path, f"api_keys:\n  - {LONG_KEYS[0]}\n")
    settings = load_settings(["--config", preset, "--api-key", LONG_KEYS[4]], environ=environ)
    assert settings.api_keys == LONG_KEYS
    assert load_settings(["--model", "m"], environ={}).api_keys == []  # no keys: open server


def test_an_api_key_file_without_keys_is_an_error(tmp_path):
    """A mounted Secret that came out empty must not leave the server open."""
    (tmp_path / "keys").write_text("# no keys yet\n\n")
    with pytest.raises(SettingsError, match="api_keys.*holds no key"):
        load_settings(["--model", "m", "--api-key-file", str(tmp_path / "keys")], environ={})


# ---- GPU presets cap max_tokens: without one, a request that omits it may decode the whole context

GPU_PRESETS = sorted(p.name for p in CONFIGS.glob("jamba-1.5-*.yaml"))


def test_every_gpu_preset_is_checked():
    assert len(GPU_PRESETS) == 4 and "dev-cpu.yaml" not in GPU_PRESETS


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_gpu_presets_cap_max_tokens(preset):
    settings = settings_for(preset)
    cap = settings.max_tokens_limit
    assert cap is not None, f"{preset} sets no max_tokens_limit"
    # A real bound (at most an eighth of the context), yet room for long answers.
    assert 4096 <= cap <= settings.max_model_len // 8, cap
    lines = (CONFIGS / preset).read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("max_tokens_limit:"))
    comment = []
    while at > 0 and lines[at - 1].startswith("#"):
        at -= 1
        comment.insert(0, lines[at])
    assert "400" in " ".join(comment) and "default" in " ".join(comment), "the preset says what the cap does"


def test_every_flag_has_one_line_of_help_with_its_default_and_variable(capsys):
    import jamba_server.settings as settings_module

    with pytest.raises(SystemExit):
        load_settings(["--help"])
    text = capsys.readouterr().out
    for name in settings_module._SCALAR_FIELDS:
        flag = "--" + name.replace("_", "-")
        assert flag in text and f"env JAMBA_{name.upper()})" in " ".join(text.split()), name
    for group in ("engine:", "server:", "admission:", "limits:", "auth:", "logging:"):
        assert f"\n{group}\n" in text
    assert "PydanticUndefined" not in text and "(default: required; env JAMBA_MODEL)" in " ".join(text.split())


@pytest.mark.parametrize("model", ["/no/such/dir", "./missing", "not a model!", "a/b/c", "~/nowhere"])
def test_a_model_that_is_neither_a_directory_nor_an_id_is_one_line(model):
    with pytest.raises(SettingsError, match="no such directory, and not a Hugging Face model id"):
        load_settings(["--model", model], environ={})


def test_model_ids_and_directories_pass(tmp_path):
    for model in ("ai21labs/AI21-Jamba-Mini-1.5", "gpt2", str(tmp_path)):
        assert load_settings(["--model", model], environ={}).model == model
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(SettingsError, match="is a file"):
        load_settings(["--model", str(tmp_path / "weights.bin")], environ={})


def test_scheduling_policy_reaches_the_engine_from_flag_and_env():
    assert settings_for("dev-cpu.yaml").engine_kwargs()["scheduling_policy"] == "fcfs"
    assert settings_for("dev-cpu.yaml", "--scheduling-policy", "priority").engine_kwargs()["scheduling_policy"] == "priority"
    from_env = load_settings(["--config", str(CONFIGS / "dev-cpu.yaml")], {"JAMBA_SCHEDULING_POLICY": "priority"})
    assert from_env.scheduling_policy == "priority"
    with pytest.raises(SettingsError, match="scheduling_policy"):
        settings_for("dev-cpu.yaml", "--scheduling-policy", "lifo")


# ---- prefix-cache isolation (core/tenancy.py): a setting, and groups of keys by SHA-256 fingerprint


def _fp(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()


def test_prefix_cache_isolation_defaults_to_key_and_takes_flag_and_env():
    assert load_settings(["--model", "m"], environ={}).prefix_cache_isolation == "key"
    assert load_settings(["--model", "m", "--prefix-cache-isolation", "off"], environ={}).prefix_cache_isolation == "off"
    environ = {"JAMBA_PREFIX_CACHE_ISOLATION": "off"}
    assert load_settings(["--model", "m"], environ=environ).prefix_cache_isolation == "off"
    with pytest.raises(SettingsError, match="prefix_cache_isolation.*got 'tenant'"):
        load_settings(["--model", "m", "--prefix-cache-isolation", "tenant"], environ={})


def test_prefix_cache_groups_from_preset_env_and_flags(tmp_path):
    k = LONG_KEYS
    preset = _preset(
        tmp_path,
        f"api_keys: [{k[0]}, {k[1]}, {k[2]}, {k[3]}]\nprefix_cache_isolation: group\n"
        f"prefix_cache_groups:\n  ops: [{_fp(k[0])}]\n  web: [{_fp(k[1]).upper()}]\n",
    )
    environ = {"JAMBA_PREFIX_CACHE_GROUPS": f"web={_fp(k[1])},{_fp(k[2])};"}
    settings = load_settings(["--config", preset, "--prefix-cache-group", f"lab = {_fp(k[3])}"], environ=environ)
    assert settings.prefix_cache_groups == {"ops": [_fp(k[0])], "web": [_fp(k[1]), _fp(k[2])], "lab": [_fp(k[3])]}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prefix-cache-isolation", "group"], "names no group"),
        (["--prefix-cache-group", "team={a}"], "needs prefix_cache_isolation: group"),
        (["--prefix-cache-isolation", "group", "--prefix-cache-group", "team={key}"], "not the key itself"),
        (["--prefix-cache-isolation", "group", "--prefix-cache-group", "team={other}"], "fingerprint 0 .* none of the api_keys"),
        (["--prefix-cache-isolation", "group", "--prefix-cache-group", "{key}"], "expected NAME=SHA256"),
        (["--prefix-cache-isolation", "group", "--prefix-cache-group", "a b={a}"], "group name"),
    ],
)
def test_bad_prefix_cache_groups_are_settings_errors_without_keys(extra, message):
    key, other = LONG_KEYS[0], LONG_KEYS[2]
    argv = ["--model", "m", "--api-key", key, "--api-key", LONG_KEYS[1]]
    argv += [item.format(a=_fp(key), key=key, other=_fp(other)) for item in extra]
    with pytest.raises(SettingsError, match=message) as info:
        load_settings(argv, environ={})
    assert key not in str(info.value) and other not in str(info.value)


def test_api_server_count_defaults_to_one_process_and_takes_preset_env_and_flag(tmp_path):
    assert settings_for("dev-cpu.yaml").api_server_count == 1
    assert settings_for("dev-cpu.yaml", environ={"JAMBA_API_SERVER_COUNT": "2"}).api_server_count == 2
    assert settings_for("dev-cpu.yaml", "--api-server-count", "4", environ={"JAMBA_API_SERVER_COUNT": "2"}).api_server_count == 4
    preset = tmp_path / "multi.yaml"
    preset.write_text((CONFIGS / "dev-cpu.yaml").read_text() + "api_server_count: 3\n")
    assert load_settings(["--config", str(preset)], environ={}).api_server_count == 3
    with pytest.raises(SettingsError, match="api_server_count"):
        settings_for("dev-cpu.yaml", "--api-server-count", "0")
