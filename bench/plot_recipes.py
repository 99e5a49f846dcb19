"""LR curves of the warmup recipes that warmup.py covers: ``python -m bench.plot_recipes``.

Writes ``bench/results/warmup_recipes.png`` and prints one recipe's table. Each recipe is a few
lines of ``GradualWarmupScheduler`` code (the same ones the README shows); the numbers are the
optimizer's LR after each ``step()``, nothing is measured.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LambdaLR,
    LinearLR,
    MultiStepLR,
    SequentialLR,
)

from bench.common import format_table, log, pyplot, save_figure
from warmup import GradualWarmupScheduler


def _goyal(opt):
    # Goyal et al.: eta = 0.1 per 256 images, batch 8k -> k = 32; 5 warmup epochs, /10 at 30/60/80
    after = MultiStepLR(opt, milestones=[30 - 5, 60 - 5, 80 - 5], gamma=0.1)
    return GradualWarmupScheduler(opt, multiplier=32, total_epoch=5, after_scheduler=after)


def _resnet110(opt):
    # He et al. (ResNet-110, CIFAR-10): 0.01 for ~400 iterations, then 0.1
    return GradualWarmupScheduler(
        opt, multiplier=1, total_epoch=400, warmup_method="constant", start_factor=0.1
    )


def _maskrcnn(method):
    def build(opt):
        # maskrcnn-benchmark: WARMUP_FACTOR=1/3, WARMUP_ITERS=500, STEPS=(60000, 80000)
        after = MultiStepLR(opt, milestones=[60000 - 500, 80000 - 500], gamma=0.1)
        return GradualWarmupScheduler(
            opt, 1, 500, after, warmup_method=method, start_factor=1 / 3
        )

    return build


def _supergradients(opt):
    # SuperGradients LinearEpochLRWarmup: from initial_lr / (1 + 3) over 3 epochs, then cosine
    after = CosineAnnealingLR(opt, T_max=30 - 3)
    return GradualWarmupScheduler(opt, 1, 3, after, start_factor=1 / (1 + 3))


# The schedules after warmup (the README's blocks): peak LR 3e-4, 100 warmup steps from 0, 1000
# steps in all.
WARMUP, STABLE, DECAY, TOTAL, LR_MIN = 100, 600, 300, 1000, 3e-5


def _wsd(opt):
    after = SequentialLR(opt, [ConstantLR(opt, factor=1.0, total_iters=STABLE),
                               LinearLR(opt, 1.0, 0.0, total_iters=DECAY)],
                         milestones=[STABLE])
    return GradualWarmupScheduler(opt, multiplier=1, total_epoch=WARMUP, after_scheduler=after)


def _cosine_to_min(opt):
    after = CosineAnnealingLR(opt, T_max=TOTAL - WARMUP, eta_min=LR_MIN)
    return GradualWarmupScheduler(opt, multiplier=1, total_epoch=WARMUP, after_scheduler=after)


def _linear_to_zero(opt):
    after = LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=TOTAL - WARMUP)
    return GradualWarmupScheduler(opt, multiplier=1, total_epoch=WARMUP, after_scheduler=after)


def _inverse_sqrt(opt):
    after = LambdaLR(opt, lambda k: (WARMUP / (WARMUP + k)) ** 0.5)
    return GradualWarmupScheduler(opt, multiplier=1, total_epoch=WARMUP, after_scheduler=after)


#: name: (base LR, build(optimizer) -> scheduler, number of steps, x-axis unit)
RECIPES = {
    "goyal": (0.1, _goyal, 90, "epoch"),
    "resnet110": (0.1, _resnet110, 800, "iteration"),
    "maskrcnn-linear": (0.02, _maskrcnn("linear"), 1000, "iteration"),
    "maskrcnn-constant": (0.02, _maskrcnn("constant"), 1000, "iteration"),
    "supergradients": (0.1, _supergradients, 30, "epoch"),
    "wsd": (3e-4, _wsd, TOTAL, "step"),
    "cosine-to-min": (3e-4, _cosine_to_min, TOTAL, "step"),
    "linear-to-zero": (3e-4, _linear_to_zero, TOTAL, "step"),
    "inverse-sqrt": (3e-4, _inverse_sqrt, TOTAL, "step"),
}


def recipe_lrs(name: str) -> list[float]:
    """The LR of recipe ``name`` at e = 0, 1, ..., steps (optimizer.step(); scheduler.step())."""
    base, build, steps, _ = RECIPES[name]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    scheduler = build(optimizer)
    values = [scheduler.get_last_lr()[0]]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        values.append(scheduler.get_last_lr()[0])
    return values


def recipe_table(name: str = "goyal", last: int | None = 12) -> list[dict]:
    """Rows ``{"step", "lr"}`` of recipe ``name`` for e = 0..last (default: the first 12 steps)."""
    values = recipe_lrs(name)
    if last is not None:
        values = values[: last + 1]
    return [{"step": e, "lr": lr} for e, lr in enumerate(values)]


def main() -> None:
    plt = pyplot()

    cols = 3
    rows = -(-len(RECIPES) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, (_, _, _, unit)) in zip(axes.flat, RECIPES.items()):
        values = recipe_lrs(name)
        ax.plot(range(len(values)), values, drawstyle="steps-post")
        ax.set_title(name)
        ax.set_xlabel(unit)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("learning rate")
    for ax in list(axes.flat)[len(RECIPES):]:
        ax.axis("off")
    fig.suptitle("warmup.GradualWarmupScheduler: recipe LR curves", y=1.0)
    fig.tight_layout()
    save_figure(fig, "warmup_recipes")
    log("goyal, first epochs:")
    print(format_table(recipe_table("goyal"), ["step", "lr"]))


if __name__ == "__main__":
    main()
