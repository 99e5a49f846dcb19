"""Smoke test of the precision study: a quick run writes every arm, finite losses, the measured
state sizes and the verdicts (the plumbing, not the claims)."""

import json
import math

import pytest

pytest.importorskip("matplotlib")


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_RESULTS", str(tmp_path))
    # the bench's normal mode on CPU: FusedAdamW's torch path, not the Triton interpreter that
    # conftest turns on for the kernel tests (fused reads the variable at every step)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    return tmp_path


def test_precision_study_quick(results):
    from bench import precision_study as study

    out = study.run(quick=True)
    for name in ("precision_study.json", "precision_study.png", "precision_study_lr.png"):
        assert (results / name).stat().st_size > 0, name
    saved = json.loads((results / "precision_study.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))  # strict JSON
    assert {"stamp", "config", "table", "rows", "sweep", "curves", "verdicts"} <= saved.keys()
    assert saved["verdicts"] == out["verdicts"]
    assert set(saved["table"]) == set(saved["curves"]) == set(study.ARMS)
    assert [row["arm"] for row in saved["rows"]] == list(study.ARMS)
    for arm, runs in saved["curves"].items():
        assert len(runs) == saved["config"]["seeds"] >= 2, arm
        for run in runs:
            assert len(run["heldout_loss"]) == len(run["train_loss"]) == len(run["step"]) > 2
            assert all(math.isfinite(v) for v in run["heldout_loss"]), arm
            assert run["train_loss"][0] is None  # step 0: no training loss yet
            assert all(math.isfinite(v) for v in run["train_loss"][1:]), arm
            assert math.isfinite(run["final_heldout_loss"]) and run["final_heldout_loss"] > 0
    # optimizer-state bytes per param, as allocated: fp32 state 8, bf16 4, 8-bit codes + scales
    # (+ the fp32 state of tensors too small to quantize) in between 2 and 4, Kahan 4 + 2
    size = {arm: saved["table"][arm]["state_bytes_per_param"]["mean"] for arm in study.ARMS}
    assert size[study.REFERENCE] == pytest.approx(8, abs=0.01)
    assert size[study.BF16_FP32_STATE] == pytest.approx(8, abs=0.01)
    assert size[study.TORCH_BF16] == pytest.approx(4, abs=0.01)
    assert size[study.BF16_SR] == pytest.approx(4, abs=0.01)
    assert size[study.KAHAN] == pytest.approx(6, abs=0.01)
    for arm in (study.FP32_8BIT, study.FP32_8BIT_SR, study.BF16_8BIT_SR):
        assert 2 < size[arm] < 4, (arm, size[arm])
    # the sweep: the main LR with every arm, the other LRs with theirs
    assert str(saved["config"]["main_lr"]) in saved["sweep"]
    for lr, point in saved["sweep"].items():
        assert study.REFERENCE in point["compare"], lr
        for c in point["compare"].values():
            assert math.isfinite(c["diff_pct"]) and isinstance(c["within_noise"], bool)
    assert set(saved["verdicts"]) == {"bf16_round_to_nearest", "stochastic_rounding_and_kahan",
                                      "kahan_vs_stochastic_rounding", "low_precision_state",
                                      "8bit_requantization_sr", "lr_dependence"}
    assert all(isinstance(v, str) and v for v in saved["verdicts"].values())


def test_precision_study_refuses_gpu():
    from bench import precision_study as study

    with pytest.raises(ValueError, match="Invalid device"):
        study.run(quick=True, device="cuda")
