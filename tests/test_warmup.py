"""Tests for warmup.py: closed forms, recipes, handoffs, step(epoch), resume, tensor LRs, errors.

Every test runs under an autouse fixture that records all warnings and fails on any, so "no
warnings in correct use" is checked everywhere; tests that expect a warning empty the record.
Most tests take the ``lr_kind`` fixture and run twice: float LRs and 0-dim float32 tensor LRs
(whose identity must survive every step).
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import io
import json
import math
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch.optim.lr_scheduler import (
    ChainedScheduler,
    ConstantLR,
    CosineAnnealingLR,
    ExponentialLR,
    LambdaLR,
    LinearLR,
    MultiStepLR,
    PolynomialLR,
    ReduceLROnPlateau,
    SequentialLR,
    StepLR,
)

from warmup import WARMUP_METHODS, GradualWarmupScheduler

ROOT = Path(__file__).resolve().parents[1]
BASES = (0.1, 0.02)  # two param groups with different base LRs


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def caught():
    """Record every warning; a test passes only if none was left in the record."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield record
    assert [str(w.message) for w in record] == []


@pytest.fixture(params=["float", "tensor"])
def lr_kind(request):
    return request.param


def make_optimizer(lr_kind="float", bases=BASES):
    groups = [
        {
            "params": [torch.nn.Parameter(torch.zeros(3))],
            "lr": torch.tensor(b, dtype=torch.float32) if lr_kind == "tensor" else b,
        }
        for b in bases
    ]
    return torch.optim.SGD(groups, lr=1.0, foreach=False)


def lrs(optimizer):
    return [float(g["lr"]) for g in optimizer.param_groups]


def drive(optimizer, scheduler, n, metrics=None):
    """``n`` iterations of optimizer.step(); scheduler.step(); LRs from e = 0 to e = n.

    Checks after every step that tensor LRs were not rebound and that get_last_lr() is right.
    """
    lr_objects = [g["lr"] for g in optimizer.param_groups]
    rows = [lrs(optimizer)]
    for i in range(n):
        optimizer.step()
        if metrics is None:
            scheduler.step()
        else:
            scheduler.step(metrics=metrics[i])
        rows.append(lrs(optimizer))
        for obj, group in zip(lr_objects, optimizer.param_groups):
            if isinstance(obj, torch.Tensor):
                assert group["lr"] is obj
        assert [float(x) for x in scheduler.get_last_lr()] == rows[-1]
    return rows


def assert_rows(got, expected, lr_kind="float"):
    rel = 1e-5 if lr_kind == "tensor" else 1e-12  # float32 storage vs float64 closed form
    assert len(got) == len(expected)
    for e, (g, x) in enumerate(zip(got, expected)):
        assert g == pytest.approx(x, rel=rel, abs=1e-12), f"e={e}: {g} != {x}"


def closed_form(factor, n, bases=BASES):
    """Rows of base * factor(e) for e = 0..n."""
    return [[b * factor(e) for b in bases] for e in range(n + 1)]


def linear(e, T, m, s):
    return s + (m - s) * min(e, T) / T


# ------------------------------------------------------------------------- warmup closed forms
@pytest.mark.parametrize("method", WARMUP_METHODS)
@pytest.mark.parametrize("m, s", [(1, 0.1), (4.0, 1.0), (8, 0.25), (2.5, 2.5)])
def test_warmup_closed_forms(method, m, s, lr_kind):
    T = 6
    expected = {
        "linear": lambda e: s + (m - s) * e / T if e <= T else m,
        "constant": lambda e: s if e < T else m,
        "exponential": lambda e: s * (m / s) ** (min(e, T) / T),
        "cosine": lambda e: s + (m - s) * (1 - math.cos(math.pi * min(e, T) / T)) / 2,
    }[method]
    opt = make_optimizer(lr_kind)
    sched = GradualWarmupScheduler(opt, m, T, warmup_method=method, start_factor=s)
    rows = drive(opt, sched, 2 * T)
    assert_rows(rows, closed_form(expected, 2 * T), lr_kind)
    assert rows[T] == rows[-1]  # target reached at e = T and held
    assert sched.finished


@pytest.mark.parametrize("m, expected_start", [(1, 0.0), (3, 1.0)])
def test_default_start_factor(m, expected_start, lr_kind):
    opt = make_optimizer(lr_kind)
    sched = GradualWarmupScheduler(opt, m, 4)
    assert sched.start_factor == expected_start
    assert_rows(drive(opt, sched, 0), closed_form(lambda e: expected_start, 0), lr_kind)


def test_base_lrs_are_python_floats(lr_kind):
    opt = make_optimizer(lr_kind)
    sched = GradualWarmupScheduler(opt, 2, 3)
    assert sched.base_lrs == pytest.approx(list(BASES), rel=1e-6)
    assert all(type(b) is float for b in sched.base_lrs)


@pytest.mark.parametrize("m", [1, 1.5, 2, 4.5, 10])
@pytest.mark.parametrize("T", [1, 3, 5, 7])
def test_linear_ramp_identical_to_reference(m, T):
    ref = pytest.importorskip("warmup_scheduler")
    opt_ref, opt = make_optimizer(), make_optimizer()
    sched_ref = ref.GradualWarmupScheduler(opt_ref, multiplier=m, total_epoch=T)
    sched = GradualWarmupScheduler(opt, m, T)
    assert drive(opt, sched, 2 * T + 2) == drive(opt_ref, sched_ref, 2 * T + 2)  # exact floats


