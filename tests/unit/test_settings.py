from pathlib import Path

import pytest

from jamba_server.settings import DEFAULT_TEMPLATE, SettingsError, load_settings

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def settings_for(preset: str, *argv: str, environ: dict | None = None):
    return load_settings(["--config", str(CONFIGS / preset), *argv], environ=environ or {})


def test_dev_preset_engine_args():
    kwargs = settings_for("dev-cpu.yaml").engine_kwargs()
    assert kwargs["model"] == "models/jamba-tiny-dev"
    assert kwargs["served_model_name"] == "jamba-tiny-dev"
    assert kwargs["dtype"] == "float32"
    assert kwargs["enable_prefix_caching"] is False
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
