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


def test_warmup_effect_quick(results):
    from bench import warmup_effect

    out = warmup_effect.run(quick=True, device="cpu")
    for name in ("warmup_effect.json", "warmup_effect_goyal.png", "warmup_effect_postln.png"):
        assert (results / name).stat().st_size > 0, name
    saved = json.loads((results / "warmup_effect.json").read_text())
    assert {"stamp", "config", "goyal", "postln", "table", "verdicts"} <= saved.keys()
    assert saved["verdicts"] == out["verdicts"]
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
    # a tiny quick run must not diverge: every number written is finite
    assert all(math.isfinite(x) for x in _finite_numbers(saved["goyal"]))
    assert all(math.isfinite(x) for x in _finite_numbers(saved["postln"]))
    assert all(isinstance(v, str) and v for v in saved["verdicts"].values())
