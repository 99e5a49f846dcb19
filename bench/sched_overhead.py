"""Host time per ``scheduler.step()``, per phase: our GradualWarmupScheduler vs warmup_scheduler 0.3
and torch, side by side.

Every scheduler drives the same schedule shape (warm up over ``WARMUP`` steps, then, where the
scheduler has one, cosine decay to the end) on an SGD optimizer with 1 or 4 param groups, with
float LRs and with 0-dim tensor LRs (``param_groups[i]["lr"] = torch.tensor(lr)``, which
schedulers must update in place): four configs. Only ``sched.step()`` is timed, one call at a time
with ``time.perf_counter_ns``; the optimizer steps once beforehand (so torch does not warn) and
never inside the timed loop.

Side by side: each of ``LOCKSTEP``'s groups (ours and the reference with the same schedule; the
torch schedulers) is measured on its own. In each repeat the group's schedulers are built fresh
(untimed, each on its own model and optimizer) and stepped in lockstep, step ``i`` of all of them
before step ``i + 1`` of any, in an order that rotates every step, so drifts of the machine
(clock, other load) hit them alike. (Pairs, not all six at once: on CPython 3.11 how fast a
scheduler's step runs shifts by about 1% with which other scheduler objects share the loop.)
Every repeat walks the whole schedule; the first is a warm-up and is dropped. A call belongs to
the warmup phase if it moves ``e`` to at most ``WARMUP``, else to the after-warmup phase.

We report each scheduler's median per phase and, for ours against warmup_scheduler 0.3 (without
an after_scheduler, and both with CosineAnnealingLR), the per-phase ratio as the median of the
paired per-step ratios ours_i / reference_i (the two calls of a pair are adjacent in time, so the
machine's drift cancels), with a bootstrap 95% interval, beside the plain ratio of the medians.
After warmup both are the after_scheduler's own step plus one Python call, so that ratio is within
a few tenths of a percent of 1 and the paired estimate is the one that resolves it.

Run: ``python -m bench.sched_overhead`` (about a minute on 2 CPU cores; ``quick=True``: seconds).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

from bench.common import format_table, log, pyplot, save_figure, stamp, write_json
from warmup import GradualWarmupScheduler

try:  # the package we replace; optional here, so a missing install is reported, not fatal
    from warmup_scheduler import GradualWarmupScheduler as ReferenceWarmupScheduler
except ImportError:
    ReferenceWarmupScheduler = None

GROUPS = (1, 4)  # param groups per optimizer
LR_KINDS = ("float", "tensor")
BASE_LR = 0.1
MULTIPLIER = 8
WARMUP = 100  # steps of warmup inside each schedule (quick runs: QUICK_WARMUP)
QUICK_WARMUP = 20
PHASES = ("warmup", "after")
REFERENCE = "warmup_scheduler 0.3"


def _optimizer(groups: int, tensor_lr: bool) -> torch.optim.Optimizer:
    """SGD over ``groups`` small layers, one param group each."""
    layers = [nn.Linear(8, 8) for _ in range(groups)]
    return torch.optim.SGD(
        [
            {"params": layer.parameters(),
             "lr": torch.tensor(BASE_LR) if tensor_lr else BASE_LR}
            for layer in layers
        ],
        lr=BASE_LR,
        momentum=0.9,
    )


# Each builder takes (optimizer, warmup steps, schedule length) and returns the scheduler.
# Schedules ramp BASE_LR -> MULTIPLIER * BASE_LR (torch's LinearLR ramps to the optimizer's LR, so
# there it starts at 1/MULTIPLIER of it; the host work per step is what we compare, not the LRs).
def _ours(opt, warmup, steps):
    return GradualWarmupScheduler(opt, multiplier=MULTIPLIER, total_epoch=warmup)


def _ours_cosine(opt, warmup, steps):
    after = CosineAnnealingLR(opt, T_max=steps - warmup)
    return GradualWarmupScheduler(opt, multiplier=MULTIPLIER, total_epoch=warmup,
                                  after_scheduler=after)


def _reference(opt, warmup, steps):
    return ReferenceWarmupScheduler(opt, multiplier=MULTIPLIER, total_epoch=warmup)


def _reference_cosine(opt, warmup, steps):
    after = CosineAnnealingLR(opt, T_max=steps - warmup)
    return ReferenceWarmupScheduler(opt, multiplier=MULTIPLIER, total_epoch=warmup,
                                    after_scheduler=after)


def _torch_sequential(opt, warmup, steps):
    ramp = LinearLR(opt, start_factor=1 / MULTIPLIER, total_iters=warmup)
    decay = CosineAnnealingLR(opt, T_max=steps - warmup)
    return SequentialLR(opt, [ramp, decay], milestones=[warmup])


def _torch_linear(opt, warmup, steps):
    return LinearLR(opt, start_factor=1 / MULTIPLIER, total_iters=warmup)


CASES: dict[str, Callable | None] = {
    "ours": _ours,
    "ours + CosineAnnealingLR": _ours_cosine,
    REFERENCE: _reference if ReferenceWarmupScheduler else None,
    f"{REFERENCE} + CosineAnnealingLR": _reference_cosine if ReferenceWarmupScheduler else None,
    "torch SequentialLR(LinearLR, CosineAnnealingLR)": _torch_sequential,
    "torch LinearLR alone (warmup only)": _torch_linear,
}
#: (ours, the reference it replaces) pairs whose per-phase ratio we report
PAIRS = (("ours", REFERENCE),
         ("ours + CosineAnnealingLR", f"{REFERENCE} + CosineAnnealingLR"))
#: the groups of schedulers stepped side by side: each pair, then the torch schedulers
LOCKSTEP = (*PAIRS, ("torch SequentialLR(LinearLR, CosineAnnealingLR)",
                     "torch LinearLR alone (warmup only)"))


def measure(builders: dict[str, Callable], groups: int, tensor_lr: bool, warmup: int,
            steps: int, repeats: int) -> dict[str, dict]:
    """Per-call ns of ``sched.step()`` for each builder, stepped side by side (see the module
    docstring): ``{name: {"warmup": [ns, ...], "after": [ns, ...], "lr_type_after": str}}``."""
    names = list(builders)
    out = {name: {"warmup": [], "after": [], "lr_type_after": None} for name in names}
    clock = time.perf_counter_ns
    for repeat in range(repeats + 1):
        optimizers = {name: _optimizer(groups, tensor_lr) for name in names}
        scheds = {name: builders[name](optimizers[name], warmup, steps) for name in names}
        for opt in optimizers.values():
            opt.step()  # grads are None: a no-op that tells torch the optimizer stepped first
        times = {name: [] for name in names}
        gc.collect()
        for i in range(steps):
            rotated = names[i % len(names):] + names[: i % len(names)]
            for name in rotated:
                sched = scheds[name]
                t0 = clock()
                sched.step()
                times[name].append(clock() - t0)
        if repeat == 0:
            continue  # warm-up pass
        for name in names:
            # call i moves e from i to i + 1: calls 0..warmup-1 end in the warmup, e <= warmup
            out[name]["warmup"] += times[name][:warmup]
            out[name]["after"] += times[name][warmup:]
            out[name]["lr_type_after"] = type(optimizers[name].param_groups[0]["lr"]).__name__
    return out


def summarize(samples: dict) -> dict:
    """Medians (µs) per phase and overall, p10/p90 overall, of one scheduler's samples."""
    both = samples["warmup"] + samples["after"]
    q = statistics.quantiles(both, n=10)
    return {
        "median_us": statistics.median(both) / 1e3,
        "p10_us": q[0] / 1e3,
        "p90_us": q[-1] / 1e3,
        "warmup_median_us": statistics.median(samples["warmup"]) / 1e3,
        "after_median_us": statistics.median(samples["after"]) / 1e3,
        "warmup_calls": len(samples["warmup"]),
        "after_calls": len(samples["after"]),
        "lr_type_after": samples["lr_type_after"],  # a tensor LR must stay a tensor
    }


