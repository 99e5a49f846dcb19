"""What warmup does, at small scale: two classic claims, re-run on synthetic tasks.

a. Goyal et al. (2017), "Accurate, Large Minibatch SGD": with the linear scaling rule (batch k·B,
   LR k·η) a large batch trains as well as the small one (batch B, LR η) *if* the LR is warmed up
   gradually from η to k·η; without warmup, or with a constant warmup at η that jumps to k·η, it
   does worse. Here: an MLP with BatchNorm, SGD + momentum + weight decay, on a teacher-network
   classification task with a held-out split; warmup per iteration; step decay afterwards.
b. Post-LN Transformers trained with Adam need warmup (Vaswani et al. 2017; Liu et al. 2020,
   Xiong et al. 2020): without it they stall or diverge at an LR that trains fine after a linear
   warmup. Here: a small Post-LN encoder (``nn.TransformerEncoderLayer(norm_first=False)``) on
   sequence reversal of random tokens; Adam; no warmup vs linear warmup, cosine afterwards.

Every arm runs with several seeds (model init and batch order; the data set is fixed). The
verdicts printed and written to JSON are computed from the numbers, never written in advance.

Run: ``python -m bench.warmup_effect`` (a few minutes on 2 CPU cores; ``quick=True`` is a smoke
run with fewer steps that proves the plumbing, not the claims).
"""

from __future__ import annotations

import math
import os
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import CosineAnnealingLR, MultiStepLR

from bench.common import format_table, log, save_figure, stamp, write_json
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


