"""The SGD / LARS kernel and its launcher: one launch per bucket (see :mod:`fused.kernels.common`
for the tables, the state formats and the rounding helpers).

One kernel serves both: LARS is SGD whose grad is first multiplied by a per-tensor trust ratio
(``TRUST``), formed in the kernel from the per-tensor sums of p² and g² that the engine's norm
pass wrote (:func:`fused.kernels.common.param_grad_squares` → ``segment_sums``, all-reduced
over FSDP2 shards): two passes, nothing read on the host.

Hyperparameter row (fp64, formed in double on the host): momentum, 1 − dampening,
weight_decay, and for LARS trust_coeff, eps, adapt (1.0 where the group's weight_decay ≠ 0 or
``always_adapt``). State slot: 0 ``momentum_buffer`` (signed 8-bit map), only with momentum.

Bytes per param in fp32 (p, g read; buffer read + written; p written): 20 with momentum, 12
without; LARS adds its norm pass (p, g read: 8): 28 / 20.
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
    TL_DTYPES,
    Tables,
    count_launch,
    flat_offsets,
    load_lr,
    load_slot,
    program_tensor,
    qmap,
    quant_tile,
    random_words,
    store_param,
    store_slot,
)


@triton.jit
def _sgd_update(
    row, param_ptr, grad_ptr, offs, mask,  # mask is None for a whole flat chunk (vector access)
    q, exists, qmap_signed,  # 8-bit tiles: block indices, code map
    step, lr, momentum, dampening_complement, weight_decay, trust_ratio, grad_mul,
    grad_scale_ptr,
    PARAM_DTYPE: tl.constexpr, STATE: tl.constexpr, STOCHASTIC: tl.constexpr,
    MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr, TRUST: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    HAS_GRAD_MUL: tl.constexpr, ALIGNED: tl.constexpr,
):
    # all math in fp32, whatever the param and state dtypes
    p = tl.load(param_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
    if HAS_GRAD_SCALE:  # unscale: divide like GradScaler's own unscale (the scale is a power of 2)
        g = g / tl.load(grad_scale_ptr)
    if HAS_GRAD_MUL:  # pending global-norm clip coefficient
        g = g * grad_mul
    if MAXIMIZE:
        g = -g
    # L2 weight decay (skipped, as torch does, for a group with weight_decay 0)
    if WEIGHT_DECAY:
        g = tl.where(weight_decay != 0.0, g + weight_decay * p, g)
    # LARS: the tensor's trust ratio
    if TRUST:
        g = g * trust_ratio
    # random bits for stochastic rounding: word 0 the param, 1 the buffer
    bits0, bits1, bits2, bits3 = 0, 0, 0, 0
    if STOCHASTIC:
        bits0, bits1, bits2, bits3 = random_words(row, step, offs)
    # momentum: the buffer starts as a copy of the grad (torch's clone(grad) on its first step)
    if MOMENTUM:
        buf = load_slot(row, 0, offs, mask, q, exists, qmap_signed, STATE, ALIGNED)
        buf = tl.where(step == 1.0, g, buf * momentum + dampening_complement * g)
        store_slot(row, 0, offs, mask, q, exists, qmap_signed, buf, bits1, STATE, STOCHASTIC,
                   ALIGNED)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    p = p - lr * g
    store_param(param_ptr, offs, mask, p, bits0, PARAM_DTYPE, STOCHASTIC)


@triton.jit
def _sgd_kernel(
    tensors_ptr,  # int64 [n_tensors, 16]: addresses, numel, row length, param id, seed, ...
    hypers_ptr,  # fp64 [n_tensors, 8]: momentum, 1 - dampening, weight_decay, trust_coeff, eps,
    #              adapt
    blocks_ptr,  # int32 [n_programs, 2]: tensor index, chunk index within that tensor
    sums_ptr,  # fp32 [n_tensors, 2]: Σp², Σg² of each whole tensor (TRUST)
    grad_scale_ptr,  # fp32 scalar: grads are divided by it (HAS_GRAD_SCALE)
    found_inf_ptr,  # fp32 scalar: nonzero means skip the whole step (HAS_FOUND_INF)
    grad_mul_ptr,  # fp32 scalar: grads are multiplied by it, e.g. a clip coefficient (HAS_GRAD_MUL)
    qmap_signed,  # fp32 [256]: the 8-bit code map of momentum_buffer
    PARAM_DTYPE: tl.constexpr,
    LR_DTYPE: tl.constexpr,  # fp32, or fp64 for a group holding fp64 params
    STATE: tl.constexpr,  # 0 fp32, 1 bf16, 2 8-bit blockwise
    STOCHASTIC: tl.constexpr,  # stochastic rounding of every store narrower than fp32
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,  # every address is 16-byte aligned: allow vector loads
    MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,  # some tensor's group has weight_decay != 0
    TRUST: tl.constexpr,  # LARS
    TRUST_CLIP: tl.constexpr,  # LARC: min(ratio / lr, 1)
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_GRAD_MUL: tl.constexpr,
):
    tensor, row, chunk, param_ptr, grad_ptr, step, numel = program_tensor(
        tensors_ptr, blocks_ptr, PARAM_DTYPE, ALIGNED)
    lr = load_lr(row, LR_DTYPE).to(tl.float32)

    hyper = hypers_ptr + tensor * 8
    momentum = tl.load(hyper + 0).to(tl.float32)
    dampening_complement = tl.load(hyper + 1).to(tl.float32)
    weight_decay = tl.load(hyper + 2).to(tl.float32)
    grad_mul = 1.0
    if HAS_GRAD_MUL:
        grad_mul = tl.load(grad_mul_ptr)

    # LARS trust ratio from the whole tensor's norms (of the unscaled, clipped grad), in fp32
    # like timm's 0-dim tensor math; 1 for tensors that are not adapted
    trust_ratio = 1.0
    if TRUST:
        trust_coeff = tl.load(hyper + 3).to(tl.float32)
        eps = tl.load(hyper + 4).to(tl.float32)
        adapt = tl.load(hyper + 5)
        w_norm = tl.sqrt_rn(tl.load(sums_ptr + 2 * tensor))
        g_norm = tl.sqrt_rn(tl.load(sums_ptr + 2 * tensor + 1))
        if HAS_GRAD_SCALE:
            g_norm = g_norm / tl.load(grad_scale_ptr)
        if HAS_GRAD_MUL:
            g_norm = g_norm * grad_mul
        denominator = g_norm + w_norm * weight_decay + eps
        ratio = tl.div_rn(trust_coeff * w_norm, tl.where(denominator > 0.0, denominator, 1.0))
        ratio = tl.where((w_norm > 0.0) & (g_norm > 0.0), ratio, 1.0)
        if TRUST_CLIP:
            ratio = tl.minimum(tl.div_rn(ratio, lr), 1.0)
        trust_ratio = tl.where(adapt != 0.0, ratio, 1.0)

    proceed = True
    if HAS_FOUND_INF:  # inf/nan in the scaled grads: leave params and state untouched
        proceed = tl.load(found_inf_ptr) == 0.0
    if proceed:
        if STATE == 2:  # 8-bit: a tile of whole quantization blocks
            q, offs, mask, exists = quant_tile(row, chunk, numel, BLOCK // 256, 256)
            _sgd_update(row, param_ptr, grad_ptr, offs, mask, q, exists, qmap_signed, step, lr,
                        momentum, dampening_complement, weight_decay, trust_ratio, grad_mul,
                        grad_scale_ptr, PARAM_DTYPE, STATE, STOCHASTIC, MOMENTUM, NESTEROV,
                        MAXIMIZE, WEIGHT_DECAY, TRUST, HAS_GRAD_SCALE, HAS_GRAD_MUL, False)
        else:
            start, offs = flat_offsets(chunk, BLOCK, ALIGNED)
            if start + BLOCK <= numel:  # a whole chunk: unmasked, vectorized access
                _sgd_update(row, param_ptr, grad_ptr, offs, None, 0, 0, qmap_signed, step, lr,
                            momentum, dampening_complement, weight_decay, trust_ratio, grad_mul,
                            grad_scale_ptr, PARAM_DTYPE, STATE, STOCHASTIC, MOMENTUM, NESTEROV,
                            MAXIMIZE, WEIGHT_DECAY, TRUST, HAS_GRAD_SCALE, HAS_GRAD_MUL,
                            ALIGNED)
            else:
                _sgd_update(row, param_ptr, grad_ptr, offs, offs < numel, 0, 0, qmap_signed,
                            step, lr, momentum, dampening_complement, weight_decay, trust_ratio,
                            grad_mul, grad_scale_ptr, PARAM_DTYPE, STATE, STOCHASTIC, MOMENTUM,
                            NESTEROV, MAXIMIZE, WEIGHT_DECAY, TRUST, HAS_GRAD_SCALE,
                            HAS_GRAD_MUL, ALIGNED)


def launch(tables: Tables, dtype: torch.dtype, *, lr_dtype: torch.dtype, state_format,
           stochastic: bool, momentum: bool, nesterov: bool, maximize: bool,
           weight_decay: bool, sums: torch.Tensor | None = None, trust_clip: bool = False,
           grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
           grad_mul: torch.Tensor | None) -> None:
    """One kernel launch over the tensors ``tables`` describe (steps already incremented).
    ``sums``: LARS's per-tensor [Σp², Σg²] of the raw (still scaled) grads, [n_tensors, 2]."""
    if tables.n_programs == 0:
        return
    device = tables.tensors.device
    dummy = tables.tensors
    _sgd_kernel[(tables.n_programs,)](
        tables.tensors, tables.hypers, tables.blocks,
        sums if sums is not None else dummy,
        grad_scale if grad_scale is not None else dummy,
        found_inf if found_inf is not None else dummy,
        grad_mul if grad_mul is not None else dummy,
        qmap(device, True),
        PARAM_DTYPE=TL_DTYPES[dtype],
        LR_DTYPE=tl.float64 if lr_dtype == torch.float64 else tl.float32,
        STATE=FORMATS.get(state_format, FP32),
        STOCHASTIC=stochastic,
        BLOCK=BLOCK,
        ALIGNED=tables.aligned,
        MOMENTUM=momentum,
        NESTEROV=nesterov,
        MAXIMIZE=maximize,
        WEIGHT_DECAY=weight_decay,
        TRUST=sums is not None,
        TRUST_CLIP=trust_clip,
        HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        HAS_GRAD_MUL=grad_mul is not None,
        num_warps=NUM_WARPS,
    )
    count_launch()
