"""The LAMB kernels and their launchers: two passes per bucket (see :mod:`fused.kernels.common`
for the tables, the state formats and the rounding helpers).

A trust ratio ‖p‖ / ‖u‖ needs the norm of the whole update before any element of it is applied,
so a step is two passes over the bucket with the per-tensor reduction between them:

1. ``_lamb_moments_kernel``: read p, g, m, v; write m, v and this program's Σp², Σu² (u, the
   update direction, from m, v in fp32);
2. :func:`fused.kernels.common.segment_sums` → per-tensor sums (all-reduced over FSDP2 shards
   by the engine);
3. ``_lamb_apply_kernel``: read p, m, v; recompute u; write p − lr · r · u. (With fp32 state
   this is exactly the u pass 1 measured; with bf16 / 8-bit state it is u from the stored,
   rounded m, v, while ‖u‖ is of the unrounded one, as the torch path does too.)

Bytes per param in fp32: 24 + 16 = 40; with the global grad-norm clip (``max_grad_norm``) the
engine's grad-norm pass adds 4: 44.

Hyperparameter row (fp64, formed in double on the host): β1, β2, β3 (1 − β1, or 1 without
grad_averaging), 1 − β2, eps, weight_decay, adapt (1.0 where the group's weight_decay ≠ 0 or
``always_adapt``), bias_correction (1.0 / 0.0). State slots: 0 ``exp_avg``, 1 ``exp_avg_sq``, in
fp32 or bf16 (8-bit moments are refused by FusedLAMB: pass 2 must use the stored moments, and an
8-bit second moment that rounds to 0 under a nonzero first moment makes u = m / eps).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    BLOCK,
    FORMATS,
    NUM_WARPS,
    TL_DTYPES,
    Tables,
    count_launch,
    flat_offsets,
    load_lr,
    load_slot,
    pow_int,
    program_tensor,
    random_words,
    store_param,
    store_slot,
)

_STATE = {torch.float32: FORMATS[torch.float32], torch.bfloat16: FORMATS[torch.bfloat16]}


@triton.jit
def _corrections(hyper, step):
    """1 − β1ᵗ and √(1 − β2ᵗ) in fp64, rounded once to fp32 (1, 1 without bias_correction)."""
    beta1 = tl.load(hyper + 0)
    beta2 = tl.load(hyper + 1)
    on = tl.load(hyper + 7) != 0.0
    bias_correction1 = tl.where(on, 1.0 - pow_int(beta1, step), 1.0).to(tl.float32)
    bias_correction2_sqrt = tl.where(on, tl.sqrt(1.0 - pow_int(beta2, step)), 1.0)
    return bias_correction1, bias_correction2_sqrt.to(tl.float32)


@triton.jit
def _direction(p, m, v, bias_correction1, bias_correction2_sqrt, eps, weight_decay):
    """u = (m / bc1) / (√v / √bc2 + eps) + wd · p (timm's order of operations)."""
    u = (m / bias_correction1) / (tl.sqrt(v) / bias_correction2_sqrt + eps)
    return tl.where(weight_decay != 0.0, u + weight_decay * p, u)


@triton.jit
def _moments(
    row, param_ptr, grad_ptr, offs, mask, partial_ptr, step, beta1, beta3, beta2,
    one_minus_beta2, eps, weight_decay, bias_correction1, bias_correction2_sqrt, grad_mul,
    grad_scale_ptr, grad_div_ptr,
    PARAM_DTYPE: tl.constexpr, STATE: tl.constexpr, STOCHASTIC: tl.constexpr,
    MASKED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_GRAD_MUL: tl.constexpr,
    HAS_GRAD_DIV: tl.constexpr, ALIGNED: tl.constexpr,
):
    # all math in fp32, whatever the param and state dtypes
    p = tl.load(param_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
    m = load_slot(row, 0, offs, mask, 0, 0, 0, STATE, ALIGNED)
    v = load_slot(row, 1, offs, mask, 0, 0, 0, STATE, ALIGNED)
    if HAS_GRAD_SCALE:  # unscale: divide like GradScaler's own unscale (the scale is a power of 2)
        g = g / tl.load(grad_scale_ptr)
    if HAS_GRAD_MUL:  # pending clip coefficient of opt.clip_grad_norm_
        g = g * grad_mul
    if HAS_GRAD_DIV:  # LAMB's own global clip: g / max(‖G‖ / max_grad_norm, 1)
        g = g / tl.load(grad_div_ptr)
    # running averages
    m = m * beta1 + beta3 * g
    v = v * beta2 + one_minus_beta2 * g * g
    bits0, bits1, bits2, bits3 = 0, 0, 0, 0
    if STOCHASTIC:  # word 1 rounds m, 2 rounds v (word 0 rounds p in the apply pass)
        bits0, bits1, bits2, bits3 = random_words(row, step, offs)
    store_slot(row, 0, offs, mask, 0, 0, 0, m, bits1, STATE, STOCHASTIC, ALIGNED)
    store_slot(row, 1, offs, mask, 0, 0, 0, v, bits2, STATE, STOCHASTIC, ALIGNED)
    # the direction's per-program sums, from m, v in fp32 (before their rounding to bf16
    # state: the apply pass recomputes u from the stored m, v)
    u = _direction(p, m, v, bias_correction1, bias_correction2_sqrt, eps, weight_decay)
    pp = p * p
    uu = u * u
    if MASKED:
        pp = tl.where(mask, pp, 0.0)
        uu = tl.where(mask, uu, 0.0)
    pid = tl.program_id(0)
    tl.store(partial_ptr + 2 * pid, tl.sum(tl.reshape(pp, [pp.numel]), axis=0))
    tl.store(partial_ptr + 2 * pid + 1, tl.sum(tl.reshape(uu, [uu.numel]), axis=0))


@triton.jit
def _lamb_moments_kernel(
    tensors_ptr,  # int64 [n_tensors, 16]: addresses, numel, row length, param id, seed, ...
    hypers_ptr,  # fp64 [n_tensors, 8]: β1, β2, β3, 1 − β2, eps, wd, adapt, bias_correction
    blocks_ptr,  # int32 [n_programs, 2]: tensor index, chunk index within that tensor
    partial_ptr,  # fp32 [n_programs, 2]: this program's Σp², Σu²
    grad_scale_ptr,  # fp32 scalar: grads are divided by it (HAS_GRAD_SCALE)
    found_inf_ptr,  # fp32 scalar: nonzero means skip the whole step (HAS_FOUND_INF)
    grad_mul_ptr,  # fp32 scalar: grads are multiplied by it (HAS_GRAD_MUL)
    grad_div_ptr,  # fp32 scalar: LAMB's global clip divisor (HAS_GRAD_DIV)
    PARAM_DTYPE: tl.constexpr,
    STATE: tl.constexpr,  # 0 fp32, 1 bf16
    STOCHASTIC: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_GRAD_MUL: tl.constexpr,
    HAS_GRAD_DIV: tl.constexpr,
):
    tensor, row, chunk, param_ptr, grad_ptr, step, numel = program_tensor(
        tensors_ptr, blocks_ptr, PARAM_DTYPE, ALIGNED)
    hyper = hypers_ptr + tensor * 8
    beta1 = tl.load(hyper + 0).to(tl.float32)
    beta2 = tl.load(hyper + 1).to(tl.float32)
    beta3 = tl.load(hyper + 2).to(tl.float32)
    one_minus_beta2 = tl.load(hyper + 3).to(tl.float32)
    eps = tl.load(hyper + 4).to(tl.float32)
    weight_decay = tl.load(hyper + 5).to(tl.float32)
    bias_correction1, bias_correction2_sqrt = _corrections(hyper, step)
    grad_mul = 1.0
    if HAS_GRAD_MUL:
        grad_mul = tl.load(grad_mul_ptr)

    proceed = True
    if HAS_FOUND_INF:  # inf/nan in the scaled grads: leave the state untouched
        proceed = tl.load(found_inf_ptr) == 0.0
    if proceed:
        start, offs = flat_offsets(chunk, BLOCK, ALIGNED)
        if start + BLOCK <= numel:  # a whole chunk: unmasked, vectorized access
            _moments(row, param_ptr, grad_ptr, offs, None, partial_ptr, step, beta1, beta3,
                     beta2, one_minus_beta2, eps, weight_decay, bias_correction1,
                     bias_correction2_sqrt, grad_mul, grad_scale_ptr, grad_div_ptr, PARAM_DTYPE,
                     STATE, STOCHASTIC, False, HAS_GRAD_SCALE, HAS_GRAD_MUL, HAS_GRAD_DIV,
                     ALIGNED)
        else:
            _moments(row, param_ptr, grad_ptr, offs, offs < numel, partial_ptr, step, beta1,
                     beta3, beta2, one_minus_beta2, eps, weight_decay, bias_correction1,
                     bias_correction2_sqrt, grad_mul, grad_scale_ptr, grad_div_ptr, PARAM_DTYPE,
                     STATE, STOCHASTIC, True, HAS_GRAD_SCALE, HAS_GRAD_MUL, HAS_GRAD_DIV,
                     ALIGNED)
    else:  # a skipped step: the apply pass skips too; keep the sums defined anyway
        pid = tl.program_id(0)
        tl.store(partial_ptr + 2 * pid, 0.0)
        tl.store(partial_ptr + 2 * pid + 1, 0.0)


@triton.jit
def _apply(
    row, param_ptr, offs, mask, step, lr, eps, weight_decay, bias_correction1,
    bias_correction2_sqrt, trust_ratio,
    PARAM_DTYPE: tl.constexpr, STATE: tl.constexpr, STOCHASTIC: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    p = tl.load(param_ptr + offs, mask=mask).to(tl.float32)
    m = load_slot(row, 0, offs, mask, 0, 0, 0, STATE, ALIGNED)
    v = load_slot(row, 1, offs, mask, 0, 0, 0, STATE, ALIGNED)
    u = _direction(p, m, v, bias_correction1, bias_correction2_sqrt, eps, weight_decay)
    bits0, bits1, bits2, bits3 = 0, 0, 0, 0
    if STOCHASTIC:
        bits0, bits1, bits2, bits3 = random_words(row, step, offs)
    # the trust-ratio step
    p = p - lr * (u * trust_ratio)
    store_param(param_ptr, offs, mask, p, bits0, PARAM_DTYPE, STOCHASTIC)


@triton.jit
def _lamb_apply_kernel(
    tensors_ptr,  # int64 [n_tensors, 16]: the same tables as the moments pass
    hypers_ptr,  # fp64 [n_tensors, 8]
    blocks_ptr,  # int32 [n_programs, 2]
    sums_ptr,  # fp32 [n_tensors, 2]: Σp², Σu² of each whole tensor
    found_inf_ptr,  # fp32 scalar: nonzero means skip the whole step (HAS_FOUND_INF)
    PARAM_DTYPE: tl.constexpr,
    LR_DTYPE: tl.constexpr,
    STATE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
    TRUST_CLIP: tl.constexpr,  # LAMBC: min(ratio, 1)
    HAS_FOUND_INF: tl.constexpr,
):
    # (pass 2 reads no grad: the pointer program_tensor forms is left unused)
    tensor, row, chunk, param_ptr, _, step, numel = program_tensor(
        tensors_ptr, blocks_ptr, PARAM_DTYPE, ALIGNED)
    lr = load_lr(row, LR_DTYPE).to(tl.float32)
    hyper = hypers_ptr + tensor * 8
    eps = tl.load(hyper + 4).to(tl.float32)
    weight_decay = tl.load(hyper + 5).to(tl.float32)
    adapt = tl.load(hyper + 6)
    bias_correction1, bias_correction2_sqrt = _corrections(hyper, step)

    # trust ratio ‖p‖ / ‖u‖ of the whole tensor (1 where either is zero, or not adapted)
    w_norm = tl.sqrt_rn(tl.load(sums_ptr + 2 * tensor))
    u_norm = tl.sqrt_rn(tl.load(sums_ptr + 2 * tensor + 1))
    ratio = tl.where((w_norm > 0.0) & (u_norm > 0.0),
                     tl.div_rn(w_norm, tl.where(u_norm > 0.0, u_norm, 1.0)), 1.0)
    if TRUST_CLIP:
        ratio = tl.minimum(ratio, 1.0)
    trust_ratio = tl.where(adapt != 0.0, ratio, 1.0)

    proceed = True
    if HAS_FOUND_INF:  # inf/nan in the scaled grads: leave the params untouched
        proceed = tl.load(found_inf_ptr) == 0.0
    if proceed:
        start, offs = flat_offsets(chunk, BLOCK, ALIGNED)
        if start + BLOCK <= numel:  # a whole chunk: unmasked, vectorized access
            _apply(row, param_ptr, offs, None, step, lr, eps, weight_decay, bias_correction1,
                   bias_correction2_sqrt, trust_ratio, PARAM_DTYPE, STATE, STOCHASTIC, ALIGNED)
        else:
            _apply(row, param_ptr, offs, offs < numel, step, lr, eps, weight_decay,
                   bias_correction1, bias_correction2_sqrt, trust_ratio, PARAM_DTYPE, STATE,
                   STOCHASTIC, ALIGNED)


def launch_moments(tables: Tables, dtype: torch.dtype, *, state_format, stochastic: bool,
                   grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
                   grad_mul: torch.Tensor | None, grad_div: torch.Tensor | None
                   ) -> torch.Tensor:
    """Pass 1 over the tensors ``tables`` describe (steps already incremented): m, v updated in
    place; returns the per-program [Σp², Σu²], [n_programs, 2]."""
    device = tables.tensors.device
    partial = torch.empty(tables.n_programs, 2, dtype=torch.float32, device=device)
    if tables.n_programs == 0:
        return partial
    dummy = tables.tensors
    _lamb_moments_kernel[(tables.n_programs,)](
        tables.tensors, tables.hypers, tables.blocks, partial,
        grad_scale if grad_scale is not None else dummy,
        found_inf if found_inf is not None else dummy,
        grad_mul if grad_mul is not None else dummy,
        grad_div if grad_div is not None else dummy,
        PARAM_DTYPE=TL_DTYPES[dtype],
        STATE=_STATE[state_format],
        STOCHASTIC=stochastic,
        BLOCK=BLOCK,
        ALIGNED=tables.aligned,
        HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        HAS_GRAD_MUL=grad_mul is not None,
        HAS_GRAD_DIV=grad_div is not None,
        num_warps=NUM_WARPS,
    )
    count_launch()
    return partial


def launch_apply(tables: Tables, dtype: torch.dtype, sums: torch.Tensor, *,
                 lr_dtype: torch.dtype, state_format, stochastic: bool, trust_clip: bool,
                 found_inf: torch.Tensor | None) -> None:
    """Pass 2: p ← p − lr · r · u, with the per-tensor sums [n_tensors, 2] of pass 1."""
    if tables.n_programs == 0:
        return
    _lamb_apply_kernel[(tables.n_programs,)](
        tables.tensors, tables.hypers, tables.blocks, sums,
        found_inf if found_inf is not None else tables.tensors,
        PARAM_DTYPE=TL_DTYPES[dtype],
        LR_DTYPE=tl.float64 if lr_dtype == torch.float64 else tl.float32,
        STATE=_STATE[state_format],
        STOCHASTIC=stochastic,
        BLOCK=BLOCK,
        ALIGNED=tables.aligned,
        TRUST_CLIP=trust_clip,
        HAS_FOUND_INF=found_inf is not None,
        num_warps=NUM_WARPS,
    )
    count_launch()
