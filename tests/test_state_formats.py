"""FusedAdamW with low-precision state (``state_dtype`` bf16 / 8-bit) and stochastic rounding.

The kernel (interpreter on CPU) and the CPU torch path (the reference wrapped with the same
formats and the same Philox bits) are checked against each other, against fp32 AdamW within the
format's tolerance, and for what the formats promise: unbiased rounding that lets sub-ulp updates
accumulate, reproducible random streams, checkpoints that resume bit-identically, 8-bit memory.
"""

from __future__ import annotations

import io

import pytest
import torch

import fused.kernels.common as fk
from fused import FusedAdamW, formats
from fused._engine import _slot_value

from .conftest import DEVICES, HAS_CUDA, INTERPRET
from .helpers import capture_step, make_grads, make_params, no_host_sync

kernel_only = pytest.mark.skipif(not INTERPRET and not HAS_CUDA,
                                 reason="the Triton kernel needs a GPU or TRITON_INTERPRET=1")
MODES = [  # (param dtype, state dtype, stochastic rounding)
    pytest.param(torch.float32, torch.bfloat16, False, id="fp32-bf16state"),
    pytest.param(torch.float32, torch.bfloat16, True, id="fp32-bf16state-sr"),
    pytest.param(torch.bfloat16, torch.bfloat16, True, id="bf16-bf16state-sr"),
    pytest.param(torch.float16, torch.bfloat16, True, id="fp16-bf16state-sr"),
    pytest.param(torch.bfloat16, torch.float32, True, id="bf16-fp32state-sr"),
    pytest.param(torch.float32, torch.uint8, False, id="fp32-8bit"),
    pytest.param(torch.float32, torch.uint8, True, id="fp32-8bit-sr"),
    pytest.param(torch.bfloat16, torch.uint8, True, id="bf16-8bit-sr"),
]
SHAPES = [(5000,), (70, 90), (3,), (33, 65)]  # 8-bit: the first two quantize, the rest keep fp32


def _params(dtype, device, shapes=SHAPES, seed=0):
    return make_params(shapes, dtype, device, seed)


_grads = make_grads


def _run(opt, params, steps, start=0, shapes=SHAPES):
    for step in range(start, start + steps):
        for p, g in zip(params, _grads(shapes, step)):
            p.grad = g.to(device=p.device, dtype=p.dtype)
        opt.step()


def _ulps(a, b, dtype):
    """Largest difference in units of the dtype's spacing at the values."""
    if dtype == torch.float32:
        return ((a.float() - b.float()).abs() / (b.float().abs() * 2**-23 + 1e-30)).max().item()
    mant = 7 if dtype == torch.bfloat16 else 10
    spacing = torch.pow(2.0, torch.floor(torch.log2(b.float().abs().clamp(min=1e-30))) - mant)
    return ((a.float() - b.float()).abs() / spacing).max().item()


# ------------------------------------------------------------------ kernel vs torch path
@kernel_only
@pytest.mark.parametrize("dtype,state_dtype,sr", MODES)
def test_kernel_and_torch_path_agree(dtype, state_dtype, sr, monkeypatch):
    """Same params, grads, seed: the kernel and the CPU torch path (the reference with the
    engine's formats and the same Philox bits) take the same steps, up to a rounding decided
    differently by an fp32 ulp of difference in the math."""
    a, b = _params(dtype, "cpu"), _params(dtype, "cpu")
    torch.manual_seed(7)
    kernel = FusedAdamW(a, lr=1e-2, amsgrad=True, state_dtype=state_dtype,
                        stochastic_rounding=sr)
    torch.manual_seed(7)
    torch_path = FusedAdamW(b, lr=1e-2, amsgrad=True, state_dtype=state_dtype,
                            stochastic_rounding=sr)
    for step in range(4):
        _run(kernel, a, 1, start=step)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        _run(torch_path, b, 1, start=step)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert {bk.backend for bk in kernel._plan.buckets} == {"kernel"}
    assert {bk.backend for bk in torch_path._plan.buckets} <= {"reference", "torch"}
    # a moment one storage step apart (the two paths' fp32 op orders differ by an ulp, which
    # can decide a rounding) moves a param by lr · (that relative step); the param's own
    # rounding (stochastic: possibly the other neighbour) by one of its spacings per step
    lr, steps = 1e-2, 4
    relative = {torch.float32: 0.0, torch.bfloat16: 2**-7, torch.uint8: 0.1}[state_dtype]
    mant = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]
    for p, q in zip(a, b):
        spacing = torch.pow(2.0, torch.floor(torch.log2(q.detach().float().abs())) - mant)
        bound = steps * (lr * relative + 2 * spacing) + 1e-7
        assert bool(((p.float() - q.float()).abs() <= bound).all())
        for key, value in kernel.state[p].items():
            other = torch_path.state[q][key]
            assert value.dtype == other.dtype, key
            if value.dtype == torch.uint8:  # codes: a rare code step from an fp32 rounding
                assert (value != other).float().mean().item() < 0.01, key
            elif key != "step":
                torch.testing.assert_close(value.float(), other.float(), rtol=2**-7, atol=1e-6,
                                           msg=lambda m, key=key: f"{key}: {m}")


