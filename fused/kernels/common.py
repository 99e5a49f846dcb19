"""What every fused optimizer kernel shares: the tables that describe the tensors, the block map,
the table cache, the engine's norm kernels, and the ``@triton.jit`` helpers an algorithm's kernel
calls to find its chunk, load and store its state in any format, and round its params.

One launch updates every tensor of a bucket (same device, dtype, state format and flags), whatever
param group it belongs to. The kernel learns where the tensors are from three device tables:

- ``tensors`` (int64, one row of ``COLS`` per tensor): the addresses of param, grad, up to three
  state slots and their 8-bit scales, the step count and the group's LR tensor; the element
  count, the row length of 8-bit blocks, a stable param id and the optimizer's seed (which key
  the stochastic-rounding bits), and the tensor's first program and program count (which the
  per-tensor reductions use);
- ``hypers`` (fp64, ``HYPER_COLS`` per tensor): the algorithm's hyperparameters of the tensor's
  group, every derived coefficient formed in double on the host;
- ``blocks`` (int32, one row per program): which tensor and which chunk of it.

The LR and the step count are *loaded* from device memory, so a scheduler that ``fill_``s the LR
tensor changes the next step without a host sync, a recompile or a CUDA-graph re-capture. The
tables depend only on addresses and hyperparameters: they are cached keyed by both, rebuilt (one
host→device copy, outside any graph capture) only when something changed, and kept alive so a
captured graph that read an older table stays valid.

A chunk is ``BLOCK`` consecutive elements (fp32 / bf16 state), or, for 8-bit state,
``QB_PER_PROGRAM`` quantization blocks of up to ``QBLOCK`` elements of one row each (a
``[QB_PER_PROGRAM, QBLOCK]`` tile): blocks never straddle a row, so the scales shard with the
param (see :mod:`fused.formats`).
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..formats import QBLOCK, code_map_tensor, row_length

BLOCK = 4096  # elements per program: 16 per thread at 8 warps, four 16-byte loads per tensor
NUM_WARPS = 8
QB_PER_PROGRAM = BLOCK // QBLOCK  # 8-bit state: quantization blocks per program
CACHE_SIZE = 8  # tables kept per optimizer: older graphs may still read one

# the tensors table's columns
COLS = 16
(PARAM, GRAD, SLOT, _SLOT1, _SLOT2, SCALE, _SCALE1, _SCALE2, STEP, LR, NUMEL, ROW, PARAM_ID,
 FIRST_PROGRAM, PROGRAMS, SEED) = range(COLS)
HYPER_COLS = 8

# state formats (a constexpr of every algorithm kernel)
FP32, BF16, U8 = 0, 1, 2
FORMATS = {torch.float32: FP32, torch.bfloat16: BF16, torch.uint8: U8}

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
SUPPORTED_DTYPES = tuple(TL_DTYPES)

# Launch counter, for tests that check a step is a handful of launches and not one per tensor.
launches = 0


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def count_launch() -> None:
    global launches
    launches += 1


# ====================================================================== jit helpers
@triton.jit
def program_chunk(tensors_ptr, blocks_ptr):
    """This program's tensor index, its row in the tensors table and its chunk index (int64)."""
    pid = tl.program_id(0)
    tensor = tl.load(blocks_ptr + 2 * pid).to(tl.int64)
    chunk = tl.load(blocks_ptr + 2 * pid + 1).to(tl.int64)
    return tensor, tensors_ptr + tensor * 16, chunk


