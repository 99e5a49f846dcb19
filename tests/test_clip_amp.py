"""Fused global-norm clipping and GradScaler hand-off, against torch's own combination."""

from __future__ import annotations

import math

import pytest
import torch

import fused.kernels.common as fk
from fused import FusedAdamW

from .conftest import DEVICES, KERNEL_DEVICES

SHAPES = [(), (7,), (1023,), (4097,), (33, 65)]


def _twins(device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ours = [torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_()
            for s in SHAPES]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    return ours, theirs


def _set_grads(params_pairs, step, scale=1.0):
    gen = torch.Generator().manual_seed(100 + step)
    for p, q in zip(*params_pairs):
        g = torch.randn(p.shape, generator=gen) * scale
        p.grad = g.to(device=p.device, dtype=p.dtype)
        q.grad = p.grad.clone()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0], ids=["l2", "l1", "inf", "l3"])
@pytest.mark.parametrize("max_norm", [0.5, 1e4], ids=["clips", "no-clip"])
def test_clip_then_step_matches_torch(device, norm_type, max_norm):
    ours, theirs = _twins(device)
    opt = FusedAdamW(ours, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(4):
        _set_grads((ours, theirs), step, scale=3.0)
        norm = opt.clip_grad_norm_(max_norm, norm_type)
        ref_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type, foreach=False)
        torch.testing.assert_close(norm.cpu(), ref_norm.cpu(), rtol=1e-5, atol=0)
        assert norm.device.type == torch.device(device).type
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_clip_leaves_grads_unchanged_and_applies_to_next_step_only(device):
    ours, theirs = _twins(device)
    opt = FusedAdamW(ours, lr=1e-2)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    _set_grads((ours, theirs), 0)
    before = [p.grad.clone() for p in ours]
    opt.clip_grad_norm_(0.1)
    for p, g in zip(ours, before):
        assert torch.equal(p.grad, g)  # no pass rewrites the grads
    torch.nn.utils.clip_grad_norm_(theirs, 0.1)
    opt.step()
    ref.step()
    _set_grads((ours, theirs), 1)  # no clip this time
    opt.step()
    ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_clip_is_one_reduction_launch(device):
    ours, _ = _twins(device)
    opt = FusedAdamW(ours)
    for p in ours:
        p.grad = torch.randn_like(p)
    opt.step()
    before = fk.launches
    opt.clip_grad_norm_(1.0)
    assert fk.launches - before == 1
    opt.step()
    assert fk.launches - before == 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_norm_behaves_like_torch(device, bad):
    ours, theirs = _twins(device)
    opt = FusedAdamW(ours, lr=1e-2)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    _set_grads((ours, theirs), 0)
    with torch.no_grad():
        ours[2].grad[5] = bad
        theirs[2].grad[5] = bad
    norm = opt.clip_grad_norm_(1.0)
    ref_norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert (torch.isnan(norm) and torch.isnan(ref_norm)) or norm.item() == ref_norm.item()
    opt.step()
    ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, equal_nan=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        _set_grads((ours, theirs), 1)
        with torch.no_grad():
            ours[0].grad.fill_(bad)
        opt.clip_grad_norm_(1.0, error_if_nonfinite=True)


def test_clip_bad_input():
    opt = FusedAdamW([torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match="Invalid norm_type: -1.0"):
        opt.clip_grad_norm_(1.0, norm_type=-1)
    with pytest.raises(ValueError, match="Invalid max_norm: -2.0"):
        opt.clip_grad_norm_(-2.0)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_end_to_end_with_clip(device):
    """GradScaler hands grad_scale/found_inf to the step; the clip reads the scale on the
    device; an overflow step is skipped (params and state untouched) and the scale adapts."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    model = model.to(device)
    twin = [p.detach().clone().requires_grad_() for p in model.parameters()]
    twin_model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                     torch.nn.Linear(32, 4)).to(device)
    with torch.no_grad():
        for p, q in zip(twin_model.parameters(), twin):
            p.copy_(q)
    opt = FusedAdamW(model.parameters(), lr=1e-2)
    ref = torch.optim.AdamW(twin_model.parameters(), lr=1e-2, foreach=False)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2)
    ref_scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2)
    x = torch.randn(64, 16, device=device)
    y = torch.randn(64, 4, device=device)
    for step in range(8):
        loss = torch.nn.functional.mse_loss(model(x), y)
        ref_loss = torch.nn.functional.mse_loss(twin_model(x), y)
        scaler.scale(loss).backward()
        ref_scaler.scale(ref_loss).backward()
        if step == 3:  # an overflow: both must skip
            for m in (model, twin_model):
                next(m.parameters()).grad[0, 0] = float("inf")
            snapshot = [p.detach().clone() for p in model.parameters()]
            state = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
        opt.clip_grad_norm_(0.5, grad_scaler=scaler)
        ref_scaler.unscale_(ref)
        torch.nn.utils.clip_grad_norm_(twin_model.parameters(), 0.5)
        scaler.step(opt)
        ref_scaler.step(ref)
        scaler.update()
        ref_scaler.update()
        if step == 3:
            for p, s_, st in zip(model.parameters(), snapshot, state):
                assert torch.equal(p.detach(), s_)
                assert torch.equal(opt.state[p]["exp_avg"], st)
        opt.zero_grad()
        ref.zero_grad()
        assert scaler.get_scale() == ref_scaler.get_scale()
        for p, q in zip(model.parameters(), twin_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert opt.state[next(model.parameters())]["step"].item() == 7  # one step skipped