# ------------------------------------------------------------------ accuracy vs fp32 AdamW
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype,rtol", [(torch.bfloat16, 2e-2), (torch.uint8, 5e-2)],
                         ids=["bf16", "8bit"])
def test_low_precision_state_tracks_fp32_adamw(device, state_dtype, rtol, cpu_path):
    """fp32 params: 20 steps with bf16 / 8-bit moments stay close to torch.optim.AdamW (the
    moments within the format's precision, the params within a fraction of the distance they
    moved)."""
    if device == "cuda" and cpu_path != "kernel":
        pytest.skip("CUDA has one path")
    ours = _params(torch.float32, device)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    start = [p.detach().clone() for p in ours]
    opt = FusedAdamW(ours, lr=1e-2, state_dtype=state_dtype)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    _run(opt, ours, 20)
    _run(ref, theirs, 20)
    for p, q, s in zip(ours, theirs, start):
        moved = (q - s).abs().max()
        assert (p - q).abs().max() <= rtol * moved
        m = formats_value(opt.state[p], "exp_avg")
        m_ref = ref.state[q]["exp_avg"]
        assert (m - m_ref).abs().max() <= rtol * m_ref.abs().max() * 2


def formats_value(state, slot):
    """A slot's values as fp32, whatever its format."""
    return _slot_value(state, slot, slot == "exp_avg").float()


def test_state_dtype_storage_and_memory_per_param():
    """bf16: the moments are bf16 (4 bytes/param of state); 8-bit: codes + scales, at most
    2.1 bytes/param over the quantized tensors; tensors under 4096 elements keep fp32."""
    shapes = [(256, 768), (300, 256), (768,), (50, 60)]
    for state_dtype, budget in ((torch.float32, 8.0), (torch.bfloat16, 4.0),
                                (torch.uint8, 2.1)):
        params = _params(torch.float32, "cpu", shapes)
        opt = FusedAdamW(params, state_dtype=state_dtype)
        for p in params:
            p.grad = torch.zeros_like(p)
        with torch.no_grad():
            for group in opt.param_groups:
                group["lr"].fill_(0.0)
        opt.step()
        big = params[:2]
        state_bytes = sum(t.numel() * t.element_size() for p in big
                          for k, t in opt.state[p].items() if k != "step")
        per_param = state_bytes / sum(p.numel() for p in big)
        assert per_param <= budget, (state_dtype, per_param)
        if state_dtype == torch.uint8:
            assert per_param > 2.0
            for small in params[2:]:
                assert opt.state[small]["exp_avg"].dtype == torch.float32
            assert opt.state[big[0]]["exp_avg_codes"].dtype == torch.uint8
            assert opt.state[big[0]]["exp_avg_scales"].shape == (256, 3)
        elif state_dtype == torch.bfloat16:
            assert all(opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16 for p in params)


