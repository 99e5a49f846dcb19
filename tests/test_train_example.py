"""bench/train_example.py runs end to end: the loss goes down and stays finite."""

from __future__ import annotations

import math

import pytest

import fused.kernels.common as fk
from bench import train_example

from .conftest import INTERPRET

FAST = ["--steps", "30", "--warmup", "5", "--batch-size", "256", "--hidden", "64",
        "--base-lr", "4e-3", "--log-every", "5"]


def _check_history(history: list[float]) -> None:
    assert len(history) == 6
    assert all(map(math.isfinite, history)), history
    assert history[-1] < 0.8 * history[0], history


@pytest.mark.parametrize("amp", ["bf16", "fp16", "off"])
def test_train_example_cpu_loss_decreases(amp, capsys):
    """fp16 runs the GradScaler path (scaled grads, unscale + inf check inside the step)."""
    launches = fk.launches
    history = train_example.main(FAST + ["--amp", amp])
    _check_history(history)
    out = capsys.readouterr().out
    assert f"grad_scaler={amp == 'fp16'}" in out
    assert "final loss" in out
    if INTERPRET:  # the real kernel ran (in the interpreter): norm pass + step, every step
        assert fk.launches - launches == 2 * 30
        assert "step=Triton kernel" in out


def test_train_example_rejects_cuda_graph_on_cpu():
    with pytest.raises(SystemExit):
        train_example.parse_args(["--cuda-graph"])


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("mode", [[], ["--cuda-graph"]], ids=["eager", "graph"])
def test_train_example_cuda(amp, mode):
    history = train_example.main(FAST + ["--device", "cuda", "--amp", amp] + mode)
    _check_history(history)
