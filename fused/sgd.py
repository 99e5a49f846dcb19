"""FusedSGD (torch.optim.SGD) and FusedLARS (timm.optim.Lars): one Triton launch per bucket for
SGD, a norm pass + the update for LARS, with the learning rate read from a device tensor.

The classes hold only what is theirs: arguments and validation, the ``momentum_buffer`` slot,
the hyperparameter row and the dispatch (kernel :mod:`fused.kernels.sgd`, or the references
:func:`fused.reference.sgd_math` / :func:`fused.reference.lars_math`). Everything else is the
engine's (:mod:`fused._engine`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from . import _engine
from ._engine import Bucket, FusedOptimizer, StepContext
from .reference import lars_trust_ratio, sgd_math

try:
    from .kernels import common as _common
    from .kernels import sgd as _kernel
except ImportError:  # triton missing: CPU params still work through the torch path
    _kernel = _common = None

__all__ = ["FusedSGD", "FusedLARS"]


class _MomentumSGD(FusedOptimizer):
    """What SGD and LARS share: momentum, dampening, nesterov, L2 weight decay and the
    ``momentum_buffer`` slot (kept only by groups with momentum ≠ 0, as torch does)."""

    SLOTS = ("momentum_buffer",)
    SIGNED_SLOTS = frozenset({"momentum_buffer"})

    def _validate_hyperparameters(self, group: dict) -> None:
        momentum, dampening = group["momentum"], group["dampening"]
        _engine.validate_number("momentum", momentum, label="momentum value")
        _engine.validate_number("dampening", dampening, -math.inf, low_inclusive=False,
                                label="dampening value")
        _engine.validate_number("weight_decay", group["weight_decay"],
                                label="weight_decay value")
        _validate_flag(group, "nesterov")
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def _group_slots(self, group: dict) -> tuple[str, ...]:
        return self.SLOTS if group["momentum"] != 0 else ()

    def _initial_step(self, p: Tensor, saved: dict) -> Tensor:
        # a torch / timm checkpoint keeps no step: a saved momentum buffer has had its first step
        has_buffer = any(isinstance(v, Tensor) for k, v in saved.items()
                         if k.startswith("momentum_buffer"))
        return torch.full((), 1.0 if has_buffer else 0.0, dtype=torch.float32, device=p.device)

    def _slot_added(self, p: Tensor, state: dict, slot: str) -> None:
        # momentum turned on for a param that stepped without it: as in torch, its buffer
        # starts as a copy of the next grad, i.e. the next step is its first momentum step
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)

    def _torch_fused_ok(self, bucket: Bucket) -> bool:
        # torch._fused_sgd_ decides the first momentum step from a host flag for the whole call
        # (is_first_step); ours is per tensor and on the device: the CPU path is the reference
        return False

    def _launch(self, bucket: Bucket, idx: list[int], grads: list[Tensor], ctx: StepContext,
                *, nesterov: bool, maximize: bool, trust_clip: bool = False,
                lars: bool = False) -> None:
        """The kernel over tensors ``idx`` (LARS: after the norm pass)."""
        tables = bucket.tables(idx, grads, self._tables)
        sums = None
        if lars:  # Σp², Σg² of each whole tensor: per program, per tensor, across shards
            partial = _common.param_grad_squares(tables, bucket.dtype)
            sums = bucket.allreduce_tensor_sums(idx, _common.segment_sums(tables, partial))
        _kernel.launch(tables, bucket.dtype, lr_dtype=bucket.lr_dtype,
                       state_format=bucket.format, stochastic=bucket.stochastic,
                       momentum=bool(bucket.slot_names), nesterov=nesterov, maximize=maximize,
                       weight_decay=any(bucket.hypers[i][2] != 0.0 for i in idx), sums=sums,
                       trust_clip=trust_clip, grad_scale=ctx.grad_scale,
                       found_inf=ctx.found_inf, grad_mul=ctx.grad_mul)


class FusedSGD(_MomentumSGD):
    r"""SGD with momentum (``torch.optim.SGD``'s math) as a fused Triton kernel that reads the LR
    from the device.

    .. math::
        g &\leftarrow g + \lambda\, p \\
        b &\leftarrow \begin{cases} g & \text{first step} \\
            \mu\, b + (1 - \tau)\, g & \text{after} \end{cases} \qquad (\mu \ne 0) \\
        g &\leftarrow g + \mu\, b \ (\text{nesterov}) \quad\text{or}\quad g \leftarrow b \\
        p &\leftarrow p - \mathrm{lr}\cdot g

    (``maximize``: g ← −g first), computed in fp32 for fp32, bf16 and fp16 params (fp64 for
    fp64 params; complex params as real/imaginary pairs). One launch per bucket (same device,
    dtype, state format, nesterov / maximize): a ResNet-50 step is one kernel plus the
    step-count ``add_``.

    ``param_groups[i]["lr"]`` is a 0-dim tensor on the group's device that schedulers
    ``fill_``; ``step()`` reads nothing on the host, so it never syncs and never invalidates a
    compiled graph or a captured CUDA graph. A float assigned to ``param_groups[i]["lr"]`` is
    adopted by the next ``step()``.

    State: ``momentum_buffer`` (only with momentum ≠ 0, as torch), in fp32 for any param dtype
    (``state_dtype=torch.bfloat16`` / ``torch.uint8`` store it in bf16 / 8-bit blockwise;
    ``stochastic_rounding=True`` rounds the narrow stores unbiasedly), plus the engine's device
    step count ``step``, which decides the first momentum step (the buffer starts as a copy of
    the grad) on the device. ``state_dict()`` is ``torch.optim.SGD``'s layout (plus ``step``,
    which torch ignores); a torch checkpoint loads here and ours loads into torch.

    ``torch.amp.GradScaler`` hands ``grad_scale`` / ``found_inf`` to the step (a skipped step
    leaves params, buffers and the step count untouched); ``clip_grad_norm_`` applies a global
    clip inside the next step.

    Args:
        params (iterable): parameters or dicts defining parameter groups.
        lr (float or Tensor, optional): learning rate (default: 1e-3)
        momentum (float, optional): momentum factor (default: 0)
        dampening (float, optional): dampening for momentum (default: 0)
        weight_decay (float, optional): L2 penalty (default: 0)
        nesterov (bool, optional): Nesterov momentum (default: False)
        maximize (bool, optional): maximize the objective instead of minimizing
            (default: False)
        state_dtype (torch.dtype, optional): storage of the momentum buffer: ``torch.float32``,
            ``torch.bfloat16`` or ``torch.uint8`` (8-bit blockwise) (default: torch.float32)
        stochastic_rounding (bool, optional): round low-precision stores stochastically
            (default: False)

    Example:
        >>> opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        >>> sched = warmup.GradualWarmupScheduler(opt, multiplier=32, total_epoch=5 * iters)
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        state_dtype: torch.dtype = torch.float32,
        stochastic_rounding: bool = False,
    ):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults, state_dtype=state_dtype,
                         stochastic_rounding=stochastic_rounding)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)

    def _validate_hyperparameters(self, group: dict) -> None:
        group.setdefault("nesterov", False)
        group.setdefault("maximize", False)
        super()._validate_hyperparameters(group)
        _validate_flag(group, "maximize")

    def _hyper_row(self, group: dict) -> tuple[float, ...]:
        # 1 − dampening in double here, rounded once in the kernel (torch: alpha=1 - dampening)
        return (float(group["momentum"]), 1.0 - float(group["dampening"]),
                float(group["weight_decay"]))

    def _bucket_flags(self, group: dict) -> tuple:
        return (bool(group["nesterov"]), bool(group["maximize"]))

    def _update(self, bucket: Bucket, idx: list[int], grads: list[Tensor], backend: str,
                ctx: StepContext) -> None:
        nesterov, maximize = bucket.flags
        if backend == "kernel":
            self._launch(bucket, idx, grads, ctx, nesterov=nesterov, maximize=maximize)
            return

        def math_fn(i, p, g, slots, step, lr, hyper):
            group = bucket.groups[i]
            p, buf = sgd_math(p, g, slots.get("momentum_buffer"), lr=lr, step=step,
                              momentum=group["momentum"], dampening=group["dampening"],
                              weight_decay=group["weight_decay"], nesterov=nesterov,
                              maximize=maximize)
            return p, ({} if buf is None else {"momentum_buffer": buf})

        bucket.run_reference(idx, grads, ctx, math_fn)