# ------------------------------------------------------------------ stochastic rounding
@pytest.mark.parametrize("device", DEVICES)
def test_sub_half_ulp_updates_follow_fp32_only_with_stochastic_rounding(device, cpu_path):
    """bf16 weights at 1.0 with updates of 1/8 ulp per step: round-to-nearest never moves them,
    stochastic rounding moves them by the fp32 trajectory on average."""
    if device == "cuda" and cpu_path != "kernel":
        pytest.skip("CUDA has one path")
    n, steps = 4096, 64
    lr = 2**-7 / 8  # a bf16 ulp at 1.0 is 2**-7; the first Adam steps move by lr · sign(g)
    results = {}
    for sr in (False, True):
        p = torch.ones(n, device=device, dtype=torch.bfloat16, requires_grad=True)
        opt = FusedAdamW([p], lr=lr, weight_decay=0.0, betas=(0.0, 0.0), stochastic_rounding=sr)
        for _ in range(steps):
            p.grad = torch.ones_like(p)  # β = 0: every step moves by exactly lr · 1/(1+eps)
            opt.step()
        results[sr] = p.detach().float().cpu()
    expected = 1.0 - steps * lr  # the fp32 trajectory: 0.9375
    assert torch.equal(results[False], torch.ones(n))  # every update lost
    # below 1.0 the spacing is 2**-8: each step moves a weight down one spacing with
    # probability 1/4, a Binomial(64, 1/4) walk; its mean over n weights is the fp32 value
    spacing, walk_std = 2**-8, (steps * 0.25 * 0.75) ** 0.5
    mean = results[True].mean().item()
    assert abs(mean - expected) < 5 * walk_std * spacing / n ** 0.5, mean
    assert results[True].min() >= expected - 6 * walk_std * spacing
    assert results[True].max() <= 1.0


def test_reproducible_under_manual_seed_and_seed_sensitive(cpu_path):
    def run(seed):
        torch.manual_seed(seed)
        params = _params(torch.bfloat16, "cpu")
        opt = FusedAdamW(params, lr=1e-3, state_dtype=torch.bfloat16, stochastic_rounding=True)
        _run(opt, params, 3)
        return [p.detach().clone() for p in params], opt.param_groups[0]["rounding_seed"]

    (a, seed_a), (b, seed_b), (c, seed_c) = run(0), run(0), run(1)
    assert seed_a == seed_b != seed_c
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, z) for x, z in zip(a, c))


def test_no_seed_drawn_without_stochastic_rounding():
    """Building an optimizer without stochastic rounding leaves torch's RNG alone."""
    torch.manual_seed(0)
    FusedAdamW(_params(torch.float32, "cpu"), state_dtype=torch.bfloat16)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.uint8], ids=["bf16", "8bit"])
def test_found_inf_leaves_params_state_and_random_stream_untouched(state_dtype, cpu_path):
    """A skipped step (GradScaler overflow) changes nothing, not even the random stream: the
    run with the skip equals the run without it."""
    shapes = SHAPES
    torch.manual_seed(3)
    a = _params(torch.bfloat16, "cpu")
    opt_a = FusedAdamW(a, lr=1e-2, state_dtype=state_dtype, stochastic_rounding=True)
    torch.manual_seed(3)
    b = _params(torch.bfloat16, "cpu")
    opt_b = FusedAdamW(b, lr=1e-2, state_dtype=state_dtype, stochastic_rounding=True)
    _run(opt_a, a, 2)
    _run(opt_b, b, 2)
    before = {k: v.clone() for k, v in opt_a.state[a[0]].items()}
    for p in a:
        p.grad = torch.full_like(p, float("inf"))
    opt_a.grad_scale, opt_a.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    snapshot = [p.detach().clone() for p in a]
    opt_a.step()
    del opt_a.grad_scale, opt_a.found_inf
    assert all(torch.equal(p, s) for p, s in zip(a, snapshot))
    assert all(torch.equal(v, before[k]) for k, v in opt_a.state[a[0]].items())
    _run(opt_a, a, 2, start=2, shapes=shapes)
    _run(opt_b, b, 2, start=2, shapes=shapes)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.uint8], ids=["bf16", "8bit"])