# ------------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize("method", ["linear", "constant"])
def test_recipe_maskrcnn_benchmark(method, lr_kind):
    """WarmupMultiStepLR of maskrcnn-benchmark, iteration by iteration."""
    warmup_factor, warmup_iters, gamma, milestones = 1 / 3, 500, 0.1, (800, 1000)

    def maskrcnn(i):  # maskrcnn_benchmark/solver/lr_scheduler.py, transcribed
        factor = 1
        if i < warmup_iters:
            if method == "constant":
                factor = warmup_factor
            else:
                alpha = i / warmup_iters
                factor = warmup_factor * (1 - alpha) + alpha
        return factor * gamma ** bisect.bisect_right(milestones, i)

    opt = make_optimizer(lr_kind)
    after = MultiStepLR(opt, [m - warmup_iters for m in milestones], gamma)
    sched = GradualWarmupScheduler(
        opt, 1, warmup_iters, after, warmup_method=method, start_factor=warmup_factor
    )
    assert_rows(drive(opt, sched, 1100), closed_form(maskrcnn, 1100), lr_kind)


def test_recipe_resnet110_constant_warmup(lr_kind):
    """He et al.: 0.01 for the first ~400 iterations, then back to 0.1."""
    opt = make_optimizer(lr_kind, bases=(0.1,))
    sched = GradualWarmupScheduler(opt, 1, 400, warmup_method="constant", start_factor=0.1)
    rows = drive(opt, sched, 410)
    assert_rows(rows, [[0.01]] * 400 + [[0.1]] * 11, lr_kind)


def test_recipe_goyal_linear_scaling(lr_kind):
    """Goyal et al.: eta per 256 images, k times the batch -> ramp from eta to k*eta in 5 epochs."""
    eta, k = 0.1, 32
    opt = make_optimizer(lr_kind, bases=(eta,))
    sched = GradualWarmupScheduler(opt, k, 5)
    expected = [[eta + (k * eta - eta) * min(e, 5) / 5] for e in range(9)]
    assert_rows(drive(opt, sched, 8), expected, lr_kind)


def test_recipe_supergradients_linear_epoch_warmup(lr_kind):
    """SuperGradients LinearEpochLRWarmup: start initial_lr / (1 + T), + (lr - start) / T each."""
    initial_lr, T = 0.1, 4
    start = initial_lr / (1 + T)
    opt = make_optimizer(lr_kind, bases=(initial_lr,))
    sched = GradualWarmupScheduler(opt, 1, T, start_factor=1 / (1 + T))
    expected = [[start + min(e, T) * (initial_lr - start) / T] for e in range(T + 3)]
    assert_rows(drive(opt, sched, T + 2), expected, lr_kind)
    assert expected[-1][0] == pytest.approx(initial_lr)


def test_recipe_per_iteration_warmup(lr_kind):
    """Step every batch: total_epoch counts iterations; the after_scheduler too."""
    iters_per_epoch, warmup_epochs = 7, 2
    T = iters_per_epoch * warmup_epochs
    opt = make_optimizer(lr_kind)
    after = StepLR(opt, step_size=3 * iters_per_epoch, gamma=0.1)  # decay every 3 epochs
    sched = GradualWarmupScheduler(opt, 2, T, after)
    rows = drive(opt, sched, T + 3 * iters_per_epoch + 1)
    assert_rows([rows[iters_per_epoch]], [[1.5 * b for b in BASES]], lr_kind)  # half way
    assert_rows([rows[T + 3 * iters_per_epoch - 1]], [[2 * b for b in BASES]], lr_kind)
    assert_rows([rows[T + 3 * iters_per_epoch]], [[0.2 * b for b in BASES]], lr_kind)


# Schedules after warmup: the README's blocks run as they stand, and bench.plot_recipes' builders.
README_RECIPES = {  # name: first line of its block in the README's "### Recipes"
    "wsd": "# Warmup-stable-decay (WSD)",
    "cosine-to-min": "# Cosine down to a minimum LR",
    "linear-to-zero": "# Linear decay to zero",
    "inverse-sqrt": "# Inverse square root",
}


def readme_recipe_block(name):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Recipes") : text.index("### Differences from warmup_scheduler")]
    blocks = [b for b in re.findall(r"```python\n(.*?)```", section, flags=re.S)
              if b.startswith(README_RECIPES[name])]
    assert len(blocks) == 1, f"README: {len(blocks)} blocks start with {README_RECIPES[name]!r}"
    return blocks[0]


def schedule(name, e, peak, warmup, stable, decay, total, lr_min):
    """The closed form of each schedule: linear warmup from 0 to ``peak``, then ..."""
    if e < warmup:
        return peak * e / warmup
    k = e - warmup
    if name == "wsd":
        return peak if k <= stable else peak * max(0.0, 1 - (k - stable) / decay)
    if name == "cosine-to-min":
        return lr_min + (peak - lr_min) * (1 + math.cos(math.pi * k / (total - warmup))) / 2
    if name == "linear-to-zero":
        return peak * (1 - k / (total - warmup))
    assert name == "inverse-sqrt"
    return peak * math.sqrt(warmup / (warmup + k))


@pytest.mark.parametrize("name", list(README_RECIPES))
def test_recipe_schedules_after_warmup_from_the_readme(name, lr_kind):
    sizes = {"warmup": 8, "stable": 12, "decay": 10, "total": 36, "lr_min": 0.004}
    opt = make_optimizer(lr_kind, bases=(0.1,))
    namespace = {"optimizer": opt, **sizes}
    exec(readme_recipe_block(name), namespace)
    rows = drive(opt, namespace["scheduler"], sizes["total"])
    expected = [[schedule(name, e, 0.1, **sizes)] for e in range(sizes["total"] + 1)]
    assert_rows(rows, expected, lr_kind)


@pytest.mark.parametrize("name", list(README_RECIPES))
def test_recipe_schedules_after_warmup_as_plotted(name):
    plot_recipes = pytest.importorskip("bench.plot_recipes")
    peak, _, steps, _ = plot_recipes.RECIPES[name]
    sizes = {"warmup": plot_recipes.WARMUP, "stable": plot_recipes.STABLE,
             "decay": plot_recipes.DECAY, "total": plot_recipes.TOTAL,
             "lr_min": plot_recipes.LR_MIN}
    expected = [schedule(name, e, peak, **sizes) for e in range(steps + 1)]
    assert plot_recipes.recipe_lrs(name) == pytest.approx(expected, rel=1e-9, abs=1e-15)


