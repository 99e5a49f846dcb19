"""FusedAdamW against torch.optim.AdamW and the torch reference.

On CPU the real Triton kernel runs in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1
when there is no GPU); the same tests run on CUDA when a device is present (``cuda`` marker).
"""

from __future__ import annotations

import io
import itertools

import pytest
import torch

import fused.kernels.common as fk
from fused import FusedAdamW, fused_adamw
from fused.reference import adamw_step_reference_

from .conftest import DEVICES, HAS_CUDA, INTERPRET, KERNEL_DEVICES
from .helpers import Mirror, capture_step, make_grads, make_params, no_host_sync

SHAPES = [(), (1,), (1023,), (4097,), (33, 65), (3, 5, 7)]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-7),  # the parity bar (tests/test_parity.py)
       # one bf16/fp16 ulp: the interpreter truncates fp32→bf16 stores, the GPU rounds
       torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
       torch.float16: dict(rtol=2**-10, atol=1e-5)}
kernel_only = pytest.mark.skipif(not INTERPRET and not HAS_CUDA,
                                 reason="the Triton kernel needs a GPU or TRITON_INTERPRET=1")


_params = make_params
_grads = make_grads


def _Mirror(params, **kw):
    """torch.optim.AdamW(foreach=False) on fp32 master copies of ``params``."""
    return Mirror(lambda master: torch.optim.AdamW(master, foreach=False, **kw), params)


def assert_close(actual, expected, dtype, what=""):
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), **TOL[dtype],
                               msg=lambda m: f"{what}: {m}")


