"""FusedSGD, FusedLARS and FusedLAMB against torch.optim.SGD, timm.optim.Lars / Lamb and the
readable reference in fused/reference.py.

Every CPU test runs twice through the ``cpu_path`` fixture: the Triton kernels in the
interpreter, and the torch path CPU params take outside it (the reference). timm is installed
without its dependencies (``pip install --no-deps timm==1.0.29``: ``import timm`` needs
torchvision), so :func:`timm_optimizers` loads ``timm/optim/lamb.py`` and ``lars.py`` on their
own; without timm the LARS / LAMB parity tests run against the reference (``_RefLars``,
``_RefLamb``), and the tests that check that reference against timm are skipped.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import fused.kernels.common as fk
from fused import FusedLAMB, FusedLARS, FusedSGD
from fused.reference import lamb_global_clip, lamb_math, lars_math, sgd_math

from .conftest import INTERPRET
from .helpers import Mirror, capture_step, make_grads, make_params, no_host_sync

SHAPES = [(), (1,), (1023,), (4097,), (33, 65), (3, 5, 7)]
STEPS = 8
# fp32: torch's own math within float32 rounding. SGD / LARS moves a param by O(lr · g) per
# step, so the absolute bar is a few ulps of the params (O(1)) rather than AdamW's 1e-7.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6),
       # one bf16 / fp16 ulp: each step is checked on its own (see _Mirror)
       torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
       torch.float16: dict(rtol=2**-10, atol=1e-5)}
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ------------------------------------------------------------------------------------ timm
def timm_optimizers(required: bool = True):
    """(Lamb, Lars) from the installed timm (loaded without ``timm/__init__``, which imports
    torchvision: the bench's loader); skips (or returns None) without timm."""
    from bench.large_batch_step import load_timm_optimizers

    timm = load_timm_optimizers()
    if timm is None and required:
        pytest.skip("needs timm: pip install --no-deps timm==1.0.29")
    return timm


class _RefLars(torch.optim.Optimizer):
    """timm.optim.Lars transcribed: :func:`fused.reference.lars_math` per tensor."""

    def __init__(self, params, lr=1.0, momentum=0, dampening=0, weight_decay=0, nesterov=False,
                 trust_coeff=0.001, eps=1e-8, trust_clip=False, always_adapt=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip,
                                      always_adapt=always_adapt))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            hyper = {k: v for k, v in group.items() if k != "params" and k != "lr"}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                buf = state.get("momentum_buffer")
                step = torch.tensor(1.0 if buf is None else 2.0)
                new_p, buf = lars_math(p, p.grad, torch.zeros_like(p) if buf is None else buf,
                                       lr=torch.tensor(group["lr"], dtype=torch.float64),
                                       step=step, **hyper)
                p.copy_(new_p)
                if group["momentum"] != 0:
                    state["momentum_buffer"] = buf


class _RefLamb(torch.optim.Optimizer):
    """timm.optim.Lamb transcribed: the global clip, one step count per group,
    :func:`fused.reference.lamb_math` per tensor."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6,
                 weight_decay=0.01, grad_averaging=True, max_grad_norm=1.0, trust_clip=False,
                 always_adapt=False):
        super().__init__(params, dict(lr=lr, bias_correction=bias_correction, betas=betas,
                                      eps=eps, weight_decay=weight_decay,
                                      grad_averaging=grad_averaging, max_grad_norm=max_grad_norm,
                                      trust_clip=trust_clip, always_adapt=always_adapt))

    @torch.no_grad()
    def step(self):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        clip = lamb_global_clip(grads, self.defaults["max_grad_norm"])
        for group in self.param_groups:
            group["step"] = group.get("step", torch.tensor(0.0)) + 1
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                new_p, state["exp_avg"], state["exp_avg_sq"] = lamb_math(
                    p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                    lr=torch.tensor(group["lr"], dtype=torch.float64), step=group["step"],
                    beta1=beta1, beta2=beta2,
                    eps=group["eps"], weight_decay=group["weight_decay"],
                    grad_averaging=group["grad_averaging"],
                    bias_correction=group["bias_correction"], trust_clip=group["trust_clip"],
                    always_adapt=group["always_adapt"], clip=clip)
                p.copy_(new_p)


def reference_class(kind: str):
    """What FusedX is checked against: torch.optim.SGD, timm's Lars / Lamb (or, without timm,
    their transcription in fused/reference.py)."""
    if kind == "sgd":
        return lambda ps, **kw: torch.optim.SGD(ps, foreach=False, **kw)
    timm = timm_optimizers(required=False)
    if kind == "lars":
        return timm[1] if timm else _RefLars
    return timm[0] if timm else _RefLamb


FUSED = {"sgd": FusedSGD, "lars": FusedLARS, "lamb": FusedLAMB}


# ------------------------------------------------------------------------------------ helpers
def _params(shapes, dtype, seed=0):
    return make_params(shapes, dtype, "cpu", seed)


_grads = make_grads


def _recipe_groups(params, weight_decay):
    """The recipes' groups: weight decay (and so, for LARS / LAMB, adaptation) on matrices and
    convolutions only, none on biases and norm weights (1-D, 0-D)."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _Mirror(make, params):
    """The reference optimizer on fp32 master copies of (copies of) our params."""
    return Mirror(make, [p.detach().clone() for p in params])