# ----------------------------------------------------------------------------------- handoffs
T, M = 4, 2.0  # warmup of the handoff tests: 4 steps to twice the base LR


def _poly(k):
    return (1 - min(k, 5) / 5) ** 2


AFTER = {  # name: (build on optimizer, after_scheduler LR factor at its epoch k = e - T >= 0)
    "none": (lambda o: None, lambda k: 1.0),
    "StepLR": (lambda o: StepLR(o, 3, 0.5), lambda k: 0.5 ** (k // 3)),
    "MultiStepLR": (
        lambda o: MultiStepLR(o, [2, 5], 0.1),
        lambda k: 0.1 ** bisect.bisect_right([2, 5], k),
    ),
    "ExponentialLR": (lambda o: ExponentialLR(o, 0.9), lambda k: 0.9**k),
    "CosineAnnealingLR": (
        lambda o: CosineAnnealingLR(o, T_max=8),
        lambda k: (1 + math.cos(math.pi * k / 8)) / 2,
    ),
    "LambdaLR": (lambda o: LambdaLR(o, lambda k: 1 / (1 + k)), lambda k: 1 / (1 + k)),
    "PolynomialLR": (lambda o: PolynomialLR(o, total_iters=5, power=2.0), _poly),
    "SequentialLR": (
        lambda o: SequentialLR(o, [ConstantLR(o, 0.5, total_iters=2), ExponentialLR(o, 0.5)], [3]),
        lambda k: 0.5 if k < 2 else (1.0 if k < 3 else 0.5 ** (k - 3)),
    ),
    "ChainedScheduler": (
        lambda o: ChainedScheduler([ConstantLR(o, 0.5, total_iters=2), ExponentialLR(o, 0.5)]),
        lambda k: (0.5 if k < 2 else 1.0) * 0.5**k,
    ),
}


def expected_after(after_factor, n):
    return closed_form(lambda e: linear(e, T, M, 1.0) if e < T else M * after_factor(e - T), n)


@pytest.mark.parametrize("name", list(AFTER))
def test_handoff_closed_form(name, lr_kind):
    build, after_factor = AFTER[name]
    opt = make_optimizer(lr_kind)
    sched = GradualWarmupScheduler(opt, M, T, build(opt))
    rows = drive(opt, sched, T + 12)
    assert_rows(rows, expected_after(after_factor, T + 12), lr_kind)
    assert sched.finished


def test_steplr_first_decays_at_T_plus_k(lr_kind):
    opt = make_optimizer(lr_kind)
    sched = GradualWarmupScheduler(opt, M, T, StepLR(opt, step_size=3, gamma=0.5))
    peak = [M * b for b in BASES]
    rows = drive(opt, sched, T + 3)
    assert_rows(rows[T : T + 3], [peak] * 3, lr_kind)
    assert_rows(rows[T + 3 :], [[p / 2 for p in peak]], lr_kind)


def test_cosine_continues_from_peak_without_spike(lr_kind):
    opt = make_optimizer(lr_kind)
    sched = GradualWarmupScheduler(opt, M, T, CosineAnnealingLR(opt, T_max=10, eta_min=0.001))
    rows = drive(opt, sched, T + 10)
    after = [r[0] for r in rows[T:]]
    assert after[0] == pytest.approx(M * BASES[0], rel=1e-6)
    assert all(a > b for a, b in zip(after, after[1:]))  # strictly decreasing from the peak
    assert after[-1] == pytest.approx(0.001, rel=1e-5)


# after_schedulers whose epoch-0 LR is not their base LR (a SequentialLR or ChainedScheduler that
# starts with a ConstantLR is in AFTER, checked against its closed form at e = T too; torch's
# SequentialLR cannot hold either of them)
NOT_AT_BASE = {
    "ConstantLR": lambda o: ConstantLR(o, factor=0.5, total_iters=3),
    "LinearLR": lambda o: LinearLR(o, start_factor=0.25, total_iters=4),
}


@pytest.mark.parametrize("name", [*NOT_AT_BASE, "StepLR", "CosineAnnealingLR", "ExponentialLR"])
def test_handoff_matches_torch_sequential_lr(name, lr_kind):
    """e = T is the after_scheduler's epoch 0, as in torch's
    SequentialLR([LinearLR(opt, 1 / m, 1, T), after], [T]) on an optimizer at the target."""
    build = NOT_AT_BASE.get(name) or AFTER[name][0]
    opt = make_optimizer(lr_kind)
    ours = drive(opt, GradualWarmupScheduler(opt, M, T, build(opt)), T + 10)
    opt = make_optimizer(lr_kind, bases=[M * b for b in BASES])
    sequential = SequentialLR(opt, [LinearLR(opt, 1 / M, 1.0, T), build(opt)], [T])
    theirs = drive(opt, sequential, T + 10)
    rel = 1e-5 if lr_kind == "tensor" else 1e-9  # torch's chainable LinearLR ramp vs ours
    for e, (a, b) in enumerate(zip(ours, theirs)):
        assert a == pytest.approx(b, rel=rel), f"e={e}"


def test_constant_lr_after_warmup_keeps_all_its_epochs(lr_kind):
    opt = make_optimizer(lr_kind)
    sched = GradualWarmupScheduler(opt, M, T, ConstantLR(opt, factor=0.5, total_iters=3))
    rows = drive(opt, sched, T + 5)
    peak = [M * b for b in BASES]
    assert_rows(rows[T : T + 3], [[p / 2 for p in peak]] * 3, lr_kind)  # its epochs 0, 1, 2
    assert_rows(rows[T + 3 :], [peak] * 3, lr_kind)
    assert sched.finished and sched.last_epoch == T + 5


def test_finished_from_the_handoff_on():
    opt = make_optimizer()
    sched = GradualWarmupScheduler(opt, M, T, StepLR(opt, 3))
    states = []
    for _ in range(T + 2):
        states.append(sched.finished)
        opt.step()
        sched.step()
    assert states == [False] * T + [True, True]


class _PlateauSubclass(ReduceLROnPlateau):
    pass


@pytest.mark.parametrize("cls", [ReduceLROnPlateau, _PlateauSubclass])
def test_reduce_lr_on_plateau(cls, lr_kind):
    """Metrics ignored during warmup (ramp from e = 0), then plateau logic from the target."""
    opt = make_optimizer(lr_kind)
    sched = GradualWarmupScheduler(opt, M, T, cls(opt, factor=0.5, patience=1))
    # Wild metrics during warmup must not matter; afterwards: improve twice, then stall.
    metrics = [100.0, -100.0, 5.0, 1e9] + [3.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    rows = drive(opt, sched, len(metrics), metrics=metrics)
    factors = [linear(e, T, M, 1.0) for e in range(T + 1)]
    # e = T+1, T+2 improve; T+3 bad 1; T+4 bad 2 > patience -> halve; T+5, T+6 bad 1, 2 -> halve
    factors += [M, M, M, M / 2, M / 2, M / 4, M / 4]
    assert_rows(rows, closed_form(lambda e: factors[e], len(metrics)), lr_kind)


def test_plateau_needs_metrics_after_warmup_only(lr_kind):
    opt = make_optimizer(lr_kind)
    sched = GradualWarmupScheduler(opt, M, T, ReduceLROnPlateau(opt))
    for _ in range(T):
        opt.step()
        sched.step()  # fine: metrics are ignored during warmup
    opt.step()
    with pytest.raises(TypeError, match=r"step\(\) needs metrics=\.\.\. once warmup is over"):
        sched.step()
    assert sched.last_epoch == T  # the failed call changed nothing
    sched.step(metrics=1.0)
    assert sched.last_epoch == T + 1


@pytest.mark.parametrize("bad", [0.53, 2.0, torch.tensor(0.53), True])
@pytest.mark.parametrize("after", ["none", "StepLR"])
def test_step_with_non_integer_epoch_raises(bad, after):
    """The classic step(val_loss) slip raises unless the after_scheduler is a plateau one."""
    opt = make_optimizer()
    sched = GradualWarmupScheduler(opt, M, T, AFTER[after][0](opt))
    opt.step()
    with pytest.raises(
        TypeError,
        match=r"^epoch must be an int \(the number of steps so far\), got .*; "
        r"to pass a validation metric use step\(metrics=\.\.\.\)$",
    ):
        sched.step(bad)
    assert sched.last_epoch == 0
    with pytest.raises(ValueError, match=r"epoch must be >= 0, got -1"):
        sched.step(-1)


@pytest.mark.parametrize("kind", ["float", "tensor"])
@pytest.mark.parametrize("cls", [ReduceLROnPlateau, _PlateauSubclass])
def test_plateau_takes_a_positional_metric(cls, kind, lr_kind):
    """Lightning's lr_scheduler_step calls step(metric): with a plateau after_scheduler a float or
    a 0-dim tensor in the epoch position is the metric, during warmup (ignored) and after, with
    the same LRs as step(metrics=...)."""
    metrics = [100.0, -100.0, 5.0, 1e9] + [3.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]

    def run(positional):
        opt = make_optimizer(lr_kind)
        sched = GradualWarmupScheduler(opt, M, T, cls(opt, factor=0.5, patience=1))
        rows = [lrs(opt)]
        for value in metrics:
            if kind != "float":
                value = torch.tensor(value, dtype=torch.float32)  # Lightning's monitored value
            opt.step()
            if positional:
                sched.step(value)
            else:
                sched.step(metrics=value)
            rows.append(lrs(opt))
            assert [float(x) for x in sched.get_last_lr()] == rows[-1]
        assert sched.last_epoch == len(metrics)
        return rows

    rows = run(positional=True)
    assert rows == run(positional=False)
    factors = [linear(e, T, M, 1.0) for e in range(T + 1)] + [M, M, M, M / 2, M / 2, M / 4, M / 4]
    assert_rows(rows, closed_form(lambda e: factors[e], len(metrics)), lr_kind)


@pytest.mark.parametrize("bad", [True, torch.tensor([0.5, 0.4]), "0.5", 1j])
def test_plateau_refuses_a_positional_non_metric(bad):
    opt = make_optimizer()
    sched = GradualWarmupScheduler(opt, M, T, ReduceLROnPlateau(opt))
    opt.step()
    with pytest.raises(
        TypeError,
        match=r"^epoch must be an int \(the number of steps so far\) or, since after_scheduler "
        r"is ReduceLROnPlateau, the metric \(a number or a 0-dim tensor\), got ",
    ):
        sched.step(bad)
    assert sched.last_epoch == 0


def test_plateau_metric_given_twice_raises():
    opt = make_optimizer()
    sched = GradualWarmupScheduler(opt, M, T, ReduceLROnPlateau(opt))
    opt.step()
    with pytest.raises(
        TypeError, match=r"^step\(\) got the metric twice: positionally \(0.5\) and as metrics=0.4$"
    ):
        sched.step(0.5, metrics=0.4)
    assert sched.last_epoch == 0


def test_plateau_int_positional_is_still_an_epoch():
    opt = make_optimizer()
    sched = GradualWarmupScheduler(opt, M, T, ReduceLROnPlateau(opt))
    opt.step()
    sched.step(2)
    assert sched.last_epoch == 2
    assert lrs(opt) == pytest.approx([b * linear(2, T, M, 1.0) for b in BASES])


def test_metrics_ignored_by_other_schedulers(lr_kind):
    opt = make_optimizer(lr_kind)
    sched = GradualWarmupScheduler(opt, M, T, StepLR(opt, 3, 0.5))
    rows = drive(opt, sched, T + 5, metrics=[1.0] * (T + 5))
    assert_rows(rows, expected_after(AFTER["StepLR"][1], T + 5), lr_kind)


# ---------------------------------------------------------------------- step(epoch) and resume
@pytest.mark.parametrize("name", list(AFTER))
def test_explicit_epoch_equals_stepping_there(name, lr_kind):
    build = AFTER[name][0]
    opt = make_optimizer(lr_kind)
    rows = drive(opt, GradualWarmupScheduler(opt, M, T, build(opt)), T + 10)
    opt = make_optimizer(lr_kind)
    sched = GradualWarmupScheduler(opt, M, T, build(opt))
    epochs = list(range(T + 11)) * 2
    random.Random(0).shuffle(epochs)  # forward, backward and repeated jumps
    for e in epochs:
        opt.step()
        sched.step(e)
        assert lrs(opt) == rows[e], f"step({e})"
        assert sched.last_epoch == e and sched.finished == (e >= T)
        assert [float(x) for x in sched.get_last_lr()] == rows[e]


def _save_load(optimizer, scheduler):
    buf = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", list(AFTER) + ["ReduceLROnPlateau"])
def test_resume_anywhere_reproduces_the_run(name, lr_kind):
    n = T + 9
    if name == "ReduceLROnPlateau":
        build = lambda o: ReduceLROnPlateau(o, factor=0.5, patience=1)  # noqa: E731
        metrics = [3.0, 2.0, 2.5, 2.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.4, 0.4]
    else:
        build, metrics = AFTER[name][0], None

    def fresh():
        opt = make_optimizer(lr_kind)
        return opt, GradualWarmupScheduler(opt, M, T, build(opt))

    opt, sched = fresh()
    uninterrupted = drive(opt, sched, n, metrics)
    for stop in range(n + 1):
        opt, sched = fresh()
        drive(opt, sched, stop, metrics)
        checkpoint = _save_load(opt, sched)
        opt, sched = fresh()
        opt.load_state_dict(checkpoint["optimizer"])
        sched.load_state_dict(checkpoint["scheduler"])
        assert lrs(opt) == uninterrupted[stop]
        assert sched.last_epoch == stop and sched.finished == (stop >= T)
        rest = drive(opt, sched, n - stop, None if metrics is None else metrics[stop:])
        assert rest == uninterrupted[stop:], f"resumed at e={stop}"


def test_state_dict_is_plain_data():
    opt = make_optimizer("tensor")
    sched = GradualWarmupScheduler(opt, M, T, SequentialLR(
        opt, [ConstantLR(opt, 0.5, total_iters=2), ExponentialLR(opt, 0.5)], [3]))
    drive(opt, sched, T + 2)
    state = sched.state_dict()
    plain = (type(None), bool, int, float, str, torch.Tensor)

    def check(value):
        if isinstance(value, dict):
            for k, v in value.items():
                assert isinstance(k, str)
                check(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                check(v)
        else:
            assert isinstance(value, plain), type(value)

    check(state)
    assert isinstance(state["after_scheduler"], dict)
    assert "optimizer" not in state


def test_load_state_dict_refuses_mismatched_after_scheduler():
    opt = make_optimizer()
    state = GradualWarmupScheduler(opt, M, T).state_dict()
    opt = make_optimizer()
    sched = GradualWarmupScheduler(opt, M, T, StepLR(opt, 3))
    with pytest.raises(ValueError, match="disagree on after_scheduler: saved none"):
        sched.load_state_dict(state)


# --------------------------------------------------------------------- tensor LRs, no host sync
@contextlib.contextmanager
def forbid_host_sync():
    """Make every tensor -> Python conversion raise while inside."""

    def boom(*args, **kwargs):
        raise AssertionError("host sync: a tensor was read on the host")

    names = ["item", "tolist", "__float__", "__int__", "__bool__", "__index__"]
    saved = {name: getattr(torch.Tensor, name) for name in names}
    for name in names:
        setattr(torch.Tensor, name, boom)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@pytest.mark.parametrize("name", ["none", "StepLR", "CosineAnnealingLR", "SequentialLR"])
@pytest.mark.parametrize("method", WARMUP_METHODS)
def test_tensor_lr_steps_without_host_sync(name, method):
    opt = make_optimizer("tensor")
    sched = GradualWarmupScheduler(
        opt, M, T, AFTER[name][0](opt), warmup_method=method, start_factor=0.5
    )
    lr_objects = [g["lr"] for g in opt.param_groups]
    with forbid_host_sync():
        for _ in range(T + 6):
            opt.step()
            sched.step()
        sched.step(2)  # an explicit epoch (a replay from the handoff) too
        sched.step(T + 3)
    assert all(g["lr"] is obj for g, obj in zip(opt.param_groups, lr_objects))
    assert all(isinstance(x, torch.Tensor) for x in sched.get_last_lr())


def _attributes_in_a_dict(obj):
    """CPython keeps an object's attributes inline until its __dict__ is read; gc shows which."""
    return any(type(r) is dict for r in gc.get_referents(obj))


@pytest.mark.parametrize("name", ["StepLR", "CosineAnnealingLR", "LambdaLR", "PolynomialLR"])
def test_plain_run_never_reads_the_after_schedulers_dict(name, lr_kind):
    """Reading a scheduler's __dict__ (state_dict(), deepcopy) makes each later step of it 1-9%
    slower on CPython 3.11 (see warmup._REWINDABLE), more than the rest of the after-warmup gap
    to warmup_scheduler that bench/sched_overhead.py measured: a plain run, handoff included,
    must not do it."""
    opt = make_optimizer(lr_kind)
    after = AFTER[name][0](opt)
    if _attributes_in_a_dict(after):
        pytest.skip("this Python keeps attributes in a dict from the start")
    sched = GradualWarmupScheduler(opt, M, T, after)
    drive(opt, sched, T + 5)
    assert not _attributes_in_a_dict(after)
    sched.state_dict()  # a checkpoint has to read it (and the check above can fail)
    assert _attributes_in_a_dict(after)


def test_forbid_host_sync_catches_a_sync():
    with forbid_host_sync(), pytest.raises(AssertionError, match="host sync"):
        float(torch.tensor(1.0))


@pytest.mark.cuda
def test_cuda_tensor_lr_no_sync():
    groups = [{"params": [torch.nn.Parameter(torch.zeros(3, device="cuda"))],
               "lr": torch.tensor(0.1, device="cuda")}]
    opt = torch.optim.SGD(groups, lr=1.0)
    lr_tensor = opt.param_groups[0]["lr"]
    sched = GradualWarmupScheduler(opt, M, T, StepLR(opt, 3, 0.5))
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(T + 5):
            opt.step()
            sched.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.param_groups[0]["lr"] is lr_tensor
    assert float(lr_tensor) == pytest.approx(0.1 * M * 0.5, rel=1e-6)


# ------------------------------------------------------------------------------------ warnings
def test_construction_and_steps_warn_nothing(caught):
    for build, _ in AFTER.values():
        opt = make_optimizer()
        sched = GradualWarmupScheduler(opt, M, T, build(opt))
        drive(opt, sched, T + 3)
        sched.step(T + 1)
    assert caught == []


def test_scheduler_before_optimizer_still_warns(caught):
    """The one torch warning we keep: it flags a real bug (proves the fixture can fail)."""
    opt = make_optimizer()
    sched = GradualWarmupScheduler(opt, M, T)
    assert caught == []
    sched.step()
    assert len(caught) == 1 and "before `optimizer.step()`" in str(caught[0].message)
    caught.clear()


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"multiplier": 0.5}, "multiplier must be a finite number >= 1, got 0.5"),
        ({"multiplier": float("nan")}, "multiplier must be a finite number >= 1, got nan"),
        ({"multiplier": float("inf")}, "multiplier must be a finite number >= 1, got inf"),
        ({"multiplier": "2"}, "multiplier must be a finite number >= 1, got '2'"),
        ({"total_epoch": 0}, "total_epoch must be a positive integer, got 0"),
        ({"total_epoch": -3}, "total_epoch must be a positive integer, got -3"),
        ({"total_epoch": 2.5}, "total_epoch must be a positive integer, got 2.5"),
        ({"total_epoch": 5.0}, "total_epoch must be a positive integer, got 5.0"),
        ({"total_epoch": True}, "total_epoch must be a positive integer, got True"),
        ({"warmup_method": "linaer"}, "warmup_method must be one of .*, got 'linaer'"),
        ({"start_factor": -0.1}, "start_factor must be a finite number >= 0, got -0.1"),
        ({"start_factor": float("nan")}, "start_factor must be a finite number >= 0, got nan"),
        ({"start_factor": 3.0}, r"start_factor must be <= multiplier \(2\), got 3.0"),
        (
            {"warmup_method": "exponential", "start_factor": 0.0},
            "start_factor must be > 0 for warmup_method='exponential', got 0.0",
        ),
        ({"after_scheduler": "StepLR"}, "after_scheduler must be an LRScheduler, got 'StepLR'"),
    ],
)
def test_bad_input_raises_value_error(kwargs, message):
    args = {"multiplier": 2, "total_epoch": 5, **kwargs}
    with pytest.raises(ValueError, match=f"^{message}$"):
        GradualWarmupScheduler(make_optimizer(), **args)