def test_resume_continues_bit_identically_random_stream_included(state_dtype, cpu_path):
    torch.manual_seed(11)
    params = _params(torch.bfloat16, "cpu")
    opt = FusedAdamW(params, lr=1e-2, amsgrad=True, state_dtype=state_dtype,
                     stochastic_rounding=True)
    _run(opt, params, 3)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    _run(opt, params, 3, start=3)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    torch.manual_seed(999)  # a different generator state: the saved seed must win
    resumed = [t.clone().requires_grad_() for t in ckpt["params"]]
    opt2 = FusedAdamW(resumed, lr=1.0, amsgrad=True, state_dtype=state_dtype,
                      stochastic_rounding=True)
    opt2.load_state_dict(ckpt["opt"])
    for key, value in ckpt["opt"]["state"][0].items():
        assert opt2.state[resumed[0]][key].dtype == value.dtype, key
    _run(opt2, resumed, 3, start=3)
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
    for key, value in opt.state[params[0]].items():
        assert torch.equal(value, opt2.state[resumed[0]][key]), key


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.uint8], ids=["bf16", "8bit"])
def test_torch_adamw_checkpoints_load_both_ways(state_dtype, cpu_path):
    """torch → ours: fp32 moments cast / quantized on load. ours → torch: bf16 state loads as
    is (torch casts it to the param dtype); 8-bit through ``dequantized_state_dict()``."""
    theirs = _params(torch.float32, "cpu")
    ref = torch.optim.AdamW(theirs, lr=1e-2)
    _run(ref, theirs, 3)
    ours = [p.detach().clone().requires_grad_() for p in theirs]
    opt = FusedAdamW(ours, lr=1.0, state_dtype=state_dtype)
    opt.load_state_dict(ref.state_dict())
    state = opt.state[ours[0]]
    if state_dtype == torch.uint8:
        back = formats.dequantize(state["exp_avg_codes"], state["exp_avg_scales"], True)
        m = ref.state[theirs[0]]["exp_avg"]
        assert (back - m).abs().max() <= 0.02 * m.abs().max()
    else:
        assert torch.equal(state["exp_avg"], ref.state[theirs[0]]["exp_avg"].bfloat16())
    assert state["step"].item() == 3
    # ours → torch
    sd = opt.dequantized_state_dict() if state_dtype == torch.uint8 else opt.state_dict()
    twins = [p.detach().clone().requires_grad_() for p in ours]
    back_to_torch = torch.optim.AdamW(twins, lr=1.0)
    back_to_torch.load_state_dict(sd)
    _run(opt, ours, 3, start=3)
    _run(back_to_torch, twins, 3, start=3)
    for p, q in zip(ours, twins):
        assert (p - q).abs().max() <= 0.05 * (q - theirs[0].new_zeros(())).abs().max()
    assert set(back_to_torch.state[twins[0]]) == {"step", "exp_avg", "exp_avg_sq"}


def test_8bit_checkpoint_is_compact_and_refuses_to_be_misread_by_torch():
    params = _params(torch.float32, "cpu", [(128, 256)])
    opt = FusedAdamW(params, state_dtype=torch.uint8)
    _run(opt, params, 1, shapes=[(128, 256)])
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg_codes", "exp_avg_scales",
                                   "exp_avg_sq_codes", "exp_avg_sq_scales"}
    assert sd["param_groups"][0]["state_dtype"] == "uint8"  # plain data (DCP, weights_only)
    torch_opt = torch.optim.AdamW([params[0].detach().clone().requires_grad_()])
    torch_opt.load_state_dict(sd)
    torch_opt.param_groups[0]["params"][0].grad = torch.zeros(128, 256)
    with pytest.raises(KeyError):  # loud, never codes read as float moments
        torch_opt.step()


# ------------------------------------------------------------------ settings changed mid-run
def test_state_dtype_changed_mid_run_converts_the_state(cpu_path):
    """A group's state_dtype changed after steps is honoured at the next step: the moments are
    converted (not silently kept in the old format)."""
    params = _params(torch.float32, "cpu")
    opt = FusedAdamW(params, lr=1e-2)
    _run(opt, params, 2)
    m = opt.state[params[0]]["exp_avg"].clone()
    opt.param_groups[0]["state_dtype"] = torch.uint8
    _run(opt, params, 1, start=2)
    state = opt.state[params[0]]
    assert "exp_avg_codes" in state and "exp_avg" not in state
    opt.param_groups[0]["state_dtype"] = torch.bfloat16
    _run(opt, params, 1, start=3)
    assert opt.state[params[0]]["exp_avg"].dtype == torch.bfloat16
    assert opt.state[params[2]]["exp_avg"].dtype == torch.bfloat16  # small ones too
    assert not torch.equal(opt.state[params[0]]["exp_avg"].float(), m)


