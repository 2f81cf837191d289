"""The CPU plugin: its Mamba1 kernels' self-consistency (prefill vs decode, varlen vs separate), its
rewind of seeded generators, and what `register()` installs."""

import inspect
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from jamba_server.runtime import cpu_plugin

DIM, DSTATE = 6, 4


def make(seq_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return dict(
        u=r(DIM, seq_len), delta=r(DIM, seq_len), z=r(DIM, seq_len),
        B=r(1, DSTATE, seq_len), C=r(1, DSTATE, seq_len),
        A=-torch.rand(DIM, DSTATE, generator=g), D=r(DIM), bias=r(DIM),
    )  # fmt: skip


def prefill(t, start, end, states, slot, has_initial):
    z = t["z"][:, start:end].clone()
    out = cpu_plugin.selective_scan_reference(
        t["u"][:, start:end], states, t["delta"][:, start:end], t["A"],
        t["B"][:, :, start:end], t["C"][:, :, start:end], t["D"], z, t["bias"], True,
        query_start_loc=torch.tensor([0, end - start]), cache_indices=torch.tensor([slot]),
        has_initial_state=torch.tensor([has_initial]),
    )  # fmt: skip
    return out


def test_prefill_then_decode_equals_longer_prefill():
    t = make(7)
    full_states = torch.zeros(3, DIM, DSTATE)
    full = prefill(t, 0, 7, full_states, 1, False)
    states = torch.zeros(3, DIM, DSTATE)
    head = prefill(t, 0, 6, states, 1, False)
    out = torch.empty(1, DIM)
    cpu_plugin.selective_state_update_reference(
        states, t["u"][:, 6:7].T, t["delta"][:, 6:7].T, t["A"], t["B"][0, :, 6:7].T,
        t["C"][0, :, 6:7].T, t["D"], t["bias"], z=t["z"][:, 6:7].T, dt_softplus=True,
        state_batch_indices=torch.tensor([[1]]), out=out,
    )  # fmt: skip
    torch.testing.assert_close(head, full[:, :6])
    torch.testing.assert_close(out[0], full[:, 6])
    torch.testing.assert_close(states[1], full_states[1])


def test_chunked_prefill_with_initial_state_equals_one_prefill():
    t = make(9, seed=1)
    whole_states = torch.zeros(2, DIM, DSTATE)
    whole = prefill(t, 0, 9, whole_states, 1, False)
    states = torch.zeros(2, DIM, DSTATE)
    first = prefill(t, 0, 4, states, 1, False)
    second = prefill(t, 4, 9, states, 1, True)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole)
    torch.testing.assert_close(states, whole_states)


def test_varlen_batch_equals_separate_sequences():
    a, b = make(5, seed=2), make(3, seed=3)
    packed = {k: torch.cat([a[k], b[k]], dim=-1) if k in ("u", "delta", "z", "B", "C") else a[k] for k in a}
    b_same_params = {**b, "A": a["A"], "D": a["D"], "bias": a["bias"]}
    states = torch.zeros(4, DIM, DSTATE)
    z = packed["z"].clone()
    out = cpu_plugin.selective_scan_reference(
        packed["u"], states, packed["delta"], a["A"], packed["B"], packed["C"], a["D"], z, a["bias"],
        True, query_start_loc=torch.tensor([0, 5, 8]), cache_indices=torch.tensor([2, 3]),
        has_initial_state=torch.tensor([False, False]),
    )  # fmt: skip
    sa, sb = torch.zeros(4, DIM, DSTATE), torch.zeros(4, DIM, DSTATE)
    torch.testing.assert_close(out[:, :5], prefill(a, 0, 5, sa, 2, False))
    torch.testing.assert_close(out[:, 5:], prefill(b_same_params, 0, 3, sb, 3, False))
    torch.testing.assert_close(states[2], sa[2])
    torch.testing.assert_close(states[3], sb[3])
    assert states[0].abs().sum() == 0  # slot 0 is vLLM's null slot: untouched


def test_decode_skips_null_slot_padding():
    t = make(1, seed=4)
    states = torch.randn(3, DIM, DSTATE)
    before = states.clone()
    x = t["u"].T.repeat(2, 1)
    cpu_plugin.selective_state_update_reference(
        states, x, t["delta"].T.repeat(2, 1), t["A"], t["B"][0].T.repeat(2, 1), t["C"][0].T.repeat(2, 1),
        t["D"], t["bias"], z=t["z"].T.repeat(2, 1), dt_softplus=True,
        state_batch_indices=torch.tensor([2, 0]), out=torch.empty(2, DIM),
    )  # fmt: skip
    assert torch.equal(states[0], before[0])
    assert not torch.equal(states[2], before[2])


