"""The Triton AdamW kernel and its multi-tensor launcher.

One launch updates every tensor of a (device, dtype, amsgrad, maximize) bucket, whatever param
group it belongs to. The kernel learns where the tensors are from three small device tables:

- ``tensors`` (int64, one row per tensor): the addresses of param, grad, exp_avg, exp_avg_sq,
  max_exp_avg_sq, the step count and the group's LR tensor, and the element count;
- ``hypers`` (fp64, one row per tensor): β1, β2, 1 − β1, 1 − β2, eps, weight_decay of its group,
  every derived coefficient formed in double on the host (never from an fp32 β);
- ``blocks`` (int32, one row per program): which tensor and which BLOCK-sized chunk of it.

The LR and the step count are *loaded* from device memory, so a scheduler that ``fill_``s the LR
tensor changes the next step without a host sync, a recompile or a CUDA-graph re-capture. The
tables depend only on addresses and hyperparameters: they are cached keyed by both, rebuilt (one
host→device copy, outside any graph capture) only when something changed, and kept alive so a
captured graph that read an older table stays valid.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict

import torch
import triton
import triton.language as tl

BLOCK = 4096  # elements per program: 16 per thread at 8 warps, i.e. four 16-byte loads per tensor
NUM_WARPS = 8
_TENSOR_COLS = 8  # param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, numel
_HYPER_COLS = 8  # beta1, beta2, 1 - beta1, 1 - beta2, eps, weight_decay, (2 unused)
_CACHE_SIZE = 8  # tables kept per optimizer: older graphs may still read one

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
SUPPORTED_DTYPES = tuple(_TL_DTYPES)

# Launch counter, for tests that check a step is a handful of launches and not one per tensor.
launches = 0


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _pow_int(base, exponent):
    """``base ** exponent`` for an fp64 base and a whole-number exponent < 2**32, by squaring in
    fp64: the bias corrections 1 − βᵗ come out as torch forms them in double (no fp32 exp/log,
    no cancellation for small t)."""
    n = exponent.to(tl.int64)
    result = base * 0.0 + 1.0
    for _ in tl.static_range(32):
        result = tl.where((n & 1) != 0, result * base, result)
        base = base * base
        n = n >> 1
    return result


@triton.jit
def _program_chunk(tensors_ptr, blocks_ptr):
    """This program's tensor index, its row in the tensor table and its chunk index (int64)."""
    pid = tl.program_id(0)
    tensor = tl.load(blocks_ptr + 2 * pid).to(tl.int64)
    chunk = tl.load(blocks_ptr + 2 * pid + 1).to(tl.int64)
    return tensor, tensors_ptr + tensor * 8, chunk


@triton.jit
def _adamw_chunk(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr,
    offs, mask,  # mask is None for a chunk wholly inside its tensor (unmasked, vectorized access)
    decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt,
    grad_mul, grad_scale_ptr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_GRAD_MUL: tl.constexpr,
):
    # all math in fp32, whatever the param dtype
    p = tl.load(param_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(exp_avg_ptr + offs, mask=mask)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask)
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
    if AMSGRAD:
        v_max = tl.maximum(tl.load(max_exp_avg_sq_ptr + offs, mask=mask), v)
        tl.store(max_exp_avg_sq_ptr + offs, v_max, mask=mask)
        denom = tl.sqrt(v_max) / bias_correction2_sqrt + eps
    else:
        denom = tl.sqrt(v) / bias_correction2_sqrt + eps
    # bias-corrected step
    p = p - step_size * (m / denom)
    tl.store(param_ptr + offs, p.to(param_ptr.dtype.element_ty), mask=mask)
    tl.store(exp_avg_ptr + offs, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v, mask=mask)


