"""Settings → the kwargs the adapter hands vLLM on this (CPU) platform."""

import os
from pathlib import Path

import pytest

from jamba_server.engine import _cpu_thread_binding, platform_engine_kwargs
from jamba_server.settings import load_settings

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def no_bind(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)


def test_cpu_defaults_applied(no_bind):
    settings = load_settings(["--model", "m"], environ={})
    kwargs = platform_engine_kwargs(settings)
    assert kwargs["dtype"] == "float32"  # dtype auto means float32 on the CPU backend
    assert kwargs["enable_prefix_caching"] is False  # seeded requests must not kill the engine
    so = kwargs["structured_outputs_config"]
    assert so.backend == "xgrammar" and so.disable_any_whitespace is True
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ


def test_explicit_choices_win(no_bind):
    settings = load_settings(["--model", "m", "--dtype", "bfloat16", "--enable-prefix-caching"], environ={})
    kwargs = platform_engine_kwargs(settings)
    assert kwargs["dtype"] == "bfloat16" and kwargs["enable_prefix_caching"] is True


def test_tensor_parallel_on_cpu_binds_threads(no_bind):
    settings = load_settings(["--config", str(CONFIGS / "dev-cpu.yaml"), "--tensor-parallel-size", "2"], environ={})
    kwargs = platform_engine_kwargs(settings)
    assert kwargs["tensor_parallel_size"] == 2
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"].count("|") == 1
    del os.environ["VLLM_CPU_OMP_THREADS_BIND"]


def test_thread_binding_splits_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2, 3})
    assert _cpu_thread_binding(2) == "0,1|2,3"
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1})
    assert _cpu_thread_binding(2) == "0|1"