def paired_ratio(ours_ns: list[int], reference_ns: list[int], seed: int = 0) -> dict:
    """Median of the per-step ratios ours_i / reference_i, with a bootstrap 95% interval, and the
    plain ratio of the two medians. ``ours_ns[i]`` and ``reference_ns[i]`` are one lockstep pair."""
    ours, ref = np.asarray(ours_ns, dtype=np.float64), np.asarray(reference_ns, dtype=np.float64)
    if ours.shape != ref.shape or ours.size == 0:
        raise ValueError(f"need two equally long, non-empty series, got {ours.size} and {ref.size}")
    per_step = ours / ref
    rng = np.random.default_rng(seed)
    boot = np.median(per_step[rng.integers(0, per_step.size, (200, per_step.size))], axis=1)
    return {
        "ratio": float(np.median(per_step)),
        "ratio_ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
        "ratio_of_medians": float(np.median(ours) / np.median(ref)),
        "ours_us": float(np.median(ours)) / 1e3,
        "reference_us": float(np.median(ref)) / 1e3,
    }


def phase_ratios(samples: dict[str, dict], groups: int, lr: str) -> list[dict]:
    """``paired_ratio`` per phase of each pair in ``PAIRS`` in ``samples`` (one config)."""
    ratios = []
    for ours, ref in PAIRS:
        if ours not in samples or ref not in samples:
            continue
        for phase in PHASES:
            ratios.append({"param_groups": groups, "lr": lr, "ours": ours, "reference": ref,
                           "phase": phase,
                           **paired_ratio(samples[ours][phase], samples[ref][phase])})
    return ratios