@triton.jit
def _adamw_kernel(
    tensors_ptr,  # int64 [n_tensors, 8]: param, grad, m, v, v_max, step, lr addresses; numel
    hypers_ptr,  # fp64 [n_tensors, 8]: beta1, beta2, 1 - beta1, 1 - beta2, eps, weight_decay
    blocks_ptr,  # int32 [n_programs, 2]: tensor index, chunk index within that tensor
    grad_scale_ptr,  # fp32 scalar: grads are divided by it (HAS_GRAD_SCALE)
    found_inf_ptr,  # fp32 scalar: nonzero means skip the whole step (HAS_FOUND_INF)
    grad_mul_ptr,  # fp32 scalar: grads are multiplied by it, e.g. a clip coefficient (HAS_GRAD_MUL)
    PARAM_DTYPE: tl.constexpr,
    LR_DTYPE: tl.constexpr,  # fp32, or fp64 for a group holding fp64 params
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,  # every address is 16-byte aligned: allow vector loads
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_GRAD_MUL: tl.constexpr,
):
    tensor, row, chunk = _program_chunk(tensors_ptr, blocks_ptr)
    param_ptr = tl.load(row + 0).to(tl.pointer_type(PARAM_DTYPE))
    grad_ptr = tl.load(row + 1).to(tl.pointer_type(PARAM_DTYPE))
    exp_avg_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    exp_avg_sq_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    max_exp_avg_sq_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    step_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    lr_ptr = tl.load(row + 6).to(tl.pointer_type(LR_DTYPE))
    numel = tl.load(row + 7)
    if ALIGNED:
        param_ptr = tl.multiple_of(param_ptr, 16)
        grad_ptr = tl.multiple_of(grad_ptr, 16)
        exp_avg_ptr = tl.multiple_of(exp_avg_ptr, 16)
        exp_avg_sq_ptr = tl.multiple_of(exp_avg_sq_ptr, 16)
        max_exp_avg_sq_ptr = tl.multiple_of(max_exp_avg_sq_ptr, 16)

    hyper = hypers_ptr + tensor * 8
    beta1 = tl.load(hyper + 0)  # fp64
    beta2 = tl.load(hyper + 1)
    one_minus_beta1 = tl.load(hyper + 2).to(tl.float32)
    one_minus_beta2 = tl.load(hyper + 3).to(tl.float32)
    eps = tl.load(hyper + 4).to(tl.float32)
    weight_decay = tl.load(hyper + 5)

    # the LR and the step count come from device memory: no host value is baked in. The scalar
    # coefficients are formed in fp64 and rounded once, as torch forms them from Python floats.
    lr = tl.load(lr_ptr).to(tl.float64)
    step = tl.load(step_ptr)
    decay = (1.0 - lr * weight_decay).to(tl.float32)
    step_size = (lr / (1.0 - _pow_int(beta1, step))).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt(1.0 - _pow_int(beta2, step)).to(tl.float32)
    grad_mul = 1.0
    if HAS_GRAD_MUL:
        grad_mul = tl.load(grad_mul_ptr)

    proceed = True
    if HAS_FOUND_INF:  # inf/nan in the scaled grads: leave params and state untouched
        proceed = tl.load(found_inf_ptr) == 0.0
    if proceed:
        # int64 offsets: a tensor may hold more than 2**31 elements
        start = chunk * BLOCK
        offs = start + tl.arange(0, BLOCK)
        if ALIGNED:
            offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
        if start + BLOCK <= numel:
            _adamw_chunk(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr,
                         offs, None, decay, one_minus_beta1, beta2.to(tl.float32),
                         one_minus_beta2, eps, step_size, bias_correction2_sqrt, grad_mul,
                         grad_scale_ptr,
                         AMSGRAD, MAXIMIZE, WEIGHT_DECAY, HAS_GRAD_SCALE, HAS_GRAD_MUL)
        else:
            _adamw_chunk(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr,
                         offs, offs < numel, decay, one_minus_beta1, beta2.to(tl.float32),
                         one_minus_beta2, eps, step_size, bias_correction2_sqrt, grad_mul,
                         grad_scale_ptr,
                         AMSGRAD, MAXIMIZE, WEIGHT_DECAY, HAS_GRAD_SCALE, HAS_GRAD_MUL)


NORM_L1, NORM_L2, NORM_INF, NORM_P = 1, 2, 3, 0


@triton.jit
def _grad_norm_kernel(
    tensors_ptr,  # the AdamW kernel's tensor table: grad address in column 1, numel in column 7
    blocks_ptr,  # int32 [n_programs, 2]: tensor index, chunk index (the same block map)
    partial_ptr,  # fp32 [n_programs]: this program's Σ|g|^p (or max |g| for the inf-norm)
    norm_type,  # p, for NORM == NORM_P
    GRAD_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    NORM: tl.constexpr,
):
    pid = tl.program_id(0)
    _, row, chunk = _program_chunk(tensors_ptr, blocks_ptr)
    grad_ptr = tl.load(row + 1).to(tl.pointer_type(GRAD_DTYPE))
    numel = tl.load(row + 7)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)  # int64, as in the step kernel
    a = tl.abs(tl.load(grad_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32))
    if NORM == 3:
        # max drops NaN: count them so a NaN grad gives a NaN norm, as torch's does
        nans = tl.sum((a != a).to(tl.int32), axis=0)
        result = tl.where(nans > 0, float("nan"), tl.max(a, axis=0))
    elif NORM == 2:
        result = tl.sum(a * a, axis=0)
    elif NORM == 1:
        result = tl.sum(a, axis=0)
    else:
        a_pos = tl.where(a > 0, a, 1.0)  # log2(0) is -inf: keep it out of the arithmetic
        result = tl.sum(tl.where(a > 0, tl.exp2(norm_type * tl.log2(a_pos)), 0.0), axis=0)
    tl.store(partial_ptr + pid, result)


class TableCache:
    """The kernel's device tables, keyed by the tensors' addresses and the hyperparameters.

    Holds the last few tables: a CUDA graph captured with an older table keeps reading it, so a
    table is never freed while it may be the one a graph replays.
    """

    def __init__(self, size: int = _CACHE_SIZE):
        self.size = size
        self._tables: OrderedDict[tuple, tuple] = OrderedDict()

    def get(self, key: tuple, build):
        tables = self._tables.get(key)
        if tables is not None:
            self._tables.move_to_end(key)
            return tables
        tables = build()
        self._tables[key] = tables
        if len(self._tables) > self.size:
            self._tables.popitem(last=False)
        return tables