@triton.jit
def program_tensor(tensors_ptr, blocks_ptr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """What every update kernel starts with: this program's tensor index, table row and chunk;
    the tensor's param and grad pointers (16-byte aligned when ALIGNED, so whole chunks load as
    vectors), its step count (the device count, after this step's increment) and element
    count."""
    tensor, row, chunk = program_chunk(tensors_ptr, blocks_ptr)
    param_ptr = tl.load(row + 0).to(tl.pointer_type(DTYPE))
    grad_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        param_ptr = tl.multiple_of(param_ptr, 16)
        grad_ptr = tl.multiple_of(grad_ptr, 16)
    step = tl.load(tl.load(row + 8).to(tl.pointer_type(tl.float32)))
    numel = tl.load(row + 10)
    return tensor, row, chunk, param_ptr, grad_ptr, step, numel


@triton.jit
def load_lr(row, LR_DTYPE: tl.constexpr):
    """The group's LR, loaded from its tensor (fp32; fp64 for a group holding fp64 params)."""
    return tl.load(tl.load(row + 9).to(tl.pointer_type(LR_DTYPE)))


@triton.jit
def chunk_offsets(row, chunk, numel, BLOCK: tl.constexpr, QUANT_TILES: tl.constexpr):
    """A chunk's offsets and mask as the step walks it: flat, or an 8-bit tile."""
    if QUANT_TILES:
        _, offs, mask, _ = quant_tile(row, chunk, numel, BLOCK // 256, 256)
    else:
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
    return offs, mask


@triton.jit
def flat_offsets(chunk, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """A flat chunk: its first element and its offsets (int64: a tensor may hold more than
    2**31 elements)."""
    start = chunk * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if ALIGNED:
        offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
    return start, offs


@triton.jit
def quant_tile(row, chunk, numel, QB: tl.constexpr, QBLOCK: tl.constexpr):
    """An 8-bit chunk: ``QB`` quantization blocks, each up to ``QBLOCK`` elements of one row.
    Returns the blocks' flat indices (``q``, which index the scales), the element offsets
    ``[QB, QBLOCK]``, their mask and which blocks exist."""
    c = tl.load(row + 11)  # row length
    blocks_per_row = (c + QBLOCK - 1) // QBLOCK
    total = ((numel + c - 1) // c) * blocks_per_row
    q = chunk * QB + tl.arange(0, QB)
    r = q // blocks_per_row
    j = q - r * blocks_per_row
    lane = tl.arange(0, QBLOCK)
    offs = (r * c + j * QBLOCK)[:, None] + lane[None, :]
    exists = q < total
    mask = (lane[None, :] < (c - j * QBLOCK)[:, None]) & exists[:, None] & (offs < numel)
    return q, offs, mask, exists


@triton.jit
def pow_int(base, exponent):
    """``base ** exponent`` for an fp64 base and a whole-number exponent, by squaring in fp64
    (log2(t) iterations): bias corrections 1 − βᵗ come out as torch forms them in double (no
    fp32 exp/log, no cancellation for small t)."""
    n = exponent.to(tl.int64)
    result = base * 0.0 + 1.0
    while n > 0:
        result = tl.where((n & 1) != 0, result * base, result)
        base = base * base
        n = n >> 1
    return result


@triton.jit
def random_words(row, step, offs):
    """16-bit random fields for stochastic rounding, four per element (field k rounds store k:
    0 the param, 1-3 the state slots), in the shape of ``offs`` (a flat chunk or an 8-bit
    tile, whose last dimension is even).

    Philox4x32-10 keyed by the optimizer's seed, counter (offset of the pair's first element,
    low/high word; param id; step): one call per *pair* of neighbouring elements, its four
    32-bit words split in halves, the low half for the first element, the high half for the
    second. 16 bits per store keep bf16 and normal fp16 rounding exact; one call per pair halves
    the integer work, which at 14 bytes/param would otherwise rival the memory time."""
    seed = tl.load(row + 15)
    param_id = tl.load(row + 12)
    pairs = tl.reshape(offs.to(tl.int64), offs.shape[:-1] + [offs.shape[-1] // 2, 2])
    first, _ = tl.split(pairs)
    lo = first.to(tl.uint32)
    zero = lo * 0
    w0, w1, w2, w3 = tl.philox(seed, lo, (first >> 32).to(tl.uint32),
                               zero + param_id.to(tl.uint32), zero + step.to(tl.uint32))
    return (tl.interleave(w0 & 0xFFFF, w0 >> 16), tl.interleave(w1 & 0xFFFF, w1 >> 16),
            tl.interleave(w2 & 0xFFFF, w2 >> 16), tl.interleave(w3 & 0xFFFF, w3 >> 16))


@triton.jit
def round_bf16(x, bits, STOCHASTIC: tl.constexpr):
    """fp32 → an fp32 holding a bf16 value, rounded in integer bits: to nearest even, or up
    with probability (low 16 bits) / 2**16 from a 16-bit random field (unbiased). NaN stays
    NaN."""
    u = x.to(tl.uint32, bitcast=True)
    if STOCHASTIC:
        r = bits & 0xFFFF
    else:
        r = 0x7FFF + ((u >> 16) & 1)
    y = (u + r) & 0xFFFF0000
    y = tl.where(x != x, 0x7FC00000, y)
    return y.to(tl.float32, bitcast=True)


@triton.jit
def round_fp16(x, bits, STOCHASTIC: tl.constexpr):
    """fp32 → an fp32 holding an fp16 value, in exact power-of-two arithmetic on fp16's grid at
    x (subnormals included): to nearest even, or up with probability equal to the fraction
    (exact for normal values, whose fraction has at most 13 bits), from a 16-bit random field.
    Past fp16's range the store gives inf."""
    u = x.to(tl.uint32, bitcast=True)
    e = ((u >> 23) & 0xFF).to(tl.int32) - 127
    e = tl.minimum(tl.maximum(e, -14), 15)
    scale = ((137 - e) << 23).to(tl.float32, bitcast=True)  # 2 ** (10 - e), exact
    t = tl.abs(x) * scale
    lo = tl.floor(t)
    frac = t - lo
    if STOCHASTIC:
        up = (bits & 0xFFFF).to(tl.float32) * (1.0 / 65536.0) < frac
    else:
        odd = (lo - 2.0 * tl.floor(lo * 0.5)) == 1.0
        up = (frac > 0.5) | ((frac == 0.5) & odd)
    y = tl.div_rn(lo + up.to(tl.float32), scale)
    y = tl.where(x < 0, -y, y)
    return tl.where(x == 0, x, y)


@triton.jit
def store_param(ptr, offs, mask, x, bits, DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Store fp32 ``x`` as the param's dtype, rounded in the kernel (to nearest even, or
    stochastically): a narrowing store would round on the GPU but truncate in the interpreter."""
    if DTYPE == tl.bfloat16:
        x = round_bf16(x, bits, STOCHASTIC)
    elif DTYPE == tl.float16:
        x = round_fp16(x, bits, STOCHASTIC)
    tl.store(ptr + offs, x.to(DTYPE), mask=mask)


@triton.jit
def code_below(qmap_ptr, y):
    """The largest code whose value is <= y (0 below the map): a branchless binary search over
    the 256 sorted values of the code map."""
    code = tl.zeros(y.shape, tl.int32)
    for k in tl.static_range(8):
        probe = code + (128 >> k)
        code = tl.where(tl.load(qmap_ptr + probe) <= y, probe, code)
    return code


@triton.jit
def _slot_ptr(row, SLOT: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(row + 2 + SLOT).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def load_slot(row, SLOT: tl.constexpr, offs, mask, q, exists, qmap_ptr, FORMAT: tl.constexpr,
              ALIGNED: tl.constexpr):
    """State slot ``SLOT`` (0–2) of this chunk as fp32, from fp32, bf16 or 8-bit codes."""
    if FORMAT == 2:
        codes_ptr = tl.load(row + 2 + SLOT).to(tl.pointer_type(tl.uint8))
        scale_ptr = tl.load(row + 5 + SLOT).to(tl.pointer_type(tl.float32))
        codes = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
        scale = tl.load(scale_ptr + q, mask=exists, other=0.0)
        value = tl.load(qmap_ptr + codes) * scale[:, None]
    elif FORMAT == 1:
        value = tl.load(_slot_ptr(row, SLOT, tl.bfloat16, ALIGNED) + offs, mask=mask)
        value = value.to(tl.float32)
    else:
        value = tl.load(_slot_ptr(row, SLOT, tl.float32, ALIGNED) + offs, mask=mask)
    return value


@triton.jit
def store_slot(row, SLOT: tl.constexpr, offs, mask, q, exists, qmap_ptr, x, bits,
               FORMAT: tl.constexpr, STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr):
    """Store fp32 ``x`` into state slot ``SLOT``: fp32 as is; bf16 rounded (to nearest even or
    stochastically); 8-bit: each block's absmax to the scales, x / absmax to the nearest code
    (ties up) or stochastically to one of the two codes around it. ``bits``: the slot's 16-bit
    random fields."""
    if FORMAT == 2:
        codes_ptr = tl.load(row + 2 + SLOT).to(tl.pointer_type(tl.uint8))
        scale_ptr = tl.load(row + 5 + SLOT).to(tl.pointer_type(tl.float32))
        absmax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=1)
        tl.store(scale_ptr + q, absmax, mask=exists)
        divisor = tl.where(absmax > 0, absmax, 1.0)
        y = tl.div_rn(x, divisor[:, None])
        code = code_below(qmap_ptr, y)
        above_code = tl.minimum(code + 1, 255)
        below = tl.load(qmap_ptr + code)
        above = tl.load(qmap_ptr + above_code)
        if STOCHASTIC:
            up = (bits & 0xFFFF).to(tl.float32) * (1.0 / 65536.0) * (above - below) < y - below
        else:
            up = (y - below) >= (above - below) * 0.5
        code = tl.where(up, above_code, code)
        tl.store(codes_ptr + offs, code.to(tl.uint8), mask=mask)
    elif FORMAT == 1:
        ptr = _slot_ptr(row, SLOT, tl.bfloat16, ALIGNED)
        tl.store(ptr + offs, round_bf16(x, bits, STOCHASTIC).to(tl.bfloat16), mask=mask)
    else:
        tl.store(_slot_ptr(row, SLOT, tl.float32, ALIGNED) + offs, x, mask=mask)


# ====================================================================== engine kernels
NORM_L1, NORM_L2, NORM_INF, NORM_P = 1, 2, 3, 0


@triton.jit
def _block_norm(a, norm_type, NORM: tl.constexpr):
    """Σ|a|^p over a block (max |a| for the inf-norm), ``a`` already non-negative."""
    flat = tl.reshape(a, [a.numel])
    if NORM == 3:
        # max drops NaN: count them so a NaN grad gives a NaN norm, as torch's does
        nans = tl.sum((flat != flat).to(tl.int32), axis=0)
        result = tl.where(nans > 0, float("nan"), tl.max(flat, axis=0))
    elif NORM == 2:
        result = tl.sum(flat * flat, axis=0)
    elif NORM == 1:
        result = tl.sum(flat, axis=0)
    else:
        a_pos = tl.where(flat > 0, flat, 1.0)  # log2(0) is -inf: keep it out of the arithmetic
        result = tl.sum(tl.where(flat > 0, tl.exp2(norm_type * tl.log2(a_pos)), 0.0), axis=0)
    return result


@triton.jit
def _grad_norm_kernel(
    tensors_ptr,  # the bucket's tensors table: grad address, numel (and row length if 8-bit)
    blocks_ptr,  # int32 [n_programs, 2]: tensor index, chunk index (the step's block map)
    partial_ptr,  # fp32 [n_programs]: this program's Σ|g|^p (or max |g| for the inf-norm)
    norm_type,  # p, for NORM == NORM_P
    GRAD_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    NORM: tl.constexpr,
    QUANT_TILES: tl.constexpr,  # the block map walks 8-bit tiles
):
    pid = tl.program_id(0)
    _, row, chunk = program_chunk(tensors_ptr, blocks_ptr)
    grad_ptr = tl.load(row + 1).to(tl.pointer_type(GRAD_DTYPE))
    offs, mask = chunk_offsets(row, chunk, tl.load(row + 10), BLOCK, QUANT_TILES)
    a = tl.abs(tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32))
    tl.store(partial_ptr + pid, _block_norm(a, norm_type, NORM))


@triton.jit
def _param_grad_squares_kernel(
    tensors_ptr,  # the bucket's tensors table
    blocks_ptr,  # the block map
    partial_ptr,  # fp32 [n_programs, 2]: this program's Σp², Σg²
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    QUANT_TILES: tl.constexpr,
):
    pid = tl.program_id(0)
    _, row, chunk, param_ptr, grad_ptr, _, numel = program_tensor(tensors_ptr, blocks_ptr,
                                                                   DTYPE, False)
    offs, mask = chunk_offsets(row, chunk, numel, BLOCK, QUANT_TILES)
    p = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(partial_ptr + 2 * pid, tl.sum(tl.reshape(p * p, [p.numel]), axis=0))
    tl.store(partial_ptr + 2 * pid + 1, tl.sum(tl.reshape(g * g, [g.numel]), axis=0))


@triton.jit
def _segment_sum_kernel(
    tensors_ptr,  # the bucket's tensors table: first program and program count per tensor
    partial_ptr,  # fp32 [n_programs, K]: per-program partial sums
    out_ptr,  # fp32 [n_tensors, K]: per-tensor sums
    K: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """One program per tensor sums its programs' partials in a fixed order (deterministic: no
    atomics, so replicas that compute the same partials get the same sums)."""
    tensor = tl.program_id(0).to(tl.int64)
    row = tensors_ptr + tensor * 16
    first = tl.load(row + 13)
    count = tl.load(row + 14)
    for k in tl.static_range(K):
        acc = tl.zeros([CHUNK], tl.float64)
        # a while loop, not range(0, count, CHUNK): the interpreter cannot use a loaded scalar
        # (a 1-element array there) as a range bound
        start = count * 0
        while start < count:
            idx = start + tl.arange(0, CHUNK)
            acc += tl.load(partial_ptr + (first + idx) * K + k, mask=idx < count,
                           other=0.0).to(tl.float64)
            start += CHUNK
        tl.store(out_ptr + tensor * K + k, tl.sum(acc, axis=0).to(tl.float32))


# ====================================================================== tables
class Tables(NamedTuple):
    """A bucket's device tables and what the launchers need to know about them."""
    tensors: torch.Tensor  # int64 [n_tensors, COLS]
    hypers: torch.Tensor  # fp64 [n_tensors, HYPER_COLS]
    blocks: torch.Tensor  # int32 [n_programs, 2]
    n_programs: int
    aligned: bool  # every param / grad / state address is 16-byte aligned
    quant_tiles: bool  # the block map walks 8-bit tiles
    keep_alive: object  # what the rows point into (the step-count buffer), kept as long


class TableCache:
    """The device tables, keyed by the tensors' addresses and the hyperparameters.

    Holds the last few: a CUDA graph captured with an older table keeps reading it, so a table
    is never freed while it may be the one a graph replays.
    """

    def __init__(self, size: int = CACHE_SIZE):
        self.size = size
        self._tables: OrderedDict[tuple, Tables] = OrderedDict()

    def get(self, key: tuple, build) -> Tables:
        tables = self._tables.get(key)
        if tables is not None:
            self._tables.move_to_end(key)
            return tables
        tables = build()
        self._tables[key] = tables
        if len(self._tables) > self.size:
            self._tables.popitem(last=False)
        return tables


def programs_per_tensor(numel: int, row: int, quant_tiles: bool) -> int:
    """How many programs walk a tensor: flat chunks of BLOCK, or 8-bit tiles."""
    if not quant_tiles:
        return -(-numel // BLOCK)
    n_blocks = -(-numel // row) * -(-row // QBLOCK)
    return -(-n_blocks // QB_PER_PROGRAM)


def tensor_row(param, grad, slots, scales, step, lr, *, param_id: int, seed: int) -> list[int]:
    """One row of the tensors table (the program columns are filled in by :func:`tables_for`).
    ``slots`` / ``scales``: up to three state tensors and their 8-bit scales (or None)."""
    row = [0] * COLS
    row[PARAM], row[GRAD] = param.data_ptr(), grad.data_ptr()
    for i, slot in enumerate(slots):
        row[SLOT + i] = slot.data_ptr()
    for i, scale in enumerate(scales):
        if scale is not None:
            row[SCALE + i] = scale.data_ptr()
    row[STEP], row[LR] = step.data_ptr(), lr.data_ptr()
    row[NUMEL] = param.numel()
    row[ROW] = row_length(param.shape)
    row[PARAM_ID] = param_id
    row[SEED] = seed
    return row


def tables_for(rows: list[list[int]], hypers: list[tuple[float, ...]], device: torch.device,
               cache: TableCache, *, quant_tiles: bool, keep_alive=None,
               what: str = "the optimizer") -> Tables:
    """The device tables for these rows (from ``cache`` when seen before). ``hypers[i]`` is the
    fp64 hyperparameter row of tensor i's group (formed in double on the host). ``keep_alive``
    (e.g. the step-count buffer the rows point into) lives as long as the tables, so a graph
    captured with them never writes freed memory."""
    key = (device, quant_tiles, tuple(map(tuple, rows)), tuple(hypers))

    def build() -> Tables:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"{what}: new tensor addresses during CUDA graph capture (the tables that "
                "describe them cannot be uploaded inside a capture). Run an eager step with the "
                "same tensors before capturing, and keep the grads allocated across the capture: "
                "opt.zero_grad(set_to_none=False) inside the captured region, not set_to_none")
        counts = [programs_per_tensor(r[NUMEL], r[ROW], quant_tiles) for r in rows]
        first = 0
        for r, n in zip(rows, counts):
            r[FIRST_PROGRAM], r[PROGRAMS] = first, n
            first += n
        tensors = torch.tensor(rows, dtype=torch.int64).reshape(-1, COLS)
        hyper = torch.tensor([tuple(h) + (0.0,) * (HYPER_COLS - len(h)) for h in hypers],
                             dtype=torch.float64).reshape(-1, HYPER_COLS)
        counts_t = torch.tensor(counts, dtype=torch.int64)
        tensor_index = torch.repeat_interleave(torch.arange(len(rows)), counts_t)
        first_t = torch.cumsum(counts_t, 0) - counts_t
        chunk_index = torch.arange(len(tensor_index)) - first_t[tensor_index]
        blocks = torch.stack([tensor_index, chunk_index], dim=1).to(torch.int32)
        if device.type == "cuda":
            # pinned + non_blocking: the copy is asynchronous and does not sync with the host
            tensors, hyper, blocks = (t.pin_memory().to(device, non_blocking=True)
                                      for t in (tensors, hyper, blocks))
        aligned = all(r[c] % 16 == 0 for r in rows for c in range(PARAM, SCALE))
        return Tables(tensors, hyper, blocks, first, aligned, quant_tiles, keep_alive)

    return cache.get(key, build)


_QMAPS: dict[tuple[torch.device, bool], torch.Tensor] = {}


def qmap(device: torch.device, signed: bool) -> torch.Tensor:
    """The 8-bit code map on ``device`` (made once per device)."""
    key = (device, signed)
    if key not in _QMAPS:
        _QMAPS[key] = code_map_tensor(signed, device)
    return _QMAPS[key]


# ====================================================================== engine launchers
def grad_norm_partials(tables: Tables, dtype: torch.dtype, norm_type: float) -> torch.Tensor:
    """One launch over the grads ``tables`` describe: per-program Σ|g|^p (max |g| for inf)."""
    partial = torch.empty(tables.n_programs, dtype=torch.float32, device=tables.tensors.device)
    if tables.n_programs == 0:
        return partial
    kind = {1.0: NORM_L1, 2.0: NORM_L2, math.inf: NORM_INF}.get(float(norm_type), NORM_P)
    _grad_norm_kernel[(tables.n_programs,)](
        tables.tensors, tables.blocks, partial, float(norm_type), GRAD_DTYPE=TL_DTYPES[dtype],
        BLOCK=BLOCK, NORM=kind, QUANT_TILES=tables.quant_tiles, num_warps=NUM_WARPS)
    count_launch()
    return partial


def param_grad_squares(tables: Tables, dtype: torch.dtype) -> torch.Tensor:
    """Per-program (Σp², Σg²) over the params and grads ``tables`` describe: [n_programs, 2]."""
    partial = torch.empty(tables.n_programs, 2, dtype=torch.float32,
                          device=tables.tensors.device)
    if tables.n_programs:
        _param_grad_squares_kernel[(tables.n_programs,)](
            tables.tensors, tables.blocks, partial, DTYPE=TL_DTYPES[dtype], BLOCK=BLOCK,
            QUANT_TILES=tables.quant_tiles, num_warps=NUM_WARPS)
        count_launch()
    return partial


def segment_sums(tables: Tables, partial: torch.Tensor) -> torch.Tensor:
    """Per-tensor sums [n_tensors, K] of per-program partials [n_programs, K], one launch."""
    n_tensors = tables.tensors.shape[0]
    k = partial.shape[1]
    out = torch.empty(n_tensors, k, dtype=torch.float32, device=partial.device)
    if n_tensors:
        _segment_sum_kernel[(n_tensors,)](tables.tensors, partial, out, K=k, CHUNK=1024,
                                          num_warps=4)
        count_launch()
    return out
