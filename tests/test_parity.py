"""Drop-in parity with torch.optim.AdamW: PyTorch's own optimizer inputs, numerics, dtypes,
checkpoints, validation order, and the CPU fast path.

Every CPU test runs twice through the ``cpu_path`` fixture: the Triton kernel in the interpreter,
and the torch path CPU params take outside it (torch's fused CPU op / the reference).
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from fused import FusedAdamW

# the fp32 bar: params and state within 1e-5 relative of torch.optim.AdamW(foreach=False) after
# 10+ steps. An fp32 1 − β2 (9.99987e-4 for 0.999) is off by 1.3e-5 and fails it.
FP32 = dict(rtol=1e-5, atol=1e-7)


def _twin_run(make_ours, make_torch, shapes, dtype, steps=12, seed=0, device="cpu"):
    """Both optimizers over the same params and grads; returns (ours, theirs) params + state."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    # copy=True: for fp64, .to() would otherwise hand both optimizers the same tensor
    ours = [t.to(device=device, dtype=dtype, copy=True).requires_grad_() for t in init]
    theirs = [t.to(device=device, dtype=dtype, copy=True).requires_grad_() for t in init]
    assert not any(p is q for p, q in zip(ours, theirs))
    opt, ref = make_ours(ours), make_torch(theirs)
    for step in range(steps):
        for p, q in zip(ours, theirs):
            g = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * (1 + step % 3))
            p.grad = g.to(device=device, dtype=dtype)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    return (ours, opt), (theirs, ref)


def _assert_same(ours_pair, theirs_pair, **tol):
    (ours, opt), (theirs, ref) = ours_pair, theirs_pair
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), **tol, msg=lambda m: f"param: {m}")
        mine, other = opt.state[p], ref.state[q]
        assert set(mine) == set(other)
        for key in other:
            if key == "step":
                assert float(mine[key]) == float(other[key])
                continue
            assert mine[key].dtype == other[key].dtype, key
            torch.testing.assert_close(mine[key], other[key], **tol,
                                       msg=lambda m, key=key: f"{key}: {m}")


SHAPES = [(), (7,), (1023,), (4097,), (33, 65)]


# ------------------------------------------------------------------- 5. numerics
@pytest.mark.parametrize("kwargs", [
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=3e-3, betas=(0.8, 0.99), amsgrad=True),
    dict(lr=1e-3, betas=(0.3, 0.999), maximize=True, weight_decay=0.0),  # lerp weight >= 0.5
], ids=["default-betas", "amsgrad", "beta1-below-half"])
def test_fp32_within_1e5_relative_of_torch_after_12_steps(cpu_path, kwargs):
    ours, theirs = _twin_run(lambda ps: FusedAdamW(ps, **kwargs),
                             lambda ps: torch.optim.AdamW(ps, foreach=False, **kwargs),
                             SHAPES, torch.float32)
    _assert_same(ours, theirs, **FP32)


def test_the_bar_catches_an_fp32_one_minus_beta2():
    """The 1e-5 bar is tight enough: torch's own math with β2 rounded to fp32 before forming
    1 − β2 (the old kernel's error) fails it on exp_avg_sq."""
    beta2_fp32 = float(torch.tensor(0.999, dtype=torch.float32))
    ours, theirs = _twin_run(
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, beta2_fp32), foreach=False),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False), SHAPES, torch.float32)
    with pytest.raises(AssertionError, match="exp_avg_sq"):
        _assert_same(ours, theirs, **FP32)


# ------------------------------------------------------------------- 2. float64
def test_fp64_params_are_stepped_in_fp64(cpu_path):
    ours, theirs = _twin_run(lambda ps: FusedAdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=True),
                             lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1,
                                                          amsgrad=True, foreach=False),
                             SHAPES, torch.float64)
    _assert_same(ours, theirs, rtol=1e-12, atol=1e-14)
    params, opt = ours
    assert all(v.dtype == torch.float64 for v in opt.state[params[2]].values()
               if v.dim() > 0)


def test_fp64_keeps_a_change_below_fp32_resolution(cpu_path):
    p = torch.full((8,), 1.0, dtype=torch.float64, requires_grad=True)
    opt = FusedAdamW([p], lr=1e-12, weight_decay=0.0)
    p.grad = torch.ones_like(p)
    opt.step()  # the first Adam step moves each element by lr·sign(g)
    assert torch.equal(p.detach(), torch.full((8,), 1.0 - 1e-12, dtype=torch.float64))


# ------------------------------------------------------------------- 3. complex
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=["c64", "c128"])
def test_complex_params_step_as_real_pairs(cpu_path, dtype):
    tol = FP32 if dtype == torch.complex64 else dict(rtol=1e-12, atol=1e-14)
    ours, theirs = _twin_run(lambda ps: FusedAdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=True),
                             lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1,
                                                          amsgrad=True, foreach=False),
                             [(5,), (1023,), (3, 4)], dtype)
    _assert_same(ours, theirs, **tol)
    params, opt = ours
    assert opt.state[params[0]]["exp_avg"].dtype == dtype  # torch's checkpoint layout