def _build_tables(rows: list[tuple[int, ...]], hypers: list[tuple[float, ...]],
                  device: torch.device):
    tensors = torch.tensor(rows, dtype=torch.int64).reshape(-1, _TENSOR_COLS)
    hyper = torch.tensor(hypers, dtype=torch.float64).reshape(-1, _HYPER_COLS)
    counts = (tensors[:, 7] + BLOCK - 1) // BLOCK
    tensor_index = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int64), counts)
    first_block = torch.cumsum(counts, 0) - counts
    chunk_index = torch.arange(len(tensor_index), dtype=torch.int64) - first_block[tensor_index]
    blocks = torch.stack([tensor_index, chunk_index], dim=1).to(torch.int32)
    if device.type == "cuda":
        # pinned + non_blocking: the copy is asynchronous and does not sync with the host
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in (tensors, hyper, blocks))
    return tensors, hyper, blocks


def tensor_rows(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lrs):
    """One table row per tensor: the addresses the kernel loads through, and the element count."""
    if max_exp_avg_sqs is None:
        max_exp_avg_sqs = exp_avg_sqs  # never read: AMSGRAD is off
    return [
        (p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), vm.data_ptr(), s.data_ptr(),
         lr.data_ptr(), p.numel())
        for p, g, m, v, vm, s, lr in zip(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                         steps, lrs)
    ]


def tables_for(rows: list[tuple[int, ...]], hyperparameters: list[tuple[float, ...]],
               device: torch.device, cache: TableCache, keep_alive=None) -> tuple:
    """The kernel's device tables for these rows (from ``cache`` when seen before).

    ``hyperparameters[i]`` is ``(beta1, beta2, eps, weight_decay)`` of tensor i's group.
    ``keep_alive`` (e.g. the step-count buffer the rows point into) lives as long as the tables,
    so a graph captured with them never writes freed memory.
    """
    key = (device, tuple(rows), tuple(hyperparameters))

    def build():
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "FusedAdamW: new tensor addresses during CUDA graph capture (the tables that "
                "describe them cannot be uploaded inside a capture). Run an eager step with the "
                "same tensors before capturing, and keep the grads allocated across the capture: "
                "opt.zero_grad(set_to_none=False) inside the captured region, not set_to_none")
        hypers = [(b1, b2, 1.0 - b1, 1.0 - b2, eps, wd, 0.0, 0.0)  # in double, rounded once
                  for b1, b2, eps, wd in hyperparameters]
        aligned = all(addr % 16 == 0 for row in rows for addr in row[:5])
        weight_decay = any(h[3] != 0.0 for h in hyperparameters)
        return (*_build_tables(rows, hypers, device), aligned, weight_decay, keep_alive)

    return cache.get(key, build)


def launch(tables: tuple, dtype: torch.dtype, *, amsgrad: bool, maximize: bool,
           grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
           grad_mul: torch.Tensor | None, lr_dtype: torch.dtype = torch.float32) -> None:
    """One kernel launch over the tensors ``tables`` describe (steps already incremented)."""
    global launches
    tensors, hypers, blocks, aligned, weight_decay, _ = tables
    n_programs = blocks.shape[0]
    if n_programs == 0:
        return
    dummy = tensors
    _adamw_kernel[(n_programs,)](
        tensors, hypers, blocks,
        grad_scale if grad_scale is not None else dummy,
        found_inf if found_inf is not None else dummy,
        grad_mul if grad_mul is not None else dummy,
        PARAM_DTYPE=_TL_DTYPES[dtype],
        LR_DTYPE=tl.float64 if lr_dtype == torch.float64 else tl.float32,
        BLOCK=BLOCK,
        ALIGNED=aligned,
        AMSGRAD=amsgrad,
        MAXIMIZE=maximize,
        WEIGHT_DECAY=weight_decay,
        HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        HAS_GRAD_MUL=grad_mul is not None,
        num_warps=NUM_WARPS,
    )
    launches += 1


def grad_norm_partials(tables: tuple, dtype: torch.dtype, norm_type: float) -> torch.Tensor:
    """One launch over the grads ``tables`` describe: per-program Σ|g|^p (max |g| for inf)."""
    global launches
    tensors, _, blocks, _, _, _ = tables
    n_programs = blocks.shape[0]
    partial = torch.empty(n_programs, dtype=torch.float32, device=tensors.device)
    if n_programs == 0:
        return partial
    kind = {1.0: NORM_L1, 2.0: NORM_L2, math.inf: NORM_INF}.get(float(norm_type), NORM_P)
    _grad_norm_kernel[(n_programs,)](tensors, blocks, partial, float(norm_type),
                                     GRAD_DTYPE=_TL_DTYPES[dtype], BLOCK=BLOCK, NORM=kind,
                                     num_warps=NUM_WARPS)
    launches += 1
    return partial