def assert_close(actual, expected, dtype, what=""):
    torch.testing.assert_close(actual.detach().float(), expected.detach().float(), **TOL[dtype],
                               msg=lambda m: f"{what}: {m}")


def _twin_steps(kind, kwargs, dtype=torch.float32, steps=STEPS, shapes=SHAPES, groups=True,
                lr_schedule=None):
    """Ours and the reference over the same params, grads and LR schedule (the LR tensor
    ``fill_``ed every step); returns (params, opt, mirror)."""
    params = _params(shapes, dtype)
    kwargs = dict(kwargs)
    wd = kwargs.pop("weight_decay", 0.0)
    opt = FUSED[kind](_recipe_groups(params, wd) if groups else params, weight_decay=wd, **kwargs)
    make = reference_class(kind)
    mirror = _Mirror(lambda ps: make(_recipe_groups(ps, wd) if groups else ps, weight_decay=wd,
                                     **kwargs), params)
    for step in range(steps):
        if lr_schedule is not None:
            lr = lr_schedule(step)
            for group in opt.param_groups:
                group["lr"].fill_(lr)
            for group in mirror.opt.param_groups:
                group["lr"] = lr
        grads = _grads(shapes, step)
        for p, g in zip(params, grads):
            p.grad = g.to(dtype)
        start = [p.detach().clone() for p in params]
        opt.step()
        mirror.step([p.grad for p in params], start)
        for i, (p, q) in enumerate(zip(params, mirror.params)):
            assert_close(p, q, dtype, f"{kind} step {step} param {i} {tuple(p.shape)}")
    return params, opt, mirror


def _assert_state_matches(kind, params, opt, mirror):
    for p, q in zip(params, mirror.master):
        theirs = mirror.opt.state[q]
        for key, value in theirs.items():
            if key == "step":
                continue
            assert opt.state[p][key].dtype == torch.float32, key
            assert_close(opt.state[p][key], value, torch.float32, key)


# ------------------------------------------------------------------------------------ parity
CONFIGS = {
    "sgd": [dict(lr=0.1),
            dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
            dict(lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True),
            dict(lr=0.1, momentum=0.5, dampening=0.3, maximize=True)],
    "lars": [dict(lr=1.0, momentum=0.9, weight_decay=1e-2),
             dict(lr=0.5, momentum=0.9, weight_decay=1e-2, nesterov=True, trust_coeff=0.02,
                  trust_clip=True),
             dict(lr=0.2, weight_decay=1e-3, dampening=0.1, always_adapt=True, eps=1e-3)],
    "lamb": [dict(lr=1e-2, weight_decay=0.1),
             dict(lr=1e-2, weight_decay=0.1, max_grad_norm=None, trust_clip=True),
             dict(lr=2e-2, weight_decay=0.01, betas=(0.8, 0.99), grad_averaging=False,
                  bias_correction=False, always_adapt=True, max_grad_norm=3.0),
             dict(lr=5e-3, weight_decay=0.0, eps=1e-8, max_grad_norm=0.5)],
}
CASES = [pytest.param(kind, dict(cfg), id=f"{kind}-{i}")
         for kind, cfgs in CONFIGS.items() for i, cfg in enumerate(cfgs)]


@pytest.mark.parametrize("kind,kwargs", CASES)
def test_fp32_matches_the_reference_optimizer_with_a_changing_lr(cpu_path, kind, kwargs):
    """torch.optim.SGD / timm's Lars and Lamb, 8 steps, shapes that are not multiples of the
    block, the recipes' groups (no weight decay, no adaptation on 1-D params), the LR tensor
    changed in place every step."""
    base = kwargs["lr"]
    params, opt, mirror = _twin_steps(kind, kwargs,
                                      lr_schedule=lambda s: base * (s + 1) / STEPS)
    _assert_state_matches(kind, params, opt, mirror)
    assert all(float(opt.state[p]["step"]) == STEPS for p in params)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind,kwargs", [
    pytest.param("sgd", dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True), id="sgd"),
    pytest.param("lars", dict(lr=1.0, momentum=0.9, weight_decay=1e-2, trust_coeff=0.01),
                 id="lars"),
    pytest.param("lamb", dict(lr=1e-2, weight_decay=0.1), id="lamb"),
])
def test_low_precision_params_keep_fp32_state(cpu_path, kind, kwargs, dtype):
    params, opt, mirror = _twin_steps(kind, kwargs, dtype=dtype, steps=4,
                                      shapes=[(1023,), (33, 65), (7,)])
    _assert_state_matches(kind, params, opt, mirror)


def test_fp64_params_are_stepped_in_fp64(cpu_path):
    params = _params([(9,), (4, 6)], torch.float64)
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt = FusedSGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    ref = torch.optim.SGD(twins, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True,
                          foreach=False)
    for step in range(4):
        for p, q, g in zip(params, twins, _grads([(9,), (4, 6)], step)):
            p.grad, q.grad = g.double(), g.double()
        opt.step()
        ref.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        assert opt.state[p]["momentum_buffer"].dtype == torch.float64