def test_slot_created_later_takes_the_groups_format(cpu_path):
    """amsgrad turned on after steps with bf16 state: max_exp_avg_sq is created in bf16."""
    params = _params(torch.float32, "cpu")
    opt = FusedAdamW(params, lr=1e-2, state_dtype=torch.bfloat16)
    _run(opt, params, 1)
    opt.param_groups[0]["amsgrad"] = True
    _run(opt, params, 1, start=1)
    assert opt.state[params[0]]["max_exp_avg_sq"].dtype == torch.bfloat16


def test_stochastic_rounding_turned_on_later_draws_a_seed(cpu_path):
    params = _params(torch.bfloat16, "cpu")
    opt = FusedAdamW(params, lr=1e-2)
    _run(opt, params, 1)
    assert "rounding_seed" not in opt.param_groups[0]
    torch.manual_seed(4)
    opt.param_groups[0]["stochastic_rounding"] = True
    _run(opt, params, 1, start=1)
    seed = opt.param_groups[0]["rounding_seed"]
    torch.manual_seed(4)
    assert seed == int(torch.randint(0, 2**62, (), dtype=torch.int64)) and seed != 0


# ------------------------------------------------------------------ everything else keeps working
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.uint8], ids=["bf16", "8bit"])
def test_clip_grad_scaler_and_groups_in_low_precision_modes(state_dtype, cpu_path):
    """The fused clip, the GradScaler hand-off (scaled grads, ``grad_scale``) and two param
    groups (no decay on 1-D) with low-precision state and stochastic rounding, against torch:
    ``unscale``, ``clip_grad_norm_``, AdamW. ``eps=1`` makes the update linear in the grad, so a
    missing unscale or clip would show (Adam is otherwise nearly scale-invariant)."""
    ours = _params(torch.float32, "cpu")
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    start = [p.detach().clone() for p in ours]

    def groups(params):
        return [{"params": [p for p in params if p.dim() > 1]},
                {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]

    opt = FusedAdamW(groups(ours), lr=0.5, eps=1.0, weight_decay=0.1, state_dtype=state_dtype,
                     stochastic_rounding=True)
    ref = torch.optim.AdamW(groups(theirs), lr=0.5, eps=1.0, weight_decay=0.1, foreach=False)
    for step in range(4):
        for p, q, g in zip(ours, theirs, _grads(SHAPES, step)):
            p.grad, q.grad = g * 64, g.clone()
        norm = opt.clip_grad_norm_(5.0 * 64)  # the grads are still scaled
        opt.grad_scale, opt.found_inf = torch.tensor(64.0), torch.tensor(0.0)
        opt.step()
        ref_norm = torch.nn.utils.clip_grad_norm_(theirs, 5.0)
        ref.step()
        torch.testing.assert_close(norm / 64, ref_norm, rtol=1e-5, atol=0)
        assert ref_norm > 5.0  # every step clips
    for p, q, s in zip(ours, theirs, start):
        assert (p - q).abs().max() <= 0.03 * (q - s).abs().max()


@kernel_only
def test_8bit_model_is_two_launches_and_invalid_state_dtype_is_refused():
    params = _params(torch.float32, "cpu")
    opt = FusedAdamW(params, state_dtype=torch.uint8)
    for p in params:
        p.grad = torch.randn_like(p)
    before = fk.launches
    opt.step()
    assert fk.launches - before == 2  # the 8-bit bucket and the small tensors' fp32 bucket
    with pytest.raises(ValueError, match="Invalid state_dtype: torch.float16"):
        FusedAdamW(params, state_dtype=torch.float16)
    with pytest.raises(ValueError, match="Invalid stochastic_rounding: 1"):
        FusedAdamW(params, stochastic_rounding=1)


def test_8bit_training_ends_close_to_fp32_adamw(monkeypatch):
    """A noisy regression (more samples than the MLP can memorize, cosine decay to zero, so the
    loss settles near its noise floor): 8-bit moments, with and without stochastic
    requantization, and bf16 moments end within 3% of torch.optim.AdamW's final loss. (The CPU
    torch path; the kernel's agreement with it is tested above.)"""
    monkeypatch.setenv("TRITON_INTERPRET", "0")

    def train(**kw):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 96), torch.nn.Tanh(),
                                    torch.nn.Linear(96, 96), torch.nn.Tanh(),
                                    torch.nn.Linear(96, 1))
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(4096, 16, generator=gen)
        y = torch.sin(x[:, :4].sum(1, keepdim=True)) + 0.3 * torch.randn(4096, 1, generator=gen)
        opt = (torch.optim.AdamW(model.parameters(), lr=1e-2) if not kw
               else FusedAdamW(model.parameters(), lr=1e-2, **kw))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 200)
        for _ in range(200):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if kw.get("state_dtype") == torch.uint8:  # the 96x96 weight really is 8-bit
            assert opt.state[model[2].weight]["exp_avg_codes"].dtype == torch.uint8
        return torch.nn.functional.mse_loss(model(x), y).item()

    fp32 = train()
    assert 0.06 < fp32 < 0.1  # near the noise floor (0.09), not memorized
    for kw in (dict(state_dtype=torch.uint8), dict(state_dtype=torch.uint8,
                                                   stochastic_rounding=True),
               dict(state_dtype=torch.bfloat16)):
        assert abs(train(**kw) - fp32) <= 0.03 * fp32, kw


