"""Low-precision training at small scale: bf16 params, bf16 / 8-bit optimizer state, stochastic
rounding and Kahan summation against fp32 AdamW.

bf16 has 8 significant bits: a weight of magnitude w sits on a grid of spacing ulp(w) ≈ w·2⁻⁷,
and with round-to-nearest an update smaller than half of that is lost entirely. Adam's update is
about lr per step, so at a small LR, or late in a decay to zero, pure-bf16 training stops moving
while fp32 keeps improving. Stochastic rounding (unbiased: E[round(x)] = x) and Kahan-compensated
params (optimi) are the two known fixes.

Task: regression onto a fixed teacher network (Gaussian inputs, a tanh MLP teacher), fit by a
GELU MLP whose 64×64 weight matrices (4096 elements) are large enough for 8-bit state; MSE
loss; AdamW (torch's defaults: lr 1e-3, betas (0.9, 0.999), wd 0.01), linear warmup then cosine
decay to zero. The forward and backward run in fp32 from the stored weights in every arm (bf16
weights are upcast exactly, grads are stored in the param's dtype), so two arms differ only in
how the optimizer stores and rounds. Arms (within a seed: the same fp32 init, cast to bf16 where
the arm has bf16 params, the same data and batch order):

- fp32 AdamW: ``torch.optim.AdamW`` on fp32 params (the reference);
- bf16 params + fp32 state: ``FusedAdamW`` on bf16 params (today's default; round-to-nearest);
- torch AdamW, pure bf16: ``torch.optim.AdamW`` on bf16 params (bf16 state and math, nearest);
- bf16 params + bf16 state + SR: ``FusedAdamW(state_dtype=torch.bfloat16,
  stochastic_rounding=True)``;
- bf16 params + bf16 state + Kahan: optimi's Kahan-compensated bf16 params, here in plain torch
  around :func:`fused.reference.adamw_math` (bf16 state, a bf16 compensation buffer);
- fp32 params + bf16 state: ``FusedAdamW(state_dtype=torch.bfloat16)``;
- fp32 params + 8-bit state, with and without SR on requantization:
  ``FusedAdamW(state_dtype=torch.uint8[, stochastic_rounding=True])``;
- bf16 params + 8-bit state + SR.

Then a small LR sweep at higher peak LRs (3e-3: fp32 and bf16 params + fp32 state; 1e-2: also
bf16 + SR and fp32 params + 8-bit state with and without SR): the effect depends on the LR, and
the verdicts say where it shows. Every arm runs over several seeds (init and batch order; the
data set is fixed). The verdicts are computed from the numbers; "within seed noise" means a
difference of means at most twice its standard error (seeds taken as independent), and the
per-seed (paired: same init and batches) differences are given beside it. Measured, not computed
from theory: the optimizer-state bytes per param (the state tensors each optimizer allocated),
and how far each arm's stored second moment drifts from an fp32 shadow fed the same grads
(median ratio over the 8-bit-eligible tensors).

Run: ``python -m bench.precision_study`` (about two minutes on 2 idle CPU cores: the runs go to
two single-threaded worker processes; ``quick=True`` is a smoke run in one process that proves
the plumbing, not the claims). On CPU, ``FusedAdamW`` takes its plain-torch path
(``TRITON_INTERPRET`` unset), so the step times in the table are those of that path, not of the
Triton kernel. Call :func:`run` from a script under ``if __name__ == "__main__":`` (the workers
are spawned processes).
"""

from __future__ import annotations

import functools
import math
import os
import platform
import statistics
import time

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bench.common import (
    config_key,
    format_table,
    log,
    pm,
    pyplot,
    run_jobs,
    save_figure,
    se_diff,
    stamp,
    summary,
    write_json,
)
from fused import FusedAdamW
from fused.formats import dequantize, quantizes, round_bf16
from fused.reference import adamw_math

CONFIG = {
    "in_dim": 64,
    "out_dim": 8,
    "teacher_hidden": 64,
    "teacher_depth": 2,  # hidden tanh layers of the teacher
    "teacher_gain": 0.3,  # weight scale of the teacher: small = a nearly linear, learnable map
    "train_size": 16384,
    "heldout_size": 4096,
    "hidden": 64,
    "depth": 2,  # hidden GELU layers of the student: two 64x64 matrices get 8-bit state
    "batch": 128,
    "steps": 500,
    "warmup_steps": 50,
    "lr": 1e-3,
    "min_lr": 0.0,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 0.01,
    "eval_every": 20,
}