def run(quick: bool = False) -> dict:
    torch.set_num_threads(1)  # scheduler steps are scalar host work; keep the timing quiet
    warmup, steps, repeats = (QUICK_WARMUP, 60, 2) if quick else (WARMUP, 1000, 20)
    log(f"sched_overhead: {len(CASES)} schedulers, side by side in groups {LOCKSTEP}, x "
        f"{len(GROUPS)} group counts x {len(LR_KINDS)} LR kinds, {repeats} x {steps} steps each "
        f"(warmup {warmup})")
    rows, ratios = [], []
    for groups in GROUPS:
        for lr in LR_KINDS:
            samples = {}
            for names in LOCKSTEP:
                builders = {name: CASES[name] for name in names if CASES[name] is not None}
                samples.update(measure(builders, groups, lr == "tensor", warmup, steps, repeats))
            ratios += phase_ratios(samples, groups, lr)
            for name, build in CASES.items():
                row = {"param_groups": groups, "lr": lr, "scheduler": name}
                if build is None:
                    row["status"] = "unavailable (warmup_scheduler not installed)"
                else:
                    row.update(summarize(samples[name]), status="ok")
                rows.append(row)
                log(f"  {groups} group(s) {lr:<6} {name:<50} "
                    + (f"warmup {row['warmup_median_us']:7.2f} us, after "
                       f"{row['after_median_us']:7.2f} us" if "median_us" in row
                       else row["status"]))
    print(format_table(rows, ["param_groups", "lr", "scheduler", "warmup_median_us",
                              "after_median_us", "p10_us", "p90_us"]))
    print(format_table(
        [{**r, "ci95": "{:.4f}-{:.4f}".format(*r["ratio_ci95"])} for r in ratios],
        ["param_groups", "lr", "ours", "phase", "ours_us", "reference_us", "ratio", "ci95",
         "ratio_of_medians"]))
    result = {
        "config": {"param_groups": list(GROUPS), "lr_kinds": list(LR_KINDS),
                   "steps_per_schedule": steps, "repeats": repeats, "warmup_steps": warmup,
                   "multiplier": MULTIPLIER, "optimizer": "SGD",
                   "torch_threads": torch.get_num_threads(),
                   "lockstep_groups": [list(names) for names in LOCKSTEP],
                   "timer": "time.perf_counter_ns around each sched.step(); the schedulers of "
                            "a lockstep group stepped side by side in a rotating order"},
        "rows": rows,
        "ratios": ratios,
    }
    write_json("sched_overhead", result)
    _plot(rows, ratios)
    return {"stamp": stamp(), **result}