# ------------------------------------------------------------------ CUDA only
@pytest.mark.cuda
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.uint8], ids=["bf16", "8bit"])
def test_cuda_graph_replays_draw_new_bits(state_dtype):
    """The step count advances inside the graph, so every replay rounds with fresh bits: 64
    replays of a 1/8-ulp update move bf16 weights along the fp32 trajectory on average (frozen
    bits would move every weight the same way, and round-to-nearest not at all)."""
    n, steps, lr = 8192, 64, 2**-7 / 8
    p = torch.ones(n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    p.grad = torch.ones_like(p)
    opt = FusedAdamW([p], lr=lr, weight_decay=0.0, betas=(0.0, 0.0), state_dtype=state_dtype,
                     stochastic_rounding=True)
    graph = capture_step(opt)
    for _ in range(steps - 1):
        graph.replay()
    torch.cuda.synchronize()
    assert opt.state[p]["step"].item() == steps
    values = p.detach().float()
    assert len(values.unique()) > 1  # not one pattern for every weight
    assert abs(values.mean().item() - (1.0 - steps * lr)) < 5 * 2**-7 / n ** 0.5 + 1e-6


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,state_dtype", [(torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.uint8),
                                               (torch.float32, torch.uint8)],
                         ids=["bf16-bf16", "bf16-8bit", "fp32-8bit"])
def test_cuda_no_host_sync_over_100_scheduled_steps(dtype, state_dtype):
    from warmup import GradualWarmupScheduler

    params = _params(dtype, "cuda", [(4096 * 3,), (300, 200), (7,)])
    opt = FusedAdamW(params, lr=1e-3, state_dtype=state_dtype, stochastic_rounding=True)
    sched = GradualWarmupScheduler(
        opt, multiplier=4, total_epoch=50,
        after_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.clip_grad_norm_(1.0)
    opt.step()
    sched.step()
    with no_host_sync():
        for _ in range(100):
            opt.clip_grad_norm_(1.0)
            opt.step()
            sched.step()
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,state_dtype,sr", MODES)
def test_cuda_kernel_matches_the_reference_path(dtype, state_dtype, sr):
    """On the GPU the kernel and the torch path (forced through the reference) agree to one
    rounding step (GPU division and FMA differ from the CPU's by an ulp of fp32)."""
    a, b = _params(dtype, "cuda"), _params(dtype, "cuda")
    torch.manual_seed(7)
    kernel = FusedAdamW(a, lr=1e-2, state_dtype=state_dtype, stochastic_rounding=sr)
    torch.manual_seed(7)
    reference = FusedAdamW(b, lr=1e-2, state_dtype=state_dtype, stochastic_rounding=sr)
    for step in range(3):
        _run(kernel, a, 1, start=step)
        reference._current_plan()
        for bucket in reference._plan.buckets:
            bucket.backend = "reference"
        _run(reference, b, 1, start=step)
    for p, q in zip(a, b):
        assert _ulps(p, q, dtype) <= (4.0 if dtype == torch.float32 else 1.0)