REFERENCE = "fp32 AdamW (reference)"
BF16_FP32_STATE = "bf16 params + fp32 state"
TORCH_BF16 = "torch AdamW, pure bf16"
BF16_SR = "bf16 params + bf16 state + SR"
KAHAN = "bf16 params + bf16 state + Kahan"
FP32_BF16_STATE = "fp32 params + bf16 state"
FP32_8BIT = "fp32 params + 8-bit state"
FP32_8BIT_SR = "fp32 params + 8-bit state + SR"
BF16_8BIT_SR = "bf16 params + 8-bit state + SR"
# arm → (param dtype, optimizer, state_dtype, stochastic rounding)
ARMS = {
    REFERENCE: (torch.float32, "torch", None, False),
    BF16_FP32_STATE: (torch.bfloat16, "fused", torch.float32, False),
    TORCH_BF16: (torch.bfloat16, "torch", None, False),
    BF16_SR: (torch.bfloat16, "fused", torch.bfloat16, True),
    KAHAN: (torch.bfloat16, "kahan", torch.bfloat16, False),
    FP32_BF16_STATE: (torch.float32, "fused", torch.bfloat16, False),
    FP32_8BIT: (torch.float32, "fused", torch.uint8, False),
    FP32_8BIT_SR: (torch.float32, "fused", torch.uint8, True),
    BF16_8BIT_SR: (torch.bfloat16, "fused", torch.uint8, True),
}
# the LR sweep: peak LR → arms (the main study is the sweep's point at CONFIG["lr"])
SWEEP = {3e-3: [REFERENCE, BF16_FP32_STATE],
         1e-2: [REFERENCE, BF16_FP32_STATE, BF16_SR, FP32_8BIT, FP32_8BIT_SR]}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.uint8: "8-bit"}


# ---------------------------------------------------------------------------------------------
# the task, the model, the Kahan-compensated optimizer
# ---------------------------------------------------------------------------------------------
class _MLP(nn.Module):
    """Linear layers with an activation between them; the math runs in fp32 from the stored
    weights whatever their dtype (bf16 → fp32 is exact; the grads come back in the param's
    dtype)."""

    def __init__(self, dims: list[int], activation):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.linear(x, layer.weight.float(), layer.bias.float())
            if i < len(self.layers) - 1:
                x = self.activation(x)
        return x


def _cpu_name() -> str:
    """The CPU the study ran on (``stamp()`` names the GPU on a CUDA machine)."""
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"


@functools.lru_cache(maxsize=2)
def _data(key: tuple) -> dict:
    """Gaussian inputs, targets from a random tanh teacher scaled to unit variance; fixed across
    seeds and arms (and rebuilt identically in every worker process)."""
    cfg = dict(key)
    g = torch.Generator().manual_seed(1234)
    n = cfg["train_size"] + cfg["heldout_size"]
    x = torch.randn(n, cfg["in_dim"], generator=g)
    dims = ([cfg["in_dim"]] + [cfg["teacher_hidden"]] * cfg["teacher_depth"]
            + [cfg["out_dim"]])
    teacher = _MLP(dims, torch.tanh)
    with torch.no_grad():
        for layer in teacher.layers:
            fan_in = layer.weight.shape[1]
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g)
                               * cfg["teacher_gain"] / math.sqrt(fan_in))
            layer.bias.zero_()
        y = teacher(x)
        y = y / y.std()
    cut = cfg["train_size"]
    return {"x": x[:cut], "y": y[:cut], "x_val": x[cut:], "y_val": y[cut:]}


