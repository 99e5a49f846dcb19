"""Low-precision state and stochastic rounding under DDP and FSDP2 (two CPU ranks over gloo, the
kernels in the Triton interpreter), against one process.

- DDP + bf16 params, bf16 state, stochastic rounding: the replicas stay bitwise identical (every
  rank builds the optimizer after the same ``torch.manual_seed``, so they share the rounding seed;
  the all-reduced grads are the same) and follow the single-process run.
- FSDP2 + 8-bit state: blocks never straddle a row, so each rank quantizes exactly the blocks the
  single process quantizes: params and the gathered (full) state match one process, and a
  full-state-dict checkpoint (codes + scales, DTensors sharded like the params) resumes the run.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .test_distributed import WORLD, _spawn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
STEPS = 4
LR = 1e-2


def _model() -> nn.Module:
    """Big enough for 8-bit state (the first two weights: 130 x 64 and 70 x 130, 65 / 35 rows
    per rank, over 4096 elements per shard), small enough for the interpreter."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 130), nn.Tanh(), nn.Linear(130, 70), nn.Tanh(),
                         nn.Linear(70, 3))


def _batch(step: int, rows: int = 16):
    gen = torch.Generator().manual_seed(500 + step)
    return torch.randn(rows, 64, generator=gen), torch.randn(rows, 3, generator=gen)


def _optimizer(params, state_dtype, stochastic):
    from fused import FusedAdamW

    torch.manual_seed(42)  # the rounding seed: the same on every rank and in the reference
    return FusedAdamW(params, lr=LR, weight_decay=0.1, state_dtype=state_dtype,
                      stochastic_rounding=stochastic)


def _single_process(dtype, state_dtype, stochastic, steps=STEPS):
    model = _model().to(dtype)
    opt = _optimizer(model.parameters(), state_dtype, stochastic)
    for step in range(steps):
        x, y = _batch(step)
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x.to(dtype)).float(), y).backward()
        opt.step()
    return model, opt


# ------------------------------------------------------------------------------ DDP
def _ddp_worker(rank: int, out_dir: str) -> None:
    import fused.kernels.common as fk

    model = _model().to(torch.bfloat16)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = _optimizer(ddp.parameters(), torch.bfloat16, True)
    for step in range(STEPS):
        x, y = (t.chunk(WORLD)[rank] for t in _batch(step))
        opt.zero_grad(set_to_none=True)
        F.mse_loss(ddp(x.bfloat16()).float(), y).backward()
        opt.step()
    torch.save({"params": {k: v.detach().clone() for k, v in model.named_parameters()},
                "interpreted": fk.interpreter_enabled(),
                "seed": opt.param_groups[0]["rounding_seed"]}, Path(out_dir) / f"rank{rank}.pt")


def test_ddp_bf16_stochastic_rounding_replicas_stay_identical(tmp_path):
    rank0, rank1 = _spawn(_ddp_worker, tmp_path)
    assert rank0["interpreted"] and rank0["seed"] == rank1["seed"]
    model, opt = _single_process(torch.bfloat16, torch.bfloat16, True)
    assert opt.param_groups[0]["rounding_seed"] == rank0["seed"]
    for name, p in model.named_parameters():
        assert torch.equal(rank0["params"][name], rank1["params"][name]), name
        # bf16 backward on half batches, averaged, is not the full batch's bf16 grad: a weight
        # whose grad is near zero may step the other way (Adam moves every weight ~lr), so
        # bound the mean difference and the share of weights that diverge
        diff = (rank0["params"][name].float() - p.detach().float()).abs()
        assert diff.mean() <= 0.02 * STEPS * LR, (name, diff.mean())
        assert (diff > 0.25 * STEPS * LR).float().mean() <= 0.01, name


# ------------------------------------------------------------------------------ FSDP2
def _sharded(state_dtype, stochastic):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = _model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, _optimizer(model.parameters(), state_dtype, stochastic)


def _train(model, opt, rank, steps):
    for step in steps:
        x, y = (t.chunk(WORLD)[rank] for t in _batch(step))
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        opt.clip_grad_norm_(1.0)
        opt.step()


def _fsdp_8bit_worker(rank: int, out_dir: str) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    model, opt = _sharded(torch.uint8, False)
    _train(model, opt, rank, range(STEPS))
    # a snapshot, as torch.save would take: state dicts hold references (the step count is the
    # live tensor), and this run goes on training before the copy is loaded
    full = copy.deepcopy({"model": get_model_state_dict(model, options=options),
                          "optim": get_optimizer_state_dict(model, opt, options=options)})
    local_kinds = {n: sorted(opt.state[p]) for n, p in model.named_parameters()}
    state = {fqn: {k: _full(v) for k, v in s.items()} for fqn, s in full["optim"]["state"].items()}
    # resume: a fresh sharded model and optimizer from the full checkpoint, then more steps
    _train(model, opt, rank, range(STEPS, STEPS + 2))
    uninterrupted = {k: v.full_tensor().detach().clone() for k, v in model.named_parameters()}
    model2, opt2 = _sharded(torch.uint8, False)
    set_model_state_dict(model2, full["model"], options=options)
    set_optimizer_state_dict(model2, opt2, full["optim"], options=options)
    _train(model2, opt2, rank, range(STEPS, STEPS + 2))
    resumed = {k: v.full_tensor().detach().clone() for k, v in model2.named_parameters()}
    torch.save({"state": state, "kinds": local_kinds, "uninterrupted": uninterrupted,
                "resumed": resumed, "params": {k: _full(v) for k, v in full["model"].items()}},
               Path(out_dir) / f"rank{rank}.pt")


def _full(t):
    """A plain tensor (a replicated DTensor from the full state dict: its whole value)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def test_fsdp2_8bit_state_matches_one_process_and_resumes(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2 (fully_shard)")
    from fused import formats

    results = _spawn(_fsdp_8bit_worker, tmp_path)
    model = _model()
    opt = _optimizer(model.parameters(), torch.uint8, False)
    for step in range(STEPS):
        x, y = _batch(step)
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
    for res in results:
        # the big weights are 8-bit on every rank, the rest fp32 (under 4096 per shard)
        assert "exp_avg_codes" in res["kinds"]["0.weight"]
        assert "exp_avg_codes" in res["kinds"]["2.weight"]
        assert "exp_avg" in res["kinds"]["4.weight"]
        for name, p in model.named_parameters():
            torch.testing.assert_close(res["params"][name], p.detach(), rtol=1e-4, atol=1e-6)
            ours, theirs = res["state"][name], opt.state[p]
            assert set(ours) == set(theirs), name
            if "exp_avg_codes" in ours:  # gathered to the whole tensor's layout
                assert ours["exp_avg_scales"].shape == formats.scales_shape(p.shape)
                m = formats.dequantize(ours["exp_avg_codes"], ours["exp_avg_scales"], True)
                m_ref = formats.dequantize(theirs["exp_avg_codes"], theirs["exp_avg_scales"],
                                           True)
                torch.testing.assert_close(m, m_ref, rtol=0.02, atol=1e-6)
        for name in res["uninterrupted"]:
            assert torch.equal(res["resumed"][name], res["uninterrupted"][name]), name