def test_complex_params_step_as_real_pairs(cpu_path):
    """SGD's math is linear in the grad: a complex param steps as its real/imaginary pairs,
    equal to torch.optim.SGD on the complex tensor."""
    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(5, 3, generator=gen, dtype=torch.complex64).requires_grad_()]
    b = [a[0].detach().clone().requires_grad_()]
    opt = FusedSGD(a, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    ref = torch.optim.SGD(b, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True,
                          foreach=False)
    for _ in range(3):
        g = torch.randn(5, 3, generator=gen, dtype=torch.complex64)
        a[0].grad, b[0].grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(a[0], b[0], **TOL[torch.float32])
    assert opt.state[a[0]]["momentum_buffer"].dtype == torch.complex64


# ------------------------------------------------------------------------------------ reference
@pytest.mark.parametrize("kwargs", CONFIGS["sgd"], ids=[str(i) for i in range(4)])
def test_sgd_reference_is_torch_sgd(kwargs):
    p = torch.randn(50)
    q = p.clone().requires_grad_()
    opt = torch.optim.SGD([q], foreach=False, **kwargs)
    buf = torch.zeros(50)
    for step in range(1, 4):
        g = torch.randn(50)
        q.grad = g.clone()
        opt.step()
        p, buf = sgd_math(p, g, buf, lr=torch.tensor(kwargs["lr"]), step=torch.tensor(float(step)),
                          momentum=kwargs.get("momentum", 0), dampening=kwargs.get("dampening", 0),
                          weight_decay=kwargs.get("weight_decay", 0),
                          nesterov=kwargs.get("nesterov", False),
                          maximize=kwargs.get("maximize", False))
        torch.testing.assert_close(p, q.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["lars", "lamb"])
@pytest.mark.parametrize("index", range(3))
def test_our_reference_is_timms_math(kind, index):
    """fused/reference.py's LARS / LAMB (as a plain optimizer) against timm over 8 steps, fp32
    and fp64, with the recipes' param groups."""
    lamb, lars = timm_optimizers()
    kwargs = dict(CONFIGS[kind][index])
    wd = kwargs.pop("weight_decay")
    theirs_cls, ours_cls = (lars, _RefLars) if kind == "lars" else (lamb, _RefLamb)
    for dtype, tol in ((torch.float32, TOL[torch.float32]),
                       (torch.float64, dict(rtol=1e-12, atol=1e-13))):
        a = _params(SHAPES, dtype)
        b = [p.detach().clone().requires_grad_() for p in a]
        ours = ours_cls(_recipe_groups(a, wd), weight_decay=wd, **kwargs)
        theirs = theirs_cls(_recipe_groups(b, wd), weight_decay=wd, **kwargs)
        for step in range(STEPS):
            for p, q, g in zip(a, b, _grads(SHAPES, step)):
                p.grad, q.grad = g.to(dtype), g.to(dtype)
            ours.step()
            theirs.step()
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, **tol)