class _KahanAdamW(torch.optim.Optimizer):
    """AdamW on bf16 params with Kahan-compensated updates, as optimi does it: bf16 state
    (rounded to nearest) and a bf16 buffer ``compensation`` holding what the last rounding of
    the param lost, added back into the next update. The AdamW math is
    :func:`fused.reference.adamw_math`; the rounding is :func:`fused.formats.round_bf16`."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = torch.tensor(group["lr"], dtype=torch.float32)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    for slot in ("exp_avg", "exp_avg_sq", "compensation"):
                        state[slot] = torch.zeros_like(p)
                state["step"] += 1
                old = p.float()
                new, m, v, _ = adamw_math(
                    old, p.grad.float(), state["exp_avg"].float(), state["exp_avg_sq"].float(),
                    None, lr=lr, step=state["step"], beta1=beta1, beta2=beta2,
                    eps=group["eps"], weight_decay=group["weight_decay"], maximize=False)
                # compensated sum: this update plus what earlier roundings lost
                update = state["compensation"].float() + (new - old)
                stored = round_bf16(old + update, None)
                state["compensation"].copy_(round_bf16(update - (stored.float() - old), None))
                p.copy_(stored)
                state["exp_avg"].copy_(round_bf16(m, None))
                state["exp_avg_sq"].copy_(round_bf16(v, None))


def _optimizer(arm: str, params, cfg: dict, lr: float) -> torch.optim.Optimizer:
    _, kind, state_dtype, stochastic = ARMS[arm]
    hyper = dict(lr=lr, betas=tuple(cfg["betas"]), eps=cfg["eps"],
                 weight_decay=cfg["weight_decay"])
    if kind == "torch":
        return torch.optim.AdamW(params, **hyper)
    if kind == "kahan":
        return _KahanAdamW(params, **hyper)
    return FusedAdamW(params, **hyper, state_dtype=state_dtype, stochastic_rounding=stochastic)


def _lr_at(step: int, peak: float, cfg: dict) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``peak`` to ``min_lr``."""
    warm = cfg["warmup_steps"]
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, cfg["steps"] - warm)
    return cfg["min_lr"] + 0.5 * (peak - cfg["min_lr"]) * (1 + math.cos(math.pi * t))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(lr)  # FusedAdamW's device LR: updated in place, never rebound
        else:
            group["lr"] = lr


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps in its state (step counts included)."""
    return sum(t.nbytes for state in opt.state.values() for t in state.values()
               if isinstance(t, Tensor))


def _stored_second_moment(opt: torch.optim.Optimizer, p: Tensor) -> Tensor:
    """The optimizer's ``exp_avg_sq`` of ``p`` as fp32 values (8-bit codes dequantized)."""
    state = opt.state[p]
    if "exp_avg_sq_codes" in state:
        return dequantize(state["exp_avg_sq_codes"], state["exp_avg_sq_scales"], signed=False)
    return state["exp_avg_sq"].float()