def test_after_scheduler_on_another_optimizer_raises():
    other = make_optimizer()
    after = StepLR(other, 3)
    with pytest.raises(
        ValueError, match=r"after_scheduler must be bound to the same optimizer, got StepLR bound"
    ):
        GradualWarmupScheduler(make_optimizer(), 2, 5, after)


# ---------------------------------------------------------------------------------- packaging
def test_file_works_copied_alone(tmp_path):
    shutil.copy(ROOT / "warmup.py", tmp_path / "warmup.py")
    code = (
        "import torch, warmup\n"
        "opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)\n"
        "s = warmup.GradualWarmupScheduler(opt, 3, 2, torch.optim.lr_scheduler.StepLR(opt, 1))\n"
        "for _ in range(3):\n"
        "    opt.step(); s.step()\n"
        "print(warmup.__file__, [round(x, 6) for x in s.get_last_lr()])\n"
    )
    result = subprocess.run(
        [sys.executable, "-E", "-W", "error", "-c", code],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{tmp_path / 'warmup.py'} [0.03]"


def test_module_docstring_example():
    import doctest

    import warmup

    assert doctest.testmod(warmup).failed == 0


# ------------------------------------------------- deliberate differences from warmup_scheduler
@pytest.fixture
def ref():
    return pytest.importorskip("warmup_scheduler")


def test_diff_reference_holds_peak_an_extra_epoch(ref, caught):
    opt_ref, opt = make_optimizer(), make_optimizer()
    sched_ref = ref.GradualWarmupScheduler(opt_ref, M, T, StepLR(opt_ref, 3, 0.5))
    ref_rows = [lrs(opt_ref)]
    for _ in range(T + 5):
        opt_ref.step()
        sched_ref.step()
        ref_rows.append(lrs(opt_ref))
    rows = drive(opt, GradualWarmupScheduler(opt, M, T, StepLR(opt, 3, 0.5)), T + 5)
    peak = [M * b for b in BASES]
    assert ref_rows[T : T + 4] == [peak] * 4  # reference: first decay at T + 1 + k
    assert ref_rows[T + 4][0] < peak[0]
    assert rows[T : T + 3] == [peak] * 3 and rows[T + 3][0] < peak[0]  # ours: at T + k
    assert any("get_last_lr" in str(w.message) for w in caught)  # reference warns at handoff
    caught.clear()


def test_diff_reference_cosine_spikes_above_peak(ref, caught):
    opt_ref = make_optimizer()
    sched_ref = ref.GradualWarmupScheduler(opt_ref, M, T, CosineAnnealingLR(opt_ref, 8))
    opt = make_optimizer()
    sched = GradualWarmupScheduler(opt, M, T, CosineAnnealingLR(opt, 8))
    peak = M * BASES[0]
    ref_max = ours_max = 0.0
    for _ in range(T + 8):
        opt_ref.step()
        sched_ref.step()
        opt.step()
        sched.step()
        ref_max, ours_max = max(ref_max, lrs(opt_ref)[0]), max(ours_max, lrs(opt)[0])
    assert ref_max > peak * 1.03  # the reference overshoots the target (0.2079 > 0.2)
    assert ours_max == pytest.approx(peak)
    caught.clear()


def test_diff_reference_get_last_lr_goes_stale(ref, caught):
    opt_ref = make_optimizer()
    sched_ref = ref.GradualWarmupScheduler(opt_ref, M, T, StepLR(opt_ref, 1, 0.5))
    opt = make_optimizer()
    sched = GradualWarmupScheduler(opt, M, T, StepLR(opt, 1, 0.5))
    for _ in range(T + 4):
        opt_ref.step()
        sched_ref.step()
        opt.step()
        sched.step()
    assert sched_ref.get_last_lr() != lrs(opt_ref)
    assert sched.get_last_lr() == lrs(opt)
    caught.clear()


def test_diff_reference_plateau_ramp_off_by_one(ref, caught):
    opt_ref = make_optimizer()
    ref.GradualWarmupScheduler(opt_ref, M, T, ReduceLROnPlateau(opt_ref))
    opt = make_optimizer()
    GradualWarmupScheduler(opt, M, T, ReduceLROnPlateau(opt))
    # Reference: construction already lands on e = 1 of the ramp.
    assert lrs(opt_ref) == pytest.approx([b * linear(1, T, M, 1.0) for b in BASES])
    assert lrs(opt) == pytest.approx(list(BASES))
    caught.clear()


def test_diff_reference_plateau_ignores_multiplier_one_ramp(ref, caught):
    """With multiplier=1 the reference's plateau path uses the m > 1 formula: no warmup at all."""
    opt_ref, opt = make_optimizer(), make_optimizer()
    sched_ref = ref.GradualWarmupScheduler(opt_ref, 1, T, ReduceLROnPlateau(opt_ref))
    sched = GradualWarmupScheduler(opt, 1, T, ReduceLROnPlateau(opt))
    for e in range(1, T):
        opt_ref.step()
        sched_ref.step(metrics=1.0)
        opt.step()
        sched.step(metrics=1.0)
        assert lrs(opt_ref) == pytest.approx(list(BASES))
        assert lrs(opt) == pytest.approx([b * e / T for b in BASES])
    caught.clear()


def test_diff_reference_state_dict_not_weights_only(ref):
    opt_ref = make_optimizer()
    sched_ref = ref.GradualWarmupScheduler(opt_ref, M, T, StepLR(opt_ref, 3))
    buf = io.BytesIO()
    torch.save(sched_ref.state_dict(), buf)
    buf.seek(0)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(buf, weights_only=True)
    opt = make_optimizer()
    assert _save_load(opt, GradualWarmupScheduler(opt, M, T, StepLR(opt, 3)))["scheduler"]


def test_diff_reference_takes_val_loss_as_epoch(ref, caught):
    opt_ref = make_optimizer()
    sched_ref = ref.GradualWarmupScheduler(opt_ref, M, T, StepLR(opt_ref, 3))
    opt_ref.step()
    sched_ref.step(0.37)  # the slip: silently becomes epoch 0.37
    assert sched_ref.last_epoch == 0.37
    opt = make_optimizer()
    sched = GradualWarmupScheduler(opt, M, T, StepLR(opt, 3))
    opt.step()
    with pytest.raises(TypeError, match="epoch must be an int"):
        sched.step(0.37)
    caught.clear()


def test_diff_reference_plateau_takes_val_loss_as_epoch(ref, caught):
    """Lightning's step(metric) with a ReduceLROnPlateau after_scheduler: the reference reads the
    metric as the epoch (a fractional warmup epoch; past total_epoch, float(None) fails); ours
    takes it as the metric."""
    opt_ref = make_optimizer()
    sched_ref = ref.GradualWarmupScheduler(opt_ref, M, T, ReduceLROnPlateau(opt_ref))
    opt_ref.step()
    sched_ref.step(0.37)
    assert sched_ref.last_epoch == 0.37
    with pytest.raises(TypeError):
        sched_ref.step(5.0)  # epoch 5 > total_epoch: ReduceLROnPlateau.step(None, ...)
    opt = make_optimizer()
    sched = GradualWarmupScheduler(opt, M, T, ReduceLROnPlateau(opt))
    opt.step()
    sched.step(0.37)
    sched.step(5.0)
    assert sched.last_epoch == 2
    assert lrs(opt) == pytest.approx([b * linear(2, T, M, 1.0) for b in BASES])
    caught.clear()


def test_diff_reference_accepts_bad_arguments(ref):
    opt = make_optimizer()
    ref.GradualWarmupScheduler(opt, float("nan"), 5)  # accepted silently
    ref.GradualWarmupScheduler(make_optimizer(), 2, 2.5)  # accepted silently
    with pytest.raises(ValueError, match="multiplier"):
        GradualWarmupScheduler(make_optimizer(), float("nan"), 5)
    with pytest.raises(ValueError, match="total_epoch"):
        GradualWarmupScheduler(make_optimizer(), 2, 2.5)


def test_bench_recipe_table_matches_closed_form():
    plot_recipes = pytest.importorskip("bench.plot_recipes")
    rows = plot_recipes.recipe_table("goyal", last=8)
    assert [r["step"] for r in rows] == list(range(9))
    expected = [0.1 * (1 + 31 * min(e, 5) / 5) for e in range(9)]
    assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-12)
    resnet = plot_recipes.recipe_lrs("resnet110")
    assert resnet[:400] == pytest.approx([0.01] * 400) and resnet[400:] == [0.1] * 401


