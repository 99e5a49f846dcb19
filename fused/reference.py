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


# ====================================================================== SGD and LARS
# SGD (torch.optim.SGD), for step t = 1, 2, ... (t = 1: the first step with a momentum buffer)
# and g = grad / grad_scale (· clip_coef when a global-norm clip is pending)::
#
#     g ← −g                                          (maximize)
#     g ← g + wd · p
#     b ← g  (t = 1),   else  b ← μ · b + (1 − dampening) · g          (momentum μ ≠ 0)
#     g ← g + μ · b  (nesterov),   else  g ← b
#     p ← p − lr · g
#
# LARS (timm.optim.Lars) puts a per-tensor trust ratio in front of SGD's momentum, for the tensors
# of groups with wd ≠ 0 (every tensor with ``always_adapt``)::
#
#     r ← trust_coeff · ‖p‖ / (‖g‖ + wd · ‖p‖ + eps);   r ← 1 where ‖p‖ = 0 or ‖g‖ = 0
#     r ← min(r / lr, 1)                              (trust_clip: LARC)
#     g ← r · (g + wd · p)
#
# The norms are of the whole tensor (all-reduced over FSDP2 shards) and of the unscaled grads.


def sgd_math(p: Tensor, g: Tensor, buf: Tensor | None, *, lr: Tensor, step: Tensor,
             momentum: float, dampening: float, weight_decay: float, nesterov: bool,
             maximize: bool, trust_ratio: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """One SGD update in the compute dtype (``g`` unscaled and clipped; ``step`` the count
    *after* this step; ``buf`` None without momentum). ``trust_ratio``: LARS's, applied to
    ``g + wd·p`` (see :func:`lars_trust_ratio`). Returns the new (p, buf)."""
    lr = lr.to(device=p.device, dtype=p.dtype)
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    if trust_ratio is not None:
        g = g * trust_ratio
    if momentum != 0:
        # torch's clone(grad) on the first step: decided on the device, no host read of step
        buf = torch.where(step.to(p.device) == 1, g,
                          buf.mul(momentum).add(g, alpha=one_minus(dampening)))
        g = g.add(buf, alpha=momentum) if nesterov else buf
    return p.addcmul(g, lr, value=-1), buf


def lars_trust_ratio(w_norm: Tensor, g_norm: Tensor, *, lr: Tensor, trust_coeff: float,
                     weight_decay: float, eps: float, trust_clip: bool) -> Tensor:
    """LARS's trust ratio from the norms of the param and of its (unscaled) grad, 0-dim."""
    ratio = trust_coeff * w_norm / (g_norm + w_norm * weight_decay + eps)
    ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)
    if trust_clip:  # LARC: the adapted LR lr · r never exceeds lr
        ratio = torch.clamp(ratio / lr.to(ratio), max=1.0)
    return ratio