class FusedLARS(_MomentumSGD):
    r"""LARS (``timm.optim.Lars``'s math: SGD with a layer-wise trust ratio; LARC with
    ``trust_clip``) as fused Triton kernels that read the LR from the device.

    .. math::
        r &\leftarrow \frac{\eta\,\lVert p\rVert}{\lVert g\rVert + \lambda\lVert p\rVert
            + \epsilon} \quad (1 \text{ if } \lVert p\rVert = 0 \text{ or }
            \lVert g\rVert = 0;\ \ \min(r / \mathrm{lr}, 1) \text{ with trust\_clip}) \\
        g &\leftarrow r\,(g + \lambda\, p) \qquad
            \text{(groups with } \lambda \ne 0 \text{, or always\_adapt)} \\
        b &\leftarrow g \text{ (first step)}, \quad
            b \leftarrow \mu\, b + (1 - \tau)\, g \text{ (after)} \\
        g &\leftarrow g + \mu\, b \ (\text{nesterov}) \quad\text{or}\quad g \leftarrow b \\
        p &\leftarrow p - \mathrm{lr}\cdot g

    η is ``trust_coeff``. As in timm, params whose group has ``weight_decay=0`` (the recipes'
    biases and norm weights) are not adapted unless ``always_adapt``.

    A step is two passes per bucket, three launches, nothing read on the host: the engine's
    norm pass writes each program's Σp², Σg², a segment sum gives each tensor's (all-reduced
    across ranks for FSDP2 shards: the ratio needs the whole tensor's norms), and the update
    kernel forms the ratio from them. The grad norm is of the unscaled grads (GradScaler's
    scale is divided out on the device) after a pending ``clip_grad_norm_``. Norms are computed
    every step, never cached, so params changed between steps (loaded weights, EMA swaps) are
    seen as they are.

    The LR, state formats, GradScaler and checkpoints are as in :class:`FusedSGD`;
    ``state_dict()`` is ``timm.optim.Lars``'s layout (``momentum_buffer``, plus ``step``).

    Args:
        params (iterable): parameters or dicts defining parameter groups.
        lr (float or Tensor, optional): learning rate (default: 1.0)
        momentum (float, optional): momentum factor (default: 0)
        dampening (float, optional): dampening for momentum (default: 0)
        weight_decay (float, optional): L2 penalty (default: 0)
        nesterov (bool, optional): Nesterov momentum (default: False)
        trust_coeff (float, optional): trust coefficient η of the adapted LR (default: 0.001)
        eps (float, optional): added to the ratio's denominator (default: 1e-8)
        trust_clip (bool, optional): LARC: clip the adapted LR at the global one
            (default: False)
        always_adapt (bool, optional): adapt params whose group has weight_decay 0 too
            (default: False)
        state_dtype (torch.dtype, optional): storage of the momentum buffer (default:
            torch.float32)
        stochastic_rounding (bool, optional): round low-precision stores stochastically
            (default: False)

    Example:
        >>> decay = [p for p in model.parameters() if p.dim() > 1]
        >>> no_decay = [p for p in model.parameters() if p.dim() <= 1]
        >>> opt = FusedLARS([{"params": decay, "weight_decay": 5e-4},
        ...                  {"params": no_decay}], lr=9.0, momentum=0.9)
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1.0,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        trust_coeff: float = 0.001,
        eps: float = 1e-8,
        trust_clip: bool = False,
        always_adapt: bool = False,
        *,
        state_dtype: torch.dtype = torch.float32,
        stochastic_rounding: bool = False,
    ):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, trust_coeff=trust_coeff,
                        eps=eps, trust_clip=trust_clip, always_adapt=always_adapt)
        super().__init__(params, defaults, state_dtype=state_dtype,
                         stochastic_rounding=stochastic_rounding)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)

    def _validate_hyperparameters(self, group: dict) -> None:
        group.setdefault("nesterov", False)
        super()._validate_hyperparameters(group)
        _engine.validate_number("trust_coeff", group["trust_coeff"], low_inclusive=False)
        _engine.validate_number("eps", group["eps"], label="epsilon value")
        _validate_flag(group, "trust_clip")
        _validate_flag(group, "always_adapt")

    def _hyper_row(self, group: dict) -> tuple[float, ...]:
        adapt = group["weight_decay"] != 0 or group["always_adapt"]
        return (float(group["momentum"]), 1.0 - float(group["dampening"]),
                float(group["weight_decay"]), float(group["trust_coeff"]), float(group["eps"]),
                1.0 if adapt else 0.0)

    def _bucket_flags(self, group: dict) -> tuple:
        return (bool(group["nesterov"]), bool(group["trust_clip"]))

    def _update(self, bucket: Bucket, idx: list[int], grads: list[Tensor], backend: str,
                ctx: StepContext) -> None:
        nesterov, trust_clip = bucket.flags
        if backend == "kernel":
            self._launch(bucket, idx, grads, ctx, nesterov=nesterov, maximize=False,
                         trust_clip=trust_clip, lars=True)
            return
        # the reference in the same two passes: the whole tensors' Σp², Σg² (g unscaled and
        # clipped by the engine), all-reduced over shards, then the update
        sums = torch.zeros(len(idx), 2, dtype=torch.float64, device=bucket.device)
        position = {i: k for k, i in enumerate(idx)}

        def squares(i, p, g, slots, step, lr, hyper):
            sums[position[i]] = torch.stack([p.double().square().sum(),
                                             g.double().square().sum()])
            return None, {}

        bucket.run_reference(idx, grads, ctx, squares)
        norms = bucket.allreduce_tensor_sums(idx, sums).sqrt()

        def math_fn(i, p, g, slots, step, lr, hyper):
            group = bucket.groups[i]
            ratio = None
            if group["weight_decay"] != 0 or group["always_adapt"]:
                w_norm, g_norm = norms[position[i]].to(p.dtype)
                ratio = lars_trust_ratio(w_norm, g_norm, lr=lr,
                                         trust_coeff=group["trust_coeff"],
                                         weight_decay=group["weight_decay"], eps=group["eps"],
                                         trust_clip=trust_clip)
            p, buf = sgd_math(p, g, slots.get("momentum_buffer"), lr=lr, step=step,
                              momentum=group["momentum"], dampening=group["dampening"],
                              weight_decay=group["weight_decay"], nesterov=nesterov,
                              maximize=False, trust_ratio=ratio)
            return p, ({} if buf is None else {"momentum_buffer": buf})

        bucket.run_reference(idx, grads, ctx, math_fn)


def _validate_flag(group: dict, name: str) -> None:
    if not isinstance(group[name], bool):
        raise ValueError(f"Invalid {name}: {group[name]!r} (expected True or False)")