# ------------------------------------------------------------------------------------ launches
@pytest.mark.skipif(not INTERPRET, reason="on the CPU the kernels run only under TRITON_INTERPRET")
@pytest.mark.parametrize("kind,kwargs,per_bucket", [
    ("sgd", dict(momentum=0.9, weight_decay=1e-4), 1),
    ("lars", dict(momentum=0.9, weight_decay=1e-4), 3),
    ("lamb", dict(), 4),
    ("lamb", dict(max_grad_norm=None), 3),
], ids=["sgd", "lars", "lamb", "lamb-no-clip"])
def test_launches_per_step_do_not_grow_with_the_number_of_tensors(kind, kwargs, per_bucket):
    """Embeddings and two GPT-2 blocks (28 tensors, scaled down) in the recipes' two groups are
    one bucket: SGD one launch, LARS the norm pass + segment sum + update, LAMB the global grad
    norm + moments + segment sum + update. bf16 params in a third group make a second bucket.
    (The interpreter runs every program in Python: the full 148 tensors are in the CUDA test.)"""
    from bench.param_sets import gpt2_124m_shapes

    shapes = [tuple(max(1, d // 256) for d in s) for s in gpt2_124m_shapes()[:26]]
    shapes += [(3,), (3,)]  # ln_f
    params = _params(shapes, torch.float32)
    low = _params([(33,), (5, 7)], torch.bfloat16)
    for p in params + low:
        p.grad = torch.randn_like(p)
    groups = _recipe_groups(params, 0.01) + [{"params": low}]
    opt = FUSED[kind](groups, **kwargs)
    before = fk.launches
    opt.step()
    assert fk.launches - before == 2 * per_bucket
    assert len(opt._plan.buckets) == 2


# ------------------------------------------------------------------------------------ host reads
@pytest.mark.parametrize("kind", ["sgd", "lars", "lamb"])
def test_step_reads_no_device_value_on_the_host(cpu_path, kind, monkeypatch):
    params = _params(SHAPES, torch.float32)
    kwargs = dict(momentum=0.9) if kind != "lamb" else {}
    opt = FUSED[kind](_recipe_groups(params, 1e-2), **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # state exists; tables built

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a tensor value inside step()")

    opt.clip_grad_norm_(1.0)
    for name in ("item", "__float__", "__bool__", "__int__", "__index__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    opt.param_groups[0]["lr"].fill_(5e-4)
    opt.grad_scale = torch.tensor(2.0)
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    monkeypatch.undo()


# ------------------------------------------------------------------------------------ AMP, clip
@pytest.mark.parametrize("kind,kwargs", [
    ("sgd", dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
    ("lars", dict(lr=1.0, momentum=0.9, weight_decay=1e-2, trust_coeff=0.01)),
    ("lamb", dict(lr=1e-2, weight_decay=0.1, max_grad_norm=2.0)),
], ids=["sgd", "lars", "lamb"])
def test_found_inf_skips_and_grad_scale_unscales(cpu_path, kind, kwargs):
    """GradScaler's hand-off: scaled grads + grad_scale = the unscaled step (the trust ratios and
    LAMB's global clip see the unscaled norms); found_inf leaves params, state and the step
    count untouched, and the first momentum step is still the first after a skipped one."""
    shapes = [(1023,), (4, 5), (3,)]
    params = _params(shapes, torch.float32)
    opt = FUSED[kind](_recipe_groups(params, kwargs["weight_decay"]), **kwargs)
    make = reference_class(kind)
    wd = kwargs["weight_decay"]
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "weight_decay"}
    mirror = _Mirror(lambda ps: make(_recipe_groups(ps, wd), weight_decay=wd, **ref_kwargs),
                     params)
    scale = torch.tensor(1024.0)
    snapshot = [p.detach().clone() for p in params]
    for p in params:  # an overflow on the very first step
        p.grad = torch.full_like(p, float("inf"))
    opt.grad_scale, opt.found_inf = scale, torch.tensor(1.0)
    opt.step()
    for p, s in zip(params, snapshot):
        assert torch.equal(p.detach(), s)
        assert float(opt.state[p]["step"]) == 0
    for step in range(3):
        grads = _grads(shapes, step)
        for p, g in zip(params, grads):
            p.grad = g * 1024.0
        opt.found_inf = torch.tensor(0.0)
        start = [p.detach().clone() for p in params]
        opt.step()
        mirror.step(grads, start)
        for p, q in zip(params, mirror.params):
            assert_close(p, q, torch.float32, f"step {step}")
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    snapshot = [p.detach().clone() for p in params]
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    for p, s, st in zip(params, snapshot, states):
        assert torch.equal(p.detach(), s)
        for key, value in opt.state[p].items():
            assert torch.equal(value, st[key]), key
    _assert_state_matches(kind, params, opt, mirror)


@pytest.mark.parametrize("kind,kwargs", [
    ("lars", dict(lr=1.0, momentum=0.9, weight_decay=1e-2, trust_coeff=0.01)),
    ("lamb", dict(lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)),
], ids=["lars", "lamb"])
def test_clip_grad_norm_then_step_matches_clipping_first(cpu_path, kind, kwargs):
    """opt.clip_grad_norm_ (applied inside the step) = torch's clip_grad_norm_ on the grads,
    then the reference step: LARS's grad norm and LAMB's global norm are of the clipped grads."""
    shapes = [(1023,), (33, 65), (7,)]
    params = _params(shapes, torch.float32)
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt = FUSED[kind](params, **kwargs)
    ref = reference_class(kind)(twins, **kwargs)
    for step in range(3):
        for p, q, g in zip(params, twins, _grads(shapes, step)):
            p.grad, q.grad = g.clone(), g.clone()
        norm = opt.clip_grad_norm_(0.5)
        ref_norm = torch.nn.utils.clip_grad_norm_(twins, 0.5)
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
        opt.step()
        ref.step()
        for p, q in zip(params, twins):
            assert_close(p, q, torch.float32, f"step {step}")


def test_grad_scaler_end_to_end_with_lamb(cpu_path):
    """torch.amp.GradScaler drives FusedLAMB: same params and scale as timm's Lamb with
    scaler.unscale_ + scaler.step, an overflow step included."""
    make = reference_class("lamb")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    twin = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    twin.load_state_dict(model.state_dict())
    opt = FusedLAMB(model.parameters(), lr=1e-2)
    ref = make(twin.parameters(), lr=1e-2)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
               for _ in range(2)]
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    for step in range(6):
        for m, o, s in ((model, opt, scalers[0]), (twin, ref, scalers[1])):
            s.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
            if step == 2:
                next(m.parameters()).grad[0, 0] = float("inf")
            if o is ref:
                s.unscale_(o)
            s.step(o)
            s.update()
            o.zero_grad()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert_close(p, q, torch.float32, f"step {step}")
    assert float(opt.state[next(model.parameters())]["step"]) == 5  # one step skipped


# ------------------------------------------------------------------------------------ norms
@pytest.mark.parametrize("kind,kwargs", [
    ("lars", dict(lr=1.0, momentum=0.9, weight_decay=1e-2, trust_coeff=0.01)),
    ("lamb", dict(lr=1e-2, weight_decay=0.1)),
], ids=["lars", "lamb"])
def test_trust_ratios_follow_params_changed_between_steps(cpu_path, kind, kwargs):
    """Norms are never cached: loading new weights (or an EMA swap) between steps changes the
    next trust ratio exactly as in the reference. Zero params and zero grads give ratio 1."""
    shapes = [(1023,), (33, 65), (4, 4)]
    params = _params(shapes, torch.float32)
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt = FUSED[kind](params, **kwargs)
    ref = reference_class(kind)(twins, **kwargs)
    for step in range(4):
        grads = _grads(shapes, step)
        grads[2].zero_()  # ‖g‖ = 0: ratio 1 (LARS)
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g.clone(), g.clone()
        with torch.no_grad():
            if step == 1:  # weights loaded from elsewhere, 10x larger
                for p, q in zip(params, twins):
                    p.mul_(10.0)
                    q.mul_(10.0)
            if step == 2:  # a zero tensor: ‖p‖ = 0
                params[1].zero_()
                twins[1].zero_()
        opt.step()
        ref.step()
        for p, q in zip(params, twins):
            assert_close(p, q, torch.float32, f"step {step}")


def test_lars_does_not_adapt_params_without_weight_decay(cpu_path):
    """timm's rule: a group with weight_decay 0 steps with plain SGD (no trust ratio) unless
    always_adapt; with trust_coeff tiny the adapted step is visibly smaller."""
    p = torch.ones(100, requires_grad=True)
    q = torch.ones(100, requires_grad=True)
    opt = FusedLARS([{"params": [p]}, {"params": [q], "weight_decay": 0.1}], lr=1.0,
                    trust_coeff=1e-3)
    p.grad = torch.full((100,), 0.5)
    q.grad = torch.full((100,), 0.5)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((100,), 0.5))  # p − lr · g
    ratio = 1e-3 * 10.0 / (5.0 + 10.0 * 0.1 + 1e-8)  # η‖p‖ / (‖g‖ + wd‖p‖ + eps)
    torch.testing.assert_close(q.detach(), torch.full((100,), 1.0 - ratio * 0.6))
    adapted = torch.ones(100, requires_grad=True)
    always = FusedLARS([adapted], lr=1.0, always_adapt=True)
    adapted.grad = torch.full((100,), 0.5)
    always.step()
    torch.testing.assert_close(adapted.detach(), torch.full((100,), 1.0 - 1e-3 * 10.0 / 5.0 * 0.5),
                               rtol=1e-6, atol=0)


def test_sgd_momentum_turned_on_later_starts_from_the_grad(cpu_path):
    p = torch.randn(100, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opt = FusedSGD([p], lr=0.1)
    ref = torch.optim.SGD([q], lr=0.1, foreach=False)
    for step in range(4):
        if step == 2:
            for o in (opt, ref):
                o.param_groups[0].update(momentum=0.9, dampening=0.5)
        g = torch.randn(100)
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert_close(p, q, torch.float32)
    assert_close(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"], torch.float32)


def test_params_without_grad_and_zero_size(cpu_path):
    for kind in ("sgd", "lars", "lamb"):
        params = _params([(5,), (0,), (3, 0), (4,)], torch.float32)
        opt = FUSED[kind](params, lr=0.1, weight_decay=0.1,
                          **({"momentum": 0.9} if kind != "lamb" else {}))
        for p in params[:3]:
            p.grad = torch.ones_like(p)
        untouched = params[3].detach().clone()
        opt.step()
        assert len(opt.state.get(params[3], {})) == 0
        assert torch.equal(params[3].detach(), untouched)
        assert float(opt.state[params[1]]["step"]) == 1
        start = _params([(5,)], torch.float32)[0].detach()
        assert torch.isfinite(params[0]).all() and not torch.equal(params[0].detach(), start)


def test_non_contiguous_params_take_the_reference_in_the_same_bucket(cpu_path):
    base = torch.randn(6, 8)
    strided = base[:, ::2]  # not dense: the reference, inside a kernel bucket
    params = [strided.requires_grad_(), torch.randn(5, 7).t().requires_grad_(),
              torch.randn(300).requires_grad_()]
    twins = [p.detach().clone().requires_grad_() for p in params]
    for kind, kwargs in (("lars", dict(lr=1.0, momentum=0.9, weight_decay=1e-2)),
                         ("lamb", dict(lr=1e-2))):
        opt = FUSED[kind](params, **kwargs)
        ref = reference_class(kind)(twins, **kwargs)
        untouched = base[:, 1::2].clone()
        for step in range(3):
            for p, q, g in zip(params, twins, _grads([p.shape for p in params], step)):
                p.grad, q.grad = g.clone(), g.clone()
            opt.step()
            ref.step()
        for p, q in zip(params, twins):
            assert_close(p, q, torch.float32, kind)
        assert torch.equal(base[:, 1::2], untouched)


# ------------------------------------------------------------------------------------ formats
@pytest.mark.skipif(not INTERPRET, reason="compares the kernel with the CPU path")
@pytest.mark.parametrize("kind,kwargs,state_dtype", [
    ("sgd", dict(lr=0.1, momentum=0.9, weight_decay=1e-2), torch.bfloat16),
    ("sgd", dict(lr=0.1, momentum=0.9, weight_decay=1e-2), torch.uint8),
    ("lars", dict(lr=1.0, momentum=0.9, weight_decay=1e-2, trust_coeff=0.1), torch.uint8),
    ("lamb", dict(lr=1e-2, weight_decay=0.1), torch.bfloat16),
], ids=["sgd-bf16", "sgd-8bit", "lars-8bit", "lamb-bf16"])
def test_low_precision_state_kernel_equals_cpu_path_and_tracks_fp32(kind, kwargs, state_dtype,
                                                                     monkeypatch):
    """bf16 / 8-bit state with stochastic rounding (bf16 params): the kernel and the torch path
    draw the same Philox bits and round alike, so they agree to a few bf16 ulps (a one-ulp fp32
    difference can flip a stochastic rounding: at most one ulp per step); both stay near the
    fp32-state run (the difference, relative to how far the params moved: a few % for bf16 and
    for 8-bit momentum; a state format that lost the state would be ~100%). (8-bit LAMB moments
    are refused: see test_bad_arguments_name_the_argument_and_value.)"""
    shapes = [(64, 65), (33,)]  # 8-bit: the matrix (blocks along its rows); the vector stays fp32
    runs = {}
    for name, fmt, interpret in (("kernel", state_dtype, "1"), ("torch", state_dtype, "0"),
                                 ("fp32", torch.float32, "1")):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        torch.manual_seed(0)  # the rounding seed
        params = _params(shapes, torch.bfloat16)
        opt = FUSED[kind](params, state_dtype=fmt, stochastic_rounding=True, **kwargs)
        for step in range(3):
            for p, g in zip(params, _grads(shapes, step)):
                p.grad = g.to(torch.bfloat16)
            opt.step()
        runs[name] = (params, opt)
    (ours, opt), (cpu, cpu_opt) = runs["kernel"], runs["torch"]
    for p, q in zip(ours, cpu):
        torch.testing.assert_close(p, q, rtol=3 * 2**-8, atol=1e-6)
    slot = "exp_avg" if kind == "lamb" else "momentum_buffer"
    for p, q in zip(ours[:1], cpu[:1]):
        mine, theirs = opt.state[p], cpu_opt.state[q]
        key = slot if state_dtype == torch.bfloat16 else f"{slot}_codes"
        assert mine[key].dtype == state_dtype
        if state_dtype == torch.bfloat16:
            torch.testing.assert_close(mine[key].float(), theirs[key].float(), rtol=3 * 2**-8,
                                       atol=1e-6)
    full, _ = runs["fp32"]
    bar = 0.05
    for p, q, start in zip(ours, full, _params(shapes, torch.bfloat16)):
        moved = (q.float() - start.float()).norm()
        assert (p.float() - q.float()).norm() <= bar * moved


# ------------------------------------------------------------------------------------ checkpoints
def _save_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("kind,kwargs", [
    ("sgd", dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)),
    ("lars", dict(lr=1.0, momentum=0.9, weight_decay=1e-2, trust_coeff=0.01)),
    ("lamb", dict(lr=1e-2, weight_decay=0.1)),
], ids=["sgd-torch", "lars-timm", "lamb-timm"])
def test_checkpoints_load_both_ways(cpu_path, kind, kwargs):
    """Ours → the reference optimizer and the reference → ours (through torch.save /
    torch.load(weights_only=True)): every pair continues exactly like the uninterrupted run.
    LAMB: timm's per-group step count (a tensor) comes and goes through param_groups."""
    if kind != "sgd":
        timm_optimizers()
    make = reference_class(kind)
    shapes = [(9,), (4, 6), (1023,)]
    ours = _params(shapes, torch.float32)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = FUSED[kind](ours, **kwargs)
    ref = make(theirs, **kwargs)
    for step in range(3):
        for p, q, g in zip(ours, theirs, _grads(shapes, step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    sd = _save_load(opt.state_dict())
    assert isinstance(sd["param_groups"][0]["lr"], float)
    slots = {"sgd": {"momentum_buffer"}, "lars": {"momentum_buffer"},
             "lamb": {"exp_avg", "exp_avg_sq"}}[kind]
    ref_sd = ref.state_dict()
    for index, state in sd["state"].items():
        assert set(state) == slots | {"step"}  # the reference's keys, plus our step count
        assert set(ref_sd["state"][index]) == slots
    if kind == "lamb":
        assert torch.equal(sd["param_groups"][0]["step"], ref_sd["param_groups"][0]["step"])
    # ours → the reference
    twins = [p.detach().clone().requires_grad_() for p in ours]
    ref_from_ours = make(twins, **dict(kwargs, lr=123.0))
    ref_from_ours.load_state_dict(sd)
    # the reference → ours
    mine = [p.detach().clone().requires_grad_() for p in theirs]
    ours_from_ref = FUSED[kind](mine, **dict(kwargs, lr=123.0))
    lr_tensor = ours_from_ref.param_groups[0]["lr"]
    ours_from_ref.load_state_dict(_save_load(ref.state_dict()))
    assert ours_from_ref.param_groups[0]["lr"] is lr_tensor
    assert float(lr_tensor) == pytest.approx(kwargs["lr"])
    assert "step" not in ours_from_ref.param_groups[0]
    # timm's LAMB keeps its count per group; torch's SGD and timm's LARS keep none (a saved
    # momentum buffer has had its first step)
    expected_step = 3 if kind == "lamb" else 1
    assert all(float(ours_from_ref.state[p]["step"]) == expected_step for p in mine)
    for step in range(3, 6):
        g = _grads(shapes, step)
        for ps in (ours, theirs, twins, mine):
            for p, gr in zip(ps, g):
                p.grad = gr.clone()
        for o in (opt, ref, ref_from_ours, ours_from_ref):
            o.step()
    for a, b, c, d in zip(ours, theirs, twins, mine):
        for x in (b, c, d):
            assert_close(a, x, torch.float32, kind)


@pytest.mark.parametrize("kind", ["sgd", "lars", "lamb"])
def test_save_load_save_is_the_same_state(cpu_path, kind):
    params = _params([(9,), (4, 6)], torch.float32)
    opt = FUSED[kind](params, lr=0.1, weight_decay=0.1,
                      **({"momentum": 0.9} if kind != "lamb" else {}))
    for step in range(2):
        for p, g in zip(params, _grads([(9,), (4, 6)], step)):
            p.grad = g
        opt.step()
    first = opt.state_dict()
    fresh = FUSED[kind]([p.detach().clone().requires_grad_() for p in params], lr=1.0)
    fresh.load_state_dict(first)
    second = fresh.state_dict()
    assert first["param_groups"] == second["param_groups"]
    for index, state in first["state"].items():
        assert state.keys() == second["state"][index].keys()
        for key, value in state.items():
            assert torch.equal(value, second["state"][index][key]), key


def test_torch_sgd_checkpoint_without_momentum_has_no_buffer(cpu_path):
    """torch keeps no state with momentum 0; a step count without a buffer loads as 0."""
    p = torch.randn(10, requires_grad=True)
    src = torch.optim.SGD([p], lr=0.1)
    p.grad = torch.randn(10)
    src.step()
    q = p.detach().clone().requires_grad_()
    opt = FusedSGD([q], lr=0.1, momentum=0.9)
    opt.load_state_dict(src.state_dict())  # the checkpoint's momentum (0) wins, as in torch
    assert opt.param_groups[0]["momentum"] == 0
    q.grad = torch.randn(10)
    opt.step()
    assert "momentum_buffer" not in opt.state[q]


# ------------------------------------------------------------------------------------ compile
@pytest.mark.parametrize("kind", ["sgd", "lars", "lamb"])
def test_compiled_training_step_does_not_recompile_when_the_lr_changes(kind):
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = FUSED[kind](model.parameters(), lr=0.01, weight_decay=0.01,
                      **({"momentum": 0.9} if kind != "lamb" else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: (e + 1) / 10)
    x = torch.randn(4, 8)

    def train_step(model, opt, x):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    compiled = torch.compile(train_step, backend=counter)
    compiled(model, opt, x)
    first = counter.frame_count
    for _ in range(5):
        sched.step()
        compiled(model, opt, x)
    assert counter.frame_count == first
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.01 * 6 / 10)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kind,kwargs,message", [
    ("sgd", dict(lr=-1.0), "Invalid learning rate: -1.0"),
    ("sgd", dict(momentum=-0.5), "Invalid momentum value: -0.5"),
    ("sgd", dict(weight_decay=-1e-4), "Invalid weight_decay value: -0.0001"),
    ("sgd", dict(dampening=float("nan")), "Invalid dampening value: nan"),
    ("sgd", dict(nesterov=True), "Nesterov momentum requires a momentum and zero dampening"),
    ("sgd", dict(momentum=0.9, dampening=0.1, nesterov=True),
     "Nesterov momentum requires a momentum and zero dampening"),
    ("sgd", dict(maximize=1), "Invalid maximize: 1"),
    ("lars", dict(lr=float("inf")), "Invalid learning rate: inf"),
    ("lars", dict(momentum=-1), "Invalid momentum value: -1"),
    ("lars", dict(trust_coeff=0.0), "Invalid trust_coeff: 0.0"),
    ("lars", dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
    ("lars", dict(trust_clip="yes"), "Invalid trust_clip: 'yes'"),
    ("lars", dict(always_adapt=None), "Invalid always_adapt: None"),
    ("lamb", dict(lr=-1e-3), "Invalid learning rate: -0.001"),
    ("lamb", dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
    ("lamb", dict(betas=(0.9,)), r"Invalid betas: \(0.9,\)"),
    ("lamb", dict(eps=-1.0), "Invalid epsilon value: -1.0"),
    ("lamb", dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    ("lamb", dict(max_grad_norm=0.0), "Invalid max_grad_norm: 0.0"),
    ("lamb", dict(max_grad_norm=-1.0), "Invalid max_grad_norm: -1.0"),
    ("lamb", dict(bias_correction=0), "Invalid bias_correction: 0"),
    ("lamb", dict(grad_averaging="no"), "Invalid grad_averaging: 'no'"),
    ("lamb", dict(state_dtype=torch.float16), "Invalid state_dtype: torch.float16"),
    ("lamb", dict(state_dtype=torch.uint8), "Invalid state_dtype: torch.uint8"),
])
def test_bad_arguments_name_the_argument_and_value(kind, kwargs, message):
    with pytest.raises(ValueError, match=message):
        FUSED[kind]([torch.zeros(3, requires_grad=True)], **kwargs)
    # as torch: validated before params are looked at
    with pytest.raises(ValueError, match=message):
        FUSED[kind](None, **kwargs)


def test_lamb_max_grad_norm_is_global():
    opt = FusedLAMB([torch.zeros(3, requires_grad=True)], max_grad_norm=1.0)
    with pytest.raises(ValueError, match="Invalid max_grad_norm: 2.0 in a param group"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)],
                             "max_grad_norm": 2.0})
    assert len(opt.param_groups) == 1


def test_lamb_refuses_a_timm_checkpoint_with_options_it_lacks():
    lamb, _ = timm_optimizers()
    p = torch.randn(4, requires_grad=True)
    src = lamb([p], caution=True)
    p.grad = torch.randn(4)
    src.step()
    with pytest.raises(ValueError, match="Invalid caution: True"):
        FusedLAMB([p.detach().clone().requires_grad_()]).load_state_dict(src.state_dict())


# ------------------------------------------------------------------------------------ bench
def test_bench_cases_construct_and_step_on_cpu():
    """The GPU bench's rows (bench/large_batch_step.py): every constructor takes its arguments
    and steps tiny CPU params (torch's fused SGD has a CPU kernel); the timm rows where timm
    imports."""
    from bench.large_batch_step import BYTES_PER_PARAM, cases

    rows = cases(quick=False)
    names = {(r["set"], r["optimizer"]) for r in rows}
    assert {("resnet50", "FusedSGD"), ("flat-1e9", "torch SGD fused"),
            ("gpt2-124m", "FusedLARS"), ("gpt2-124m", "FusedLAMB")} <= names
    if timm_optimizers(required=False):
        assert {("gpt2-124m", "timm Lamb"), ("gpt2-124m", "timm Lars")} <= names
    for row in rows:
        assert row["algorithm"] in BYTES_PER_PARAM
        params = _params([(33,), (4, 5)], torch.float32)
        for p in params:
            p.grad = torch.randn_like(p)
        start = [p.detach().clone() for p in params]
        row["make"](params).step()
        assert all(torch.isfinite(p).all() and not torch.equal(p, s)
                   for p, s in zip(params, start)), row["optimizer"]


# ------------------------------------------------------------------------------------ CUDA only
def _cuda_model_params(shapes):
    return [p.cuda().detach().requires_grad_() for p in _params(shapes, torch.float32)]


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["sgd", "lars", "lamb"])
def test_cuda_no_host_sync_over_scheduled_steps(kind):
    from warmup import GradualWarmupScheduler

    params = _cuda_model_params(SHAPES)
    opt = FUSED[kind](_recipe_groups(params, 1e-2), lr=1e-3,
                      **({"momentum": 0.9} if kind != "lamb" else {}))
    sched = GradualWarmupScheduler(opt, multiplier=4, total_epoch=20)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    sched.step()
    with no_host_sync():
        for _ in range(30):
            opt.clip_grad_norm_(1.0)
            opt.step()
            sched.step()


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["sgd", "lars", "lamb"])
def test_cuda_graph_replays_follow_the_lr_and_match_eager(kind):
    shapes = [(1023,), (64, 65), (4097,), (7,)]
    kwargs = dict(lr=1e-2, weight_decay=1e-2, **({"momentum": 0.9} if kind != "lamb" else {}))
    params = _cuda_model_params(shapes)
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt = FUSED[kind](_recipe_groups(params, 1e-2), **kwargs)
    eager = FUSED[kind](_recipe_groups(twins, 1e-2), **kwargs)
    static_grads = [torch.randn_like(p) for p in params]
    for p, q, g in zip(params, twins, static_grads):
        p.grad, q.grad = g, g.clone()
    graph = capture_step(opt)
    eager.step()
    for i in range(8):
        lr = 1e-2 * (i + 2)
        for o in (opt, eager):
            for group in o.param_groups:
                group["lr"].fill_(lr)
        for g, q in zip(static_grads, twins):
            g.copy_(torch.randn_like(g))
            q.grad.copy_(g)
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("kind,expected", [("sgd", 2), ("lars", 4)])
def test_cuda_kernels_per_step(kind, expected):
    """GPT-2-124M's 148 tensors: SGD is the step-count add_ and one kernel; LARS adds the norm
    pass and the segment sum. (LAMB: see the next test.)"""
    from torch.profiler import ProfilerActivity, profile

    from bench.param_sets import gpt2_124m_shapes, make_params

    params = make_params([tuple(max(1, d // 16) for d in s) for s in gpt2_124m_shapes()],
                         device="cuda")
    opt = FUSED[kind](params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == expected, [e.name for e in kernels]


@pytest.mark.cuda
def test_cuda_lamb_kernel_count_does_not_depend_on_the_number_of_tensors():
    from torch.profiler import ProfilerActivity, profile

    from bench.param_sets import gpt2_124m_shapes, make_params

    counts = []
    for shapes in ([(4096, 64), (64,), (1000,)],
                   [tuple(max(1, d // 16) for d in s) for s in gpt2_124m_shapes()]):
        opt = FusedLAMB(make_params(shapes, device="cuda"), lr=1e-3)
        opt.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            opt.step()
            torch.cuda.synchronize()
        counts.append(len([e for e in prof.events()
                           if e.device_type == torch.autograd.DeviceType.CUDA]))
    assert counts[0] == counts[1] <= 16, counts


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["sgd", "lars", "lamb"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_cuda_matches_the_reference(kind, dtype):
    kwargs = dict(CONFIGS[kind][1])
    params, opt, mirror = _twin_steps_cuda(kind, kwargs, dtype)
    for p, q in zip(params, mirror.params):
        assert_close(p.cpu(), q.cpu(), dtype, kind)


def _twin_steps_cuda(kind, kwargs, dtype):
    shapes = [(1023,), (33, 65), (4097,), (7,)]
    params = [p.cuda().detach().requires_grad_() for p in _params(shapes, dtype)]
    kwargs = dict(kwargs)
    wd = kwargs.pop("weight_decay", 0.0)
    opt = FUSED[kind](_recipe_groups(params, wd), weight_decay=wd, **kwargs)
    make = reference_class(kind)
    mirror = _Mirror(lambda ps: make(_recipe_groups(ps, wd), weight_decay=wd, **kwargs), params)
    for step in range(4):
        for p, g in zip(params, _grads(shapes, step)):
            p.grad = g.to(device="cuda", dtype=dtype)
        start = [p.detach().clone() for p in params]
        opt.step()
        mirror.step([p.grad for p in params], start)
        for p, q in zip(params, mirror.params):
            assert_close(p, q, dtype, f"{kind} step {step}")
    return params, opt, mirror