def _goyal_data(cfg: dict, device: torch.device) -> dict:
    """Teacher-network labels on Gaussian inputs, with some label noise; fixed across seeds."""
    g = torch.Generator().manual_seed(1234)
    n = cfg["train_size"] + cfg["heldout_size"]
    x = torch.randn(n, cfg["in_dim"], generator=g)
    w1 = torch.randn(cfg["in_dim"], 128, generator=g) / math.sqrt(cfg["in_dim"])
    w2 = torch.randn(128, cfg["classes"], generator=g) / math.sqrt(128)
    y = (torch.tanh(x @ w1 * cfg["teacher_gain"]) @ w2).argmax(1)
    flip = torch.rand(n, generator=g) < cfg["label_noise"]
    y[flip] = torch.randint(0, cfg["classes"], (int(flip.sum()),), generator=g)
    cut = cfg["train_size"]
    return {"x": x[:cut].to(device), "y": y[:cut].to(device),
            "x_val": x[cut:].to(device), "y_val": y[cut:].to(device)}


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
    total = cfg["epochs"] * iters_per_epoch
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

    order = torch.Generator().manual_seed(10_000 + seed)
    chunk = iters_per_epoch // cfg["points_per_epoch"]
    curve_epoch, curve_loss, lrs, val_curve = [], [], [], []
    running, count, it = 0.0, 0, 0
    for _ in range(cfg["epochs"]):
        model.train()
        perm = torch.randperm(cfg["train_size"], generator=order).to(device)
        for i in range(iters_per_epoch):
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
            if it % chunk == 0:
                curve_epoch.append(it / iters_per_epoch)
                curve_loss.append(running / count)
                running, count = 0.0, 0
        val_curve.append(_goyal_eval(model, data))
    final = val_curve[-1]
    return {"train_epoch": curve_epoch, "train_loss": curve_loss,
            "val_loss": [v[0] for v in val_curve], "val_error": [v[1] for v in val_curve],
            "final_train_loss": statistics.fmean(curve_loss[-cfg["points_per_epoch"]:]),
            "final_val_loss": final[0], "final_val_error": final[1],
            "lr": lrs[:: max(1, total // 400)], "iterations": total, "batch": batch}


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


def _postln_run(arm: str, seed: int, cfg: dict, device: torch.device) -> dict:
    torch.manual_seed(seed)
    model = _PostLNEncoder(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], betas=cfg["betas"])
    steps, warm = cfg["steps"], cfg["warmup_steps"]
    if arm == "no warmup":
        sched = CosineAnnealingLR(opt, T_max=steps)
    else:
        after = CosineAnnealingLR(opt, T_max=steps - warm)
        sched = GradualWarmupScheduler(opt, multiplier=1, total_epoch=warm, after_scheduler=after)
    g = torch.Generator().manual_seed(20_000 + seed)
    x_val, y_val = _reverse_batch(cfg["eval_size"], cfg, torch.Generator().manual_seed(99), device)
    curve_step, curve_loss = [], []
    running, count = 0.0, 0
    for step in range(1, steps + 1):
        model.train()
        x, y = _reverse_batch(cfg["batch"], cfg, g, device)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        count += 1
        if step % cfg["curve_every"] == 0:
            curve_step.append(step)
            curve_loss.append(running / count)
            running, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        logits = model(x_val)
        val_loss = F.cross_entropy(logits.flatten(0, 1), y_val.flatten()).item()
        val_acc = (logits.argmax(-1) == y_val).float().mean().item()
    fitted = [st for st, lo in zip(curve_step, curve_loss) if lo < FIT_LOSS]
    return {"step": curve_step, "train_loss": curve_loss,
            "steps_to_fit": fitted[0] if fitted else None,
            "final_train_loss": statistics.fmean(curve_loss[-5:]),
            "final_val_loss": val_loss, "final_val_accuracy": val_acc}


# ---------------------------------------------------------------------------------------------
# summaries, verdicts, plots
# ---------------------------------------------------------------------------------------------
def _summary(values: list[float]) -> dict:
    finite = [v for v in values if math.isfinite(v)]
    return {"mean": statistics.fmean(values) if len(finite) == len(values) else float("nan"),
            "std": statistics.stdev(values) if len(finite) == len(values) > 1 else float("nan"),
            "min": min(finite) if finite else float("nan"),
            "max": max(finite) if finite else float("nan"),
            "values": values, "diverged": len(values) - len(finite)}


def _pm(s: dict, scale: float = 1.0, digits: int = 3) -> str:
    if not math.isfinite(s["mean"]):
        return f"diverged in {s['diverged']}/{len(s['values'])}"
    return (f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f} "
            f"[{s['min'] * scale:.{digits}f}, {s['max'] * scale:.{digits}f}]")


def _se_diff(a: dict, b: dict) -> float:
    """Standard error of the difference of two arms' means (independent seeds)."""
    return math.sqrt(a["std"] ** 2 / len(a["values"]) + b["std"] ** 2 / len(b["values"]))


def _goyal_verdict(table: dict) -> str:
    err = {arm: table[arm]["final_val_error"] for arm in GOYAL_ARMS}
    base, none, const, grad = (err[a] for a in GOYAL_ARMS)
    gap = none["mean"] - base["mean"]
    if not math.isfinite(gap):
        return "no-warmup diverged; gradual warmup " + (
            "trained" if math.isfinite(grad["mean"]) else "also diverged")
    se = _se_diff(none, base)

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


def _band_plot(ax, xs: list[float], runs: list[list[float]], label: str, color) -> None:
    """Mean over seeds as a line, min-max over seeds as a band."""
    per_x = list(zip(*runs))
    ax.plot(xs, [statistics.fmean(v) for v in per_x], color=color, label=label, lw=1.5)
    ax.fill_between(xs, [min(v) for v in per_x], [max(v) for v in per_x], color=color, alpha=0.2)


def _plot_goyal(curves: dict, cfg: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    s = stamp()
    fig.suptitle(f"Goyal et al. at small scale: MLP+BN, SGD, k={cfg['k']} "
                 f"(batch {cfg['small_batch']}→{cfg['small_batch'] * cfg['k']}), "
                 f"mean and min–max over seeds — {s['device']}, {s['date']}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, "warmup_effect_goyal")
    plt.close(fig)


def _plot_postln(curves: dict, cfg: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    table = {arm: {key: _summary([r[key] for r in curves[arm]]) for key in keys} for arm in arms}
    return curves, table


def run(quick: bool = False, device: str | None = None, seeds: int = 3) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
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
                 _pm(goyal_table[arm]["final_val_error"], 100, 2),
             "final train loss": _pm(goyal_table[arm]["final_train_loss"])}
            for arm in GOYAL_ARMS]
    rows += [{"experiment": "post-ln", "arm": arm,
              "held-out token acc": _pm(postln_table[arm]["final_val_accuracy"]),
              "final train loss": _pm(postln_table[arm]["final_train_loss"]),
              f"steps to loss < {FIT_LOSS:g} (per seed)":
                  ", ".join("never" if v is None else str(v) for v in postln_fit[arm]["values"])}
             for arm in POSTLN_ARMS]
    print(format_table(rows[:len(GOYAL_ARMS)],
                       ["arm", "held-out error % (mean ± std [min, max])", "final train loss"]))
    print(f"verdict (Goyal): {verdicts['goyal']}")
    print(format_table(rows[len(GOYAL_ARMS):],
                       ["arm", "held-out token acc", "final train loss",
                        f"steps to loss < {FIT_LOSS:g} (per seed)"]))
    print(f"verdict (Post-LN): {verdicts['postln']}")

    elapsed = time.perf_counter() - t_start
    result = {
        "config": {"device": str(device), "threads": torch.get_num_threads(), "seeds": seeds,
                   "quick": quick, "goyal": goyal, "postln": postln,
                   "elapsed_s": round(elapsed, 1)},
        "goyal": {"table": goyal_table, "curves": goyal_curves, "verdict": verdicts["goyal"]},
        "postln": {"table": postln_table, "steps_to_fit": postln_fit, "curves": postln_curves,
                   "verdict": verdicts["postln"]},
        "table": rows,
        "verdicts": verdicts,
    }
    write_json("warmup_effect", result)
    _plot_goyal(goyal_curves, goyal)
    _plot_postln(postln_curves, postln)
    log(f"warmup_effect done in {elapsed:.0f} s")
    return {"stamp": stamp(), **result}


if __name__ == "__main__":
    run()