def lars_math(p: Tensor, g: Tensor, buf: Tensor | None, *, lr: Tensor, step: Tensor,
              momentum: float, dampening: float, weight_decay: float, nesterov: bool,
              trust_coeff: float, eps: float, trust_clip: bool, always_adapt: bool,
              norms: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
    """One LARS update of a whole tensor (``norms``: its (‖p‖, ‖g‖) when the tensor is a shard
    of a larger one). Returns the new (p, buf)."""
    ratio = None
    if weight_decay != 0 or always_adapt:
        w_norm, g_norm = norms if norms is not None else (torch.linalg.vector_norm(p),
                                                          torch.linalg.vector_norm(g))
        ratio = lars_trust_ratio(w_norm.to(p.dtype), g_norm.to(p.dtype), lr=lr,
                                 trust_coeff=trust_coeff, weight_decay=weight_decay, eps=eps,
                                 trust_clip=trust_clip)
    return sgd_math(p, g, buf, lr=lr, step=step, momentum=momentum, dampening=dampening,
                    weight_decay=weight_decay, nesterov=nesterov, maximize=False,
                    trust_ratio=ratio)


# ====================================================================== LAMB
# LAMB (timm.optim.Lamb = apex FusedLAMB's NVLAMB), for step t = 1, 2, ...::
#
#     c ← max(‖G‖ / max_grad_norm, 1)     ‖G‖ the norm of all grads of all groups (else c = 1)
#     g ← g / c
#     m ← β1 · m + β3 · g                  β3 = 1 − β1 (grad_averaging), else 1
#     v ← β2 · v + (1 − β2) · g²
#     u ← (m / bc1) / (√v / √bc2 + eps) + wd · p       bc_i = 1 − β_iᵗ (1 without bias_correction)
#     r ← ‖p‖ / ‖u‖;  r ← 1 where ‖p‖ = 0 or ‖u‖ = 0;  r ← min(r, 1) (trust_clip)
#                                           (only for groups with wd ≠ 0, or always_adapt)
#     p ← p − lr · r · u
#
# ‖p‖ and ‖u‖ are of the whole tensor: the fused step computes m, v and the per-tensor sums of
# p² and u² in one pass, all-reduces the sums over FSDP2 shards, and applies the update in a
# second pass that recomputes u from the stored m, v.


def lamb_global_clip(grads: list[Tensor], max_grad_norm: float | None) -> Tensor | None:
    """timm's clip divisor max(‖G‖ / max_grad_norm, 1) over all grads (None: no clip)."""
    if max_grad_norm is None or not grads:
        return None
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return (norm / max_grad_norm).clamp(min=1.0)


def lamb_moments(g: Tensor, m: Tensor, v: Tensor, *, beta1: float, beta2: float,
                 grad_averaging: bool) -> tuple[Tensor, Tensor]:
    """LAMB's running averages (``g`` already unscaled and divided by the global clip)."""
    m = m.mul(beta1).add(g, alpha=one_minus(beta1) if grad_averaging else 1.0)
    v = v.mul(beta2).addcmul(g, g, value=one_minus(beta2))
    return m, v


def lamb_direction(p: Tensor, m: Tensor, v: Tensor, *, step: Tensor, beta1: float,
                   beta2: float, eps: float, weight_decay: float,
                   bias_correction: bool) -> Tensor:
    """LAMB's update direction u before the trust ratio (``step`` the count after this step)."""
    if bias_correction:
        bias_correction1, bias_correction2_sqrt = _lamb_corrections(beta1, beta2, step, p.dtype)
    else:
        bias_correction1 = bias_correction2_sqrt = torch.ones((), dtype=p.dtype,
                                                              device=p.device)
    update = (m / bias_correction1) / (v.sqrt() / bias_correction2_sqrt + eps)
    if weight_decay != 0:
        update = update.add(p, alpha=weight_decay)
    return update


def lamb_trust_ratio(w_norm: Tensor, u_norm: Tensor, *, trust_clip: bool) -> Tensor:
    """‖p‖ / ‖u‖, 1 where either is zero; at most 1 with ``trust_clip`` (LAMBC)."""
    ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
    return torch.clamp(ratio, max=1.0) if trust_clip else ratio


def lamb_apply(p: Tensor, update: Tensor, *, lr: Tensor, adapt: bool, trust_clip: bool,
               norms: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """p − lr · r · u (r = 1 unless ``adapt``); ``norms``: the whole tensor's (‖p‖, ‖u‖)."""
    if adapt:
        w_norm, u_norm = norms if norms is not None else (torch.linalg.vector_norm(p),
                                                          torch.linalg.vector_norm(update))
        update = update * lamb_trust_ratio(w_norm.to(p.dtype), u_norm.to(p.dtype),
                                           trust_clip=trust_clip)
    return p.addcmul(update, lr.to(device=p.device, dtype=p.dtype), value=-1)


def lamb_math(p: Tensor, g: Tensor, m: Tensor, v: Tensor, *, lr: Tensor, step: Tensor,
              beta1: float, beta2: float, eps: float, weight_decay: float,
              grad_averaging: bool, bias_correction: bool, trust_clip: bool,
              always_adapt: bool, clip: Tensor | None = None
              ) -> tuple[Tensor, Tensor, Tensor]:
    """One LAMB update of a whole tensor in the compute dtype (``clip``: the global clip
    divisor, :func:`lamb_global_clip`). Returns the new (p, m, v)."""
    if clip is not None:
        g = g / clip.to(g)
    m, v = lamb_moments(g, m, v, beta1=beta1, beta2=beta2, grad_averaging=grad_averaging)
    update = lamb_direction(p, m, v, step=step, beta1=beta1, beta2=beta2, eps=eps,
                            weight_decay=weight_decay, bias_correction=bias_correction)
    p = lamb_apply(p, update, lr=lr, adapt=weight_decay != 0 or always_adapt,
                   trust_clip=trust_clip)
    return p, m, v


def _lamb_corrections(beta1: float, beta2: float, step: Tensor,
                      dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """1 − β1ᵗ and √(1 − β2ᵗ), formed in double and rounded once (timm forms them from
    Python floats)."""
    return (bias_correction(beta1, step).to(dtype),
            bias_correction(beta2, step).sqrt().to(dtype))
