"""Lightning and the Hugging Face Trainer drive GradualWarmupScheduler for real.

Tiny models built here (a few dozen parameters), CPU only, nothing downloaded, nothing written
outside ``tmp_path``. Each framework: per-iteration warmup with ``fused.FusedAdamW`` (its LR is a
0-dim tensor updated in place) checked against the closed form, and resumed mid-warmup from the
framework's own checkpoint onto the uninterrupted LR sequence; ReduceLROnPlateau after warmup
through the framework's own metric plumbing (Lightning's ``lr_scheduler_step`` calling
``step(metric)``; the README's ``StepOnEvaluate`` adapter for the Trainer); Lightning's
``LearningRateMonitor`` with tensor LRs and the README's fix. Recipes that the README shows are
run from the README itself. The file skips what it cannot import.

Warnings: any warning fails a test, except the third-party ones named in ``THIRD_PARTY``; the
tests that expect one take it out of the record.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, ReduceLROnPlateau

from warmup import GradualWarmupScheduler

ROOT = Path(__file__).resolve().parents[1]
BASE, M, T = 0.01, 4, 5  # per-iteration warmup: base LR, multiplier, warmup steps
COSINE = 6  # then CosineAnnealingLR(T_max=COSINE)
# ReduceLROnPlateau after a per-epoch warmup: the metric of each epoch's evaluation (wild during
# warmup, where it must be ignored), and the LR factor each epoch then trains with: 3 epochs to
# 2x, then best 3, better 2, bad, bad (> patience 1: halve), bad, bad (halve)
PLATEAU_METRICS = [100.0, -100.0, 5.0, 3.0, 2.0, 2.0, 2.0, 2.0, 2.0]
PLATEAU_FACTORS = [1, 4 / 3, 5 / 3, 2, 2, 2, 2, 1, 1]
COPY_WARNING = "To copy construct from a tensor"
THIRD_PARTY = [  # warnings other code emits in these runs; none comes from a scheduler
    r"isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning 2.6.6 on torch 2.13
]


@pytest.fixture(autouse=True)
def caught():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield record
    left = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in record
            if not any(re.search(p, str(w.message)) for p in THIRD_PARTY)]
    assert left == []


def expected_lr(e):
    """Closed form of the per-iteration schedule at step e: linear warmup, then cosine."""
    if e < T:
        return BASE * (1 + (M - 1) * e / T)
    return BASE * M * (1 + math.cos(math.pi * (e - T) / COSINE)) / 2


def readme_class(name):
    """The README's python block that defines class ``name``, run; returns the class."""
    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)
              if f"class {name}(" in b]
    assert len(blocks) == 1, f"README: {len(blocks)} blocks define {name}"
    namespace = {}
    exec(blocks[0], namespace)
    return namespace[name]


def data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)


def fused_adamw(params, lr):
    return pytest.importorskip("fused").FusedAdamW(params, lr=lr)


# ----------------------------------------------------------------------------------- Lightning
@pytest.fixture(scope="module")
def pl():
    return pytest.importorskip("lightning.pytorch")


def lightning_module(pl, configure, metrics=None):
    """A LightningModule over Linear(4, 1) that records the LR (as a float) and its type at every
    training step, logs ``metrics[epoch]`` as "val_metric" in validation (if given), and takes
    its optimizer and scheduler config from ``configure(module)``."""

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)
            self.lrs, self.lr_types = [], set()

        def training_step(self, batch, batch_idx):
            lr = self.optimizers().param_groups[0]["lr"]
            self.lrs.append(float(lr))
            self.lr_types.add(type(lr))
            x, y = batch
            return torch.nn.functional.mse_loss(self.lin(x), y)

        def configure_optimizers(self):
            return configure(self)

    class TinyValidated(Tiny):
        def validation_step(self, batch, batch_idx):
            self.log("val_metric", metrics[self.current_epoch])

    return Tiny() if metrics is None else TinyValidated()


def lightning_fit(pl, module, root, max_epochs, batches=3, ckpt_path=None, callbacks=(),
                  logger=False, validate=False):
    x, y = data(2 * batches)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    trainer = pl.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, default_root_dir=root,
        logger=logger, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=list(callbacks), log_every_n_steps=1,
        num_sanity_val_steps=0, limit_val_batches=1 if validate else 0,
    )
    trainer.fit(module, loader, loader if validate else None, ckpt_path=ckpt_path)
    return trainer