def _train(arm: str, seed: int, lr: float, cfg: dict) -> dict:
    """One run: held-out and train-loss curves, final losses, state bytes, step time, and the
    drift of the stored second moment from an fp32 shadow fed the same grads."""
    data = _data(config_key(cfg))
    dtype = ARMS[arm][0]
    torch.manual_seed(seed)
    dims = [cfg["in_dim"]] + [cfg["hidden"]] * cfg["depth"] + [cfg["out_dim"]]
    model = _MLP(dims, F.gelu).to(dtype)  # fp32 init, cast where the arm has bf16 params
    opt = _optimizer(arm, model.parameters(), cfg, lr)  # (draws FusedAdamW's rounding seed)
    # the tensors that get 8-bit state; their second moment is also kept in fp32 here
    tracked = [p for p in model.parameters() if quantizes(p.shape)]
    shadow = [torch.zeros_like(p, dtype=torch.float32) for p in tracked]
    beta2 = cfg["betas"][1]
    order = torch.Generator().manual_seed(10_000 + seed)
    n, batch = cfg["train_size"], cfg["batch"]
    perm, pos = torch.randperm(n, generator=order), 0

    def heldout() -> float:
        with torch.no_grad():
            return F.mse_loss(model(data["x_val"]), data["y_val"]).item()

    steps_at, val_curve, train_curve = [0], [heldout()], [None]  # no train loss before step 1
    running, count, step_time = 0.0, 0, 0.0
    for step in range(cfg["steps"]):
        _set_lr(opt, _lr_at(step, lr, cfg))
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=order), 0
        idx = perm[pos:pos + batch]
        pos += batch
        loss = F.mse_loss(model(data["x"][idx]), data["y"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t0 = time.perf_counter()
        opt.step()
        step_time += time.perf_counter() - t0
        with torch.no_grad():
            for v, p in zip(shadow, tracked):
                g = p.grad.float()
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        running += loss.item()
        count += 1
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == cfg["steps"]:
            steps_at.append(step + 1)
            val_curve.append(heldout())
            train_curve.append(running / count)
            running, count = 0.0, 0
    n_params = sum(p.numel() for p in model.parameters())
    stored = torch.cat([_stored_second_moment(opt, p).flatten() for p in tracked])
    tail = [v for v in train_curve[-5:] if v is not None and math.isfinite(v)]
    return {"step": steps_at, "heldout_loss": val_curve, "train_loss": train_curve,
            "final_heldout_loss": val_curve[-1],
            "final_train_loss": statistics.fmean(tail) if tail else float("nan"),
            "params": n_params, "state_bytes_per_param": _state_bytes(opt) / n_params,
            "step_ms": 1e3 * step_time / cfg["steps"],
            "second_moment_ratio": (stored / torch.cat([v.flatten() for v in shadow]))
            .median().item()}


def _report(done: dict, key: tuple, result: dict, seconds: float, total: int) -> None:
    """The progress line of one (arm, seed, peak LR) run."""
    arm, seed, lr = key
    log(f"  [{len(done)}/{total}] lr {lr:g} {arm:<34} seed {seed}: held-out "
        f"{result['final_heldout_loss']:.4e} ({seconds:.1f} s, step {result['step_ms']:.2f} ms)")


# ---------------------------------------------------------------------------------------------
# summaries and verdicts
# ---------------------------------------------------------------------------------------------
def _compare(arm: dict, ref: dict) -> dict:
    """``arm`` against ``ref`` (final held-out loss summaries over the same seeds), in % of
    ref's mean: the difference of the means, twice its standard error (within seed noise: the
    difference is at most that), and the per-seed (paired) differences."""
    base = ref["mean"]
    paired = [100 * (a - r) / r for a, r in zip(arm["values"], ref["values"])]
    diff = 100 * (arm["mean"] - base) / base
    two_se = 200 * se_diff(arm, ref) / base
    return {"diff_pct": diff, "two_se_pct": two_se,
            "within_noise": bool(abs(diff) <= two_se) if math.isfinite(two_se) else False,
            "paired_pct": paired, "paired_min_pct": min(paired), "paired_max_pct": max(paired),
            "seeds_higher": sum(p > 0 for p in paired)}


def _vs(c: dict, what: str = "fp32 AdamW") -> str:
    if not math.isfinite(c["diff_pct"]):
        return "diverged"
    noise = ("within seed noise" if c["within_noise"]
             else "outside seed noise (" + ("worse" if c["diff_pct"] > 0 else "better") + ")")
    return (f"{c['diff_pct']:+.1f}% vs {what} (2 x s.e. = {c['two_se_pct']:.1f}%; per seed "
            f"{c['paired_min_pct']:+.1f}% to {c['paired_max_pct']:+.1f}%, higher in "
            f"{c['seeds_higher']}/{len(c['paired_pct'])}): {noise}")


def _worse(c: dict) -> bool:
    return not c["within_noise"] and c["diff_pct"] > 0


def _verdicts(sweep: dict, main_lr: float) -> dict:
    main = sweep[main_lr]
    loss, cmp, ratio = main["final_heldout_loss"], main["compare"], main["second_moment_ratio"]
    ref = loss[REFERENCE]
    verdicts = {}

    rtn, torch_bf16 = cmp[BF16_FP32_STATE], cmp[TORCH_BF16]
    head = ("pure-bf16 training with round-to-nearest measurably loses to fp32"
            if _worse(rtn) and _worse(torch_bf16)
            else "the expected bf16 round-to-nearest loss showed only in part"
            if _worse(rtn) or _worse(torch_bf16)
            else "the expected bf16 round-to-nearest loss did NOT show")
    verdicts["bf16_round_to_nearest"] = (
        f"{head} at peak LR {main_lr:g}: bf16 params + fp32 state {_vs(rtn)}; torch AdamW on "
        f"bf16 params {_vs(torch_bf16)}")

    parts = []
    for fix in (BF16_SR, KAHAN):
        text = f"{fix}: {_vs(cmp[fix])}"
        for gap_arm in (TORCH_BF16, BF16_FP32_STATE):
            if _worse(cmp[gap_arm]):
                closed = 1 - (loss[fix]["mean"] - ref["mean"]) / (loss[gap_arm]["mean"]
                                                                   - ref["mean"])
                text += f"; closes {100 * closed:.0f}% of the gap of {gap_arm}"
            else:
                text += f"; no measurable gap of {gap_arm} to close"
        parts.append(text)
    verdicts["stochastic_rounding_and_kahan"] = ". ".join(parts)

    sr, kahan = loss[BF16_SR], loss[KAHAN]
    d = 100 * (kahan["mean"] - sr["mean"]) / ref["mean"]
    two_se = 200 * se_diff(kahan, sr) / ref["mean"]
    paired = [100 * (k - s) / r for k, s, r in zip(kahan["values"], sr["values"], ref["values"])]
    outcome = ("Kahan beats stochastic rounding" if d < -two_se
               else "stochastic rounding beats Kahan" if d > two_se
               else "no measurable difference between Kahan and stochastic rounding")
    verdicts["kahan_vs_stochastic_rounding"] = (
        f"{outcome} at peak LR {main_lr:g}: Kahan minus SR = {d:+.1f}% of the fp32 loss "
        f"(2 x s.e. = {two_se:.1f}%; per seed {min(paired):+.1f}% to {max(paired):+.1f}%); "
        f"cost measured here: state {main['state_bytes_per_param'][KAHAN]:.2f} vs "
        f"{main['state_bytes_per_param'][BF16_SR]:.2f} bytes/param, optimizer step "
        f"{main['step_ms'][KAHAN]:.2f} vs {main['step_ms'][BF16_SR]:.2f} ms on this CPU "
        f"(plain-torch paths of both, not GPU kernels). What remains of Kahan's gap is its "
        f"state: rounded to nearest in bf16, its second moment ends at {ratio[KAHAN]:.2f}x an "
        f"fp32 shadow (SR's: {ratio[BF16_SR]:.2f}x), and fp32 params with the same bf16 state "
        f"end {cmp[FP32_BF16_STATE]['diff_pct']:+.1f}% vs fp32 AdamW (Kahan: "
        f"{cmp[KAHAN]['diff_pct']:+.1f}%)")

    def state_text(arm: str, at: dict) -> str:
        return (f"{arm}: {_vs(at['compare'][arm])}; stored second moment "
                f"{at['second_moment_ratio'][arm]:.2f}x an fp32 shadow")

    lines = [f"at peak LR {main_lr:g}: " + "; ".join(
        state_text(arm, main) for arm in (FP32_BF16_STATE, FP32_8BIT, FP32_8BIT_SR,
                                          BF16_8BIT_SR))]
    for lr in sorted(sweep):
        if lr != main_lr and FP32_8BIT in sweep[lr]["compare"]:
            lines.append(f"at peak LR {lr:g}: " + "; ".join(
                state_text(arm, sweep[lr]) for arm in (FP32_8BIT, FP32_8BIT_SR)
                if arm in sweep[lr]["compare"]))
    ref_by_lr = {lr: sweep[lr]["final_heldout_loss"][REFERENCE]["mean"] for lr in sorted(sweep)}
    # a drift of the stored second moment that every seed agrees on explains a state format's
    # difference even where it is within seed noise
    drifted = [arm for arm in (FP32_BF16_STATE, FP32_8BIT) if abs(ratio[arm] - 1) > 0.05
               and len({d > 0 for d in cmp[arm]["paired_pct"]}) == 1]
    if drifted:
        def effect(arm: str) -> str:
            size = "larger" if ratio[arm] < 1 else "smaller"
            return (f"{arm} {ratio[arm]:.2f}x: {size} steps, {cmp[arm]['diff_pct']:+.1f}% vs fp32 "
                    "AdamW with the same sign in every seed")

        why = ("why round-to-nearest state differs: its stored second moment drifts from an fp32 "
               "shadow fed the same grads (" + "; ".join(effect(arm) for arm in drifted)
               + f"), while with SR it stays at {ratio[FP32_8BIT_SR]:.2f}x (8-bit) and "
               f"{ratio[BF16_SR]:.2f}x (bf16)")
        if any(ratio[arm] < 1 for arm in drifted) and min(ref_by_lr, key=ref_by_lr.get) > main_lr:
            why += ("; fp32 AdamW's own loss falls as the peak LR grows ("
                    + ", ".join(f"{lr:g}: {v:.3e}" for lr, v in ref_by_lr.items())
                    + "), so larger steps lower the loss at this LR")
        lines.append(why)
    verdicts["low_precision_state"] = ". ".join(lines)

    lines = []
    for lr in sorted(sweep):
        at = sweep[lr]
        if FP32_8BIT_SR not in at["compare"]:
            continue
        a, b = at["final_heldout_loss"][FP32_8BIT_SR], at["final_heldout_loss"][FP32_8BIT]
        d = 100 * (a["mean"] - b["mean"]) / b["mean"]
        two_se = 200 * se_diff(a, b) / b["mean"]
        paired = [100 * (x - y) / y for x, y in zip(a["values"], b["values"])]
        outcome = ("lower loss with SR" if d < -two_se else "higher loss with SR" if d > two_se
                   else "no measurable difference in loss")
        lines.append(
            f"at peak LR {lr:g}: {outcome}, {d:+.2f}% vs without (2 x s.e. = {two_se:.2f}%; per "
            f"seed {min(paired):+.2f}% to {max(paired):+.2f}%); vs fp32 AdamW: with SR "
            f"{at['compare'][FP32_8BIT_SR]['diff_pct']:+.2f}%, without "
            f"{at['compare'][FP32_8BIT]['diff_pct']:+.2f}%; stored second moment vs fp32 shadow: "
            f"with SR {at['second_moment_ratio'][FP32_8BIT_SR]:.2f}x, without "
            f"{at['second_moment_ratio'][FP32_8BIT]:.2f}x")
    verdicts["8bit_requantization_sr"] = ("fp32 params + 8-bit state, stochastic rounding on "
                                          "requantization: " + "; ".join(lines))

    lines = []
    for lr in sorted(sweep):
        at = sweep[lr]
        lines.append(f"peak LR {lr:g} (fp32 AdamW {ref_by_lr[lr]:.3e}): " + ", ".join(
            f"{arm} {at['compare'][arm]['diff_pct']:+.1f}% (2 x s.e. "
            f"{at['compare'][arm]['two_se_pct']:.1f}%)"
            for arm in (BF16_FP32_STATE, BF16_SR) if arm in at["compare"]))
    gaps = [sweep[lr]["compare"][BF16_FP32_STATE]["diff_pct"] for lr in sorted(sweep)]
    top = max(sweep)
    verdicts["lr_dependence"] = (
        "final held-out loss vs fp32 AdamW at the same peak LR: " + "; ".join(lines)
        + ". The gap of bf16 params + fp32 state (round-to-nearest) "
        + ("shrinks as the peak LR grows" if all(x > y for x, y in zip(gaps, gaps[1:]))
           else "does not shrink steadily with the peak LR")
        + f" and at {top:g} is "
        + ("still outside seed noise" if _worse(sweep[top]["compare"][BF16_FP32_STATE])
           else "within seed noise"))
    return verdicts


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
_COLORS = {REFERENCE: "black", BF16_FP32_STATE: "tab:red", TORCH_BF16: "tab:orange",
           BF16_SR: "tab:green", KAHAN: "tab:olive", FP32_BF16_STATE: "tab:blue",
           FP32_8BIT: "tab:purple", FP32_8BIT_SR: "tab:pink", BF16_8BIT_SR: "tab:cyan"}
_BF16_PARAM_ARMS = [REFERENCE, BF16_FP32_STATE, TORCH_BF16, BF16_SR, KAHAN, BF16_8BIT_SR]
_STATE_ARMS = [REFERENCE, FP32_BF16_STATE, FP32_8BIT, FP32_8BIT_SR]


def _band_plot(ax, xs: list[float], runs: list[list[float]], label: str, color) -> None:
    """Mean over seeds as a line, min-max over seeds as a band."""
    per_x = list(zip(*runs))
    ax.plot(xs, [statistics.fmean(v) for v in per_x], color=color, label=label, lw=1.3,
            ls="--" if label == KAHAN else "-")  # Kahan lies on fp32 params + bf16 state
    ax.fill_between(xs, [min(v) for v in per_x], [max(v) for v in per_x], color=color, alpha=0.15)


def _plot(curves: dict, sweep: dict, cfg: dict, quick: bool) -> None:
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    s = stamp()
    fig, axes = plt.subplots(2, 3, figsize=(17, 8.5))
    ref_runs = curves[REFERENCE]
    for row, key in enumerate(("heldout_loss", "train_loss")):
        where = " — held-out" if row == 0 else " — train"
        for col, arms in enumerate((_BF16_PARAM_ARMS, _STATE_ARMS)):
            ax = axes[row][col]
            for arm in arms:
                runs = curves[arm]  # from step 1 on (the train curve has no step 0)
                _band_plot(ax, runs[0]["step"][1:], [r[key][1:] for r in runs], arm,
                           _COLORS[arm])
            ax.set(xlabel="step", yscale="log",
                   ylabel="held-out MSE" if row == 0 else "train MSE (mean per interval)",
                   title=("bf16 params" if col == 0 else "fp32 params, low-precision state")
                   + where)
            ax.legend(fontsize=7)
        # against fp32 AdamW at the same step and seed (paired), mean and min-max over seeds
        ax = axes[row][2]
        for arm in ARMS:
            if arm == REFERENCE:
                continue
            rel = [[100 * (a / r - 1) for a, r in zip(run[key][1:], ref[key][1:])]
                   for run, ref in zip(curves[arm], ref_runs)]
            _band_plot(ax, ref_runs[0]["step"][1:], rel, arm, _COLORS[arm])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_yscale("symlog", linthresh=1)
        ax.yaxis.set_major_formatter(plain)
        ax.set(xlabel="step", ylabel="% vs fp32 AdamW, same seed (symlog)",
               title="relative to fp32 AdamW" + where)
        ax.legend(fontsize=6)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(f"Low-precision AdamW, teacher-student MLP: peak LR {cfg['lr']:g}, cosine to "
                 f"{cfg['min_lr']:g} over {cfg['steps']} steps, mean and min–max over "
                 f"{len(ref_runs)} seeds{' (QUICK smoke run)' if quick else ''} — "
                 f"{_cpu_name()}, {s['date']}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, "precision_study")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.4))
    lrs = sorted(sweep)
    for arm in ARMS:
        at = [lr for lr in lrs if arm != REFERENCE and arm in sweep[lr]["compare"]]
        if len(at) < 2:
            continue
        c = [sweep[lr]["compare"][arm] for lr in at]
        ax.errorbar(at, [x["diff_pct"] for x in c], yerr=[x["two_se_pct"] for x in c],
                    color=_COLORS[arm], marker="o", capsize=3, label=arm)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_yscale("symlog", linthresh=1)
    ax.yaxis.set_major_formatter(plain)
    ax.set(xscale="log", xlabel="peak LR (warmup, then cosine to 0)",
           ylabel="final held-out MSE, % vs fp32 AdamW (±2 s.e., symlog)")
    ax.set_title(f"Where low precision costs loss{' (QUICK)' if quick else ''} — {_cpu_name()}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, "precision_study_lr")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
def run(quick: bool = False, device: str | None = None, seeds: int = 3,
        workers: int | None = None) -> dict:
    """The study on CPU (another ``device`` is refused: the arms are sized for CPU and
    FusedAdamW's CPU path; the GPU bench measures the kernels). ``workers``: processes running
    the runs (default: 2 on a machine with 2+ cores, 1 for ``quick``)."""
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"Invalid device: {device!r} (the precision study runs on CPU)")
    cfg = dict(CONFIG)
    sweep_arms = dict(SWEEP)
    if quick:  # plumbing check, not a reproduction
        cfg.update(steps=16, warmup_steps=4, eval_every=4, train_size=2048, heldout_size=512)
        sweep_arms = {1e-2: SWEEP[1e-2]}
        seeds = min(seeds, 2)
    if workers is None:
        workers = 1 if quick else max(1, min(2, os.cpu_count() or 1))
    t_start = time.perf_counter()
    log(f"precision_study on cpu, {workers} worker process(es) x 1 thread, seeds={seeds}, "
        f"quick={quick}")

    plan = {cfg["lr"]: list(ARMS), **sweep_arms}
    slow = {FP32_8BIT_SR: 0, BF16_8BIT_SR: 0, FP32_8BIT: 1, BF16_SR: 2}
    # the slowest first, so that the workers end together
    jobs = {(arm, seed, lr): (slow.get(arm, 3), _train, dict(arm=arm, seed=seed, lr=lr, cfg=cfg))
            for lr, arms in plan.items() for arm in arms for seed in range(seeds)}
    runs: dict = {lr: {arm: [None] * seeds for arm in arms} for lr, arms in plan.items()}
    done = run_jobs(jobs, workers, 1, functools.partial(_report, total=len(jobs)))
    for (arm, seed, lr), r in done.items():
        runs[lr][arm][seed] = r

    keys = ("final_heldout_loss", "final_train_loss", "state_bytes_per_param", "step_ms",
            "second_moment_ratio")
    sweep = {}
    for lr, by_arm in sorted(runs.items()):
        table = {arm: {k: summary([r[k] for r in by_arm[arm]]) for k in keys} for arm in by_arm}
        ref = table[REFERENCE]["final_heldout_loss"]
        sweep[lr] = {"arms": list(by_arm),
                     "final_heldout_loss": {a: t["final_heldout_loss"] for a, t in table.items()},
                     "compare": {a: _compare(t["final_heldout_loss"], ref)
                                 for a, t in table.items()},
                     **{k: {a: t[k]["mean"] for a, t in table.items()}
                        for k in ("state_bytes_per_param", "step_ms", "second_moment_ratio")},
                     "table": table}
    verdicts = _verdicts(sweep, cfg["lr"])

    main = sweep[cfg["lr"]]
    vs = "vs fp32, 2 x s.e."
    columns = ["arm", "params", "state", "rounding", "held-out MSE x1e3 (mean ± std [min, max])",
               vs, "per seed", "v / fp32 shadow", "state B/param", "step ms"]
    rows = []
    for arm, (dtype, kind, state_dtype, stochastic) in ARMS.items():
        c = main["compare"][arm]
        rows.append({
            "arm": arm, "params": _DTYPE_NAMES[dtype], "state": _DTYPE_NAMES[state_dtype or dtype],
            "rounding": ("stochastic" if stochastic else "Kahan" if kind == "kahan"
                         else "nearest" if torch.bfloat16 in (dtype, state_dtype)
                         or state_dtype == torch.uint8 else "-"),
            columns[4]: pm(main["final_heldout_loss"][arm], 1e3, 3),
            vs: "-" if arm == REFERENCE else f"{c['diff_pct']:+.1f}% ({c['two_se_pct']:.1f}%)",
            "per seed": ("-" if arm == REFERENCE else
                         f"{c['paired_min_pct']:+.1f}% to {c['paired_max_pct']:+.1f}%"),
            "v / fp32 shadow": round(main["second_moment_ratio"][arm], 3),
            "state B/param": round(main["state_bytes_per_param"][arm], 2),
            "step ms": round(main["step_ms"][arm], 2)})
    print(format_table(rows, columns))
    sweep_cols = [arm for arm in ARMS if sum(arm in sweep[lr]["compare"] for lr in sweep) > 1]
    sweep_rows = [{"peak LR": lr, **{
        arm: (f"{1e3 * sweep[lr]['final_heldout_loss'][arm]['mean']:.3f}"
              + ("" if arm == REFERENCE else f" ({sweep[lr]['compare'][arm]['diff_pct']:+.1f}%)")
              if arm in sweep[lr]["compare"] else "-") for arm in sweep_cols}}
        for lr in sweep]
    print("final held-out MSE x1e3 by peak LR (mean over seeds; vs fp32 AdamW at that LR):")
    print(format_table(sweep_rows, ["peak LR"] + sweep_cols))
    for name, text in verdicts.items():
        print(f"verdict ({name}): {text}")

    elapsed = time.perf_counter() - t_start
    result = {
        "config": {"device": "cpu", "measured_on": _cpu_name(),
                   "fused_cpu_path": ("Triton interpreter"
                                      if os.environ.get("TRITON_INTERPRET") == "1"
                                      else "plain torch"),
                   "workers": workers, "threads_per_worker": 1, "seeds": seeds,
                   "quick": quick, "task": cfg, "main_lr": cfg["lr"],
                   "sweep": {str(lr): arms for lr, arms in plan.items()},
                   "arms": {arm: {"params": _DTYPE_NAMES[d], "optimizer": kind,
                                  "state": _DTYPE_NAMES[s or d], "stochastic_rounding": sr}
                            for arm, (d, kind, s, sr) in ARMS.items()},
                   "elapsed_s": round(elapsed, 1)},
        "table": main["table"],
        "rows": rows,
        "sweep": {str(lr): v for lr, v in sweep.items()},
        "sweep_rows": sweep_rows,
        "curves": runs[cfg["lr"]],
        "sweep_curves": {str(lr): by_arm for lr, by_arm in runs.items() if lr != cfg["lr"]},
        "verdicts": verdicts,
    }
    write_json("precision_study", result)
    _plot(runs[cfg["lr"]], sweep, cfg, quick)
    log(f"precision_study done in {elapsed:.0f} s")
    return {"stamp": stamp(), **result}


if __name__ == "__main__":
    run()
