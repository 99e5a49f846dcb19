"""The optimizers' math in plain torch: the readable statement of each algorithm.

One reference, used three ways: the tests compare the Triton kernels against it, the optimizers
run it for tensors their kernels do not take (CPU params outside the interpreter where torch has
no fused op with the same math, non-contiguous ones), and the bench imports it rather than keeping
a copy. It reads no device value on the host (the LR, the step count, ``grad_scale`` and
``found_inf`` stay tensors), so it is also what a CUDA tensor would take through plain torch ops.

Each ``*_math`` function is the pure math of one tensor's update in the compute dtype (fp32, or
fp64 for fp64 params), returning the new param and state; the engine
(:meth:`fused._engine.Bucket.run_reference`) wraps it with the grad unscale and clip, the state
formats (bf16, 8-bit) and the rounding of low-precision stores (:mod:`fused.formats`).

AdamW (torch.optim.AdamW, decoupled weight decay), for step t = 1, 2, ... and
g = grad / grad_scale (−g with ``maximize``; g · clip_coef when a global-norm clip is pending)::

    p ← p · (1 − lr · wd)
    m ← m + (1 − β1) · (g − m)                       (torch's lerp)
    v ← β2 · v + (1 − β2) · g²
    v̂ ← max(v̂, v)                                   (amsgrad; the denominator uses v̂)
    p ← p − (lr / bc1) · m / (√v / √bc2 + eps),      bc_i = 1 − β_iᵗ

The element-wise math runs in fp32 for fp32/bf16/fp16 params and in fp64 for fp64 params. The
scalar coefficients (1 − lr·wd, lr / bc1, √bc2) are formed in float64 and rounded once, as torch
forms them from Python floats; so are 1 − β1 and 1 − β2 (``one_minus``). With ``found_inf`` nonzero
nothing changes.
"""

from __future__ import annotations

import torch
from torch import Tensor


def one_minus(beta: float) -> float:
    """``1 − beta`` in double, as torch forms it from a Python float (never from an fp32 beta:
    fp32(0.999) gives 1 − β2 with a 1.3e-5 relative error)."""
    return 1.0 - float(beta)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the element-wise math: fp64 for fp64 (and complex128) tensors, else fp32."""
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def bias_correction(beta: float, step: Tensor) -> Tensor:
    """``1 − beta**step`` in float64 from a float32 step tensor (no host read of ``step``)."""
    return 1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64, device=step.device),
                           step.to(torch.float64))


def adamw_math(p: Tensor, g: Tensor, m: Tensor, v: Tensor, v_max: Tensor | None, *,
               lr: Tensor, step: Tensor, beta1: float, beta2: float, eps: float,
               weight_decay: float, maximize: bool
               ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One AdamW update in the compute dtype (all tensors in it; ``g`` already unscaled and
    clipped; ``step`` the count *after* this step). Returns the new (p, m, v, v_max)."""
    dtype = p.dtype
    lr64 = lr.to(device=p.device, dtype=torch.float64)
    if maximize:
        g = -g
    # decoupled weight decay (the factor formed in double, rounded once)
    if weight_decay != 0:
        p = p * (1.0 - lr64 * weight_decay).to(dtype)
    # first and second moments
    m = m.lerp(g, one_minus(beta1))
    v = v * beta2 + one_minus(beta2) * g * g
    if v_max is not None:
        v_max = torch.maximum(v_max, v)
    # bias-corrected step
    step_size = (lr64 / bias_correction(beta1, step)).to(dtype)
    bias_correction2_sqrt = bias_correction(beta2, step).sqrt().to(dtype)
    denom = (v_max if v_max is not None else v).sqrt() / bias_correction2_sqrt + eps
    p = p - step_size * (m / denom)  # torch: p.addcdiv_(m, denom, value=-step_size)
    return p, m, v, v_max


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
    """One AdamW update of one real tensor with full-precision state, in place (``step`` is the
    count *after* this step): :func:`adamw_math` with the grad unscale / clip and ``found_inf``.
    ``param``/``grad`` any float dtype; the state in the compute dtype."""
    if param.numel() == 0:
        return
    dtype = compute_dtype(param.dtype)
    g = grad.to(dtype)
    if grad_scale is not None:  # unscale: GradScaler hands its scale over
        g = g / grad_scale.to(device=g.device, dtype=dtype)
    if clip_coef is not None:  # pending global-norm clip coefficient
        g = g * clip_coef.to(device=g.device, dtype=dtype)
    p, m, v, v_max = adamw_math(
        param.to(dtype), g, exp_avg.to(dtype), exp_avg_sq.to(dtype),
        None if max_exp_avg_sq is None else max_exp_avg_sq.to(dtype), lr=lr, step=step,
        beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=maximize)
    if found_inf is not None:  # inf/nan in the scaled grads: keep everything as it was
        keep = found_inf.to(param.device) != 0
        p = torch.where(keep, param.to(dtype), p)
        m = torch.where(keep, exp_avg.to(dtype), m)
        v = torch.where(keep, exp_avg_sq.to(dtype), v)
        if v_max is not None:
            v_max = torch.where(keep, max_exp_avg_sq.to(dtype), v_max)
    param.copy_(p)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if max_exp_avg_sq is not None:
        max_exp_avg_sq.copy_(v_max)