# ------------------------------------------------------- bench: per-phase host cost, side by side
class _BusyScheduler:
    """Stands in for a scheduler in the bench: step() busy-waits ``warmup_ns`` during the first
    ``warmup`` calls and ``after_ns`` after them."""

    def __init__(self, warmup, warmup_ns, after_ns):
        self.warmup, self.warmup_ns, self.after_ns, self.calls = warmup, warmup_ns, after_ns, 0

    def step(self):
        self.calls += 1
        busy_ns = self.warmup_ns if self.calls <= self.warmup else self.after_ns
        end = time.perf_counter_ns() + busy_ns
        while time.perf_counter_ns() < end:
            pass


def test_bench_measures_per_phase_side_by_side_and_computes_ratios():
    so = pytest.importorskip("bench.sched_overhead")
    builders = {  # "ours" is half the reference's cost during warmup and the same after it
        "ours": lambda opt, warmup, steps: _BusyScheduler(warmup, 50_000, 100_000),
        so.REFERENCE: lambda opt, warmup, steps: _BusyScheduler(warmup, 100_000, 100_000),
    }
    samples = so.measure(builders, groups=4, tensor_lr=True, warmup=5, steps=15, repeats=2)
    for name in builders:  # the warm-up repeat is dropped; 5 warmup + 10 after calls per repeat
        assert len(samples[name]["warmup"]) == 2 * 5 and len(samples[name]["after"]) == 2 * 10
    assert 50_000 <= statistics.median(samples["ours"]["warmup"]) < 75_000
    assert 100_000 <= statistics.median(samples["ours"]["after"]) < 150_000
    ratios = {r["phase"]: r for r in so.phase_ratios(samples, 4, "tensor")}
    assert set(ratios) == {"warmup", "after"}
    assert ratios["warmup"]["ratio"] == pytest.approx(0.5, abs=0.15)
    assert ratios["after"]["ratio"] == pytest.approx(1.0, abs=0.3)
    low, high = ratios["warmup"]["ratio_ci95"]
    assert low <= ratios["warmup"]["ratio"] <= high
    assert ratios["warmup"]["param_groups"] == 4 and ratios["warmup"]["lr"] == "tensor"


