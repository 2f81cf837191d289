"""Settings → the kwargs the adapter hands vLLM on this (CPU) platform."""

import copy
import dataclasses
import os
from pathlib import Path

import pytest

from jamba_server.runtime.vllm_engine import _cpu_thread_binding, platform_engine_kwargs
from jamba_server.settings import load_settings

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def no_bind(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)


def test_cpu_defaults_applied(no_bind):
    settings = load_settings(["--model", "m"], environ={})
    kwargs = platform_engine_kwargs(settings)
    assert kwargs["dtype"] == "float32"  # dtype auto means float32 on the CPU backend
    assert "enable_prefix_caching" not in kwargs  # vLLM's own default decides (on for Jamba)
    so = kwargs["structured_outputs_config"]
    assert so.backend == "xgrammar" and so.disable_any_whitespace is True
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ


def test_explicit_choices_win(no_bind):
    settings = load_settings(["--model", "m", "--dtype", "bfloat16", "--no-enable-prefix-caching"], environ={})
    kwargs = platform_engine_kwargs(settings)
    assert kwargs["dtype"] == "bfloat16" and kwargs["enable_prefix_caching"] is False


@pytest.fixture
def environ_kept():
    """vLLM's config step sets process variables for its engine (LD_PRELOAD, LOCAL_WORLD_SIZE, ...);
    servers the session starts later must not inherit them from the test process."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_vllm_turns_prefix_caching_on_for_jamba_on_cpu(no_bind, environ_kept):
    """Unset, prefix caching is vLLM's choice; for the dev Jamba on this CPU backend that is on, with
    Mamba state kept at block boundaries (mamba_cache_mode "align"), as on GPU."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from jamba_server.runtime.vllm_engine import USAGE_CONTEXT

    dev_model = CONFIGS.parent / "models" / "jamba-tiny-dev"
    settings = load_settings(["--model", str(dev_model), "--max-model-len", "4096", "--enforce-eager"], environ={})
    config = AsyncEngineArgs(**platform_engine_kwargs(settings)).create_engine_config(USAGE_CONTEXT)
    assert config.cache_config.enable_prefix_caching is True
    assert config.cache_config.mamba_cache_mode == "align"


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


# ---- the same engine as `vllm serve`, on the GPUs the presets are for (faked: no GPU here)

GPUS = {  # what NVML reports: total memory, device name
    "H100-80GB": (81_559 * 2**20, "NVIDIA H100 80GB HBM3"),
    "H200": (143_771 * 2**20, "NVIDIA H200"),
    "A100-80GB": (81_920 * 2**20, "NVIDIA A100-SXM4-80GB"),
}
GPU_PRESETS = sorted(p.stem for p in CONFIGS.glob("jamba-1.5-*.yaml"))
FLAGS_ONLY = ["--model", "ai21labs/AI21-Jamba-1.5-Mini", "--tensor-parallel-size", "2"]
# Set on purpose (see runtime/vllm_engine.py): grammar-constrained JSON without free whitespace.
DELIBERATE = {"structured_outputs_config"}
# vLLM's CLI default and dataclass default differ for this multimodal-only field (None vs True).
NOT_FOR_TEXT_MODELS = {"mm_device_do_normalize"}


def vllm_serve_args(argv: list[str]):
    """What `vllm serve ARGV` hands its engine; built on the (faked) platform, whose defaults its
    parser reads."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return AsyncEngineArgs.from_cli_args(make_arg_parser(FlexibleArgumentParser()).parse_args(argv))


def fake_gpu(monkeypatch, gpu: str) -> None:
    from vllm.platforms import current_platform

    memory, name = GPUS[gpu]
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    monkeypatch.setattr(current_platform, "is_tpu", lambda: False)
    monkeypatch.setattr(current_platform, "get_device_total_memory", lambda device_id=0: memory)
    monkeypatch.setattr(current_platform, "get_device_name", lambda device_id=0: name)


def serve_flags(kwargs: dict) -> list[str]:
    """The `vllm serve` flags that say what `kwargs` say."""
    flags = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif key not in DELIBERATE:
            flags += [flag, str(value)]
    return flags


def with_batch_defaults(args, usage_context):
    """`args` after vLLM's scheduler defaults for `usage_context` on the current platform (the step
    of `create_engine_config` that reads the device; chunked prefill is on for hybrid models)."""
    from types import SimpleNamespace

    args = copy.deepcopy(args)
    if args.enable_chunked_prefill is None:
        args.enable_chunked_prefill = True
    model = SimpleNamespace(max_model_len=args.max_model_len or 262_144, is_multimodal_model=False, is_mm_prefix_lm=False)
    args._set_default_max_num_seqs_and_batched_tokens_args(usage_context, model, SimpleNamespace(use_batched_dp_moe=False))
    return args


def _same(value):
    """CLI and dataclass spellings of one setting: ["name"] is "name"; None, False, "" are unset."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return None if value in (None, False, "", []) else value