# ------------------------------------------------------------------- 1. load_state_dict
@pytest.mark.parametrize("amsgrad", [False, True])
def test_save_load_save_is_the_same_state(cpu_path, amsgrad):
    ours, _ = _twin_run(lambda ps: FusedAdamW(ps, lr=1e-2, amsgrad=amsgrad),
                        lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=amsgrad),
                        [(9,), (4, 6)], torch.float32, steps=3)
    params, opt = ours
    first = opt.state_dict()
    fresh = FusedAdamW([p.detach().clone().requires_grad_() for p in params], lr=1.0,
                       amsgrad=amsgrad)
    fresh.load_state_dict(first)
    second = fresh.state_dict()
    assert first["param_groups"] == second["param_groups"]
    assert first["state"].keys() == second["state"].keys()
    for index, state in first["state"].items():
        assert state.keys() == second["state"][index].keys()  # no max_exp_avg_sq appears
        for key, value in state.items():
            assert torch.equal(value, second["state"][index][key]), key
    if not amsgrad:
        assert all("max_exp_avg_sq" not in s for s in fresh.state.values())


def test_non_amsgrad_checkpoint_into_amsgrad_optimizer_creates_max_on_first_step(cpu_path):
    p = torch.randn(10, requires_grad=True)
    src = torch.optim.AdamW([p], lr=1e-2)
    p.grad = torch.randn(10)
    src.step()
    q = p.detach().clone().requires_grad_()
    opt = FusedAdamW([q], lr=1e-2, amsgrad=True)
    sd = src.state_dict()
    sd["param_groups"][0]["amsgrad"] = True
    opt.load_state_dict(sd)
    assert "max_exp_avg_sq" not in opt.state[q]
    q.grad = torch.randn(10)
    opt.step()
    assert opt.state[q]["max_exp_avg_sq"].shape == (10,)


# ------------------------------------------------------------------- 4. validation order
def test_a_bad_default_is_refused_even_if_no_group_uses_it():
    ps = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        FusedAdamW([{"params": ps, "lr": 0.1}], lr=-1)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1: 1.5"):
        FusedAdamW([{"params": ps, "betas": (0.9, 0.99)}], betas=(0.9, 1.5))


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (dict(eps=-1.0), "Invalid epsilon value: -1.0"),
    (dict(betas=(1.0, 0.0)), "Invalid beta parameter at index 0: 1.0"),
    (dict(weight_decay=-1), "Invalid weight_decay value: -1"),
    (dict(betas=(0.9, torch.tensor(0.99))), "betas must be either both floats or both Tensors"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), "Tensor lr must be 1-element"),
])
def test_bad_settings_with_params_none_raise_value_error(kwargs, message):
    """As torch: settings are validated before ``params`` is looked at."""
    with pytest.raises(ValueError, match=message):
        FusedAdamW(None, **kwargs)
    with pytest.raises(ValueError, match=message):
        torch.optim.AdamW(None, **kwargs)


def test_params_none_with_good_settings_is_torchs_type_error():
    with pytest.raises(TypeError) as theirs:
        torch.optim.AdamW(None)
    with pytest.raises(TypeError) as ours:
        FusedAdamW(None)
    assert str(ours.value) == str(theirs.value)


def test_tensor_betas_are_read_once_as_floats(cpu_path):
    """1-element tensor betas (torch accepts them) become the floats they hold, at
    construction: same results as torch given the same tensors."""
    betas = (torch.tensor([[[0.9]]]), torch.tensor([[0.99]]))
    ours, theirs = _twin_run(lambda ps: FusedAdamW(ps, lr=1e-2, betas=betas),
                             lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=betas,
                                                          foreach=False),
                             [(17,)], torch.float32)
    _assert_same(ours, theirs, **FP32)
    assert ours[1].param_groups[0]["betas"] == (float(betas[0]), float(betas[1]))