def test_bench_paired_ratio_is_the_median_of_per_step_ratios():
    so = pytest.importorskip("bench.sched_overhead")
    out = so.paired_ratio([30, 10, 1000, 40], [10, 10, 10, 10])  # per step: 3, 1, 100, 4
    assert out["ratio"] == 3.5 and out["ratio_of_medians"] == 3.5
    assert out["ours_us"] == pytest.approx(0.035) and out["reference_us"] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="need two equally long, non-empty series, got 2 and 1"):
        so.paired_ratio([1, 2], [1])


def test_committed_sched_overhead_at_most_the_reference_per_phase():
    """bench/results/sched_overhead.json (what the README quotes): for float and tensor LRs, 1 and 4
    param groups, with and without an after_scheduler, ours costs at most warmup_scheduler 0.3's
    host time per step in both phases (the paired per-step ratio; after warmup with an
    after_scheduler both are that scheduler's step plus one Python call: parity, 0.99-1.00)."""
    data = json.loads((ROOT / "bench" / "results" / "sched_overhead.json").read_text())
    got = {(r["param_groups"], r["lr"], r["ours"], r["phase"]): r for r in data["ratios"]}
    assert set(got) == {
        (groups, lr, ours, phase)
        for groups in (1, 4) for lr in ("float", "tensor")
        for ours in ("ours", "ours + CosineAnnealingLR") for phase in ("warmup", "after")
    }
    for key, r in got.items():
        assert r["reference"].startswith("warmup_scheduler 0.3"), key
        assert r["ratio"] <= 1.0, (key, r)
        assert r["ratio_ci95"][0] <= r["ratio"] <= r["ratio_ci95"][1], (key, r)