@pytest.mark.parametrize("gpu", sorted(GPUS))
@pytest.mark.parametrize("preset", [*GPU_PRESETS, "flags only"])
def test_engine_args_equal_what_vllm_serve_derives(monkeypatch, preset, gpu):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    from jamba_server.runtime.vllm_engine import USAGE_CONTEXT

    argv = FLAGS_ONLY if preset == "flags only" else ["--config", str(CONFIGS / f"{preset}.yaml")]
    fake_gpu(monkeypatch, gpu)
    kwargs = platform_engine_kwargs(load_settings(argv, environ={}))
    ours = with_batch_defaults(AsyncEngineArgs(**kwargs), USAGE_CONTEXT)
    serve = with_batch_defaults(vllm_serve_args(serve_flags(kwargs)), UsageContext.OPENAI_API_SERVER)
    differ = {
        f.name: (getattr(ours, f.name), getattr(serve, f.name))
        for f in dataclasses.fields(AsyncEngineArgs)
        if f.name not in DELIBERATE | NOT_FOR_TEXT_MODELS and _same(getattr(ours, f.name)) != _same(getattr(serve, f.name))
    }
    assert differ == {}
    assert ours.max_num_seqs >= 256 and ours.max_num_batched_tokens >= 2048  # never the library's 128


def test_usage_context_is_what_sizes_the_batch(monkeypatch):
    """The check above can fail: with AsyncLLM.from_engine_args' default context, an H100 gets an
    eighth of `vllm serve`'s batch."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    fake_gpu(monkeypatch, "H100-80GB")
    args = AsyncEngineArgs(**platform_engine_kwargs(load_settings(FLAGS_ONLY, environ={})))
    serve = with_batch_defaults(args, UsageContext.OPENAI_API_SERVER)
    library = with_batch_defaults(args, UsageContext.ENGINE_CONTEXT)
    assert (serve.max_num_seqs, serve.max_num_batched_tokens) == (1024, 8192)
    assert (library.max_num_seqs, library.max_num_batched_tokens) == (128, 2048)


def test_the_adapter_builds_the_engine_in_that_context(monkeypatch):
    from vllm.usage.usage_lib import UsageContext

    from jamba_server.runtime import vllm_engine as engine

    seen = {}

    class FakeAsyncLLM:
        @staticmethod
        def from_engine_args(args, usage_context=None):
            seen["usage_context"] = usage_context
            raise RuntimeError("built")

    monkeypatch.setattr(engine, "AsyncLLM", FakeAsyncLLM)
    dev_model = CONFIGS.parent / "models" / "jamba-tiny-dev"
    adapter = engine.EngineAdapter(load_settings(["--config", str(CONFIGS / "dev-cpu.yaml"), "--model", str(dev_model)], environ={}))
    with pytest.raises(RuntimeError, match="built"):
        adapter.start()
    assert seen["usage_context"] is engine.USAGE_CONTEXT is UsageContext.OPENAI_API_SERVER


@pytest.mark.parametrize(("flags", "expected"), [([], "abc123"), (["--tokenizer", "other/tok"], None)])
def test_our_tokenizer_follows_the_models_revision(monkeypatch, flags, expected):
    from jamba_server.runtime import vllm_engine as engine

    seen = {}

    def from_pretrained(source, **kwargs):
        seen.update(kwargs, source=source)
        raise RuntimeError("loaded")

    monkeypatch.setattr(engine.AutoTokenizer, "from_pretrained", from_pretrained)
    adapter = engine.EngineAdapter(load_settings(["--model", "ai21labs/AI21-Jamba-1.5-Mini", "--revision", "abc123", *flags], environ={}))
    with pytest.raises(RuntimeError, match="loaded"):
        adapter.load_tokenizer()
    assert seen["revision"] == expected  # a separate tokenizer repo does not share the model's commits


def test_a_grammar_compiler_out_of_stack_is_the_clients_400(monkeypatch):
    """A RecursionError from vLLM's xgrammar check (a RuntimeError) is a 400 naming the schema's field."""
    import jamba_server.runtime.vllm_engine as engine
    from jamba_server.core.constraints import OutputConstraint
    from jamba_server.core.sampling import SamplingSpec
    from jamba_server.errors import InvalidRequestError
    from jamba_server.settings import Settings

    def exhausted(params):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(engine, "validate_xgrammar_grammar", exhausted)
    adapter = engine.EngineAdapter(Settings(model="m"))
    adapter._control_token_ids = []
    constraint = OutputConstraint("json", {"type": "object"}, "response_format.json_schema.schema")
    spec = SamplingSpec(max_tokens=4, constraint=constraint)
    engine.grammar_problem.cache_clear()  # the memo must not answer for the checker
    try:
        with pytest.raises(InvalidRequestError) as info:
            adapter.sampling_params(spec)
    finally:
        engine.grammar_problem.cache_clear()
    assert info.value.param == "response_format.json_schema.schema"



def test_vllms_environment_is_read_once_the_engine_is_up(monkeypatch):
    """vLLM's API-side code reads its environment variables on every access (two per generated
    token in the output processor's stats) until `enable_envs_cache()`; the adapter turns the cache
    on once its engine has started."""
    import vllm.envs

    from jamba_server.runtime import vllm_engine as engine

    class FakeModelConfig:
        max_model_len = 64

        def get_vocab_size(self):
            return 10

    class FakeAsyncLLM:
        model_config = FakeModelConfig()

        @staticmethod
        def from_engine_args(args, usage_context=None):
            return FakeAsyncLLM()

    monkeypatch.setattr(engine, "AsyncLLM", FakeAsyncLLM)
    vllm.envs.disable_envs_cache()
    dev_model = CONFIGS.parent / "models" / "jamba-tiny-dev"
    adapter = engine.EngineAdapter(load_settings(["--config", str(CONFIGS / "dev-cpu.yaml"), "--model", str(dev_model)], environ={}))
    try:
        assert not vllm.envs._is_envs_cache_enabled()
        adapter.start()
        assert vllm.envs._is_envs_cache_enabled()
    finally:
        vllm.envs.disable_envs_cache()