def _plot(rows: list[dict], ratios: list[dict]) -> None:
    plt = pyplot()

    configs = [(g, lr) for g in GROUPS for lr in LR_KINDS]
    labels = [f"{g} group{'s' if g > 1 else ''}, {lr} LR" for g, lr in configs]
    fig, (ax_ratio, ax_abs) = plt.subplots(1, 2, figsize=(13, 4.6),
                                           gridspec_kw={"width_ratios": [1, 1.5]})

    # left: ours / warmup_scheduler 0.3 per phase
    bars = [(ours, phase) for ours, _ in PAIRS for phase in PHASES]
    width = 0.8 / len(bars)
    colors = ["tab:blue", "tab:cyan", "tab:red", "tab:orange"]
    for j, ((ours, phase), color) in enumerate(zip(bars, colors)):
        xs, ys = [], []
        for i, (g, lr) in enumerate(configs):
            hit = [r for r in ratios if (r["param_groups"], r["lr"], r["ours"], r["phase"])
                   == (g, lr, ours, phase)]
            if hit:
                xs.append(i + (j - (len(bars) - 1) / 2) * width)
                ys.append(hit[0]["ratio"])
        kind = "no after_scheduler" if ours == "ours" else "+ CosineAnnealingLR"
        ax_ratio.bar(xs, ys, width, color=color,
                     label=f"{kind}, {'during' if phase == 'warmup' else 'after'} warmup")
        for x, y in zip(xs, ys):
            ax_ratio.text(x, y, f" {y:.3f}", ha="center", va="bottom", fontsize=6, rotation=90)
    ax_ratio.axhline(1.0, color="black", lw=0.8)
    ax_ratio.set_xticks(range(len(configs)), labels, fontsize=7, rotation=15)
    ax_ratio.set_ylabel(f"host time per step, ours / {REFERENCE}")
    ax_ratio.set_ylim(0, 1.5)
    ax_ratio.legend(fontsize=7, loc="upper left", ncol=2)
    ax_ratio.set_title("paired per-step ratio (median), by phase", fontsize=8)
    ax_ratio.grid(axis="y", alpha=0.3)

    # right: after-warmup medians of every scheduler, per config (log scale)
    names = list(dict.fromkeys(r["scheduler"] for r in rows))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        xs, ys = [], []
        for i, (g, lr) in enumerate(configs):
            row = next(r for r in rows if (r["param_groups"], r["lr"], r["scheduler"])
                       == (g, lr, name))
            if "after_median_us" in row:
                xs.append(i + (j - (len(names) - 1) / 2) * width)
                ys.append(row["after_median_us"])
        ax_abs.bar(xs, ys, width, label=name)
    ax_abs.set_yscale("log")
    ax_abs.set_xticks(range(len(configs)), labels, fontsize=7, rotation=15)
    ax_abs.set_ylabel("µs per sched.step() after warmup (median)")
    ax_abs.legend(fontsize=6.5, loc="upper left")
    ax_abs.set_title("absolute; compare within a lockstep group only (ours with the reference)",
                     fontsize=8)
    ax_abs.grid(axis="y", alpha=0.3)

    s = stamp()
    fig.suptitle(f"Scheduler step overhead, side by side per phase — {s['device']}, "
                 f"torch {s['torch']}, Python {s['python']}, {s['date']}", fontsize=9)
    save_figure(fig, "sched_overhead")
    plt.close(fig)


if __name__ == "__main__":
    run()