def fused_warmup_cosine(module):
    optimizer = fused_adamw(module.parameters(), lr=BASE)
    after = CosineAnnealingLR(optimizer, T_max=COSINE)
    scheduler = GradualWarmupScheduler(optimizer, M, T, after)
    return {"optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_lightning_per_step_warmup_fused_adamw_resumes_mid_warmup(pl, tmp_path, caught):
    """3 steps an epoch, 4 epochs: warmup over 5 steps, cosine after. Stopped after epoch 1 (step
    3, mid-warmup), checkpointed, resumed by a fresh module and Trainer: the same LRs, exactly.
    The uninterrupted run also logs with the README's FloatLearningRateMonitor."""
    from lightning.pytorch.loggers import CSVLogger

    monitor = readme_class("FloatLearningRateMonitor")(logging_interval="step")
    whole = lightning_module(pl, fused_warmup_cosine)
    lightning_fit(pl, whole, tmp_path / "whole", max_epochs=4, callbacks=[monitor],
                  logger=CSVLogger(tmp_path / "logs"))
    assert whole.lrs == pytest.approx([expected_lr(e) for e in range(12)], rel=1e-6)
    assert whole.lr_types == {torch.Tensor}  # FusedAdamW's 0-dim LR tensor, never rebound
    assert monitor.lrs["lr-FusedAdamW"] == whole.lrs  # floats, one per step, not one tensor

    first = lightning_module(pl, fused_warmup_cosine)
    trainer = lightning_fit(pl, first, tmp_path / "first", max_epochs=1)
    trainer.save_checkpoint(tmp_path / "mid-warmup.ckpt")
    resumed = lightning_module(pl, fused_warmup_cosine)
    lightning_fit(pl, resumed, tmp_path / "resumed", max_epochs=4,
                  ckpt_path=tmp_path / "mid-warmup.ckpt")
    assert first.lrs + resumed.lrs == whole.lrs


@pytest.mark.parametrize("monitor_kind", ["LearningRateMonitor", "FloatLearningRateMonitor"])
def test_lightning_lr_monitor_with_a_tensor_lr(pl, tmp_path, caught, monitor_kind):
    """The stock monitor keeps the LR tensor itself (its history reads as the last LR) and warns
    at every log; the README's subclass keeps floats and warns nothing."""
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    def configure(module):
        optimizer = torch.optim.SGD(
            [{"params": module.parameters(), "lr": torch.tensor(BASE)}], lr=BASE)
        scheduler = GradualWarmupScheduler(optimizer, M, T)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    cls = (LearningRateMonitor if monitor_kind == "LearningRateMonitor"
           else readme_class("FloatLearningRateMonitor"))
    monitor = cls(logging_interval="step")
    module = lightning_module(pl, configure)
    lightning_fit(pl, module, tmp_path, max_epochs=2, callbacks=[monitor],
                  logger=CSVLogger(tmp_path / "logs"))
    history = monitor.lrs["lr-SGD"]
    copies = [w for w in caught if str(w.message).startswith(COPY_WARNING)]
    assert module.lrs == pytest.approx([BASE * (1 + (M - 1) * min(e, T) / T) for e in range(6)])
    if monitor_kind == "LearningRateMonitor":
        assert all(lr is history[0] for lr in history)  # one tensor, six times
        assert [float(lr) for lr in history] == [module.lrs[-1]] * 6
        assert len(copies) == 6  # one per logged step
        for w in copies:
            caught.remove(w)
    else:
        assert history == module.lrs and copies == []


def plateau_config(reduce_on_plateau):
    def configure(module):
        optimizer = torch.optim.SGD(module.parameters(), lr=BASE)
        after = ReduceLROnPlateau(optimizer, factor=0.5, patience=1)
        scheduler = GradualWarmupScheduler(optimizer, 2, 3, after)
        config = {"scheduler": scheduler, "interval": "epoch", "monitor": "val_metric"}
        if reduce_on_plateau:
            config["reduce_on_plateau"] = True
        return {"optimizer": optimizer, "lr_scheduler": config}

    return configure


def test_lightning_plateau_after_warmup_through_its_own_lr_scheduler_step(pl, tmp_path):
    """Per-epoch warmup (3 epochs to 2x), then ReduceLROnPlateau on the logged "val_metric":
    Lightning's default lr_scheduler_step calls scheduler.step(metric), positionally."""
    module = lightning_module(pl, plateau_config(True), metrics=PLATEAU_METRICS)
    lightning_fit(pl, module, tmp_path, max_epochs=len(PLATEAU_METRICS), batches=1,
                  validate=True)
    assert module.lrs == pytest.approx([BASE * f for f in PLATEAU_FACTORS])


def test_lightning_plateau_without_the_flag_fails_clearly(pl, tmp_path):
    """Without "reduce_on_plateau": True Lightning passes no metric: the first step after warmup
    says what is missing."""
    module = lightning_module(pl, plateau_config(False), metrics=PLATEAU_METRICS)
    with pytest.raises(TypeError, match=r"step\(\) needs metrics=\.\.\. once warmup is over"):
        lightning_fit(pl, module, tmp_path, max_epochs=len(PLATEAU_METRICS), batches=1,
                      validate=True)
    assert len(module.lrs) == 4  # epochs 0..3 trained; the step to e = 4 raised


# ------------------------------------------------------------------------ Hugging Face Trainer
@pytest.fixture(scope="module")
def hf():
    with pytest.MonkeyPatch.context() as env:
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE",
                     "HF_HUB_DISABLE_TELEMETRY"):
            env.setenv(name, "1")
        env.setenv("WANDB_DISABLED", "true")
        env.setenv("TOKENIZERS_PARALLELISM", "false")
        pytest.importorskip("accelerate")
        yield pytest.importorskip("transformers")


