"""What warmup does, at small scale: classic claims, re-run on synthetic tasks.

a. Goyal et al. (2017), "Accurate, Large Minibatch SGD": with the linear scaling rule (batch k·B,
   LR k·η) a large batch trains as well as the small one (batch B, LR η) *if* the LR is warmed up
   gradually from η to k·η; without warmup, or with a constant warmup at η that jumps to k·η, it
   does worse. Here: an MLP with BatchNorm, SGD + momentum + weight decay, on a teacher-network
   classification task with a held-out split; warmup per iteration; step decay afterwards.
b. Post-LN Transformers trained with Adam need warmup (Vaswani et al. 2017; Liu et al. 2020,
   Xiong et al. 2020): without it they stall or diverge at an LR that trains fine after a linear
   warmup. Here: a small Post-LN encoder (``nn.TransformerEncoderLayer(norm_first=False)``) on
   sequence reversal of random tokens; Adam; no warmup vs linear warmup, cosine afterwards.
c. Large-batch SGD vs LARS (You et al. 2017, "Large Batch Training of Convolutional Networks"):
   beyond some k the linear scaling rule fails even with warmup, and LARS (a layer-wise trust
   ratio) with warmup keeps the small-batch accuracy. Here: part a's MLP and data at k = 32, 64,
   128 (batch 1024 to 4096, the same 12 epochs), all with gradual warmup (peak/k to peak over 2
   epochs) and part a's step decay: ``fused.FusedSGD`` (momentum 0.9) at kη, ``FusedSGD`` and
   ``fused.FusedLARS`` (trust coefficient 0.001, momentum 0.9) at a peak LR swept at k = 128
   (picked by the error on a separate tuning split, one seed) and scaled ∝ k below it. Weight
   decay, and so LARS's adaptation, on weight matrices only (biases and BatchNorm params in a
   group without decay, as the recipes do).
d. LAMB vs AdamW at a large batch (You et al. 2020, "Large Batch Optimization for Deep
   Learning"): a Post-LN encoder on the reversal task at batch 512, ``fused.FusedAdamW`` vs
   ``fused.FusedLAMB``, both with linear warmup then cosine, each at the best LR of a small
   sweep (picked on a tuning set of fresh sequences, one seed); weight decay 0.01 on weight
   matrices only (so LAMB adapts those; biases and LayerNorm params take its plain update).
e. "Warmup makes little sense with plain SGD; it is for adaptive optimizers (Adam, RMSProp),
   whose statistics need a few steps": part b's model, batch, steps and schedules with
   ``FusedSGD`` without momentum or weight decay, at two LRs, with and without warmup, beside
   Adam with and without warmup at part b's LR (part b's runs) and at a lower one.

Every arm runs with several seeds (model init and batch order; the data set is fixed). The
verdicts printed and written to JSON are computed from the numbers, never written in advance;
"within noise" means a difference of means at most twice its standard error (seeds taken as
independent). A run of parts c-e whose loss turns non-finite stops there and counts as diverged.

Run: ``python -m bench.warmup_effect`` (about six minutes on 2 CPU cores: parts a and b in this
process as they always ran, about two minutes; parts c-e in two single-threaded spawned worker
processes on CPU, about four; ``quick=True`` is a smoke run in one process, with fewer steps,
that proves the plumbing, not the claims). On CPU the fused optimizers take their plain-torch
path (``TRITON_INTERPRET`` unset).
Call :func:`run` from a script under ``if __name__ == "__main__":`` (the workers are spawned).
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import CosineAnnealingLR, MultiStepLR

from bench.common import (
    config_key,
    finish_figure,
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
from fused import FusedAdamW, FusedLAMB, FusedLARS, FusedSGD
from warmup import GradualWarmupScheduler

# ---------------------------------------------------------------------------------------------
# a. Goyal et al.: large-batch SGD with the linear scaling rule
# ---------------------------------------------------------------------------------------------
GOYAL = {
    "in_dim": 32,
    "classes": 10,
    "train_size": 16384,
    "heldout_size": 4096,
    "label_noise": 0.0,
    "teacher_gain": 1.0,
    "hidden": 256,
    "depth": 4,  # hidden Linear-BN-ReLU blocks
    "small_batch": 32,
    "k": 32,  # large batch = k * small_batch, LR = k * small_lr
    "small_lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "epochs": 12,
    "warmup_epochs": 2,
    "decay_epochs": [6, 9],  # LR x 0.1 at these epochs (counted in iterations, per arm)
    "points_per_epoch": 4,  # train-loss curve resolution
}
GOYAL_ARMS = ["small batch (B, η)", "large, no warmup (kB, kη)", "large, constant warmup",
              "large, gradual warmup"]


def _goyal_data(cfg: dict, device: torch.device, tune_size: int = 0) -> dict:
    """Teacher-network labels on Gaussian inputs, with some label noise; fixed across seeds.
    ``tune_size`` > 0 adds a tuning split (``x_tune``, ``y_tune``) from the same teacher, drawn
    after everything else, so the train and held-out splits do not depend on it."""
    g = torch.Generator().manual_seed(1234)
    n = cfg["train_size"] + cfg["heldout_size"]
    x = torch.randn(n, cfg["in_dim"], generator=g)
    w1 = torch.randn(cfg["in_dim"], 128, generator=g) / math.sqrt(cfg["in_dim"])
    w2 = torch.randn(128, cfg["classes"], generator=g) / math.sqrt(128)

    def labels(inputs: torch.Tensor) -> torch.Tensor:
        y = (torch.tanh(inputs @ w1 * cfg["teacher_gain"]) @ w2).argmax(1)
        flip = torch.rand(len(inputs), generator=g) < cfg["label_noise"]
        y[flip] = torch.randint(0, cfg["classes"], (int(flip.sum()),), generator=g)
        return y

    y = labels(x)
    cut = cfg["train_size"]
    data = {"x": x[:cut].to(device), "y": y[:cut].to(device),
            "x_val": x[cut:].to(device), "y_val": y[cut:].to(device)}
    if tune_size:
        x_tune = torch.randn(tune_size, cfg["in_dim"], generator=g)
        data.update(x_tune=x_tune.to(device), y_tune=labels(x_tune).to(device))
    return data


def _goyal_model(cfg: dict) -> nn.Module:
    layers: list[nn.Module] = []
    width = cfg["in_dim"]
    for _ in range(cfg["depth"]):
        layers += [nn.Linear(width, cfg["hidden"]), nn.BatchNorm1d(cfg["hidden"]), nn.ReLU()]
        width = cfg["hidden"]
    layers.append(nn.Linear(width, cfg["classes"]))
    return nn.Sequential(*layers)


def _goyal_run(arm: str, seed: int, cfg: dict, data: dict, device: torch.device) -> dict:
    small = arm == GOYAL_ARMS[0]
    k = 1 if small else cfg["k"]
    batch = cfg["small_batch"] * k
    iters_per_epoch = cfg["train_size"] // batch
    warmup_iters = cfg["warmup_epochs"] * iters_per_epoch
    milestones = [e * iters_per_epoch for e in cfg["decay_epochs"]]

    torch.manual_seed(seed)
    model = _goyal_model(cfg).to(device)
    eta = cfg["small_lr"]
    if arm in (GOYAL_ARMS[0], GOYAL_ARMS[1]):
        # no warmup: the small batch at η, or the large batch at kη from the first step
        opt = torch.optim.SGD(model.parameters(), lr=eta * k, momentum=cfg["momentum"],
                              weight_decay=cfg["weight_decay"])
        sched = MultiStepLR(opt, milestones, gamma=0.1)
    else:
        # warmup from η to kη over warmup_iters, then the same step decay (after_scheduler's
        # epoch 0 is the end of warmup, so its milestones are shifted by warmup_iters)
        opt = torch.optim.SGD(model.parameters(), lr=eta, momentum=cfg["momentum"],
                              weight_decay=cfg["weight_decay"])
        after = MultiStepLR(opt, [m - warmup_iters for m in milestones], gamma=0.1)
        method = "constant" if arm == GOYAL_ARMS[2] else "linear"
        sched = GradualWarmupScheduler(opt, multiplier=k, total_epoch=warmup_iters,
                                       after_scheduler=after, warmup_method=method)
    return _goyal_train(model, opt, sched, seed, cfg, data, batch, device)


def _goyal_train(model: nn.Module, opt, sched, seed: int, cfg: dict, data: dict, batch: int,
                 device: torch.device, stop_on_divergence: bool = False) -> dict:
    """Train ``model`` for ``cfg["epochs"]`` epochs of batches of ``batch`` (order from
    ``seed``), ``sched.step()`` every iteration; the train-loss, held-out and LR curves.
    ``stop_on_divergence``: stop at the first non-finite loss, the rest of the curves NaN."""
    iters_per_epoch = cfg["train_size"] // batch
    total = cfg["epochs"] * iters_per_epoch
    order = torch.Generator().manual_seed(10_000 + seed)
    chunk = iters_per_epoch // cfg["points_per_epoch"]
    curve_epoch, curve_loss, lrs, val_curve = [], [], [], []
    running, count, it, diverged_at = 0.0, 0, 0, None
    for _ in range(cfg["epochs"]):
        if diverged_at is not None:
            val_curve.append((math.nan, math.nan))
            continue
        model.train()
        perm = torch.randperm(cfg["train_size"], generator=order).to(device)
        for i in range(iters_per_epoch):
            if diverged_at is not None:  # the remaining points of the curves
                it += 1
                if it % chunk == 0:
                    curve_epoch.append(it / iters_per_epoch)
                    curve_loss.append(math.nan)
                continue
            idx = perm[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(model(data["x"][idx]), data["y"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            lrs.append(float(opt.param_groups[0]["lr"]))
            opt.step()
            sched.step()
            it += 1
            running += loss.item() if math.isfinite(loss.item()) else float("nan")
            count += 1
            if stop_on_divergence and not math.isfinite(loss.item()):
                diverged_at = it
            if it % chunk == 0:
                curve_epoch.append(it / iters_per_epoch)
                curve_loss.append(running / count if diverged_at is None else math.nan)
                running, count = 0.0, 0
        val_curve.append(_goyal_eval(model, data) if diverged_at is None
                         else (math.nan, math.nan))
    final = val_curve[-1]
    return {"train_epoch": curve_epoch, "train_loss": curve_loss,
            "val_loss": [v[0] for v in val_curve], "val_error": [v[1] for v in val_curve],
            "final_train_loss": statistics.fmean(curve_loss[-cfg["points_per_epoch"]:]),
            "final_val_loss": final[0], "final_val_error": final[1],
            "lr": lrs[:: max(1, total // 400)], "iterations": total, "batch": batch,
            **({"diverged_at": diverged_at} if stop_on_divergence else {})}


@torch.no_grad()
def _goyal_eval(model: nn.Module, data: dict) -> tuple[float, float]:
    model.eval()
    logits = model(data["x_val"])
    loss = F.cross_entropy(logits, data["y_val"]).item()
    error = (logits.argmax(1) != data["y_val"]).float().mean().item()
    return loss, error


# ---------------------------------------------------------------------------------------------
# b. Post-LN Transformer + Adam
# ---------------------------------------------------------------------------------------------
POSTLN = {
    "vocab": 32,
    "seq_len": 16,
    "d_model": 64,
    "heads": 4,
    "layers": 6,
    "batch": 64,
    "steps": 300,
    "lr": 5e-3,
    "betas": (0.9, 0.999),
    "warmup_steps": 60,
    "eval_size": 1024,
    "curve_every": 10,
}
POSTLN_ARMS = ["no warmup", "linear warmup"]
FIT_LOSS = 1.0  # "has started to learn": running train loss below this (chance is ln 32 = 3.47)


class _PostLNEncoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d = cfg["d_model"]
        self.embed = nn.Embedding(cfg["vocab"], d)
        self.pos = nn.Parameter(torch.randn(cfg["seq_len"], d))  # same scale as the tokens
        layer = nn.TransformerEncoderLayer(d, cfg["heads"], dim_feedforward=4 * d, dropout=0.0,
                                           batch_first=True, norm_first=False)
        self.encoder = nn.TransformerEncoder(layer, cfg["layers"], enable_nested_tensor=False)
        self.head = nn.Linear(d, cfg["vocab"])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos
        return self.head(self.encoder(h))


def _reverse_batch(n: int, cfg: dict, g: torch.Generator, device) -> tuple[torch.Tensor, ...]:
    x = torch.randint(0, cfg["vocab"], (n, cfg["seq_len"]), generator=g)
    return x.to(device), x.flip(1).to(device)


def _postln_schedule(opt, arm: str, cfg: dict):
    """Part b's schedules: cosine over the run, or linear warmup from 0 then cosine."""
    steps, warm = cfg["steps"], cfg["warmup_steps"]
    if arm == "no warmup":
        return CosineAnnealingLR(opt, T_max=steps)
    after = CosineAnnealingLR(opt, T_max=steps - warm)
    return GradualWarmupScheduler(opt, multiplier=1, total_epoch=warm, after_scheduler=after)