def test_diff_reference_explicit_epoch_warns_and_drifts(ref, caught):
    """Reference: step(epoch) warns (epoch deprecation) and jumps the after_scheduler by closed
    form; ours replays, warns nothing and matches stepping there (see the step(epoch) test)."""
    opt_ref = make_optimizer()
    sched_ref = ref.GradualWarmupScheduler(opt_ref, M, T, StepLR(opt_ref, 1, 0.5))
    for e in range(1, T + 4):
        opt_ref.step()
        sched_ref.step(e)
    assert any("epoch parameter" in str(w.message) for w in caught)
    caught.clear()
    opt = make_optimizer()
    sched = GradualWarmupScheduler(opt, M, T, StepLR(opt, 1, 0.5))
    for e in range(1, T + 4):
        opt.step()
        sched.step(e)
    assert caught == []
    assert lrs(opt) == pytest.approx([M * b * 0.5**3 for b in BASES])


def test_diff_reference_plateau_rebinds_tensor_lr_and_lacks_last_lr(ref, caught):
    opt_ref = make_optimizer("tensor")
    lr_tensor = opt_ref.param_groups[0]["lr"]
    sched_ref = ref.GradualWarmupScheduler(opt_ref, M, T, ReduceLROnPlateau(opt_ref))
    assert opt_ref.param_groups[0]["lr"] is not lr_tensor  # rebound: a new tensor
    with pytest.raises(AttributeError):
        sched_ref.get_last_lr()
    opt = make_optimizer("tensor")
    lr_tensor = opt.param_groups[0]["lr"]
    sched = GradualWarmupScheduler(opt, M, T, ReduceLROnPlateau(opt))
    assert opt.param_groups[0]["lr"] is lr_tensor
    assert [float(x) for x in sched.get_last_lr()] == lrs(opt)
    caught.clear()
