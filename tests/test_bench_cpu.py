"""Smoke tests for the CPU parts of the bench: quick runs write complete, finite results."""

import json
import math

import pytest

pytest.importorskip("matplotlib")


def _finite_numbers(obj):
    """Every int/float anywhere inside ``obj`` (dicts, lists)."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _finite_numbers(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _finite_numbers(v)


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_RESULTS", str(tmp_path))
    return tmp_path


def test_sched_overhead_quick(results):
    from bench import sched_overhead

    out = sched_overhead.run(quick=True)
    saved = json.loads((results / "sched_overhead.json").read_text())
    assert (results / "sched_overhead.png").stat().st_size > 0
    assert {"stamp", "config", "rows"} <= saved.keys()
    assert saved["rows"] == json.loads(json.dumps(out["rows"]))
    names = {row["scheduler"] for row in saved["rows"]}
    assert {"ours", "ours + CosineAnnealingLR",
            "torch SequentialLR(LinearLR, CosineAnnealingLR)"} <= names
    for row in saved["rows"]:
        assert row["lr"] in ("float", "tensor")
        if row["scheduler"].startswith("ours") or row["scheduler"].startswith("torch"):
            assert row["status"] == "ok", row
        if row["status"] == "ok":
            for key in ("median_us", "p10_us", "p90_us", "warmup_median_us", "after_median_us"):
                assert math.isfinite(row[key]) and row[key] > 0, (row, key)
            # a tensor LR must stay a tensor (updated in place, never rebound to a float)
            assert row["lr_type_after"] == ("Tensor" if row["lr"] == "tensor" else "float")


def test_warmup_effect_quick(results, monkeypatch):
    from bench import warmup_effect

    # the bench's normal mode on CPU: the fused optimizers' torch path, not the Triton
    # interpreter that conftest turns on for the kernel tests (fused reads it at every step)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = warmup_effect.run(quick=True, device="cpu")
    for name in ("warmup_effect.json", "warmup_effect_goyal.png", "warmup_effect_postln.png",
                 "warmup_effect_lars.png", "warmup_effect_lamb.png",
                 "warmup_effect_plain_sgd.png"):
        assert (results / name).stat().st_size > 0, name
    saved = json.loads((results / "warmup_effect.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))  # strict JSON
    assert {"stamp", "config", "goyal", "postln", "lars", "lamb", "plain_sgd", "table",
            "verdicts"} <= saved.keys()
    assert saved["verdicts"] == out["verdicts"]
    assert set(saved["verdicts"]) == {"goyal", "postln", "lars", "lamb", "plain_sgd"}
    assert set(saved["goyal"]["table"]) == set(warmup_effect.GOYAL_ARMS)
    assert set(saved["postln"]["table"]) == set(warmup_effect.POSTLN_ARMS)
    for arm, runs in saved["goyal"]["curves"].items():
        assert len(runs) >= 2, arm
        for run in runs:
            assert len(run["train_loss"]) == len(run["train_epoch"]) > 0
            assert 0.0 <= run["final_val_error"] <= 1.0
    for runs in saved["postln"]["curves"].values():
        for run in runs:
            assert len(run["train_loss"]) == len(run["step"]) > 0
            assert 0.0 <= run["final_val_accuracy"] <= 1.0
    seeds = saved["config"]["seeds"]

    # c. SGD vs LARS: every k has the three arms, each over every seed, at the LR the table says
    lars, cfg = saved["lars"], saved["config"]["lars"]
    assert set(lars["table"]) == set(lars["curves"]) == {str(k) for k in cfg["ks"]}
    for k, arms in lars["curves"].items():
        assert set(arms) == set(warmup_effect.LARS_ARMS), k
        assert lars["lr"][k]["SGD + warmup, kη"] == pytest.approx(
            saved["config"]["goyal"]["small_lr"] * int(k))
        for runs in arms.values():
            assert len(runs) == seeds
            for run in runs:
                assert run["batch"] == saved["config"]["goyal"]["small_batch"] * int(k)
                assert run["diverged_at"] is None
                assert 0.0 <= run["final_val_error"] <= 1.0
    for opt, grid in (("SGD", cfg["sgd_sweep"]), ("LARS", cfg["lars_sweep"])):
        assert set(lars["sweep"][opt]["runs"]) == {f"{lr:g}" for lr in grid}
        assert lars["sweep"][opt]["chosen"] in grid
    # d. AdamW vs LAMB
    lamb, cfg = saved["lamb"], saved["config"]["lamb"]
    assert set(lamb["table"]) == set(lamb["curves"]) == set(warmup_effect.LAMB_ARMS)
    for opt, grid in cfg["sweep"].items():
        assert set(lamb["sweep"][opt]["runs"]) == {f"{lr:g}" for lr in grid}
        assert lamb["sweep"][opt]["chosen"] in grid
    for runs in lamb["curves"].values():
        assert len(runs) == seeds
        for run in runs:
            assert len(run["train_loss"]) == len(run["step"]) > 0
            assert 0.0 <= run["final_val_accuracy"] <= 1.0 and run["tune_loss"] > 0
    # e. plain SGD and Adam, with and without warmup (Adam at part b's lr is part b's runs)
    plain, cfg = saved["plain_sgd"], saved["config"]["plain_sgd"]
    postln_lr = f"{saved['config']['postln']['lr']:g}"
    assert set(plain["curves"]["plain SGD"]) == {f"{lr:g}" for lr in cfg["sgd_lrs"]}
    assert set(plain["curves"]["Adam"]) == {f"{lr:g}" for lr in cfg["adam_lrs"]} | {postln_lr}
    assert plain["curves"]["Adam"][postln_lr] == saved["postln"]["curves"]
    for by_lr in plain["curves"].values():
        for arms in by_lr.values():
            assert set(arms) == set(warmup_effect.POSTLN_ARMS)
            assert all(len(runs) == seeds for runs in arms.values())
    for by_lr in plain["effect"].values():
        for effect in by_lr.values():
            assert effect["outcome"] in ("needed", "helps", "hurts", "no difference")
    # a tiny quick run must not diverge: every number written is finite
    for part in ("goyal", "postln", "lars", "lamb", "plain_sgd"):
        assert all(math.isfinite(x) for x in _finite_numbers(saved[part])), part
    assert all(isinstance(v, str) and v for v in saved["verdicts"].values())
