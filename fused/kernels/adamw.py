"""The AdamW kernel and its launcher: one launch per bucket (see :mod:`fused.kernels.common`
for the tables, the state formats and the rounding helpers).

Hyperparameter row (fp64, formed in double on the host): β1, β2, 1 − β1, 1 − β2, eps,
weight_decay. State slots: 0 ``exp_avg`` (signed 8-bit map), 1 ``exp_avg_sq``,
2 ``max_exp_avg_sq`` (unsigned).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    BLOCK,
    FORMATS,
    FP32,
    NUM_WARPS,
    QB_PER_PROGRAM,
    QBLOCK,
    TL_DTYPES,
    Tables,
    count_launch,
    flat_offsets,
    load_lr,
    load_slot,
    pow_int,
    program_tensor,
    qmap,
    quant_tile,
    random_words,
    store_param,
    store_slot,
)


@triton.jit
def _adamw_update(
    row, param_ptr, grad_ptr, offs, mask,  # mask is None for a whole flat chunk (vector access)
    q, exists, qmap_signed, qmap_unsigned,  # 8-bit tiles: block indices, code maps
    step, decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
    bias_correction2_sqrt, grad_mul, grad_scale_ptr,
    PARAM_DTYPE: tl.constexpr, STATE: tl.constexpr, STOCHASTIC: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_GRAD_MUL: tl.constexpr, ALIGNED: tl.constexpr,
):
    # all math in fp32, whatever the param and state dtypes
    p = tl.load(param_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
    m = load_slot(row, 0, offs, mask, q, exists, qmap_signed, STATE, ALIGNED)
    v = load_slot(row, 1, offs, mask, q, exists, qmap_unsigned, STATE, ALIGNED)
    if HAS_GRAD_SCALE:  # unscale: divide like GradScaler's own unscale (the scale is a power of 2)
        g = g / tl.load(grad_scale_ptr)
    if HAS_GRAD_MUL:  # pending global-norm clip coefficient
        g = g * grad_mul
    if MAXIMIZE:
        g = -g
    # decoupled weight decay
    if WEIGHT_DECAY:
        p = p * decay
    # first moment: torch's lerp(m, g, 1 − β1), same two forms
    if one_minus_beta1 < 0.5:
        m = m + one_minus_beta1 * (g - m)
    else:
        m = g - (g - m) * (1.0 - one_minus_beta1)
    # second moment
    v = v * beta2 + one_minus_beta2 * g * g
    # 16-bit random fields for stochastic rounding: 0 the param, 1-3 the slots
    bits0, bits1, bits2, bits3 = 0, 0, 0, 0
    if STOCHASTIC:
        bits0, bits1, bits2, bits3 = random_words(row, step, offs)
    if AMSGRAD:
        v_max = tl.maximum(
            load_slot(row, 2, offs, mask, q, exists, qmap_unsigned, STATE, ALIGNED), v)
        store_slot(row, 2, offs, mask, q, exists, qmap_unsigned, v_max, bits3, STATE,
                   STOCHASTIC, ALIGNED)
        denom = tl.sqrt(v_max) / bias_correction2_sqrt + eps
    else:
        denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    # bias-corrected step
    p = p - step_size * (m / denom)
    store_param(param_ptr, offs, mask, p, bits0, PARAM_DTYPE, STOCHASTIC)
    store_slot(row, 0, offs, mask, q, exists, qmap_signed, m, bits1, STATE, STOCHASTIC, ALIGNED)
    store_slot(row, 1, offs, mask, q, exists, qmap_unsigned, v, bits2, STATE, STOCHASTIC,
               ALIGNED)


@triton.jit
def _adamw_kernel(
    tensors_ptr,  # int64 [n_tensors, 16]: addresses, numel, row length, param id, seed, ...
    hypers_ptr,  # fp64 [n_tensors, 8]: beta1, beta2, 1 - beta1, 1 - beta2, eps, weight_decay
    blocks_ptr,  # int32 [n_programs, 2]: tensor index, chunk index within that tensor
    grad_scale_ptr,  # fp32 scalar: grads are divided by it (HAS_GRAD_SCALE)
    found_inf_ptr,  # fp32 scalar: nonzero means skip the whole step (HAS_FOUND_INF)
    grad_mul_ptr,  # fp32 scalar: grads are multiplied by it, e.g. a clip coefficient (HAS_GRAD_MUL)
    qmap_signed,  # fp32 [256]: the 8-bit code map of exp_avg
    qmap_unsigned,  # fp32 [256]: the 8-bit code map of exp_avg_sq / max_exp_avg_sq
    PARAM_DTYPE: tl.constexpr,
    LR_DTYPE: tl.constexpr,  # fp32, or fp64 for a group holding fp64 params
    STATE: tl.constexpr,  # 0 fp32, 1 bf16, 2 8-bit blockwise
    STOCHASTIC: tl.constexpr,  # stochastic rounding of every store narrower than fp32
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,  # every address is 16-byte aligned: allow vector loads
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_GRAD_MUL: tl.constexpr,
):
    tensor, row, chunk, param_ptr, grad_ptr, step, numel = program_tensor(
        tensors_ptr, blocks_ptr, PARAM_DTYPE, ALIGNED)
    lr = load_lr(row, LR_DTYPE).to(tl.float64)

    hyper = hypers_ptr + tensor * 8
    beta1 = tl.load(hyper + 0)  # fp64
    beta2 = tl.load(hyper + 1)
    one_minus_beta1 = tl.load(hyper + 2).to(tl.float32)
    one_minus_beta2 = tl.load(hyper + 3).to(tl.float32)
    eps = tl.load(hyper + 4).to(tl.float32)
    weight_decay = tl.load(hyper + 5)

    # the LR and the step count come from device memory: no host value is baked in. The scalar
    # coefficients are formed in fp64 and rounded once, as torch forms them from Python floats.
    decay = (1.0 - lr * weight_decay).to(tl.float32)
    step_size = (lr / (1.0 - pow_int(beta1, step))).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt(1.0 - pow_int(beta2, step)).to(tl.float32)
    grad_mul = 1.0
    if HAS_GRAD_MUL:
        grad_mul = tl.load(grad_mul_ptr)

    proceed = True
    if HAS_FOUND_INF:  # inf/nan in the scaled grads: leave params and state untouched
        proceed = tl.load(found_inf_ptr) == 0.0
    if proceed:
        if STATE == 2:  # 8-bit: a tile of whole quantization blocks
            q, offs, mask, exists = quant_tile(row, chunk, numel, BLOCK // 256, 256)
            _adamw_update(row, param_ptr, grad_ptr, offs, mask, q, exists, qmap_signed,
                          qmap_unsigned, step, decay, one_minus_beta1, beta2.to(tl.float32),
                          one_minus_beta2, eps, step_size, bias_correction2_sqrt, grad_mul,
                          grad_scale_ptr, PARAM_DTYPE, STATE, STOCHASTIC, AMSGRAD, MAXIMIZE,
                          WEIGHT_DECAY, HAS_GRAD_SCALE, HAS_GRAD_MUL, False)
        else:
            start, offs = flat_offsets(chunk, BLOCK, ALIGNED)
            if start + BLOCK <= numel:  # a whole chunk: unmasked, vectorized access
                _adamw_update(row, param_ptr, grad_ptr, offs, None, 0, 0, qmap_signed,
                              qmap_unsigned, step, decay, one_minus_beta1, beta2.to(tl.float32),
                              one_minus_beta2, eps, step_size, bias_correction2_sqrt, grad_mul,
                              grad_scale_ptr, PARAM_DTYPE, STATE, STOCHASTIC, AMSGRAD,
                              MAXIMIZE, WEIGHT_DECAY, HAS_GRAD_SCALE, HAS_GRAD_MUL, ALIGNED)
            else:
                _adamw_update(row, param_ptr, grad_ptr, offs, offs < numel, 0, 0, qmap_signed,
                              qmap_unsigned, step, decay, one_minus_beta1, beta2.to(tl.float32),
                              one_minus_beta2, eps, step_size, bias_correction2_sqrt, grad_mul,
                              grad_scale_ptr, PARAM_DTYPE, STATE, STOCHASTIC, AMSGRAD,
                              MAXIMIZE, WEIGHT_DECAY, HAS_GRAD_SCALE, HAS_GRAD_MUL, ALIGNED)


def launch(tables: Tables, dtype: torch.dtype, *, lr_dtype: torch.dtype, state_format,
           stochastic: bool, amsgrad: bool, maximize: bool, weight_decay: bool,
           grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
           grad_mul: torch.Tensor | None) -> None:
    """One kernel launch over the tensors ``tables`` describe (steps already incremented)."""
    if tables.n_programs == 0:
        return
    device = tables.tensors.device
    dummy = tables.tensors
    assert QB_PER_PROGRAM * QBLOCK == BLOCK
    _adamw_kernel[(tables.n_programs,)](
        tables.tensors, tables.hypers, tables.blocks,
        grad_scale if grad_scale is not None else dummy,
        found_inf if found_inf is not None else dummy,
        grad_mul if grad_mul is not None else dummy,
        qmap(device, True), qmap(device, False),
        PARAM_DTYPE=TL_DTYPES[dtype],
        LR_DTYPE=tl.float64 if lr_dtype == torch.float64 else tl.float32,
        STATE=FORMATS.get(state_format, FP32),
        STOCHASTIC=stochastic,
        BLOCK=BLOCK,
        ALIGNED=tables.aligned,
        AMSGRAD=amsgrad,
        MAXIMIZE=maximize,
        WEIGHT_DECAY=weight_decay,
        HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        HAS_GRAD_MUL=grad_mul is not None,
        num_warps=NUM_WARPS,
    )
    count_launch()