@pytest.fixture
def runner_class(monkeypatch):
    """vLLM's CPU model runner class, its patchable attributes restored after the test, and an
    import-hook list of the test's own."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    for name in ("_sample", "_bookkeeping_sync"):
        monkeypatch.setattr(CPUModelRunner, name, getattr(CPUModelRunner, name))
    monkeypatch.setattr(CPUModelRunner, "_jamba_seeded_rewind", False, raising=False)
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.setattr(cpu_plugin, "_PATCHED", False)
    return CPUModelRunner


def test_register_is_inert_off_cpu(monkeypatch, runner_class):
    from vllm.model_executor.layers.mamba import mamba_mixer
    from vllm.platforms import current_platform

    scan, update, init = (
        mamba_mixer.selective_scan_fn,
        mamba_mixer.selective_state_update,
        mamba_mixer.MambaMixer.__init__,
    )
    sample, bookkeeping, hooks = runner_class._sample, runner_class._bookkeeping_sync, list(sys.meta_path)
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
    cpu_plugin.register()
    assert mamba_mixer.selective_scan_fn is scan
    assert mamba_mixer.selective_state_update is update
    assert mamba_mixer.MambaMixer.__init__ is init
    assert (runner_class._sample, runner_class._bookkeeping_sync) == (sample, bookkeeping)
    assert sys.meta_path == hooks


def test_register_installs_kernels_and_rewind_on_cpu(monkeypatch, runner_class):
    from vllm.model_executor.layers.mamba import mamba_mixer
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("this machine's vLLM platform is not CPU")
    for name in ("selective_scan_fn", "selective_state_update"):
        monkeypatch.setattr(mamba_mixer, name, getattr(mamba_mixer, name))
    monkeypatch.setattr(mamba_mixer.MambaMixer, "__init__", mamba_mixer.MambaMixer.__init__)
    sample, bookkeeping = runner_class._sample, runner_class._bookkeeping_sync
    cpu_plugin.register()
    assert mamba_mixer.selective_scan_fn is cpu_plugin.selective_scan_reference
    assert mamba_mixer.selective_state_update is cpu_plugin.selective_state_update_reference
    # The runner module is loaded here, so it is patched at once; each method wrapped once.
    monkeypatch.setattr(cpu_plugin, "_PATCHED", False)
    cpu_plugin.register()
    assert runner_class._sample.__wrapped__ is sample
    assert runner_class._bookkeeping_sync.__wrapped__ is bookkeeping


# ---- seeded generators: vLLM's rewind of a discarded sample


def test_vllm_rewinds_where_the_patch_expects():
    """The patch relies on vLLM 0.32's model runner: one offset rewind, in `_bookkeeping_sync`, over
    the generators of the rows in `discard_request_mask`, after `_sample` in the same step, and a
    CPU runner that inherits both methods. Check this again when the vLLM pin moves."""
    from vllm.v1.worker import cpu_model_runner, gpu_model_runner

    runner = gpu_model_runner.GPUModelRunner
    assert inspect.getsource(gpu_model_runner).count("set_offset(") == 1
    bookkeeping = inspect.getsource(runner._bookkeeping_sync)
    assert "self.discard_request_mask.np[:num_reqs]" in bookkeeping
    assert "gen = self.input_batch.generators.get(int(i))" in bookkeeping
    assert "gen.set_offset(gen.get_offset() - 4)" in bookkeeping
    step = inspect.getsource(runner.sample_tokens)
    assert step.index("self._sample(") < step.index("self._bookkeeping_sync(")
    own = cpu_model_runner.CPUModelRunner.__dict__
    for name in ("_sample", "_bookkeeping_sync"):
        method = own.get(name, getattr(runner, name))
        assert getattr(method, "__wrapped__", method) is getattr(runner, name)


VOCAB = 48


def cpu_sampler_draw():
    """vLLM's CPU sampler: one `randint` per seeded row seeds a fused Gumbel-max kernel."""
    import vllm._custom_ops  # noqa: F401  (registers torch.ops._C.fused_gumbel_argmax)
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler

    sampler = TopKTopPSampler()
    return lambda logits, generators: sampler.forward_cpu(logits, generators, None, None)[0]


def native_sampler_draw():
    """vLLM's native sampler: a whole row of exponentials per seeded row."""
    from vllm.v1.sample.ops.topk_topp_sampler import random_sample

    return lambda logits, generators: random_sample(logits.softmax(-1), generators)