# ------------------------------------------------------------------- 9. the CPU fast path
def test_cpu_step_is_one_torch_fused_call_per_group(monkeypatch):
    """Outside the interpreter, fp32 CPU params take torch's own fused AdamW op: one call per
    param group per step, whatever the number of tensors (not a per-tensor Python loop)."""
    from bench.param_sets import make_params, resnet50_shapes

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    shapes = [tuple(max(1, d // 8) for d in s) for s in resnet50_shapes()]
    params = make_params(shapes)
    decay, no_decay = params[::2], params[1::2]
    opt = FusedAdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3)
    calls = []
    real = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: calls.append(len(a[0])) or
                        real(*a, **k))
    opt.step()
    assert calls == [len(decay), len(no_decay)]
    assert [b.backend for b in opt._plan.buckets] == ["torch"]


def test_cpu_fast_path_leaves_grads_alone_with_grad_scale_and_clip(monkeypatch):
    """torch's fused op writes unscaled grads back into ``.grad``; ours hands it copies."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ours, theirs = [], []
    for s in [(33,), (4, 5)]:
        t = torch.randn(s)
        ours.append(t.clone().requires_grad_())
        theirs.append(t.clone().requires_grad_())
    opt = FusedAdamW(ours, lr=1e-2)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    for _ in range(3):
        grads = [torch.randn(p.shape) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad = g * 8.0
            q.grad = g.clone()
        before = [p.grad.clone() for p in ours]
        opt.clip_grad_norm_(0.5 * 8.0)  # the norm of the scaled grads
        opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(0.0)
        opt.step()
        torch.nn.utils.clip_grad_norm_(theirs, 0.5)
        ref.step()
        for p, b in zip(ours, before):
            assert torch.equal(p.grad, b)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, **FP32)


# ------------------------------------------------------------------- PyTorch's own inputs
def _torch_inputs():
    common = pytest.importorskip("torch.testing._internal.common_optimizers")
    # the CUDA list is a superset of the CPU one (it adds the `capturable` configs)
    return common.optim_inputs_func_adamw("cuda"), common.optim_error_inputs_func_adamw(
        "cpu", torch.float32)


# kwargs that select one of torch's implementations rather than the math: FusedAdamW is always
# one fused, capturable implementation, so they are dropped on both sides (capturable) ...
_IMPLEMENTATION_ONLY = ("capturable",)
# ... or make an input inapplicable: error inputs about combining torch's implementations
# (`foreach` with tensor LRs/betas, `fused` with `foreach`/`differentiable`) test options
# FusedAdamW does not have (passing them is a TypeError, as for any unknown keyword).
_NOT_APPLICABLE = ("foreach", "fused", "differentiable")


def _model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64],
                         ids=["fp32", "fp64", "c64"])
def test_pytorch_optim_inputs_value_parity(cpu_path, dtype):
    inputs, _ = _torch_inputs()
    assert len(inputs) >= 10
    for optim_input in inputs:
        kwargs = {k: v for k, v in optim_input.kwargs.items() if k not in _IMPLEMENTATION_ONLY}
        tol = FP32
        if dtype == torch.float64 and not isinstance(kwargs.get("lr"), torch.Tensor):
            tol = dict(rtol=1e-12, atol=1e-14)
        # (with the inputs' fp32 tensor LR torch forms 1 − lr·wd in fp32 tensor math even for
        # fp64 params, where we form it in double: for those the bar is the fp32 one)
        if dtype.is_complex:  # torch's complex test: one complex weight
            gen = torch.Generator().manual_seed(1)
            a = [torch.randn(6, 5, generator=gen, dtype=dtype).requires_grad_()]
            b = [a[0].detach().clone().requires_grad_()]
            grads = [torch.randn(6, 5, generator=gen, dtype=dtype) for _ in range(10)]
        else:
            a, b = list(_model(dtype).parameters()), list(_model(dtype).parameters())
            gen = torch.Generator().manual_seed(1)
            grads = [[torch.randn(p.shape, generator=gen, dtype=dtype) for p in a]
                     for _ in range(10)]
        ours = FusedAdamW(a, **kwargs)
        theirs = torch.optim.AdamW(b, foreach=False, **kwargs)
        for g in grads:
            for p, q, gr in zip(a, b, g if isinstance(g, list) else [g]):
                p.grad, q.grad = gr.clone(), gr.clone()
            ours.step()
            theirs.step()
        for p, q in zip(a, b):
            torch.testing.assert_close(p.detach(), q.detach(), **tol,
                                       msg=lambda m, d=optim_input.desc: f"{d}: {m}")
            for key, value in theirs.state[q].items():
                torch.testing.assert_close(ours.state[p][key].to(value.dtype), value, **tol,
                                           msg=lambda m, d=optim_input.desc, k=key:
                                           f"{d} {k}: {m}")


def test_pytorch_optim_error_inputs_same_exception_type():
    _, error_inputs = _torch_inputs()
    applied = 0
    for error_input in error_inputs:
        optim_input = error_input.optimizer_error_input
        if any(k in optim_input.kwargs for k in _NOT_APPLICABLE):
            with pytest.raises(TypeError, match="unexpected keyword argument"):
                FusedAdamW(optim_input.params, **optim_input.kwargs)
            continue
        if issubclass(error_input.error_type, Warning):
            with pytest.warns(error_input.error_type, match=error_input.error_regex):
                FusedAdamW(optim_input.params, **optim_input.kwargs)
        else:
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                FusedAdamW(optim_input.params, **optim_input.kwargs)
        applied += 1
    assert applied >= 9


def test_checkpoint_loads_with_weights_only_both_ways(cpu_path):
    ours, theirs = _twin_run(lambda ps: FusedAdamW(ps, lr=1e-2, amsgrad=True),
                             lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True,
                                                          foreach=False),
                             [(9,), (2, 3)], torch.float64, steps=2)
    for _, opt in (ours, theirs):
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.load(buf, weights_only=True)
