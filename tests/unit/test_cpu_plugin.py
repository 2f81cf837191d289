"""The CPU plugin's Mamba1 kernels: self-consistency (prefill vs decode, varlen vs separate)."""

import pytest
import torch

from jamba_server import cpu_plugin

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


def test_register_is_inert_off_cpu(monkeypatch):
    from vllm.model_executor.layers.mamba import mamba_mixer
    from vllm.platforms import current_platform

    scan, update, init = (
        mamba_mixer.selective_scan_fn,
        mamba_mixer.selective_state_update,
        mamba_mixer.MambaMixer.__init__,
    )
    monkeypatch.setattr(cpu_plugin, "_PATCHED", False)
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
    cpu_plugin.register()
    assert mamba_mixer.selective_scan_fn is scan
    assert mamba_mixer.selective_state_update is update
    assert mamba_mixer.MambaMixer.__init__ is init


def test_register_installs_kernels_on_cpu(monkeypatch):
    from vllm.model_executor.layers.mamba import mamba_mixer
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("this machine's vLLM platform is not CPU")
    for name in ("selective_scan_fn", "selective_state_update"):
        monkeypatch.setattr(mamba_mixer, name, getattr(mamba_mixer, name))
    monkeypatch.setattr(mamba_mixer.MambaMixer, "__init__", mamba_mixer.MambaMixer.__init__)
    monkeypatch.setattr(cpu_plugin, "_PATCHED", False)
    cpu_plugin.register()
    assert mamba_mixer.selective_scan_fn is cpu_plugin.selective_scan_reference
    assert mamba_mixer.selective_state_update is cpu_plugin.selective_state_update_reference