class VllmRunner:
    """What the rewind touches of vLLM 0.32's model runner: the rows' generators, the discard mask,
    a sampling step, and `_bookkeeping_sync`'s rewind (its code, verbatim)."""

    def __init__(self, seeds: dict[int, int], num_reqs: int, draw):
        generators = {row: torch.Generator().manual_seed(seed) for row, seed in seeds.items()}
        self.input_batch = SimpleNamespace(generators=generators, num_reqs=num_reqs)
        self.discard_request_mask = SimpleNamespace(np=np.zeros(8, dtype=bool))
        self.draw = draw

    def step(self, logits: torch.Tensor, discard: list[bool]) -> list[int | None]:
        """One engine step: the rows' tokens, None for a discarded one."""
        self.discard_request_mask.np[: len(discard)] = discard
        tokens = self._sample(logits.clone())
        self._bookkeeping_sync()
        return [None if dropped else int(token) for dropped, token in zip(discard, tokens)]

    def _sample(self, logits):
        return self.draw(logits, self.input_batch.generators)

    def _bookkeeping_sync(self):
        num_reqs = self.input_batch.num_reqs
        discard_sampled_tokens_req_indices = np.nonzero(self.discard_request_mask.np[:num_reqs])[0]
        for i in discard_sampled_tokens_req_indices:
            gen = self.input_batch.generators.get(int(i))
            if gen is not None:
                gen.set_offset(gen.get_offset() - 4)


def patched_runner_class():
    class CPUModelRunner(VllmRunner):
        pass

    cpu_plugin._patch_seeded_rewind(SimpleNamespace(CPUModelRunner=CPUModelRunner))
    return CPUModelRunner


def test_vllm_offset_rewind_kills_a_cpu_generator():
    runner = VllmRunner({0: 5}, 1, native_sampler_draw())
    with pytest.raises(RuntimeError, match="CPU Generator does not use offset"):
        runner.step(torch.randn(1, VOCAB), [True])


def test_patched_rewind_restores_the_generator_so_the_draws_repeat():
    runner = patched_runner_class()({0: 5}, 1, native_sampler_draw())
    fresh = torch.Generator().manual_seed(5)
    logits = torch.randn(1, VOCAB)
    for _ in range(3):  # three discarded prefill chunks
        assert runner.step(logits, [True]) == [None]
        assert torch.equal(runner.input_batch.generators[0].get_state(), fresh.get_state())
    assert runner.step(logits, [False]) == VllmRunner({0: 5}, 1, native_sampler_draw()).step(logits, [False])
    assert not torch.equal(runner.input_batch.generators[0].get_state(), fresh.get_state())  # kept: advanced


def test_discarded_row_without_a_saved_state_is_not_offset_rewound():
    runner = patched_runner_class()({0: 5}, 1, native_sampler_draw())
    generators = runner.input_batch.generators
    runner.discard_request_mask.np[0] = True
    runner._bookkeeping_sync()  # no sampling before it: nothing to restore, and no crash
    assert runner.input_batch.generators is generators and list(generators) == [0]


@pytest.mark.parametrize("draw", [cpu_sampler_draw, native_sampler_draw], ids=["forward_cpu", "native"])
def test_chunked_prefill_samples_the_same_tokens_as_one_step(draw):
    """Rows: 0 a seeded prompt prefilled in 3 discarded chunks then decoded; 1 a seeded request that
    decodes throughout; 2 an unseeded one. Row 0 gets the tokens of the same request prefilled in one
    step; row 1 those of it alone (the rewind leaves kept rows be)."""
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(3, VOCAB, generator=g) * 3 for _ in range(8)]
    chunks = 3
    batch = patched_runner_class()({0: 11, 1: 22}, 3, draw())
    steps = [batch.step(step, [i < chunks, False, False]) for i, step in enumerate(logits)]
    one_step = patched_runner_class()({0: 11}, 1, draw())
    alone = patched_runner_class()({0: 22}, 1, draw())
    row0 = [one_step.step(step[:1], [False])[0] for step in logits[chunks:]]
    row1 = [alone.step(step[1:2], [False])[0] for step in logits]
    assert [tokens[0] for tokens in steps] == [None] * chunks + row0
    assert [tokens[1] for tokens in steps] == row1
    unrewound = VllmRunner({0: 11}, 1, draw())  # a "fix" that dropped the rewind: other draws
    for step in logits[:chunks]:
        unrewound._sample(step[:1].clone())
    assert [unrewound.step(step[:1], [False])[0] for step in logits[chunks:]] != row0


def test_patch_when_imported_patches_a_module_as_it_loads(tmp_path, monkeypatch):
    name = "jamba_cpu_plugin_probe"
    (tmp_path / f"{name}.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    seen = []
    try:
        cpu_plugin._patch_when_imported(name, seen.append)
        cpu_plugin._patch_when_imported(name, seen.append)  # one hook per module name
        assert name not in sys.modules and not seen
        import jamba_cpu_plugin_probe as probe

        assert seen == [probe] and probe.VALUE == 1
        assert not any(isinstance(f, cpu_plugin._PatchOnImport) for f in sys.meta_path)
        cpu_plugin._patch_when_imported(name, seen.append)  # loaded: patched at once
        assert seen == [probe, probe]
    finally:
        sys.modules.pop(name, None)
