r"""Gradual learning-rate warmup: a single-file drop-in for ``warmup_scheduler``.

Copy this file into your project (it needs torch only) and replace
``from warmup_scheduler import GradualWarmupScheduler`` with
``from warmup import GradualWarmupScheduler``.

Notation: ``e`` = number of ``step()`` calls so far (0 right after construction),
``T`` = ``total_epoch``, ``m`` = ``multiplier``, ``s`` = ``start_factor`` (default ``0.0`` if
``m == 1`` else ``1.0``, as in ``warmup_scheduler``), ``base`` = each param group's LR when the
scheduler was built (its ``initial_lr``), ``target = base * m`` and ``r = e / T``.

Warmup, ``0 <= e <= T``, ``lr(e) = base * f(e)`` with ``f(T) = m``::

    "linear":       f = s + (m - s) * r                  (identical to warmup_scheduler)
    "constant":     f = s for e < T,  m at e = T
    "exponential":  f = s * (m / s) ** r                 (geometric; needs s > 0)
    "cosine":       f = s + (m - s) * (1 - cos(pi * r)) / 2

After warmup, ``e >= T``: without ``after_scheduler`` the LR stays at ``target``; with one, the
LR is the after_scheduler's own LR at *its* epoch ``e - T``, as if it had been built on an
optimizer whose LR was ``target``. Its epoch 0 *is* ``e = T``, as in torch's
``SequentialLR([LinearLR(opt, 1 / m, 1, T), after], [T])``: for a scheduler that starts at its
base that is the target, so ``StepLR(step_size=k)`` first decays at ``e = T + k`` and
``CosineAnnealingLR`` continues from the peak without a spike; one that does not (``ConstantLR``,
``LinearLR(start_factor < 1)``) keeps all its epochs, the first at ``e = T``.

A ``ReduceLROnPlateau`` after_scheduler (or a subclass) gets ``step(metrics=val_loss)``, or
``step(val_loss)`` as Lightning calls it: with a plateau after_scheduler a float or a 0-dim tensor
where the epoch goes is the metric (an int is still an epoch; with any other after_scheduler a
non-int epoch raises). Metrics of the steps up to ``e = T`` are ignored (warmup); the plateau logic
starts from ``target`` with the metric given at the step to ``e = T + 1``.

Recipes (per-iteration warmup: call ``step()`` every batch and count ``T`` in iterations; the
README has each one's code, tests/test_warmup.py checks each against its closed form)::

    Goyal et al. (k GPUs, linear scaling rule): lr=eta, multiplier=k, total_epoch=5
    ResNet-110 (0.01 then 0.1):      lr=0.1, multiplier=1, start_factor=0.1, "constant", T=400
    maskrcnn-benchmark:              multiplier=1, start_factor=WARMUP_FACTOR, T=WARMUP_ITERS,
                                     warmup_method=WARMUP_METHOD, after_scheduler=MultiStepLR
    SuperGradients linear step:      multiplier=1, start_factor=1 / (1 + T), "linear"
    (the next four warm up from 0 to the optimizer's lr, which is their peak; N = run length)
    warmup-stable-decay (WSD):       multiplier=1, after_scheduler=SequentialLR(
                                         [ConstantLR(factor=1, total_iters=S),
                                          LinearLR(1, 0, total_iters=D)], milestones=[S])
    cosine down to a minimum LR:     after_scheduler=CosineAnnealingLR(T_max=N - T, eta_min=lr_min)
    linear decay to zero:            after_scheduler=LinearLR(1, 0, total_iters=N - T)
    inverse square root:             after_scheduler=LambdaLR(lambda k: (T / (T + k)) ** 0.5)

Example:
    >>> import torch
    >>> from torch.optim.lr_scheduler import StepLR
    >>> model = torch.nn.Linear(2, 1)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> scheduler = GradualWarmupScheduler(
    ...     optimizer, multiplier=4, total_epoch=2, after_scheduler=StepLR(optimizer, 1, 0.5))
    >>> lrs = [scheduler.get_last_lr()[0]]
    >>> for epoch in range(4):
    ...     optimizer.step()
    ...     scheduler.step()
    ...     lrs.append(scheduler.get_last_lr()[0])
    >>> [round(lr, 4) for lr in lrs]
    [0.1, 0.25, 0.4, 0.2, 0.1]

A 0-dim tensor LR in a param group is updated in place with ``fill_`` and never rebound; the
warmup computes Python floats from base LRs read once at construction, so ``step()`` does no host
sync of its own. ``state_dict()`` is plain data (it nests the after_scheduler's ``state_dict()``)
and loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import copy
import math
import numbers
import types
import warnings
from typing import Any

import torch
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    CyclicLR,
    ExponentialLR,
    LambdaLR,
    LinearLR,
    LRScheduler,
    MultiplicativeLR,
    MultiStepLR,
    OneCycleLR,
    PolynomialLR,
    ReduceLROnPlateau,
    StepLR,
)

__all__ = ["GradualWarmupScheduler", "WARMUP_METHODS"]

#: The accepted values of ``warmup_method``.
WARMUP_METHODS = ("linear", "constant", "exponential", "cosine")

# Schedulers whose LRs are absolute (given as their own arguments), so the handoff leaves their
# base LRs alone instead of re-basing them on the warmup target.
_ABSOLUTE_SCHEDULERS = (CyclicLR, OneCycleLR)

# torch's schedulers whose whole state is their epoch count (the rest are constructor arguments):
# restarting one (a second handoff, e.g. after step(epoch) went back) is rewinding that count.
# Any other after_scheduler is restarted from a state_dict() snapshot taken at construction. Not
# taking one when it is not needed matters for speed: reading an object's __dict__ makes CPython
# (3.11) keep its attributes in a real dict from then on, and every later step of a
# CosineAnnealingLR read so took 0.15-0.7 us (1-9%) longer (1 or 4 param groups, float or tensor
# LRs, 2-core CPU), more than the rest of this wrapper's after-warmup cost.
_REWINDABLE = (
    StepLR, MultiStepLR, ConstantLR, LinearLR, ExponentialLR, PolynomialLR, CosineAnnealingLR,
    LambdaLR, MultiplicativeLR,
)

# Attributes that state_dict() leaves out: objects, and what is derived from after_scheduler.
_NOT_SAVED = ("optimizer", "after_scheduler", "_after_fresh", "_plateau", "_after_running")

_ORDER_WARNING = (
    "Detected call of `lr_scheduler.step()` before `optimizer.step()`. "
    "In PyTorch 1.1.0 and later, you should call them in the opposite order: "
    "`optimizer.step()` before `lr_scheduler.step()`.  Failure to do this "
    "will result in PyTorch skipping the first value of the learning rate schedule. "
    "See more details at "
    "https://pytorch.org/docs/stable/optim.html#how-to-adjust-learning-rate"
)


class GradualWarmupScheduler(LRScheduler):
    r"""Warm the LR up from ``base * start_factor`` to ``base * multiplier``, then hand off.

    Proposed in 'Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour' (Goyal et al.).
    The formulas are in the module docstring.

    Args:
        optimizer (Optimizer): wrapped optimizer; its LRs (float or 0-dim tensor) are the bases.
        multiplier (float): target LR = base LR * multiplier; must be finite and >= 1.
        total_epoch (int): number of ``step()`` calls until the target is reached; > 0.
        after_scheduler (LRScheduler, optional): scheduler to follow after warmup, built on the
            same optimizer; it runs as if built with the target LR (default: None).
        warmup_method (str): "linear", "constant", "exponential" or "cosine"
            (default: "linear").
        start_factor (float, optional): LR at ``e = 0`` is ``base * start_factor``; must be
            finite, >= 0 and <= multiplier (a start above the target is not a warmup), > 0 for
            "exponential" (default: None, meaning 0.0 if multiplier == 1 else 1.0).

    Attributes:
        multiplier, total_epoch, after_scheduler: as given.
        finished (bool): True once ``e >= total_epoch``: warmup is over (an after_scheduler is
            in charge from its epoch 0, at ``e = total_epoch``).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        multiplier: float,
        total_epoch: int,
        after_scheduler: LRScheduler | None = None,
        *,
        warmup_method: str = "linear",
        start_factor: float | None = None,
    ) -> None:
        if not _is_real(multiplier) or not math.isfinite(multiplier) or multiplier < 1:
            raise ValueError(f"multiplier must be a finite number >= 1, got {multiplier!r}")
        if not _is_int(total_epoch) or total_epoch <= 0:
            raise ValueError(f"total_epoch must be a positive integer, got {total_epoch!r}")
        if warmup_method not in WARMUP_METHODS:
            raise ValueError(
                f"warmup_method must be one of {WARMUP_METHODS}, got {warmup_method!r}"
            )
        if start_factor is None:
            start_factor = 0.0 if multiplier == 1 else 1.0
        elif not _is_real(start_factor) or not math.isfinite(start_factor) or start_factor < 0:
            raise ValueError(f"start_factor must be a finite number >= 0, got {start_factor!r}")
        elif start_factor > multiplier:
            raise ValueError(
                f"start_factor must be <= multiplier ({multiplier!r}), got {start_factor!r}"
            )
        if warmup_method == "exponential" and start_factor == 0:
            raise ValueError(
                f"start_factor must be > 0 for warmup_method='exponential', got {start_factor!r}"
            )
        if after_scheduler is not None:
            if not isinstance(after_scheduler, LRScheduler):
                raise ValueError(
                    f"after_scheduler must be an LRScheduler, got {after_scheduler!r}"
                )
            if after_scheduler.optimizer is not optimizer:
                raise ValueError(
                    "after_scheduler must be bound to the same optimizer, got "
                    f"{type(after_scheduler).__name__} bound to {after_scheduler.optimizer!r}"
                )
        self.multiplier = float(multiplier)
        self.total_epoch = int(total_epoch)
        self.warmup_method = warmup_method
        self.start_factor = float(start_factor)
        self.after_scheduler = after_scheduler
        self.finished = False
        # Derived from after_scheduler, never saved: is it a plateau one, and is it in charge
        # (finished, and not a plateau one: then step() is the after_scheduler's step alone)?
        self._plateau = isinstance(after_scheduler, ReduceLROnPlateau)
        self._after_running = False
        # The after_scheduler as it was built, for restarting it at every handoff; None when it
        # needs none (no after_scheduler, or one whose restart is a rewind of its count).
        self._after_fresh = None
        if after_scheduler is not None and not _rewindable(after_scheduler):
            self._after_fresh = copy.deepcopy(after_scheduler.state_dict())
        # Base LRs as Python floats, read once here (a tensor LR costs one sync, now only).
        bases = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        self._bases = bases
        super().__init__(optimizer)  # sets initial_lr and runs step() once: e = 0
        self.base_lrs = bases

    # ----------------------------------------------------------------------------------------
    def step(self, epoch: int | None = None, metrics: Any = None) -> None:
        """Advance one step, or to ``epoch`` steps if given (the same LR as stepping there).

        Args:
            epoch (int, optional): the step count to move to; equal to reaching it by ``step()``
                (for ReduceLROnPlateau it only sets the counter: the plateau logic sees one
                metric per call). With a ReduceLROnPlateau after_scheduler a float or a 0-dim
                tensor here is the metric instead, since Lightning calls ``step(metric)``
                (default: None, meaning ``last_epoch + 1``).
            metrics (float or Tensor, optional): validation metric for a ReduceLROnPlateau
                after_scheduler; ignored during warmup and by other schedulers (default: None).
        """
        if epoch is None and self._after_running:
            # After the handoff a plain step() is the after_scheduler's own step and a count:
            # this path is the whole per-step cost of a long run, so it does nothing else.
            self.after_scheduler.step()
            self.last_epoch += 1
            return
        if epoch is not None and not _is_int(epoch):
            if not (self._plateau and _is_metric(epoch)):
                raise TypeError(_bad_epoch_message(epoch, self.after_scheduler, self._plateau))
            if metrics is not None:
                raise TypeError(
                    f"step() got the metric twice: positionally ({epoch!r}) and as "
                    f"metrics={metrics!r}"
                )
            epoch, metrics = None, epoch  # Lightning's step(metric) for a plateau scheduler
        if epoch is None:
            epoch = self.last_epoch + 1
        elif epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch!r}")
        T = self.total_epoch
        if self._plateau and epoch > T and metrics is None:
            raise TypeError(
                f"step() needs metrics=... once warmup is over (epoch {epoch} > total_epoch "
                f"{T}), since after_scheduler is {type(self.after_scheduler).__name__}"
            )
        if self._step_count == 1 and not getattr(self.optimizer, "_opt_called", False):
            warnings.warn(_ORDER_WARNING, UserWarning, stacklevel=2)
        self._step_count += 1

        after = self.after_scheduler
        if after is None or epoch < T:
            _set_lrs(self.optimizer, self._lrs_at(epoch))
            self._last_lr = _lr_list(self.optimizer)
        elif self._plateau:
            if not self.finished or epoch == T:
                self._handoff()  # the plateau logic starts afresh from the target
            if epoch > T:
                after.step(metrics)
            self._last_lr = after.get_last_lr()
        else:
            # Replay from the handoff unless moving forward from a post-warmup epoch, so an
            # explicit epoch gives exactly the LR of reaching it by step() (torch's chainable
            # schedulers compute from the current LR, so jumping needs a replay).
            if not self.finished or epoch <= self.last_epoch:
                self._handoff()  # the after_scheduler's epoch 0 is e = T
                at = T
            else:
                at = self.last_epoch
            for _ in range(epoch - at):
                after.step()
            self._last_lr = after.get_last_lr()
        self.last_epoch = epoch
        self.finished = epoch >= T
        self._after_running = self.finished and after is not None and not self._plateau

    def get_last_lr(self) -> list[float | torch.Tensor]:
        """The LRs that the last ``step()`` set (tensors are copies, as torch's schedulers')."""
        if self._after_running:
            return self.after_scheduler.get_last_lr()
        return self._last_lr

    def get_lr(self) -> list[float | torch.Tensor]:
        """The LRs at ``last_epoch`` (use ``get_last_lr()``; this one exists for LRScheduler)."""
        if self.finished and self.after_scheduler is not None:
            return self.after_scheduler.get_last_lr()
        return self._lrs_at(self.last_epoch)

    def state_dict(self) -> dict[str, Any]:
        """Plain data: this scheduler's fields plus the after_scheduler's own ``state_dict()``."""
        state = {k: copy.copy(v) for k, v in self.__dict__.items() if k not in _NOT_SAVED}
        state["_last_lr"] = list(self.get_last_lr())
        state["after_scheduler"] = (
            None if self.after_scheduler is None else self.after_scheduler.state_dict()
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``; load the optimizer's state too (chainable LRs live there)."""
        after_state = state_dict.get("after_scheduler")
        state = {k: v for k, v in state_dict.items() if k not in _NOT_SAVED}
        if (after_state is None) != (self.after_scheduler is None):
            raise ValueError(
                "state_dict and scheduler disagree on after_scheduler: saved "
                f"{'none' if after_state is None else 'one'}, this scheduler has "
                f"{self.after_scheduler!r}"
            )
        self.__dict__.update(state)
        if self.after_scheduler is not None:
            self.after_scheduler.load_state_dict(after_state)
        self._after_running = (
            self.finished and self.after_scheduler is not None and not self._plateau
        )

    # ----------------------------------------------------------------------------------------
    def _lrs_at(self, epoch: int) -> list[float]:
        if epoch > self.total_epoch:
            return [base * self.multiplier for base in self._bases]
        factor = _warmup_factor(
            self.warmup_method, epoch, self.total_epoch, self.start_factor, self.multiplier
        )
        return [base * factor for base in self._bases]

    def _handoff(self) -> None:
        """(Re)start the after_scheduler at its epoch 0, as if built on an optimizer at target."""
        targets = [base * self.multiplier for base in self._bases]
        _set_lrs(self.optimizer, targets)
        if self._after_fresh is not None:
            self.after_scheduler.load_state_dict(copy.deepcopy(self._after_fresh))
        else:  # a rewindable one: its count back to as built (unchanged at the first handoff)
            self.after_scheduler.last_epoch = 0
        _rebase(self.after_scheduler, targets)
        self.finished = True


# --------------------------------------------------------------------------------------------
def _warmup_factor(method: str, e: int, T: int, s: float, m: float) -> float:
    """``f(e)`` of the module docstring, for 0 <= e <= T."""
    if method == "linear":
        return s + (m - s) * e / T  # same operations as warmup_scheduler: identical floats
    if e == T:
        return m
    if method == "constant":
        return s
    if method == "exponential":
        return s * (m / s) ** (e / T)
    return s + (m - s) * (1 - math.cos(math.pi * e / T)) / 2  # cosine


def _rebase(scheduler: LRScheduler, targets: list[float]) -> None:
    """Redo ``scheduler``'s construction-time step as if the optimizer's LRs were ``targets``.

    Expects the scheduler in its as-built state and the optimizer's LRs already at ``targets``.
    """
    children = getattr(scheduler, "_schedulers", None)
    if isinstance(scheduler, ReduceLROnPlateau):
        pass  # no base LRs: it reduces whatever LR the optimizer has
    elif children is not None and hasattr(scheduler, "_milestones"):  # SequentialLR
        for child in children:
            _set_base_lrs(child, targets)
        first = children[sum(1 for m in scheduler._milestones if m <= 0)]
        first.last_epoch -= 1
        first._initial_step()
    elif children is not None:  # ChainedScheduler: children stepped in order at construction
        for child in children:
            _set_base_lrs(child, targets)
            child.last_epoch -= 1
            child._initial_step()
    else:
        _set_base_lrs(scheduler, targets)
        scheduler.last_epoch -= 1
        scheduler._initial_step()
    scheduler._last_lr = _lr_list(scheduler.optimizer)


def _rewindable(scheduler: LRScheduler) -> bool:
    """True if restarting ``scheduler`` needs no snapshot: see ``_REWINDABLE``."""
    lr_lambdas = getattr(scheduler, "lr_lambdas", ())  # a callable object may have state
    return type(scheduler) in _REWINDABLE and all(
        isinstance(fn, types.FunctionType) for fn in lr_lambdas
    )


def _set_base_lrs(scheduler: LRScheduler, targets: list[float]) -> None:
    for child in getattr(scheduler, "_schedulers", ()):
        _set_base_lrs(child, targets)
    if hasattr(scheduler, "base_lrs") and not isinstance(scheduler, _ABSOLUTE_SCHEDULERS):
        scheduler.base_lrs = list(targets)


def _set_lrs(optimizer: torch.optim.Optimizer, values: list[float]) -> None:
    """Write LRs; a tensor LR is filled in place (never rebound, no host sync)."""
    for group, value in zip(optimizer.param_groups, values, strict=True):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def _lr_list(optimizer: torch.optim.Optimizer) -> list[float | torch.Tensor]:
    """The current LRs; tensors are cloned (on device, no sync) so callers cannot alias them."""
    return [
        g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
        for g in optimizer.param_groups
    ]


def _is_metric(value: Any) -> bool:
    """A value ReduceLROnPlateau takes as its metric: a real number or a 0-dim tensor."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0
    return _is_real(value)


def _bad_epoch_message(epoch: Any, after_scheduler: LRScheduler | None, plateau: bool) -> str:
    if plateau:
        return (
            "epoch must be an int (the number of steps so far) or, since after_scheduler is "
            f"{type(after_scheduler).__name__}, the metric (a number or a 0-dim tensor), "
            f"got {epoch!r}"
        )
    return (
        f"epoch must be an int (the number of steps so far), got {epoch!r}; "
        "to pass a validation metric use step(metrics=...)"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