def _postln_run(arm: str, seed: int, cfg: dict, device: torch.device) -> dict:
    torch.manual_seed(seed)
    model = _PostLNEncoder(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], betas=cfg["betas"])
    return _postln_train(model, opt, _postln_schedule(opt, arm, cfg), seed, cfg, device)


def _postln_train(model: nn.Module, opt, sched, seed: int, cfg: dict, device: torch.device,
                  stop_on_divergence: bool = False, tune_seed: int | None = None) -> dict:
    """Train on fresh reversal batches for ``cfg["steps"]`` steps (batches from ``seed``); the
    train-loss curve, steps until it is below FIT_LOSS, held-out loss and token accuracy
    (sequences from seed 99; ``tune_seed``: also those of a tuning set from that seed).
    ``stop_on_divergence``: stop at the first non-finite loss, the rest of the curve NaN."""
    g = torch.Generator().manual_seed(20_000 + seed)
    x_val, y_val = _reverse_batch(cfg["eval_size"], cfg, torch.Generator().manual_seed(99), device)
    curve_step, curve_loss = [], []
    running, count, diverged_at = 0.0, 0, None
    for step in range(1, cfg["steps"] + 1):
        if diverged_at is None:
            model.train()
            x, y = _reverse_batch(cfg["batch"], cfg, g, device)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
            count += 1
            if stop_on_divergence and not math.isfinite(loss.item()):
                diverged_at = step
        if step % cfg["curve_every"] == 0:
            curve_step.append(step)
            curve_loss.append(running / count if diverged_at is None else math.nan)
            running, count = 0.0, 0

    @torch.no_grad()
    def evaluate(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        if diverged_at is not None:
            return math.nan, math.nan
        model.eval()
        logits = model(x)
        return (F.cross_entropy(logits.flatten(0, 1), y.flatten()).item(),
                (logits.argmax(-1) == y).float().mean().item())

    val_loss, val_acc = evaluate(x_val, y_val)
    fitted = [st for st, lo in zip(curve_step, curve_loss) if lo < FIT_LOSS]
    result = {"step": curve_step, "train_loss": curve_loss,
              "steps_to_fit": fitted[0] if fitted else None,
              "final_train_loss": statistics.fmean(curve_loss[-5:]),
              "final_val_loss": val_loss, "final_val_accuracy": val_acc}
    if tune_seed is not None:
        x_tune, y_tune = _reverse_batch(cfg["eval_size"], cfg,
                                        torch.Generator().manual_seed(tune_seed), device)
        result["tune_loss"], result["tune_accuracy"] = evaluate(x_tune, y_tune)
    if stop_on_divergence:
        result["diverged_at"] = diverged_at
    return result


# ---------------------------------------------------------------------------------------------
# c. large-batch MLP: SGD vs LARS, both with gradual warmup
# ---------------------------------------------------------------------------------------------
LARS = {
    "ks": [32, 64, 128],
    "sweep_k": 128,  # each optimizer's peak LR is swept here, then scaled ∝ k below it
    "sgd_sweep": [0.4, 0.8, 1.6, 3.2, 12.8],  # peak LRs at sweep_k (12.8 = kη)
    "lars_sweep": [3.0, 10.0, 30.0, 100.0],
    "momentum": 0.9,
    "weight_decay": 5e-4,  # on weight matrices only
    "trust_coeff": 1e-3,
    "tune_size": 4096,  # the split the sweep picks on (the held-out split is not used for it)
}
LARS_ARMS = ["SGD + warmup, kη", "SGD + warmup, swept LR", "LARS + warmup, swept LR"]
_LARS_OPTIMIZER = {LARS_ARMS[0]: "SGD", LARS_ARMS[1]: "SGD", LARS_ARMS[2]: "LARS"}


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The recipes' param groups: weight decay on weight matrices (and embeddings), none on
    biases and norm params. LARS / LAMB adapt only the group with weight decay."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@functools.lru_cache(maxsize=2)
def _lars_data(key: tuple, tune_size: int, device: str) -> dict:
    """Part a's data set plus a tuning split, built once per process."""
    return _goyal_data(dict(key), torch.device(device), tune_size)


def _lars_run(optimizer: str, peak_lr: float, k: int, seed: int, goyal: dict, lars: dict,
              device: str) -> dict:
    """Part a's MLP, data and schedule at batch k·B: warmup from peak/k to ``peak_lr`` over
    ``warmup_epochs``, then × 0.1 at the decay epochs; ``optimizer`` "SGD" or "LARS"."""
    data = _lars_data(config_key(goyal), lars["tune_size"], device)
    batch = goyal["small_batch"] * k
    iters_per_epoch = goyal["train_size"] // batch
    warmup_iters = goyal["warmup_epochs"] * iters_per_epoch
    milestones = [e * iters_per_epoch - warmup_iters for e in goyal["decay_epochs"]]
    torch.manual_seed(seed)
    model = _goyal_model(goyal).to(device)
    groups = _decay_groups(model, lars["weight_decay"])
    if optimizer == "SGD":
        opt = FusedSGD(groups, lr=peak_lr / k, momentum=lars["momentum"])
    else:
        opt = FusedLARS(groups, lr=peak_lr / k, momentum=lars["momentum"],
                        trust_coeff=lars["trust_coeff"])
    sched = GradualWarmupScheduler(opt, multiplier=k, total_epoch=warmup_iters,
                                   after_scheduler=MultiStepLR(opt, milestones, gamma=0.1))
    result = _goyal_train(model, opt, sched, seed, goyal, data, batch, torch.device(device),
                          stop_on_divergence=True)
    result["tune_loss"], result["tune_error"] = (
        _goyal_eval(model, {"x_val": data["x_tune"], "y_val": data["y_tune"]})
        if result["diverged_at"] is None else (math.nan, math.nan))
    return result


# ---------------------------------------------------------------------------------------------
# d. Post-LN Transformer at a large batch: AdamW vs LAMB, both with warmup
# ---------------------------------------------------------------------------------------------
LAMB = {
    "vocab": 32,
    "seq_len": 16,
    "d_model": 32,
    "heads": 4,
    "layers": 4,
    "batch": 512,
    "steps": 100,
    "warmup_steps": 25,
    "betas": (0.9, 0.999),
    "weight_decay": 0.01,  # on weight matrices and embeddings only
    "eval_size": 1024,
    "curve_every": 5,
    "tune_seed": 98,  # the tuning set the sweep picks on (the held-out set is seed 99)
    "sweep": {"AdamW": [3e-3, 1e-2, 3e-2], "LAMB": [2e-2, 3e-2, 5e-2]},
}
LAMB_ARMS = ["AdamW + warmup", "LAMB + warmup"]
_LAMB_OPTIMIZER = {LAMB_ARMS[0]: "AdamW", LAMB_ARMS[1]: "LAMB"}


def _lamb_run(optimizer: str, lr: float, seed: int, cfg: dict, device: str) -> dict:
    """The Post-LN encoder at ``cfg["batch"]``, FusedAdamW or FusedLAMB (timm's defaults
    otherwise: eps 1e-6, global grad-norm clip 1.0), linear warmup from 0 then cosine."""
    torch.manual_seed(seed)
    model = _PostLNEncoder(cfg).to(device)
    groups = _decay_groups(model, cfg["weight_decay"])
    if optimizer == "AdamW":
        opt = FusedAdamW(groups, lr=lr, betas=tuple(cfg["betas"]))
    else:
        opt = FusedLAMB(groups, lr=lr, betas=tuple(cfg["betas"]))
    return _postln_train(model, opt, _postln_schedule(opt, "linear warmup", cfg), seed, cfg,
                         torch.device(device), stop_on_divergence=True,
                         tune_seed=cfg["tune_seed"])


# ---------------------------------------------------------------------------------------------
# e. plain SGD (no momentum) with and without warmup, beside part b's Adam
# ---------------------------------------------------------------------------------------------
PLAIN_SGD = {
    "sgd_lrs": [1.0, 2.0],  # FusedSGD, momentum 0, no weight decay
    "adam_lrs": [1e-3],  # torch.optim.Adam as in part b, beside part b's own lr (5e-3)
}  # part b's model, batch, steps, warmup and cosine otherwise


def _plain_sgd_run(arm: str, lr: float, seed: int, cfg: dict, device: str) -> dict:
    """Part b's run with ``FusedSGD(lr)``: no momentum, no weight decay."""
    torch.manual_seed(seed)
    model = _PostLNEncoder(cfg).to(device)
    opt = FusedSGD(model.parameters(), lr=lr)
    return _postln_train(model, opt, _postln_schedule(opt, arm, cfg), seed, cfg,
                         torch.device(device), stop_on_divergence=True)


def _adam_run(arm: str, lr: float, seed: int, cfg: dict, device: str) -> dict:
    """Part b's run (torch.optim.Adam) at another ``lr``."""
    return _postln_run(arm, seed, {**cfg, "lr": lr}, torch.device(device))


# ---------------------------------------------------------------------------------------------
# summaries, verdicts, plots
# ---------------------------------------------------------------------------------------------
def _goyal_verdict(table: dict) -> str:
    err = {arm: table[arm]["final_val_error"] for arm in GOYAL_ARMS}
    base, none, const, grad = (err[a] for a in GOYAL_ARMS)
    gap = none["mean"] - base["mean"]
    if not math.isfinite(gap):
        return "no-warmup diverged; gradual warmup " + (
            "trained" if math.isfinite(grad["mean"]) else "also diverged")
    se = se_diff(none, base)

    def left(arm: dict) -> str:
        if not math.isfinite(arm["mean"]):
            return "diverged"
        return f"{100 * (arm['mean'] - base['mean']):+.2f} pp vs small batch"

    if gap <= 2 * se:
        return (f"no-warmup did not clearly suffer at this scale: held-out error "
                f"{100 * gap:+.2f} pp vs small batch (2 x s.e. = {200 * se:.2f} pp), so there "
                f"is no gap for warmup to close; gradual warmup {left(grad)}, constant warmup "
                f"{left(const)}")
    parts = [f"no-warmup is {100 * gap:.2f} pp worse than the small batch in held-out error "
             f"(2 x s.e. = {200 * se:.2f} pp)"]
    for name, arm in (("gradual", grad), ("constant", const)):
        if math.isfinite(arm["mean"]):
            closed = 1 - (arm["mean"] - base["mean"]) / gap
            parts.append(f"{name} warmup closes {100 * closed:.0f}% of that gap ({left(arm)}, "
                         f"worst seed {100 * (arm['max'] - base['mean']):+.2f} pp)")
        else:
            parts.append(f"{name} warmup diverged")
    return "; ".join(parts)


def _fit_summary(runs: list[dict]) -> dict:
    """Steps until the train loss first drops below FIT_LOSS: median over seeds that got there."""
    steps = [r["steps_to_fit"] for r in runs]
    reached = [st for st in steps if st is not None]
    return {"values": steps, "reached": len(reached), "seeds": len(steps),
            "median": statistics.median(reached) if reached else None}


def _postln_verdict(table: dict, fit: dict, chance: float) -> str:
    none, warm = (table[a]["final_val_accuracy"] for a in POSTLN_ARMS)
    fnone, fwarm = (fit[a] for a in POSTLN_ARMS)
    n = len(none["values"])

    def fit_text(f: dict) -> str:
        if not f["reached"]:
            return f"never below {FIT_LOSS:g} in {f['seeds']} seeds"
        return (f"below {FIT_LOSS:g} after {f['median']:g} steps (median), "
                f"{f['seeds'] - f['reached']}/{f['seeds']} seeds never")

    never_none = fnone["seeds"] - fnone["reached"]
    never_warm = fwarm["seeds"] - fwarm["reached"]
    slower = (fnone["reached"] and fwarm["reached"]
              and fnone["median"] >= 1.5 * fwarm["median"])
    if never_none > never_warm or (never_none == never_warm and slower):
        outcome = "without warmup training stalls at chance longer or for good: warmup helps"
    elif never_warm > never_none or (fnone["reached"] and fwarm["reached"]
                                     and fwarm["median"] >= 1.5 * fnone["median"]):
        outcome = "warmup is slower here: the failure did not reproduce"
    else:
        outcome = "no clear difference at this scale"
    return (f"train loss (chance ln V = {chance:.2f}): no warmup {fit_text(fnone)}; linear "
            f"warmup {fit_text(fwarm)}. Final held-out token accuracy {none['mean']:.3f} vs "
            f"{warm['mean']:.3f} over {n} seeds -> {outcome}")


def _diff(a: dict, b: dict) -> tuple[float, float]:
    """Difference of two arms' means and twice its standard error (NaN if either diverged)."""
    return a["mean"] - b["mean"], 2 * se_diff(a, b)


def _noise_word(diff: float, two_se: float, better: str, worse: str) -> str:
    if not (math.isfinite(diff) and math.isfinite(two_se)):
        return "not comparable (a run diverged)"
    if abs(diff) <= two_se:
        return "within noise"
    return f"outside noise: {worse if diff > 0 else better}"


def _lars_verdict(table: dict, lrs: dict, small: dict, sweep: dict, cfg: dict,
                  small_lr: float) -> str:
    """Held-out error per k: LARS vs SGD at kη and at the swept LR, against part a's small
    batch; then which arms keep the small-batch error at which k."""
    ks = sorted(int(k) for k in table)
    pct = 100.0

    def err(s: dict) -> str:
        if not math.isfinite(s["mean"]):
            return f"diverged in {s['diverged']}/{len(s['values'])} seeds"
        return f"{pct * s['mean']:.2f} ± {pct * s['std']:.2f}%"

    per_k, keeps, broken = [], {arm: [] for arm in LARS_ARMS}, {arm: [] for arm in LARS_ARMS}
    for k in ks:
        arms = table[str(k)]
        errors = {arm: arms[arm]["final_val_error"] for arm in LARS_ARMS}
        per_k.append(
            f"k={k} (batch {cfg['small_batch'] * k}): LARS + warmup {err(errors[LARS_ARMS[2]])} "
            f"(peak LR {lrs[str(k)][LARS_ARMS[2]]:g}) vs SGD + warmup "
            f"{err(errors[LARS_ARMS[0]])} at kη = {lrs[str(k)][LARS_ARMS[0]]:g} and "
            f"{err(errors[LARS_ARMS[1]])} at the swept {lrs[str(k)][LARS_ARMS[1]]:g}")
        for arm in LARS_ARMS:
            diff, two_se = _diff(errors[arm], small)
            if math.isfinite(diff) and diff <= two_se:
                keeps[arm].append(k)
            else:
                broken[arm].append(k)

    def ks_text(values: list[int]) -> str:
        return ", ".join(str(k) for k in values) if values else "no k"

    chosen = {opt: sweep[opt]["chosen"] for opt in ("SGD", "LARS")}
    rule_lr = small_lr * cfg["sweep_k"]
    summary = [
        f"small batch (part a) {err(small)}",
        f"within noise of it or better (difference ≤ 2 x s.e.): LARS + warmup at k = "
        f"{ks_text(keeps[LARS_ARMS[2]])}, SGD + warmup at kη at k = "
        f"{ks_text(keeps[LARS_ARMS[0]])}, SGD + warmup at the swept LR at k = "
        f"{ks_text(keeps[LARS_ARMS[1]])}"]
    if broken[LARS_ARMS[0]]:
        summary.append(f"the linear scaling rule (SGD at kη) breaks at k = "
                       f"{ks_text(broken[LARS_ARMS[0]])} even with gradual warmup")
    else:
        summary.append("the linear scaling rule (SGD at kη) with gradual warmup did not break "
                       "at any k tried")
    top = str(max(ks))
    lars_top, sgd_top = (table[top][arm]["final_val_error"] for arm in (LARS_ARMS[2],
                                                                         LARS_ARMS[1]))
    diff, two_se = _diff(lars_top, sgd_top)
    summary.append(
        f"at k={top} LARS - swept SGD = {pct * diff:+.2f} pp (2 x s.e. = {pct * two_se:.2f} pp): "
        f"{_noise_word(diff, two_se, 'LARS better', 'LARS worse')}")
    summary.append(
        f"sweep at k={cfg['sweep_k']} (tuning split, seed 0) picked SGD {chosen['SGD']:g} "
        f"({'= kη' if chosen['SGD'] == rule_lr else f'kη = {rule_lr:g}'}) and LARS "
        f"{chosen['LARS']:g}; peak LRs within 1 pp of each one's best tuning error: "
        + ", ".join(f"{opt} {_near_best(sweep[opt]['runs'])}" for opt in ("SGD", "LARS")))
    return "; ".join(per_k) + ". " + "; ".join(summary)


def _near_best(runs: dict, tolerance: float = 0.01) -> str:
    """The swept LRs whose tuning error is within ``tolerance`` of the best one's."""
    errors = {lr: r["tune_error"] for lr, r in runs.items() if math.isfinite(r["tune_error"])}
    if not errors:
        return "none (all diverged)"
    best = min(errors.values())
    near = [lr for lr, e in errors.items() if e <= best + tolerance]
    return "{" + ", ".join(near) + "}"


def _lamb_verdict(table: dict, fit: dict, lrs: dict, sweep: dict, cfg: dict) -> str:
    adamw, lamb = (table[arm]["final_val_loss"] for arm in LAMB_ARMS)
    acc = {arm: table[arm]["final_val_accuracy"] for arm in LAMB_ARMS}
    diff, two_se = _diff(lamb, adamw)

    def one(arm: str) -> str:
        s, f = table[arm]["final_val_loss"], fit[arm]
        loss = (f"{s['mean']:.3f} ± {s['std']:.3f}" if math.isfinite(s["mean"])
                else f"diverged in {s['diverged']}/{len(s['values'])} seeds")
        reach = (f"train loss < {FIT_LOSS:g} after {f['median']:g} steps (median, "
                 f"{f['reached']}/{f['seeds']} seeds)" if f["reached"]
                 else f"train loss never < {FIT_LOSS:g}")
        return (f"{arm} at lr {lrs[arm]:g}: held-out loss {loss}, token accuracy "
                f"{acc[arm]['mean']:.3f}, {reach}")

    def trained(opt: str) -> str:
        ok = [lr for lr, r in sweep[opt]["runs"].items()
              if math.isfinite(r["tune_loss"]) and r["tune_loss"] < FIT_LOSS]
        return ", ".join(ok) if ok else "none"

    if not (math.isfinite(diff) and math.isfinite(two_se)):
        outcome = "not comparable (a run diverged)"
    elif diff < -two_se:
        outcome = "outside noise: LAMB better, the large-batch advantage reproduces"
    elif diff > two_se:
        outcome = "outside noise: LAMB worse, its large-batch advantage did NOT reproduce"
    else:
        outcome = ("within noise: LAMB's large-batch advantage did NOT show"
                   + (" (LAMB's mean is the worse one)" if diff > 0 else ""))
    return (f"batch {cfg['batch']}, {cfg['steps']} steps: {one(LAMB_ARMS[0])}; "
            f"{one(LAMB_ARMS[1])}. LAMB - AdamW held-out loss = {diff:+.3f} (2 x s.e. = "
            f"{two_se:.3f}): {outcome}. Sweep (seed 0): tuning loss < {FIT_LOSS:g} at AdamW lr "
            f"{trained('AdamW')} of {', '.join(sweep['AdamW']['runs'])}, at LAMB lr "
            f"{trained('LAMB')} of {', '.join(sweep['LAMB']['runs'])}")


def _warmup_effect(none: list[dict], warm: list[dict]) -> dict:
    """What warmup does to one optimizer at one LR: seeds that diverged, seeds that end trained
    (final train loss < FIT_LOSS), the final train loss difference (warmup - none), and the
    outcome: "needed" (more seeds end trained with warmup), "helps" / "hurts" (every seed
    trains either way; the final loss is lower / higher with warmup, outside noise), "hurts"
    also when fewer seeds end trained with warmup, else "no difference"."""
    out: dict = {}
    for name, runs in (("none", none), ("warmup", warm)):
        losses = [r["final_train_loss"] for r in runs]
        out[name] = {"diverged": sum(not math.isfinite(v) for v in losses),
                     "trained": sum(math.isfinite(v) and v < FIT_LOSS for v in losses),
                     "seeds": len(runs), "loss": summary(losses)}
    diff, two_se = _diff(out["warmup"]["loss"], out["none"]["loss"])
    n, w = out["none"], out["warmup"]
    out.update(diff=diff, two_se=two_se,
               diff_pct=100 * diff / n["loss"]["mean"] if math.isfinite(diff) else math.nan)
    if w["trained"] > n["trained"]:
        out["outcome"] = "needed"
    elif n["trained"] > w["trained"] or (math.isfinite(diff) and diff > two_se):
        out["outcome"] = "hurts"
    elif math.isfinite(diff) and diff < -two_se:
        out["outcome"] = "helps"
    else:
        out["outcome"] = "no difference"
    return out


def _effect_text(e: dict) -> str:
    n, w = e["none"], e["warmup"]
    counts = (f"ends trained (train loss < {FIT_LOSS:g}) in {n['trained']}/{n['seeds']} seeds "
              f"without warmup, {w['trained']}/{w['seeds']} with")
    if n["diverged"] or w["diverged"]:
        return (f"{counts}; diverged (non-finite loss) in {n['diverged']}/{n['seeds']} without, "
                f"{w['diverged']}/{w['seeds']} with")
    return (f"warmup changes the final train loss by {e['diff']:+.4f} ({e['diff_pct']:+.0f}%: "
            f"{n['loss']['mean']:.4f} -> {w['loss']['mean']:.4f}; 2 x s.e. = "
            f"{e['two_se']:.4f}, "
            f"{'within noise' if abs(e['diff']) <= e['two_se'] else 'outside noise'}); {counts}")


def _plain_sgd_verdict(effects: dict) -> str:
    """``effects``: optimizer ("plain SGD", "Adam") → LR → :func:`_warmup_effect`."""
    parts = [f"{opt} at lr {lr}: {_effect_text(e)}" for opt, by_lr in effects.items()
             for lr, e in by_lr.items()]

    def where(outcome: str, opt: str | None = None) -> list[str]:
        return [f"{o} at lr {lr}" + (f" ({e['diff_pct']:+.0f}% final train loss)"
                                     if outcome in ("helps", "hurts")
                                     and math.isfinite(e["diff_pct"]) else "")
                for o, by_lr in effects.items() if opt in (None, o)
                for lr, e in by_lr.items() if e["outcome"] == outcome]

    sgd, adam = where("needed", "plain SGD"), where("needed", "Adam")
    if adam and not sgd:
        outcome = (f"the claim holds here: without warmup runs fail in more seeds for "
                   f"{', '.join(adam)}, for plain SGD at none of its LRs")
    elif adam:
        outcome = (f"the claim does NOT hold here: without warmup runs fail in more seeds "
                   f"(diverge or stall) for {', '.join(sgd)}, as for {', '.join(adam)}")
    elif sgd:
        outcome = (f"the reverse of the claim here: without warmup runs fail in more seeds for "
                   f"{', '.join(sgd)}, for Adam at none of its LRs")
    else:
        outcome = "no run failed for want of warmup, with either optimizer"
    for kind, text in (("helps", "warmup helps, outside noise but every seed trains either "
                                 "way"),
                       ("no difference", "no difference outside noise"),
                       ("hurts", "warmup hurts")):
        found = where(kind)
        if found:
            outcome += f"; {text}: {', '.join(found)}"
    return "; ".join(parts) + " -> " + outcome


def _band_plot(ax, xs: list[float], runs: list[list[float]], label: str, color) -> None:
    """Mean over seeds as a line, min-max over seeds as a band."""
    per_x = list(zip(*runs))
    ax.plot(xs, [statistics.fmean(v) for v in per_x], color=color, label=label, lw=1.5)
    ax.fill_between(xs, [min(v) for v in per_x], [max(v) for v in per_x], color=color, alpha=0.2)


def _plot_goyal(curves: dict, cfg: dict) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = ["black", "tab:red", "tab:orange", "tab:green"]
    for arm, color in zip(GOYAL_ARMS, colors):
        runs = curves[arm]
        _band_plot(axes[0], runs[0]["train_epoch"], [r["train_loss"] for r in runs], arm, color)
        _band_plot(axes[1], list(range(1, cfg["epochs"] + 1)), [r["val_error"] for r in runs],
                   arm, color)
        # the LR trace keeps every `stride`-th iteration (see _goyal_run)
        lr, iterations = runs[0]["lr"], runs[0]["iterations"]
        stride = max(1, iterations // 400)
        axes[2].plot([i * stride * cfg["epochs"] / iterations for i in range(len(lr))], lr,
                     color=color, label=arm)
    axes[0].set(xlabel="epoch", ylabel="train loss (running mean)", yscale="log",
                title="training loss")
    axes[1].set(xlabel="epoch", ylabel="held-out error", title="held-out error")
    axes[2].set(xlabel="epoch", ylabel="LR", yscale="log", title="learning rate")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    finish_figure(fig, "warmup_effect_goyal",
                  f"Goyal et al. at small scale: MLP+BN, SGD, k={cfg['k']} "
                  f"(batch {cfg['small_batch']}→{cfg['small_batch'] * cfg['k']}), "
                  f"mean and min–max over seeds")


def _plot_postln(curves: dict, cfg: dict) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm, color in zip(POSTLN_ARMS, ["tab:red", "tab:green"]):
        runs = curves[arm]
        _band_plot(ax, runs[0]["step"], [r["train_loss"] for r in runs],
                   arm + " (mean, min–max)", color)
        for r in curves[arm]:
            ax.plot(r["step"], r["train_loss"], color=color, lw=0.6, alpha=0.6, ls="--")
    ax.axhline(math.log(cfg["vocab"]), color="gray", ls=":", lw=1, label="chance (ln V)")
    ax.axvline(cfg["warmup_steps"], color="gray", ls="--", lw=0.8, label="end of warmup")
    ax.set(xlabel="step", ylabel="train loss", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    s = stamp()
    ax.set_title(f"Post-LN Transformer ({cfg['layers']} layers, d={cfg['d_model']}), Adam "
                 f"lr {cfg['lr']:g}, reverse task\nmean, min–max band, dashed: single seeds — "
                 f"{s['device']}, {s['date']}", fontsize=9)
    save_figure(fig, "warmup_effect_postln")
    plt.close(fig)


def _finite_band_plot(ax, xs: list[float], runs: list[list[float]], label: str, color,
                      ls: str = "-") -> None:
    """Mean over seeds as a line (broken where a seed diverged), min-max of the finite values
    as a band."""
    per_x = [[v for v in values if math.isfinite(v)] for values in zip(*runs)]
    ax.plot(xs, [statistics.fmean(v) if len(v) == len(runs) else math.nan for v in per_x],
            color=color, label=label, lw=1.5, ls=ls)
    ax.fill_between(xs, [min(v) if v else math.nan for v in per_x],
                    [max(v) if v else math.nan for v in per_x], color=color, alpha=0.15)


def _lr_ticks(ax, lrs: list[float]) -> None:
    """The swept LRs as the ticks of a log axis."""
    ax.set_xticks(sorted(set(lrs)), [f"{lr:g}" for lr in sorted(set(lrs))], fontsize=7)
    ax.minorticks_off()


def _sweep_curves(ax, sweeps: dict, colors: dict, key: str, star: bool = False) -> None:
    """One line per optimizer: the sweep runs' ``key`` against their LR (``star``: the picked
    LR marked)."""
    for opt, color in colors.items():
        sweep = sweeps[opt]
        lrs = [float(lr) for lr in sweep["runs"]]
        ax.plot(lrs, [r[key] for r in sweep["runs"].values()], "o-", color=color,
                label=f"{opt} (picked {sweep['chosen']:g})")
        if star:
            ax.plot([sweep["chosen"]], [sweep["runs"][f"{sweep['chosen']:g}"][key]], "*",
                    color=color, ms=14)


def _plot_lars(result: dict, small_runs: list[dict], goyal: dict, cfg: dict) -> None:
    plt = pyplot()

    ks = cfg["ks"]
    fig, axes = plt.subplots(1, len(ks) + 1, figsize=(4.6 * (len(ks) + 1), 4.2))
    epochs = list(range(1, goyal["epochs"] + 1))
    colors = dict(zip(LARS_ARMS, ["tab:red", "tab:orange", "tab:blue"]))
    for ax, k in zip(axes, ks):
        _finite_band_plot(ax, epochs, [r["val_error"] for r in small_runs],
                          f"small batch (part a), η = {goyal['small_lr']:g}", "black", ls="--")
        for arm in LARS_ARMS:
            runs = result["curves"][str(k)][arm]
            _finite_band_plot(ax, epochs, [r["val_error"] for r in runs],
                              f"{arm} ({result['lr'][str(k)][arm]:g})", colors[arm])
        ax.set(xlabel="epoch", ylabel="held-out error", ylim=(0.15, 0.95),
               title=f"k = {k} (batch {goyal['small_batch'] * k}, "
                     f"{goyal['train_size'] // (goyal['small_batch'] * k)} iterations/epoch)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[-1]
    _sweep_curves(ax, result["sweep"], {"SGD": "tab:orange", "LARS": "tab:blue"}, "tune_error",
                  star=True)
    ax.axvline(goyal["small_lr"] * cfg["sweep_k"], color="gray", ls=":", lw=1,
               label="kη (linear scaling)")
    ax.set(xscale="log", xlabel="peak LR", ylabel="tuning-split error (seed 0)",
           title=f"LR sweep at k = {cfg['sweep_k']}")
    _lr_ticks(ax, cfg["sgd_sweep"] + cfg["lars_sweep"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    finish_figure(fig, "warmup_effect_lars", "Large batch: SGD vs LARS, gradual warmup, MLP+BN "
                  "(part a's task), mean and min–max over seeds")


def _plot_lamb(result: dict, cfg: dict) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    for arm, color in zip(LAMB_ARMS, ["tab:red", "tab:blue"]):
        runs = result["curves"][arm]
        _finite_band_plot(ax, runs[0]["step"], [r["train_loss"] for r in runs],
                          f"{arm}, lr {result['lr'][arm]:g}", color)
    ax.axhline(math.log(cfg["vocab"]), color="gray", ls=":", lw=1, label="chance (ln V)")
    ax.axvline(cfg["warmup_steps"], color="gray", ls="--", lw=0.8, label="end of warmup")
    ax.set(xlabel="step", ylabel="train loss", yscale="log",
           title=f"batch {cfg['batch']}, {cfg['layers']}-layer Post-LN, d={cfg['d_model']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    _sweep_curves(ax, result["sweep"], {"AdamW": "tab:red", "LAMB": "tab:blue"}, "tune_loss")
    ax.axhline(math.log(cfg["vocab"]), color="gray", ls=":", lw=1, label="chance (ln V)")
    ax.set(xscale="log", yscale="log", xlabel="peak LR", ylabel="tuning-set loss (seed 0)",
           title="LR sweep")
    _lr_ticks(ax, [lr for lrs in cfg["sweep"].values() for lr in lrs])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    finish_figure(fig, "warmup_effect_lamb", "Post-LN Transformer at a large batch: AdamW vs "
                  "LAMB, both with warmup; mean and min–max over seeds")


def _plot_plain_sgd(result: dict, postln: dict) -> None:
    plt = pyplot()

    panels = [(f"{opt}, lr {lr}" + (" (part b)" if opt == "Adam" and lr == f"{postln['lr']:g}"
                                    else ""), curves)
              for opt, by_lr in result["curves"].items() for lr, curves in by_lr.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), sharey=True)
    for ax, (title, curves) in zip(axes, panels):
        for arm, color in zip(POSTLN_ARMS, ["tab:red", "tab:green"]):
            for i, r in enumerate(curves[arm]):
                ax.plot(r["step"], r["train_loss"], color=color, lw=1.0, alpha=0.8,
                        label=arm if i == 0 else None)
                if r.get("diverged_at"):
                    ax.plot([r["diverged_at"]], [math.log(postln["vocab"])], "x", color=color,
                            ms=9)
        ax.axhline(math.log(postln["vocab"]), color="gray", ls=":", lw=1, label="chance (ln V)")
        ax.axvline(postln["warmup_steps"], color="gray", ls="--", lw=0.8, label="end of warmup")
        # a diverging run's last finite losses are huge: the axis stops above chance
        ax.set(xlabel="step", yscale="log", ylim=(5e-4, 30), title=title)
        ax.grid(alpha=0.3)
    axes[0].set(ylabel="train loss (one line per seed; x: diverged)")
    axes[0].legend(fontsize=8)
    finish_figure(fig, "warmup_effect_plain_sgd", "Is warmup only for adaptive optimizers? "
                  f"Post-LN Transformer (part b), batch {postln['batch']}")


def _run_arms(study: str, arms, seeds: int, run_one, keys, width: int, describe):
    """Every arm of a study over ``seeds`` seeds, a progress line per run; the runs per arm and
    the mean/spread table of ``keys`` per arm."""
    curves = {arm: [] for arm in arms}
    for arm in arms:
        for seed in range(seeds):
            t0 = time.perf_counter()
            r = run_one(arm, seed)
            curves[arm].append(r)
            log(f"  {study} {arm:<{width}} seed {seed}: {describe(r)} "
                f"({time.perf_counter() - t0:.1f} s)")
    table = {arm: {key: summary([r[key] for r in curves[arm]]) for key in keys} for arm in arms}
    return curves, table


def _report(done: dict, key: tuple, result: dict, seconds: float) -> None:
    """The progress line of one run of parts c-e."""
    log(f"  [{len(done)}] {' '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in key)}"
        f": final train loss {result['final_train_loss']:.4f} "
        + (f"(diverged at {result['diverged_at']}) " if result.get("diverged_at") else "")
        + f"({seconds:.1f} s)")


def _best_lr(runs: dict, metric: tuple[str, ...]) -> float:
    """The LR whose run has the lowest ``metric`` values (in order; a diverged run is last)."""
    def rank(lr):
        return tuple(v if math.isfinite(v) else math.inf for v in (runs[lr][m] for m in metric))
    return min(runs, key=rank)


def _large_batch_parts(goyal: dict, postln: dict, goyal_small: dict, goyal_small_runs: list,
                       postln_table: dict, postln_curves: dict, quick: bool, seeds: int,
                       device: torch.device, workers: int) -> tuple[dict, list[dict], dict]:
    """Parts c-e: their runs (in ``workers`` processes), tables, verdicts and plots."""
    lars_cfg, lamb_cfg, sgd_cfg = dict(LARS), dict(LAMB), dict(PLAIN_SGD)
    lamb_cfg["sweep"] = {k: list(v) for k, v in LAMB["sweep"].items()}
    if quick:  # plumbing check, not a reproduction
        lars_cfg.update(ks=[2, 4], sweep_k=4, sgd_sweep=[0.2, 0.4], lars_sweep=[3.0, 10.0],
                        tune_size=512)
        lamb_cfg.update(steps=20, warmup_steps=5, layers=2, d_model=16, batch=64,
                        eval_size=128, sweep={"AdamW": [3e-3, 1e-2], "LAMB": [1e-2, 3e-2]})
        sgd_cfg.update(sgd_lrs=[0.3], adam_lrs=[1e-3])
    dev = str(device)
    eta, top = goyal["small_lr"], lars_cfg["sweep_k"]

    def lars_job(opt: str, lr: float, k: int, seed: int, priority: int) -> dict:
        return {("lars", opt, lr, k, seed): (priority, _lars_run, dict(
            optimizer=opt, peak_lr=lr, k=k, seed=seed, goyal=goyal, lars=lars_cfg, device=dev))}

    def lamb_job(opt: str, lr: float, seed: int, priority: int) -> dict:
        return {("lamb", opt, lr, seed): (priority, _lamb_run, dict(
            optimizer=opt, lr=lr, seed=seed, cfg=lamb_cfg, device=dev))}

    sweeps = {"SGD": lars_cfg["sgd_sweep"], "LARS": lars_cfg["lars_sweep"]}
    # first the long runs whose winners others wait for, then the rest, the short runs last
    jobs: dict = {}
    for opt, lrs in lamb_cfg["sweep"].items():
        for lr in lrs:
            jobs.update(lamb_job(opt, lr, 0, 0))
    for part, fn, lrs in (("plain_sgd", _plain_sgd_run, sgd_cfg["sgd_lrs"]),
                          ("adam", _adam_run, sgd_cfg["adam_lrs"])):
        for lr in lrs:
            for arm in POSTLN_ARMS:
                for seed in range(seeds):
                    jobs[(part, arm, lr, seed)] = (2, fn, dict(
                        arm=arm, lr=lr, seed=seed, cfg=postln, device=dev))
    for opt, lrs in sweeps.items():
        for lr in lrs:
            jobs.update(lars_job(opt, lr, top, 0, 3))
    for k in lars_cfg["ks"]:  # SGD at kη (the linear scaling rule): needs no sweep
        for seed in range(seeds):
            jobs.update(lars_job("SGD", eta * k, k, seed, 5))
    chosen: dict = {}

    def follow_up(done: dict) -> dict:
        more: dict = {}
        for opt, lrs in lamb_cfg["sweep"].items():
            keys = [("lamb", opt, lr, 0) for lr in lrs]
            if opt not in chosen and all(key in done for key in keys):
                chosen[opt] = _best_lr({lr: done[key] for lr, key in zip(lrs, keys)},
                                       ("tune_loss",))
                for seed in range(1, seeds):
                    more.update(lamb_job(opt, chosen[opt], seed, 1))
        for opt, lrs in sweeps.items():
            keys = [("lars", opt, lr, top, 0) for lr in lrs]
            if opt not in chosen and all(key in done for key in keys):
                chosen[opt] = _best_lr({lr: done[key] for lr, key in zip(lrs, keys)},
                                       ("tune_error", "tune_loss"))
                for k in lars_cfg["ks"]:
                    for seed in range(seeds):
                        more.update(lars_job(opt, chosen[opt] * k / top, k, seed, 4))
        return more

    done = run_jobs(jobs, workers, torch.get_num_threads(), _report, follow_up)

    # c. SGD vs LARS
    lars_lrs = {str(k): {LARS_ARMS[0]: eta * k, LARS_ARMS[1]: chosen["SGD"] * k / top,
                         LARS_ARMS[2]: chosen["LARS"] * k / top} for k in lars_cfg["ks"]}
    lars_curves = {str(k): {arm: [done[("lars", _LARS_OPTIMIZER[arm], lars_lrs[str(k)][arm], k,
                                        seed)] for seed in range(seeds)] for arm in LARS_ARMS}
                   for k in lars_cfg["ks"]}
    keys = ("final_val_error", "final_val_loss", "final_train_loss")
    lars_table = {k: {arm: {key: summary([r[key] for r in runs]) for key in keys}
                      for arm, runs in arms.items()} for k, arms in lars_curves.items()}
    lars_sweep = {opt: {"k": top, "chosen": chosen[opt],
                        "runs": {f"{lr:g}": done[("lars", opt, lr, top, 0)] for lr in lrs}}
                  for opt, lrs in sweeps.items()}
    # d. AdamW vs LAMB
    lamb_lrs = {arm: chosen[_LAMB_OPTIMIZER[arm]] for arm in LAMB_ARMS}
    lamb_curves = {arm: [done[("lamb", _LAMB_OPTIMIZER[arm], lamb_lrs[arm], seed)]
                         for seed in range(seeds)] for arm in LAMB_ARMS}
    keys = ("final_val_loss", "final_val_accuracy", "final_train_loss")
    lamb_table = {arm: {key: summary([r[key] for r in runs]) for key in keys}
                  for arm, runs in lamb_curves.items()}
    lamb_fit = {arm: _fit_summary(runs) for arm, runs in lamb_curves.items()}
    lamb_sweep = {opt: {"chosen": chosen[opt],
                        "runs": {f"{lr:g}": done[("lamb", opt, lr, 0)] for lr in lrs}}
                  for opt, lrs in lamb_cfg["sweep"].items()}
    # e. plain SGD with and without warmup, beside Adam (part b's runs at part b's lr)
    by_optimizer = {"plain SGD": ("plain_sgd", sgd_cfg["sgd_lrs"]),
                    "Adam": ("adam", sgd_cfg["adam_lrs"])}
    sgd_curves = {opt: {f"{lr:g}": {arm: [done[(part, arm, lr, seed)] for seed in range(seeds)]
                                    for arm in POSTLN_ARMS} for lr in lrs}
                  for opt, (part, lrs) in by_optimizer.items()}
    sgd_curves["Adam"][f"{postln['lr']:g}"] = postln_curves
    keys = ("final_train_loss", "final_val_loss", "final_val_accuracy")
    sgd_table = {opt: {lr: {arm: {key: summary([r[key] for r in runs]) for key in keys}
                            for arm, runs in arms.items()} for lr, arms in by_lr.items()}
                 for opt, by_lr in sgd_curves.items()}
    sgd_fit = {opt: {lr: {arm: _fit_summary(runs) for arm, runs in arms.items()}
                     for lr, arms in by_lr.items()} for opt, by_lr in sgd_curves.items()}
    effects = {opt: {lr: _warmup_effect(*(arms[arm] for arm in POSTLN_ARMS))
                     for lr, arms in by_lr.items()} for opt, by_lr in sgd_curves.items()}

    verdicts = {
        "lars": _lars_verdict(lars_table, lars_lrs, goyal_small, lars_sweep,
                              {**lars_cfg, "small_batch": goyal["small_batch"]}, eta),
        "lamb": _lamb_verdict(lamb_table, lamb_fit, lamb_lrs, lamb_sweep, lamb_cfg),
        "plain_sgd": _plain_sgd_verdict(effects),
    }
    err_col, loss_col = "held-out error % (mean ± std [min, max])", "final train loss"
    rows = [{"experiment": "lars", "arm": f"small batch (part a), η = {eta:g}", "k": 1,
             "batch": goyal["small_batch"], "peak LR": eta,
             err_col: pm(goyal_small, 100, 2), loss_col: "-"}]
    rows += [{"experiment": "lars", "arm": arm, "k": int(k),
              "batch": goyal["small_batch"] * int(k), "peak LR": round(lars_lrs[k][arm], 6),
              err_col: pm(lars_table[k][arm]["final_val_error"], 100, 2),
              loss_col: pm(lars_table[k][arm]["final_train_loss"])}
             for k in lars_table for arm in LARS_ARMS]
    rows += [{"experiment": "lamb", "arm": arm, "peak LR": lamb_lrs[arm],
              "held-out loss": pm(lamb_table[arm]["final_val_loss"]),
              "held-out token acc": pm(lamb_table[arm]["final_val_accuracy"]),
              loss_col: pm(lamb_table[arm]["final_train_loss"]),
              f"steps to loss < {FIT_LOSS:g} (per seed)":
                  ", ".join("never" if v is None else str(v) for v in lamb_fit[arm]["values"])}
             for arm in LAMB_ARMS]
    rows += [{"experiment": "plain-sgd",
              "optimizer": (f"SGD (momentum 0), lr {lr}" if opt == "plain SGD" else
                            f"Adam, lr {lr}" + (" (part b)" if lr == f"{postln['lr']:g}"
                                                else "")),
              "arm": arm, loss_col: pm(sgd_table[opt][lr][arm]["final_train_loss"], digits=4),
              "held-out token acc": pm(sgd_table[opt][lr][arm]["final_val_accuracy"]),
              f"steps to loss < {FIT_LOSS:g} (per seed)":
                  ", ".join("never" if v is None else str(v)
                            for v in sgd_fit[opt][lr][arm]["values"]),
              "diverged at step (per seed)":
                  ", ".join("-" if r.get("diverged_at") is None else str(r["diverged_at"])
                            for r in runs)}
             for opt, by_lr in sgd_curves.items() for lr, arms in by_lr.items()
             for arm, runs in arms.items()]
    parts = {
        "lars": {"table": lars_table, "lr": lars_lrs, "small_batch": goyal_small,
                 "sweep": lars_sweep, "curves": lars_curves, "verdict": verdicts["lars"]},
        "lamb": {"table": lamb_table, "lr": lamb_lrs, "steps_to_fit": lamb_fit,
                 "sweep": lamb_sweep, "curves": lamb_curves, "verdict": verdicts["lamb"]},
        "plain_sgd": {"table": sgd_table, "steps_to_fit": sgd_fit, "effect": effects,
                      "adam_from_part_b": f"{postln['lr']:g}", "curves": sgd_curves,
                      "verdict": verdicts["plain_sgd"]},
    }
    _plot_lars(parts["lars"], goyal_small_runs, goyal, lars_cfg)
    _plot_lamb(parts["lamb"], lamb_cfg)
    _plot_plain_sgd(parts["plain_sgd"], postln)
    configs = {"lars": lars_cfg, "lamb": lamb_cfg, "plain_sgd": sgd_cfg}
    return parts, rows, {"configs": configs, "verdicts": verdicts}


def _strict(obj):
    """``obj`` with every non-finite float (a diverged run's losses) as None: strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def run(quick: bool = False, device: str | None = None, seeds: int = 3,
        workers: int | None = None) -> dict:
    """The study. Parts a and b run in this process; parts c-e in ``workers`` spawned
    single-threaded processes (default: 2 on a CPU with 2+ cores; 1, i.e. this process, for
    ``quick`` or another device)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    if workers is None:
        workers = 1 if quick or device.type != "cpu" else max(1, min(2, os.cpu_count() or 1))
    goyal = dict(GOYAL)
    postln = dict(POSTLN)
    if quick:  # plumbing check, not a reproduction
        goyal.update(train_size=2048, heldout_size=512, epochs=3, warmup_epochs=1,
                     decay_epochs=[2], depth=2, hidden=64, points_per_epoch=2)
        postln.update(steps=40, warmup_steps=10, layers=2, d_model=32, eval_size=128,
                      curve_every=5)
        seeds = min(seeds, 2)
    t_start = time.perf_counter()
    log(f"warmup_effect on {device} ({torch.get_num_threads()} threads), seeds={seeds}, "
        f"quick={quick}")

    data = _goyal_data(goyal, device)
    goyal_curves, goyal_table = _run_arms(
        "goyal ", GOYAL_ARMS, seeds, lambda arm, seed: _goyal_run(arm, seed, goyal, data, device),
        ("final_train_loss", "final_val_loss", "final_val_error"), 28,
        lambda r: f"held-out error {r['final_val_error']:.4f} loss {r['final_val_loss']:.4f}")
    postln_curves, postln_table = _run_arms(
        "postln", POSTLN_ARMS, seeds, lambda arm, seed: _postln_run(arm, seed, postln, device),
        ("final_train_loss", "final_val_loss", "final_val_accuracy"), 14,
        lambda r: (f"held-out acc {r['final_val_accuracy']:.4f} "
                   f"train loss {r['final_train_loss']:.4f}"))

    postln_fit = {arm: _fit_summary(postln_curves[arm]) for arm in POSTLN_ARMS}
    verdicts = {"goyal": _goyal_verdict(goyal_table),
                "postln": _postln_verdict(postln_table, postln_fit, math.log(postln["vocab"]))}
    rows = [{"experiment": "goyal", "arm": arm,
             "held-out error % (mean ± std [min, max])":
                 pm(goyal_table[arm]["final_val_error"], 100, 2),
             "final train loss": pm(goyal_table[arm]["final_train_loss"])}
            for arm in GOYAL_ARMS]
    rows += [{"experiment": "post-ln", "arm": arm,
              "held-out token acc": pm(postln_table[arm]["final_val_accuracy"]),
              "final train loss": pm(postln_table[arm]["final_train_loss"]),
              f"steps to loss < {FIT_LOSS:g} (per seed)":
                  ", ".join("never" if v is None else str(v) for v in postln_fit[arm]["values"])}
             for arm in POSTLN_ARMS]
    elapsed_ab = time.perf_counter() - t_start
    log(f"warmup_effect parts a, b done in {elapsed_ab:.0f} s; parts c-e in {workers} "
        f"worker process(es)")

    t_new = time.perf_counter()
    parts, new_rows, extra = _large_batch_parts(
        goyal, postln, goyal_table[GOYAL_ARMS[0]]["final_val_error"], goyal_curves[GOYAL_ARMS[0]],
        postln_table, postln_curves, quick, seeds, device, workers)
    verdicts.update(extra["verdicts"])
    elapsed_new = time.perf_counter() - t_new

    def table(experiment: str, columns: list[str]) -> str:
        return format_table([r for r in rows + new_rows if r["experiment"] == experiment],
                            columns)

    print(table("goyal", ["arm", "held-out error % (mean ± std [min, max])",
                          "final train loss"]))
    print(f"verdict (Goyal): {verdicts['goyal']}")
    print(table("post-ln", ["arm", "held-out token acc", "final train loss",
                            f"steps to loss < {FIT_LOSS:g} (per seed)"]))
    print(f"verdict (Post-LN): {verdicts['postln']}")
    print(table("lars", ["k", "batch", "arm", "peak LR",
                         "held-out error % (mean ± std [min, max])", "final train loss"]))
    print(f"verdict (SGD vs LARS): {verdicts['lars']}")
    print(table("lamb", ["arm", "peak LR", "held-out loss", "held-out token acc",
                         "final train loss", f"steps to loss < {FIT_LOSS:g} (per seed)"]))
    print(f"verdict (AdamW vs LAMB): {verdicts['lamb']}")
    print(table("plain-sgd", ["optimizer", "arm", "final train loss", "held-out token acc",
                              f"steps to loss < {FIT_LOSS:g} (per seed)",
                              "diverged at step (per seed)"]))
    print(f"verdict (plain SGD vs Adam): {verdicts['plain_sgd']}")

    elapsed = time.perf_counter() - t_start
    result = {
        "config": {"device": str(device), "threads": torch.get_num_threads(), "seeds": seeds,
                   "quick": quick, "goyal": goyal, "postln": postln, **extra["configs"],
                   "workers_c_to_e": workers, "threads_per_worker": 1 if workers > 1 else None,
                   "fused_cpu_path": ("Triton interpreter"
                                      if os.environ.get("TRITON_INTERPRET") == "1"
                                      else "plain torch"),
                   "elapsed_s": round(elapsed, 1), "elapsed_a_b_s": round(elapsed_ab, 1),
                   "elapsed_c_to_e_s": round(elapsed_new, 1)},
        "goyal": {"table": goyal_table, "curves": goyal_curves, "verdict": verdicts["goyal"]},
        "postln": {"table": postln_table, "steps_to_fit": postln_fit, "curves": postln_curves,
                   "verdict": verdicts["postln"]},
        **parts,
        "table": rows + new_rows,
        "verdicts": verdicts,
    }
    write_json("warmup_effect", _strict(result))
    _plot_goyal(goyal_curves, goyal)
    _plot_postln(postln_curves, postln)
    log(f"warmup_effect done in {elapsed:.0f} s (a, b: {elapsed_ab:.0f} s; c-e: "
        f"{elapsed_new:.0f} s)")
    return {"stamp": stamp(), **result}


if __name__ == "__main__":
    run()