@kernel_only
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("amsgrad,maximize,weight_decay,betas", [
    (False, False, 1e-2, (0.9, 0.999)),
    (True, False, 0.1, (0.9, 0.999)),
    (False, True, 0.0, (0.8, 0.99)),
    (True, True, 0.5, (0.0, 0.5)),
])
def test_matches_torch_adamw_with_changing_lr(device, dtype, amsgrad, maximize, weight_decay,
                                              betas):
    params = _params(SHAPES, dtype, device)
    mirror_params = [p.detach().clone() for p in params]
    kw = dict(betas=betas, eps=1e-8, weight_decay=weight_decay, amsgrad=amsgrad,
              maximize=maximize)
    opt = FusedAdamW(params, lr=1e-2, **kw)
    mirror = _Mirror(mirror_params, lr=1e-2, **kw)
    lr_tensor = opt.param_groups[0]["lr"]
    for step in range(8):
        lr = 1e-2 * (step + 1) / 8  # a schedule changing the LR tensor in place every step
        lr_tensor.fill_(lr)
        grads = _grads(SHAPES, step)
        for p, g in zip(params, grads):
            p.grad = g.to(device=device, dtype=dtype)
        start = [p.detach().clone() for p in params]
        opt.step()
        mirror.step([p.grad for p in params], lr=lr, start=start)
        for i, (p, q) in enumerate(zip(params, mirror_params)):
            assert_close(p, q, dtype, f"step {step} param {i} {tuple(p.shape)}")
    assert opt.param_groups[0]["lr"] is lr_tensor
    for p, q in zip(params, mirror.master):
        mine, ref = opt.state[p], mirror.opt.state[q]
        assert mine["exp_avg"].dtype == torch.float32
        assert_close(mine["exp_avg"], ref["exp_avg"], torch.float32, "exp_avg")
        assert_close(mine["exp_avg_sq"], ref["exp_avg_sq"], torch.float32, "exp_avg_sq")
        if amsgrad:
            assert_close(mine["max_exp_avg_sq"], ref["max_exp_avg_sq"], torch.float32, "max")
        assert mine["step"].item() == ref["step"].item() == 8


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_matches_torch_directly(device):
    """No mirror: FusedAdamW and torch.optim.AdamW side by side on the same fp32 params."""
    params = _params(SHAPES, torch.float32, device)
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt = FusedAdamW(params, lr=3e-3, weight_decay=0.05)
    ref = torch.optim.AdamW(twins, lr=3e-3, weight_decay=0.05, foreach=False)
    for step in range(6):
        for p, q, g in zip(params, twins, _grads(SHAPES, step)):
            p.grad = g.to(device)
            q.grad = g.to(device)
        opt.step()
        ref.step()
    for p, q in zip(params, twins):
        assert_close(p, q, torch.float32)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_param_groups_one_launch_per_dtype(device):
    shapes_a, shapes_b = [(7,), (300,), (5, 9)], [(4097,), (2, 3)]
    a32 = _params(shapes_a, torch.float32, device, seed=2)
    b32 = _params(shapes_b, torch.float32, device, seed=3)
    c16 = _params(shapes_b, torch.bfloat16, device, seed=4)
    groups = [dict(params=a32, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.99)),
              dict(params=b32, lr=5e-3, weight_decay=0.2),
              dict(params=c16, lr=2e-2, eps=1e-6)]
    opt = FusedAdamW(groups, lr=1e-3, weight_decay=1e-2)
    mirrors = [_Mirror([p.detach().clone() for p in g["params"]],
                       **{k: v for k, v in opt.param_groups[i].items()
                          if k in ("betas", "eps", "weight_decay")},
                       lr=opt.param_groups[i]["lr"].item())
               for i, g in enumerate(groups)]
    for step in range(4):
        for g in groups:
            for p, gr in zip(g["params"], _grads([p.shape for p in g["params"]], step)):
                p.grad = gr.to(device=device, dtype=p.dtype)
        start = [[p.detach().clone() for p in g["params"]] for g in groups]
        before = fk.launches
        opt.step()
        assert fk.launches - before == 2  # fp32 (two groups) and bf16: one launch each
        for g, m, st in zip(groups, mirrors, start):
            m.step([p.grad for p in g["params"]], start=st)
    for g, m in zip(groups, mirrors):
        for p, q in zip(g["params"], m.params):
            assert_close(p, q, p.dtype)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_launch_count_gpt2_like(device):
    """148 tensors of a GPT-2 layout (scaled down) step in one kernel launch (on CUDA the
    profiler sees exactly two: that kernel and the step-count add_)."""
    from bench.param_sets import gpt2_124m_shapes

    shapes = [tuple(max(1, d // 64) for d in s) for s in gpt2_124m_shapes()]
    params = _params(shapes, torch.float32, device)
    for p in params:
        p.grad = torch.randn_like(p)
    opt = FusedAdamW(params)
    before = fk.launches
    opt.step()
    assert fk.launches - before == 1
    if device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        opt.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            opt.step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        # the step-count add_ on the bucket's flat buffer + the AdamW kernel
        assert len(kernels) == 2, [e.name for e in kernels]


@pytest.mark.parametrize("device", DEVICES)
def test_params_without_grad_and_zero_size(device):
    params = _params([(5,), (0,), (3, 0), (4,)], torch.float32, device)
    opt = FusedAdamW(params, lr=0.1)
    params[0].grad = torch.ones(5, device=device)
    params[1].grad = torch.ones(0, device=device)
    params[2].grad = torch.ones(3, 0, device=device)
    untouched = params[3].detach().clone()
    opt.step()
    assert params[3] not in opt.state or len(opt.state[params[3]]) == 0
    torch.testing.assert_close(params[3].detach(), untouched, rtol=0, atol=0)
    assert opt.state[params[1]]["step"].item() == 1
    # the first AdamW step moves each element by lr·sign(grad) after the weight decay
    start = _params([(5,)], torch.float32, device)[0].detach().cpu()
    torch.testing.assert_close(params[0].detach().cpu(), start * (1 - 1e-3) - 0.1, rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_found_inf_skips_and_grad_scale_unscales(device, dtype):
    params = _params([(1023,), (4, 5)], dtype, device)
    opt = FusedAdamW(params, lr=1e-2, amsgrad=True)
    mirror = _Mirror([p.detach().clone() for p in params], lr=1e-2, amsgrad=True)
    for step in range(2):
        grads = _grads([p.shape for p in params], step)
        for p, g in zip(params, grads):
            p.grad = g.to(device=device, dtype=dtype)
        start = [p.detach().clone() for p in params]
        opt.step()
        mirror.step(grads, start=start)
    snapshot = [p.detach().clone() for p in params]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    scale = torch.tensor(1024.0, device=device)
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    opt.grad_scale, opt.found_inf = scale, torch.tensor(1.0, device=device)
    opt.step()
    for p, s, st in zip(params, snapshot, states):
        assert torch.equal(p.detach(), s)
        for k, v in opt.state[p].items():
            assert torch.equal(v, st[k]), k
    # scaled grads + found_inf = 0: same as stepping on the unscaled grads
    grads = _grads([p.shape for p in params], 7)
    for p, g in zip(params, grads):
        p.grad = (g * 1024.0).to(device=device, dtype=dtype)
    opt.found_inf = torch.tensor(0.0, device=device)
    start = [p.detach().clone() for p in params]
    opt.step()
    del opt.grad_scale, opt.found_inf
    mirror.step(grads, start=start)
    for p, q in zip(params, mirror.params):
        assert_close(p, q, dtype)
    assert opt.state[params[0]]["step"].item() == 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_round_trips_with_torch_adamw(device, amsgrad):
    shapes = [(9,), (4, 6)]
    ours = _params(shapes, torch.float32, device)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = FusedAdamW(ours, lr=2e-3, amsgrad=amsgrad)
    ref = torch.optim.AdamW(theirs, lr=2e-3, amsgrad=amsgrad, foreach=False)
    for step in range(3):
        for p, q, g in zip(ours, theirs, _grads(shapes, step)):
            p.grad, q.grad = g.to(device), g.to(device)
        opt.step()
        ref.step()
    # ours → torch, through torch.save / torch.load(weights_only=True)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert isinstance(sd["param_groups"][0]["lr"], float)
    twins = [p.detach().clone().requires_grad_() for p in ours]
    torch_from_ours = torch.optim.AdamW(twins, lr=1.0, amsgrad=amsgrad, foreach=False)
    torch_from_ours.load_state_dict(sd)
    # torch → ours
    mine = [p.detach().clone().requires_grad_() for p in theirs]
    ours_from_torch = FusedAdamW(mine, lr=1.0, amsgrad=amsgrad)
    lr_tensor = ours_from_torch.param_groups[0]["lr"]
    ours_from_torch.load_state_dict(ref.state_dict())
    assert ours_from_torch.param_groups[0]["lr"] is lr_tensor
    assert lr_tensor.item() == pytest.approx(2e-3)
    assert ours_from_torch.state[mine[0]]["step"].device == mine[0].device
    for step in range(3, 6):
        g = _grads(shapes, step)
        for ps in (ours, theirs, twins, mine):
            for p, gr in zip(ps, g):
                p.grad = gr.to(device)
        for o in (opt, ref, torch_from_ours, ours_from_torch):
            o.step()
    for a, b, c, d in zip(ours, theirs, twins, mine):
        for x in (b, c, d):
            assert_close(a, x, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_load_keeps_fp32_state_for_bf16_params(device):
    params = _params([(33,)], torch.bfloat16, device)
    params[0].grad = torch.randn(33, device=device, dtype=torch.bfloat16)
    opt = FusedAdamW(params)
    opt.step()
    exp_avg = opt.state[params[0]]["exp_avg"].clone()
    fresh = FusedAdamW([params[0].detach().clone().requires_grad_()])
    fresh.load_state_dict(opt.state_dict())
    state = next(iter(fresh.state.values()))
    assert state["exp_avg"].dtype == torch.float32
    assert torch.equal(state["exp_avg"], exp_avg)  # not rounded through bf16


@kernel_only
@pytest.mark.parametrize("device", DEVICES)
def test_step_reads_no_device_value_on_the_host(device, monkeypatch):
    params = _params(SHAPES, torch.float32, device)
    opt = FusedAdamW(params, lr=1e-3, amsgrad=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # state exists; tables built

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a tensor value inside step()")

    for name in ("item", "__float__", "__bool__", "__int__", "__index__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    opt.param_groups[0]["lr"].fill_(5e-4)
    opt.grad_scale = torch.tensor(2.0, device=device)
    opt.found_inf = torch.tensor(0.0, device=device)
    opt.step()
    monkeypatch.undo()


@pytest.mark.parametrize("device", DEVICES)
def test_float_lr_assignment_is_adopted(device):
    params = _params([(17,)], torch.float32, device)
    twin = [params[0].detach().clone().requires_grad_()]
    opt = FusedAdamW(params, lr=1e-3)
    ref = torch.optim.AdamW(twin, lr=1e-3, foreach=False)
    lr_tensor = opt.param_groups[0]["lr"]
    assert lr_tensor.dim() == 0 and lr_tensor.dtype == torch.float32
    assert lr_tensor.device.type == torch.device(device).type
    opt.param_groups[0]["lr"] = 0.25  # the anti-pattern: rebinding with a float
    ref.param_groups[0]["lr"] = 0.25
    params[0].grad = torch.randn(17, device=device)
    twin[0].grad = params[0].grad.clone()
    opt.step()
    ref.step()
    assert opt.param_groups[0]["lr"] is lr_tensor
    assert lr_tensor.item() == 0.25
    assert_close(params[0], twin[0], torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_scheduler_drives_the_lr_tensor(device):
    params = _params([(65,)], torch.float32, device)
    twin = [params[0].detach().clone().requires_grad_()]
    opt = FusedAdamW(params, lr=0.1)
    ref = torch.optim.AdamW(twin, lr=0.1, foreach=False)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, ref)]
    lr_tensor = opt.param_groups[0]["lr"]
    for step in range(6):
        g = _grads([(65,)], step)[0]
        params[0].grad, twin[0].grad = g.to(device), g.to(device)
        opt.step()
        ref.step()
        for s in scheds:
            s.step()
        assert lr_tensor.item() == pytest.approx(ref.param_groups[0]["lr"])
    assert opt.param_groups[0]["lr"] is lr_tensor
    assert_close(params[0], twin[0], torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_params_are_updated_correctly(device):
    base = torch.randn(6, 8, device=device)
    strided = base[:, ::2]  # not dense: the kernel gets a contiguous working copy
    transposed = torch.randn(5, 7, device=device).t()  # dense, permuted: walked in place
    params = [strided.requires_grad_(), transposed.requires_grad_()]
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt = FusedAdamW(params, lr=1e-2)
    ref = torch.optim.AdamW(twins, lr=1e-2, foreach=False)
    untouched = base[:, 1::2].clone()
    for step in range(3):
        for p, q, g in zip(params, twins, _grads([p.shape for p in params], step)):
            p.grad, q.grad = g.to(device), g.to(device)
        opt.step()
        ref.step()
    for p, q in zip(params, twins):
        assert_close(p, q, torch.float32)
    assert torch.equal(base[:, 1::2], untouched)


@pytest.mark.parametrize("device", DEVICES)
def test_functional_form_matches_the_class(device):
    shapes = [(31,), (4, 4)]
    a = _params(shapes, torch.float32, device)
    b = [p.detach().clone() for p in a]
    opt = FusedAdamW(a, lr=1e-2, weight_decay=0.1)
    exp_avgs = [torch.zeros_like(p) for p in b]
    exp_avg_sqs = [torch.zeros_like(p) for p in b]
    steps = [torch.zeros((), device=device) for _ in b]
    lr = torch.tensor(1e-2, device=device)
    for step in range(3):
        grads = [g.to(device) for g in _grads(shapes, step)]
        for p, g in zip(a, grads):
            p.grad = g
        opt.step()
        fused_adamw(b, grads, exp_avgs, exp_avg_sqs, None, steps, lr=lr, beta1=0.9,
                    beta2=0.999, eps=1e-8, weight_decay=0.1)
    for p, q in zip(a, b):
        assert torch.equal(p.detach(), q)
    assert steps[0].item() == 3


def test_reference_matches_torch_for_one_step():
    p = torch.randn(50)
    q = p.clone().requires_grad_()
    g = torch.randn(50)
    q.grad = g.clone()
    torch.optim.AdamW([q], lr=0.01, weight_decay=0.1, foreach=False).step()
    m, v = torch.zeros(50), torch.zeros(50)
    adamw_step_reference_(p, g, m, v, None, torch.tensor(1.0), lr=torch.tensor(0.01), beta1=0.9,
                          beta2=0.999, eps=1e-8, weight_decay=0.1, maximize=False)
    torch.testing.assert_close(p, q.detach())


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-1e-3), "Invalid learning rate: -0.001"),
    (dict(lr=float("nan")), "Invalid learning rate: nan"),
    (dict(lr=torch.tensor(-1.0)), "Invalid learning rate: -1.0"),
    (dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
    (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
    (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
    (dict(betas=(0.9,)), r"Invalid betas: \(0.9,\)"),
    (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
])
def test_invalid_hyperparameters_name_argument_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FusedAdamW([torch.zeros(3, requires_grad=True)], **kwargs)


def test_invalid_group_hyperparameter_is_refused_and_group_not_added():
    opt = FusedAdamW([torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match="Invalid learning rate: -2"):
        opt.add_param_group(dict(params=[torch.zeros(2, requires_grad=True)], lr=-2))
    assert len(opt.param_groups) == 1


def test_sparse_grads_are_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt = FusedAdamW(emb.parameters())
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_group_on_two_devices_is_refused():
    params = [torch.zeros(3, requires_grad=True), torch.zeros(3, device="meta",
                                                              requires_grad=True)]
    with pytest.raises(ValueError, match="all params of a param group must be on one device"):
        FusedAdamW(params)


def test_integer_params_are_refused():
    with pytest.raises(ValueError,
                       match="params must be floating point or complex, got torch.int64"):
        FusedAdamW([torch.zeros(3, dtype=torch.int64)])


# ---------------------------------------------------------------------------------- CUDA only
@pytest.mark.cuda
def test_no_host_sync_over_100_scheduled_steps():
    from warmup import GradualWarmupScheduler

    params = _params(SHAPES, torch.float32, "cuda")
    opt = FusedAdamW(params, lr=1e-3)
    sched = GradualWarmupScheduler(
        opt, multiplier=4, total_epoch=50,
        after_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    sched.step()
    with no_host_sync():
        for _ in range(100):
            opt.step()
            sched.step()


@pytest.mark.cuda
def test_cuda_graph_capture_with_lr_changed_between_replays():
    shapes = [(1023,), (64, 65), (4097,)]
    params = _params(shapes, torch.float32, "cuda")
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt = FusedAdamW(params, lr=1e-3)
    eager = FusedAdamW(twins, lr=1e-3)
    static_grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, static_grads):
        p.grad = g
    for q, g in zip(twins, static_grads):
        q.grad = g.clone()
    graph = capture_step(opt)  # warm-up step on a side stream, then the capture
    eager.step()
    lr_tensor = opt.param_groups[0]["lr"]
    for i in range(10):
        lr = 1e-3 * (i + 2)
        lr_tensor.fill_(lr)  # what a scheduler does between replays
        eager.param_groups[0]["lr"].fill_(lr)
        new = [torch.randn_like(g) for g in static_grads]
        for g, n, q in zip(static_grads, new, twins):
            g.copy_(n)
            q.grad.copy_(n)
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.cuda
def test_tensor_over_2_pow_31_elements():
    n = 2**31 + 4096 + 3
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a GPU with 40 GiB")
    p = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
    p[-5000:] = torch.randn(5000, device="cuda", dtype=torch.bfloat16)
    p.requires_grad_()
    p.grad = torch.zeros_like(p)
    p.grad[-5000:] = torch.randn(5000, device="cuda", dtype=torch.bfloat16)
    tail = p.detach()[-5000:].clone()
    tail_grad = p.grad[-5000:].clone()
    opt = FusedAdamW([p], lr=1e-2)
    opt.step()
    m, v = torch.zeros(5000, device="cuda"), torch.zeros(5000, device="cuda")
    adamw_step_reference_(tail, tail_grad, m, v, None, torch.ones((), device="cuda"),
                          lr=torch.tensor(1e-2, device="cuda"), beta1=0.9, beta2=0.999,
                          eps=1e-8, weight_decay=1e-2, maximize=False)
    torch.testing.assert_close(p.detach()[-5000:], tail, **TOL[torch.bfloat16])
    torch.testing.assert_close(opt.state[p]["exp_avg"][-5000:], m)
    del p, opt


@pytest.mark.cuda
def test_every_hyperparameter_combination_compiles_on_cuda():
    for amsgrad, maximize, dtype in itertools.product([False, True], [False, True],
                                                      [torch.float32, torch.bfloat16,
                                                       torch.float16]):
        params = _params([(4097,)], dtype, "cuda")
        params[0].grad = torch.randn_like(params[0])
        FusedAdamW(params, amsgrad=amsgrad, maximize=maximize).step()
        assert torch.isfinite(params[0]).all()
