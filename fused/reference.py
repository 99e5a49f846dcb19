"""The AdamW step in plain torch: the readable statement of the math.

One reference, used three ways: the tests compare the Triton kernel against it, FusedAdamW runs it
for CPU parameters when the Triton interpreter is off, and the bench imports it rather than keeping
a copy. It reads no device value on the host (the LR, the step count, ``grad_scale`` and
``found_inf`` stay tensors), so it is also what a CUDA tensor would take through plain torch ops.

Math (torch.optim.AdamW, decoupled weight decay), for step t = 1, 2, ... and g = grad / grad_scale
(−g with ``maximize``; g · clip_coef when a global-norm clip is pending)::

    p ← p · (1 − lr · wd)
    m ← β1 · m + (1 − β1) · g
    v ← β2 · v + (1 − β2) · g²
    v̂ ← max(v̂, v)                                   (amsgrad; the denominator uses v̂)
    p ← p − (lr / bc1) · m / (√v / √bc2 + eps),      bc_i = 1 − β_iᵗ

All of it in fp32 whatever the parameter's dtype (bf16/fp16 params keep fp32 ``m``/``v``); with
``found_inf`` nonzero nothing changes.
"""

from __future__ import annotations

import torch
from torch import Tensor


def bias_correction(beta: float, step: Tensor) -> Tensor:
    """``1 − beta**step`` in float64 from a float32 step tensor (no host read of ``step``)."""
    return 1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64, device=step.device),
                           step.to(torch.float64))


def adamw_step_reference_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    step: Tensor,
    *,
    lr: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    clip_coef: Tensor | None = None,
) -> None:
    """One AdamW update of one tensor, in place. ``step`` is the count *after* this step.

    ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq`` are fp32; ``param``/``grad`` any float dtype.
    """
    if param.numel() == 0:
        return
    lr = lr.to(device=param.device, dtype=torch.float32)
    g = grad.float()
    if grad_scale is not None:  # unscale: GradScaler hands its scale over
        g = g / grad_scale.to(g.device)
    if clip_coef is not None:  # pending global-norm clip coefficient
        g = g * clip_coef.to(g.device)
    if maximize:
        g = -g
    p = param.float()
    # decoupled weight decay
    p = p * (1.0 - lr * weight_decay)
    # first and second moments
    m = exp_avg.lerp(g, 1.0 - beta1)
    v = exp_avg_sq * beta2 + (1.0 - beta2) * g * g
    v_max = torch.maximum(max_exp_avg_sq, v) if max_exp_avg_sq is not None else None
    # bias-corrected step
    bias_correction1 = bias_correction(beta1, step).float()
    bias_correction2_sqrt = bias_correction(beta2, step).sqrt().float()
    denom = (v_max if v_max is not None else v).sqrt() / bias_correction2_sqrt + eps
    p = p - (lr / bias_correction1) * m / denom

    if found_inf is not None:  # inf/nan in the scaled grads: keep everything as it was
        keep = found_inf.to(param.device) != 0
        p = torch.where(keep, param.float(), p)
        m = torch.where(keep, exp_avg, m)
        v = torch.where(keep, exp_avg_sq, v)
        if v_max is not None:
            v_max = torch.where(keep, max_exp_avg_sq, v_max)
    param.copy_(p)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if max_exp_avg_sq is not None:
        max_exp_avg_sq.copy_(v_max)
