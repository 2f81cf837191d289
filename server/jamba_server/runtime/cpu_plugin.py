"""vLLM general plugin: make Jamba's Mamba1 layers run on vLLM's CPU backend.

vLLM loads this in every process it starts (entry point group `vllm.general_plugins`), TP workers
included. On the CPU platform the build lacks Mamba1's prefill scan op, its decode kernel expects the
Mamba2 state layout, and the oneDNN linear rejects the transposed input the mixer hands `out_proj`.
This module supplies plain-PyTorch versions of the two kernels and makes that input contiguous.
It also makes vLLM's rewind of a seeded request's generator work on CPU (see `_patch_seeded_rewind`).
On any other platform `register()` does nothing: CUDA keeps vLLM's own kernels.

Like the engine adapter, this module is allowed to import vllm; nothing else in the package is.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import logging
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

NULL_SLOT = 0  # vLLM's NULL_BLOCK_ID: a padding entry in the state-slot indices
CPU_MODEL_RUNNER = "vllm.v1.worker.cpu_model_runner"
_SAVED_STATES = "_jamba_generator_states_before_sampling"  # a CPUModelRunner attribute, one step long
_PATCHED = False


def selective_scan_reference(
    u,
    ssm_states,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    query_start_loc=None,
    cache_indices=None,
    has_initial_state=None,
    null_block_id=NULL_SLOT,
    **_unused,
):
    """Varlen Mamba1 prefill scan. u, delta, z: (dim, T); B, C: (1, dstate, T) or (dstate, T).

    Writes each sequence's final state into its slot and the gated output into z (returned).
    """
    if B.dim() == 3:
        B = B[0]
    if C.dim() == 3:
        C = C[0]
    if cache_indices is not None and cache_indices.dim() > 1:
        cache_indices = cache_indices[:, 0]
    A = A.float()
    dt_all = delta.float()
    if delta_bias is not None:
        dt_all = dt_all + delta_bias.float().unsqueeze(-1)
    if delta_softplus:
        dt_all = F.softplus(dt_all)
    out = z if z is not None else delta
    num_seqs = query_start_loc.numel() - 1
    for i in range(num_seqs):
        start, end = int(query_start_loc[i]), int(query_start_loc[i + 1])
        if end <= start:
            continue
        slot = int(cache_indices[i]) if cache_indices is not None else i
        if cache_indices is not None and slot == null_block_id:
            continue
        x = u[:, start:end].float()  # (dim, L)
        dt = dt_all[:, start:end]  # (dim, L)
        dA = torch.exp(dt.unsqueeze(-1) * A.unsqueeze(1))  # (dim, L, dstate)
        dBx = (dt * x).unsqueeze(-1) * B[:, start:end].float().t().unsqueeze(0)  # (dim, L, dstate)
        Ct = C[:, start:end].float().t()  # (L, dstate)
        if has_initial_state is not None and bool(has_initial_state[i]):
            h = ssm_states[slot].float()
        else:
            h = torch.zeros_like(dBx[:, 0])
        ys = []
        for t in range(end - start):
            h = dA[:, t] * h + dBx[:, t]
            ys.append(h @ Ct[t])
        y = torch.stack(ys, dim=-1)  # (dim, L)
        if D is not None:
            y = y + D.float().unsqueeze(-1) * x
        if z is not None:
            y = y * F.silu(z[:, start:end].float())
        out[:, start:end] = y.to(out.dtype)
        ssm_states[slot] = h.to(ssm_states.dtype)
    return out


def selective_state_update_reference(
    state,
    x,
    dt,
    A,
    B,
    C,
    D,
    dt_bias,
    z=None,
    dt_softplus=False,
    state_batch_indices=None,
    dst_state_batch_indices=None,
    null_block_id=NULL_SLOT,
    out=None,
    **_unused,
):
    """One Mamba1 decode step. state: (slots, dim, dstate); x, dt, z: (batch, dim); B, C: (batch, dstate)."""
    batch = x.shape[0]
    src = _flat_indices(state_batch_indices, batch, x.device)
    dst = _flat_indices(dst_state_batch_indices, batch, x.device) if dst_state_batch_indices is not None else src
    valid = src != null_block_id
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    xf = x.float()
    dA = torch.exp(dt.unsqueeze(-1) * A.float())  # (batch, dim, dstate)
    dBx = (dt * xf).unsqueeze(-1) * B.float().unsqueeze(1)
    h = state[src].float() * dA + dBx
    y = (h * C.float().unsqueeze(1)).sum(-1)
    if D is not None:
        y = y + D.float() * xf
    if z is not None:
        y = y * F.silu(z.float())
    if out is not None:
        out.copy_(y.to(out.dtype))
    if bool(valid.all()):
        state[dst] = h.to(state.dtype)
    else:
        state[dst[valid]] = h[valid].to(state.dtype)
    return out if out is not None else y.to(x.dtype)


def _flat_indices(indices, batch, device):
    if indices is None:
        return torch.arange(batch, device=device)
    if indices.dim() > 1:
        indices = indices[:, 0]
    return indices.long()


def _contiguous_input(forward):
    @functools.wraps(forward)
    def wrapper(input_, *args, **kwargs):
        return forward(input_.contiguous(), *args, **kwargs)

    return wrapper


def _patch_mamba1() -> None:
    from vllm.model_executor.layers.mamba import mamba_mixer

    mamba_mixer.selective_scan_fn = selective_scan_reference
    mamba_mixer.selective_state_update = selective_state_update_reference
    original_init = mamba_mixer.MambaMixer.__init__

    @functools.wraps(original_init)
    def init_with_contiguous_out_proj(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.out_proj.forward = _contiguous_input(self.out_proj.forward)

    mamba_mixer.MambaMixer.__init__ = init_with_contiguous_out_proj


def _discarded_rows(runner) -> list[int]:
    """Batch rows whose token this step vLLM throws away: prefills that are not yet complete."""
    num_reqs = runner.input_batch.num_reqs
    return [int(i) for i in runner.discard_request_mask.np[:num_reqs].nonzero()[0]]


def _sample_saving_states(original_sample):
    @functools.wraps(original_sample)
    def _sample(self, *args, **kwargs):
        generators = self.input_batch.generators
        saved = {}
        for row in _discarded_rows(self):
            gen = generators.get(row)
            if gen is not None:
                saved[row] = (gen, gen.get_state())
        setattr(self, _SAVED_STATES, saved)
        return original_sample(self, *args, **kwargs)

    return _sample


def _bookkeeping_restoring_states(original_bookkeeping):
    @functools.wraps(original_bookkeeping)
    def _bookkeeping_sync(self, *args, **kwargs):
        saved = getattr(self, _SAVED_STATES, None) or {}
        setattr(self, _SAVED_STATES, {})
        generators = self.input_batch.generators
        rewound = set()
        for row in _discarded_rows(self):
            gen = generators.get(row)
            if gen is None:
                continue
            entry = saved.get(row)
            if entry is not None and entry[0] is gen:
                gen.set_state(entry[1])
            rewound.add(row)
        if not rewound:
            return original_bookkeeping(self, *args, **kwargs)
        # vLLM's own rewind (`set_offset`) walks the discarded rows' generators; these are done.
        self.input_batch.generators = {row: g for row, g in generators.items() if row not in rewound}
        try:
            return original_bookkeeping(self, *args, **kwargs)
        finally:
            self.input_batch.generators = generators

    return _bookkeeping_sync


def _patch_seeded_rewind(module) -> None:
    """Rewind a seeded request's generator by state, not by offset, in vLLM's CPU model runner.

    Until a prompt is fully prefilled vLLM samples a token for the request at every step and throws it
    away (the "discard" rows); so that the first kept token draws what a prefill in one step draws,
    `_bookkeeping_sync` then moves each discarded row's generator back with
    `gen.set_offset(gen.get_offset() - 4)` (one sampling step's advance of a CUDA Philox generator).
    A CPU generator (Mersenne Twister) has no offset: `RuntimeError: CPU Generator does not use
    offset` killed the engine core on any seeded request prefilled in more than one step (a prompt
    over `max_num_batched_tokens`, Mamba's block-aligned chunks under prefix caching, the replay of a
    preempted request). Here `_sample` saves the `get_state()` of each discarded row's generator
    before the sampler draws, and `_bookkeeping_sync` `set_state`s it back, then hides those rows from
    vLLM's offset rewind. However many numbers the sampler drew, the generator reaches the prompt's
    last chunk exactly as `manual_seed` left it: the same draws, so the same tokens, as one step.
    """
    runner = module.CPUModelRunner
    if getattr(runner, "_jamba_seeded_rewind", False):
        return
    runner._sample = _sample_saving_states(runner._sample)
    runner._bookkeeping_sync = _bookkeeping_restoring_states(runner._bookkeeping_sync)
    runner._jamba_seeded_rewind = True


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs `patch(module)` right after the module `name` first executes in this process."""

    def __init__(self, name: str, patch: Callable[[Any], None]):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)  # once; the finders after it locate the module
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module, patch = spec.loader.exec_module, self.patch

        def exec_then_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_then_patch
        return spec


def _patch_when_imported(name: str, patch: Callable[[Any], None]) -> None:
    """Patch module `name` now if it is loaded, else as it loads. Only vLLM's worker process imports
    the model runner; importing it from `register()` would add about a second to the start of the
    API server and of the engine core, which never use it."""
    module = sys.modules.get(name)
    if module is not None:
        patch(module)
    elif not any(isinstance(f, _PatchOnImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport(name, patch))


def register() -> None:
    """Entry point for `vllm.general_plugins`. Idempotent; a no-op off the CPU platform."""
    global _PATCHED
    if _PATCHED:
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    _patch_mamba1()
    _patch_when_imported(CPU_MODEL_RUNNER, _patch_seeded_rewind)
    _PATCHED = True
    logger.info("jamba-server: Mamba1 CPU kernels and seeded-generator rewind installed")