class TinyRegressor(torch.nn.Module):
    """What the Trainer needs of a model: forward(**batch) returning a dict with "loss"."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x, labels):
        out = self.lin(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


def hf_dataset(n):
    x, y = data(n)
    return [{"x": xi, "labels": yi} for xi, yi in zip(x, y)]


def hf_train(hf, out, optimizers, resume=None, compute_metrics=None, **args):
    """Train a fresh TinyRegressor (seed 0); return the LR (float) at the start of every step."""
    lrs = []

    class RecordLR(hf.TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            lrs.append(float(optimizer.param_groups[0]["lr"]))

    torch.manual_seed(0)
    model = TinyRegressor()
    optimizer, scheduler = optimizers(model)
    arguments = hf.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=2, report_to="none", use_cpu=True,
        disable_tqdm=True, logging_strategy="no", dataloader_num_workers=0, seed=0, **args)
    trainer = hf.Trainer(model=model, args=arguments, train_dataset=hf_dataset(8),
                         eval_dataset=hf_dataset(4), optimizers=(optimizer, scheduler),
                         callbacks=[RecordLR()], compute_metrics=compute_metrics)
    trainer.train(resume_from_checkpoint=resume)
    return lrs, optimizer


def fused_warmup_cosine_hf(model):
    optimizer = fused_adamw(model.parameters(), lr=BASE)
    return optimizer, GradualWarmupScheduler(optimizer, M, T, CosineAnnealingLR(optimizer, COSINE))


def test_hf_trainer_per_step_warmup_fused_adamw_resumes_mid_warmup(hf, tmp_path):
    """The Trainer steps the scheduler after every optimizer step; checkpoint-3 (mid-warmup) is
    resumed by a fresh model, optimizer and scheduler onto the same LRs, exactly."""
    whole, optimizer = hf_train(hf, tmp_path / "run", fused_warmup_cosine_hf, max_steps=10,
                                save_strategy="steps", save_steps=3)
    assert whole == pytest.approx([expected_lr(e) for e in range(10)], rel=1e-6)
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
    resumed, _ = hf_train(hf, tmp_path / "resumed", fused_warmup_cosine_hf, max_steps=10,
                          save_strategy="no", resume=tmp_path / "run" / "checkpoint-3")
    assert resumed == whole[3:]


def test_hf_trainer_plateau_after_warmup_with_the_readme_adapter(hf, tmp_path):
    """The README's StepOnEvaluate: the Trainer takes it for a ReduceLROnPlateau and calls
    step(metric) after each evaluation (per epoch here), with the metric named by
    metric_for_best_model; the warmup counts epochs, then the plateau logic runs."""
    step_on_evaluate = readme_class("StepOnEvaluate")
    scripted = iter(PLATEAU_METRICS)

    def optimizers(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=BASE)
        after = ReduceLROnPlateau(optimizer, factor=0.5, patience=1)
        return optimizer, step_on_evaluate(GradualWarmupScheduler(optimizer, 2, 3, after))

    # 8 samples, batch 2: 4 steps an epoch; the LR of each epoch's first step
    lrs, _ = hf_train(hf, tmp_path, optimizers, num_train_epochs=len(PLATEAU_METRICS),
                      eval_strategy="epoch", save_strategy="no",
                      metric_for_best_model="scripted",
                      compute_metrics=lambda prediction: {"scripted": next(scripted)})
    assert lrs[::4] == pytest.approx([BASE * f for f in PLATEAU_FACTORS])
    assert all(lrs[i] == lrs[i - i % 4] for i in range(len(lrs)))  # constant within an epoch

