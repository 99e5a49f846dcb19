"""Host time per ``scheduler.step()``: our GradualWarmupScheduler vs the reference and torch.

Every scheduler drives the same schedule shape (warm up over ``WARMUP`` steps, then, where the
scheduler has one, cosine decay to the end) on an SGD optimizer with ``GROUPS`` param groups, once
with float LRs and once with 0-dim tensor LRs (``param_groups[i]["lr"] = torch.tensor(lr)``, which
schedulers must update in place). Only ``sched.step()`` is timed, one call at a time with
``time.perf_counter_ns``; the optimizer steps once beforehand (so torch does not warn) and never
inside the timed loop. A fresh optimizer + scheduler is built for every repeat (untimed) so every
repeat walks the whole schedule, warmup and decay alike; the first repeat is a warm-up and is
dropped. We report the median over all timed calls, and per phase.

Run: ``python -m bench.sched_overhead`` (well under 30 s on a laptop CPU).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

from bench.common import format_table, log, save_figure, stamp, write_json
from warmup import GradualWarmupScheduler

try:  # the package we replace; optional here, so a missing install is reported, not fatal
    from warmup_scheduler import GradualWarmupScheduler as ReferenceWarmupScheduler
except ImportError:
    ReferenceWarmupScheduler = None

GROUPS = 4
BASE_LR = 0.1
MULTIPLIER = 8
WARMUP = 100  # steps of warmup inside each schedule


def _model() -> nn.Module:
    # one param group per layer: GROUPS layers
    return nn.Sequential(*(nn.Linear(32, 32) for _ in range(GROUPS)))


def _optimizer(model: nn.Module, tensor_lr: bool) -> torch.optim.Optimizer:
    groups = [
        {"params": layer.parameters(), "lr": torch.tensor(BASE_LR) if tensor_lr else BASE_LR}
        for layer in model
    ]
    opt = torch.optim.SGD(groups, lr=BASE_LR, momentum=0.9)
    return opt


# Each builder takes (optimizer, schedule length) and returns the scheduler. Schedules ramp
# BASE_LR -> MULTIPLIER * BASE_LR over WARMUP steps (torch's LinearLR ramps to the optimizer's LR,
# so there the optimizer is built at the peak and LinearLR starts at 1/MULTIPLIER of it; the host
# work per step is what we compare, not the LR values).
def _ours(opt, steps):
    return GradualWarmupScheduler(opt, multiplier=MULTIPLIER, total_epoch=WARMUP)


def _ours_cosine(opt, steps):
    after = CosineAnnealingLR(opt, T_max=steps - WARMUP)
    return GradualWarmupScheduler(opt, multiplier=MULTIPLIER, total_epoch=WARMUP,
                                  after_scheduler=after)


def _reference(opt, steps):
    return ReferenceWarmupScheduler(opt, multiplier=MULTIPLIER, total_epoch=WARMUP)


def _reference_cosine(opt, steps):
    after = CosineAnnealingLR(opt, T_max=steps - WARMUP)
    return ReferenceWarmupScheduler(opt, multiplier=MULTIPLIER, total_epoch=WARMUP,
                                    after_scheduler=after)


def _torch_sequential(opt, steps):
    warm = LinearLR(opt, start_factor=1 / MULTIPLIER, total_iters=WARMUP)
    decay = CosineAnnealingLR(opt, T_max=steps - WARMUP)
    return SequentialLR(opt, [warm, decay], milestones=[WARMUP])


def _torch_linear(opt, steps):
    return LinearLR(opt, start_factor=1 / MULTIPLIER, total_iters=WARMUP)


CASES: list[tuple[str, Callable | None]] = [
    ("ours", _ours),
    ("ours + CosineAnnealingLR", _ours_cosine),
    ("warmup_scheduler 0.3", _reference if ReferenceWarmupScheduler else None),
    ("warmup_scheduler 0.3 + CosineAnnealingLR",
     _reference_cosine if ReferenceWarmupScheduler else None),
    ("torch SequentialLR(LinearLR, CosineAnnealingLR)", _torch_sequential),
    ("torch LinearLR alone (warmup only)", _torch_linear),
]


def _time_case(build: Callable, tensor_lr: bool, steps: int, repeats: int) -> dict:
    """Per-call ns of ``sched.step()`` over ``repeats`` full schedules (first one dropped)."""
    model = _model()
    warm_ns: list[int] = []
    after_ns: list[int] = []
    for repeat in range(repeats + 1):
        opt = _optimizer(model, tensor_lr)
        sched = build(opt, steps)
        opt.step()  # grads are None: a no-op that tells torch the optimizer stepped first
        clock = time.perf_counter_ns
        times = []
        for _ in range(steps):
            t0 = clock()
            sched.step()
            times.append(clock() - t0)
        if repeat == 0:
            continue  # warm-up pass
        warm_ns += times[:WARMUP]
        after_ns += times[WARMUP:]
        lr = opt.param_groups[0]["lr"]
        lr_type = type(lr).__name__
    all_ns = warm_ns + after_ns
    q = statistics.quantiles(all_ns, n=10)
    return {
        "median_us": statistics.median(all_ns) / 1e3,
        "p10_us": q[0] / 1e3,
        "p90_us": q[-1] / 1e3,
        "warmup_median_us": statistics.median(warm_ns) / 1e3,
        "after_median_us": statistics.median(after_ns) / 1e3,
        "calls": len(all_ns),
        "lr_type_after": lr_type,  # a tensor LR must stay a tensor
    }


def run(quick: bool = False) -> dict:
    torch.set_num_threads(1)  # scheduler steps are scalar host work; keep the timing quiet
    steps, repeats = (300, 3) if quick else (1000, 25)
    log(f"sched_overhead: {len(CASES)} schedulers x (float, tensor) LR, {GROUPS} param groups, "
        f"{repeats} x {steps} steps each (warmup {WARMUP})")
    rows = []
    for name, build in CASES:
        for tensor_lr in (False, True):
            row = {"scheduler": name, "lr": "tensor" if tensor_lr else "float"}
            if build is None:
                row["status"] = "unavailable (warmup_scheduler not installed)"
            else:
                try:
                    row.update(_time_case(build, tensor_lr, steps, repeats))
                    row["status"] = "ok"
                except Exception as exc:  # report a scheduler that breaks, keep timing the rest
                    row["status"] = f"failed: {type(exc).__name__}: {exc}"[:200]
            log(f"  {name:<50} {row['lr']:<6} "
                + (f"{row['median_us']:7.2f} us" if "median_us" in row else row["status"]))
            rows.append(row)

    columns = ["scheduler", "lr", "median_us", "p10_us", "p90_us", "warmup_median_us",
               "after_median_us", "status"]
    print(format_table(rows, columns))
    result = {
        "config": {"param_groups": GROUPS, "steps_per_schedule": steps, "repeats": repeats,
                   "warmup_steps": WARMUP, "multiplier": MULTIPLIER, "optimizer": "SGD",
                   "torch_threads": torch.get_num_threads(),
                   "timer": "time.perf_counter_ns around each sched.step()"},
        "rows": rows,
    }
    write_json("sched_overhead", result)
    _plot(rows)
    return {"stamp": stamp(), **result}


def _plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["scheduler"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(names) + 1.5))
    height = 0.38
    for offset, kind, color in ((-height / 2, "float", "tab:blue"),
                                (height / 2, "tensor", "tab:orange")):
        for i, name in enumerate(names):
            row = next(r for r in rows if r["scheduler"] == name and r["lr"] == kind)
            y = i + offset
            if "median_us" not in row:
                ax.text(0, y, "  unavailable", va="center", fontsize=8, color="gray")
                continue
            err = [[row["median_us"] - row["p10_us"]], [row["p90_us"] - row["median_us"]]]
            ax.barh(y, row["median_us"], height, xerr=err, color=color, capsize=2,
                    label=f"{kind} LR" if i == 0 else None)
            ax.text(row["p90_us"], y, f" {row['median_us']:.1f}", va="center", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("host µs per sched.step() (median, whiskers p10–p90)")
    s = stamp()
    ax.set_title(f"Scheduler step overhead, {GROUPS} param groups\n{s['device']}, "
                 f"torch {s['torch']}, {s['date']}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, "sched_overhead")
    plt.close(fig)


if __name__ == "__main__":
    run()
