"""FusedAdamW: torch.optim.AdamW's math in one Triton launch per bucket, with the learning rate
read from a device tensor.

The class holds only what is AdamW's: its arguments and their validation, its state slots, its
hyperparameter row and its dispatch (kernel :mod:`fused.kernels.adamw`, torch's fused op, or the
reference :func:`fused.reference.adamw_math`). Everything else is the engine's
(:mod:`fused._engine`). :func:`fused_adamw` is the functional form.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from . import _engine
from ._engine import Bucket, FusedOptimizer, StepContext, float_betas
from .reference import adamw_math, adamw_step_reference_

try:
    from .kernels import adamw as _kernel
    from .kernels import common as _common
except ImportError:  # triton missing: CPU params still work through the torch path
    _kernel = _common = None

__all__ = ["FusedAdamW", "fused_adamw"]


class FusedAdamW(FusedOptimizer):
    r"""AdamW (decoupled weight decay) as a fused Triton kernel that reads the LR from the device.

    .. math::
        p &\leftarrow p\,(1 - \mathrm{lr}\cdot\lambda) \\
        m &\leftarrow \beta_1 m + (1-\beta_1)\, g \\
        v &\leftarrow \beta_2 v + (1-\beta_2)\, g^2 \qquad
            (\text{amsgrad: } \hat v \leftarrow \max(\hat v, v)) \\
        p &\leftarrow p - \frac{\mathrm{lr}}{1-\beta_1^t}\,
            \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

    computed in fp32 for fp32, bf16 and fp16 params (fp64 for fp64 params; complex params as
    real/imaginary pairs), identical to ``torch.optim.AdamW`` up to float32 rounding (within
    1e-5 relative after many steps: the scalar coefficients are formed in double, as torch does).

    ``param_groups[i]["lr"]`` is a 0-dim tensor on the group's device (float32; float64 for a
    group holding fp64 params). Schedulers (torch's, and ``warmup.GradualWarmupScheduler``)
    update it in place with ``fill_``, and the kernel loads it, so
    ``scheduler.step(); opt.step()`` never syncs with the host and never invalidates a compiled
    graph or a captured CUDA graph. If a float is assigned to ``param_groups[i]["lr"]`` instead,
    the next ``step()`` adopts it: it ``fill_``s the group's own LR tensor with the value and
    puts that tensor back (same address, so graphs stay valid).

    State: ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with amsgrad) in fp32 by default;
    ``state_dtype=torch.bfloat16`` stores them in bf16 (4 bytes/param instead of 8),
    ``torch.uint8`` as 8-bit blockwise codes with one fp32 absmax per block of ≤ 256 elements of a
    row (about 2 bytes/param; tensors under 4096 elements keep fp32 state); the math is fp32 in
    every case. ``stochastic_rounding=True`` rounds every store narrower than fp32 (bf16/fp16
    params, bf16 state, 8-bit requantization) stochastically and unbiasedly, with Philox bits
    keyed by a seed drawn at construction from torch's generator and the device step count.

    ``state_dict()`` saves the LR as a float and the state under torch.optim.AdamW's keys in its
    own dtype (8-bit slots as ``<slot>_codes`` + ``<slot>_scales``), so checkpoints move both
    ways between this optimizer and ``torch.optim.AdamW`` (``dequantized_state_dict()`` for 8-bit
    state); loading converts each slot to this optimizer's format.

    ``torch.amp.GradScaler`` hands the unscale and the inf check to the step (``grad_scale`` /
    ``found_inf``, as with torch's fused optimizers): with ``found_inf`` set, params, state and
    the random stream are left untouched.

    Args:
        params (iterable): parameters or dicts defining parameter groups.
        lr (float or Tensor, optional): learning rate (default: 1e-3)
        betas (tuple[float, float], optional): coefficients of the running averages of the
            gradient and its square (default: (0.9, 0.999))
        eps (float, optional): added to the denominator (default: 1e-8)
        weight_decay (float, optional): decoupled weight decay coefficient (default: 1e-2)
        amsgrad (bool, optional): use the AMSGrad variant (default: False)
        maximize (bool, optional): maximize the objective instead of minimizing (default: False)
        state_dtype (torch.dtype, optional): storage of the moments: ``torch.float32``,
            ``torch.bfloat16`` or ``torch.uint8`` (8-bit blockwise) (default: torch.float32)
        stochastic_rounding (bool, optional): round low-precision stores stochastically
            (default: False)

    Example:
        >>> opt = FusedAdamW(model.parameters(), lr=1e-3)
        >>> sched = warmup.GradualWarmupScheduler(opt, multiplier=1, total_epoch=1000)
        >>> for batch in loader:
        ...     loss_fn(model(batch)).backward()
        ...     opt.step(); opt.zero_grad(); sched.step()
    """

    SLOTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    SIGNED_SLOTS = frozenset({"exp_avg"})

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
        state_dtype: torch.dtype = torch.float32,
        stochastic_rounding: bool = False,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize)
        super().__init__(params, defaults, state_dtype=state_dtype,
                         stochastic_rounding=stochastic_rounding)

    # ------------------------------------------------------------------ the engine's hooks
    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)

    def _validate_hyperparameters(self, group: dict) -> None:
        group.setdefault("amsgrad", False)
        group.setdefault("maximize", False)
        _validate_adamw(group)

    def _normalize(self, group: dict) -> None:
        group["betas"] = float_betas(group["betas"])

    def _group_slots(self, group: dict) -> tuple[str, ...]:
        return self.SLOTS if group["amsgrad"] else self.SLOTS[:2]

    def _hyper_row(self, group: dict) -> tuple[float, ...]:
        beta1, beta2 = float_betas(group["betas"])
        # 1 − β in double here, rounded once in the kernel (never from an fp32 β)
        return (beta1, beta2, 1.0 - beta1, 1.0 - beta2, float(group["eps"]),
                float(group["weight_decay"]))

    def _bucket_flags(self, group: dict) -> tuple:
        return (bool(group["amsgrad"]), bool(group["maximize"]))

    def _torch_fused_ok(self, bucket: Bucket) -> bool:
        # torch's fused CPU AdamW: its state in the param's dtype, fp32 (fp64) math, no rounding
        # of ours. Only on the CPU: on CUDA fp64 params take the reference (torch's CUDA kernel
        # is not known to take our fp64 LR tensor, and no GPU run has checked it)
        native = bucket.format == _engine._NATIVE
        return (bucket.device.type == "cpu" and not bucket.stochastic
                and ((bucket.dtype == torch.float32 and bucket.format == torch.float32)
                     or (bucket.dtype in (torch.float32, torch.float64) and native)))

    def _update(self, bucket: Bucket, idx: list[int], grads: list[Tensor], backend: str,
                ctx: StepContext) -> None:
        amsgrad, maximize = bucket.flags
        if backend == "kernel":
            tables = bucket.tables(idx, grads, self._tables)
            _kernel.launch(tables, bucket.dtype, lr_dtype=bucket.lr_dtype,
                           state_format=bucket.format, stochastic=bucket.stochastic,
                           amsgrad=amsgrad, maximize=maximize,
                           weight_decay=any(bucket.hypers[i][5] != 0.0 for i in idx),
                           grad_scale=ctx.grad_scale, found_inf=ctx.found_inf,
                           grad_mul=ctx.grad_mul)
        elif backend == "torch":
            _torch_fused_adamw(bucket, idx, grads, ctx, amsgrad=amsgrad, maximize=maximize)
        else:
            def math_fn(i, p, g, slots, step, lr, hyper):
                beta1, beta2, _, _, eps, weight_decay = hyper
                p, m, v, v_max = adamw_math(
                    p, g, slots["exp_avg"], slots["exp_avg_sq"], slots.get("max_exp_avg_sq"),
                    lr=lr, step=step, beta1=beta1, beta2=beta2, eps=eps,
                    weight_decay=weight_decay, maximize=maximize)
                new = {"exp_avg": m, "exp_avg_sq": v}
                if v_max is not None:
                    new["max_exp_avg_sq"] = v_max
                return p, new

            bucket.run_reference(idx, grads, ctx, math_fn)


def _validate_adamw(group: dict) -> None:
    """AdamW's hyperparameters (torch's messages)."""
    _engine.validate_number("eps", group["eps"], label="epsilon value")
    _engine.validate_betas(group["betas"])
    _engine.validate_number("weight_decay", group["weight_decay"], label="weight_decay value")


def _torch_fused_adamw(bucket: Bucket, idx: list[int], grads: list[Tensor], ctx: StepContext,
                       *, amsgrad: bool, maximize: bool) -> None:
    """torch's own fused AdamW op (its CPU kernel): the same math. It takes
    one LR and one set of hyperparameters per call, and would write unscaled grads back into
    ``.grad``, so it gets unscaled / clipped copies (ours never change the grads)."""
    calls: dict[tuple, list[int]] = {}
    for i in idx:
        calls.setdefault((id(bucket.lrs[i]), bucket.hypers[i]), []).append(i)
    for ids in calls.values():
        g = [grads[i] for i in ids]
        if ctx.grad_scale is not None:
            g = torch._foreach_div(g, ctx.grad_scale)
        if ctx.grad_mul is not None:
            g = torch._foreach_mul(g, ctx.grad_mul)
        beta1, beta2, _, _, eps, weight_decay = bucket.hypers[ids[0]]
        torch._fused_adamw_(
            [bucket.locals[i] for i in ids], g,
            [bucket.slots["exp_avg"][i] for i in ids],
            [bucket.slots["exp_avg_sq"][i] for i in ids],
            [bucket.slots["max_exp_avg_sq"][i] for i in ids] if amsgrad else [],
            [bucket.steps[i] for i in ids], lr=bucket.lrs[ids[0]], beta1=beta1, beta2=beta2,
            weight_decay=weight_decay, eps=eps, amsgrad=amsgrad, maximize=maximize,
            grad_scale=None, found_inf=ctx.found_inf)


def fused_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor] | None,
    state_steps: list[Tensor],
    *,
    lr: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool = False,
    maximize: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    r"""Functional FusedAdamW: one step over these tensors, in place (the math of
    :class:`FusedAdamW`). ``state_steps`` are 0-dim float32 tensors, incremented here; ``lr`` is a
    0-dim tensor on the params' device (a float is accepted and put there). State tensors are
    fp32 (fp64 for fp64 params; complex params and their state are stepped as real views).
    Tensors are grouped by (device, dtype) and stepped with one launch per group.
    """
    if not params:
        return
    if not all(len(x) == len(params) for x in (grads, exp_avgs, exp_avg_sqs, state_steps)):
        raise ValueError("fused_adamw: params, grads, exp_avgs, exp_avg_sqs and state_steps must "
                         "have the same length")
    if amsgrad and (max_exp_avg_sqs is None or len(max_exp_avg_sqs) != len(params)):
        raise ValueError("fused_adamw: amsgrad=True needs one max_exp_avg_sq per param")
    group = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
    if not isinstance(lr, Tensor):
        _engine.validate_number("lr", lr, label="learning rate")
    _validate_adamw(group)
    real = _engine._real
    params, grads, exp_avgs, exp_avg_sqs = ([real(t) for t in ts]
                                            for ts in (params, grads, exp_avgs, exp_avg_sqs))
    max_exp_avg_sqs = [real(t) for t in max_exp_avg_sqs] if amsgrad else None
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    hyper = (float(beta1), float(beta2), 1.0 - float(beta1), 1.0 - float(beta2), float(eps),
             float(weight_decay))
    for (device, dtype), idx in groups.items():
        lr_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        lr_tensor = (lr.to(device=device, dtype=lr_dtype).reshape(()) if isinstance(lr, Tensor)
                     else torch.tensor(float(lr), dtype=lr_dtype, device=device))
        steps = [state_steps[i] for i in idx]
        device_found_inf = _engine._on(found_inf, device)
        device_grad_scale = _engine._on(grad_scale, device)
        torch._foreach_add_(steps, 1)
        fast = [i for i in idx if _engine.uses_kernel(device, "fused_adamw")
                and dtype in _common.SUPPORTED_DTYPES
                and all(t.is_contiguous() for t in (params[i], grads[i], exp_avgs[i],
                                                    exp_avg_sqs[i]))
                and exp_avgs[i].dtype == torch.float32]
        if fast:
            rows = [_common.tensor_row(
                params[i], grads[i],
                [exp_avgs[i], exp_avg_sqs[i]] + ([max_exp_avg_sqs[i]] if amsgrad else []),
                [None] * 3, state_steps[i], lr_tensor, param_id=i, seed=0) for i in fast]
            tables = _common.tables_for(rows, [hyper] * len(fast), device, _FUNCTIONAL_TABLES,
                                        quant_tiles=False, keep_alive=lr_tensor,
                                        what="fused_adamw")
            _kernel.launch(tables, dtype, lr_dtype=lr_dtype, state_format=torch.float32,
                           stochastic=False, amsgrad=amsgrad, maximize=maximize,
                           weight_decay=weight_decay != 0, grad_scale=device_grad_scale,
                           found_inf=device_found_inf, grad_mul=None)
        taken = set(fast)
        for i in idx:
            if i in taken:
                continue
            adamw_step_reference_(
                params[i], grads[i], exp_avgs[i], exp_avg_sqs[i],
                max_exp_avg_sqs[i] if amsgrad else None, state_steps[i], lr=lr_tensor,
                beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=maximize,
                grad_scale=device_grad_scale, found_inf=device_found_inf)
        if device_found_inf is not None:  # a skipped step does not count
            torch._foreach_sub_(steps, [device_found_inf] * len(steps))


_FUNCTIONAL_TABLES = _common.TableCache() if _common is not None else None
