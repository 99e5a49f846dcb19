"""Number formats of the optimizer state, in plain torch: rounding to bf16/fp16 (to nearest or
stochastic), the Philox random bits that drive stochastic rounding, and 8-bit blockwise
quantization with its code maps.

Written once and shared: the torch reference and the CPU path round and quantize with these, the
tests check the Triton kernels against them, and checkpoints convert state with them. The kernels
(:mod:`fused.kernels.common`) implement the same operations on the same bits, so the interpreter,
the GPU and this module agree exactly (the random bits included).

Rounding is formed in integer bits (bf16) or in exact power-of-two arithmetic (fp16), never by a
narrowing cast: a cast rounds to nearest on the GPU but truncates in the Triton interpreter.

Stochastic rounding of x between its two neighbours lo < x < hi rounds up with probability
(x − lo) / (hi − lo), so E[round(x)] = x. The bits are 16-bit fields of Philox4x32-10 words keyed
by the optimizer's seed with the counter (offset of an element pair, param id, step count): a
fresh, reproducible stream per element, param and step, computed on the device without a host
RNG (:func:`random_words`).

8-bit state: ``codes`` (uint8, the param's shape) index a 256-entry code map in [−1, 1] (signed,
for the first moment) or [0, 1] (unsigned, for the second), scaled by one fp32 absmax per block.
A block is at most 256 consecutive elements of one row, a row being everything but dim 0
(1-D tensors: rows of 256), so ``scales`` has shape (rows, blocks per row) and shards along dim 0
exactly like the param (FSDP2).
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import Tensor

QBLOCK = 256  # elements per quantization block (at most; a row's last block may be shorter)
QUANTIZE_MIN_NUMEL = 4096  # smaller tensors keep fp32 state, as in bitsandbytes and torchao

#: The values ``state_dtype`` accepts.
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.uint8)


# ------------------------------------------------------------------ Philox4x32-10
_M32 = 0xFFFFFFFF
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    product = b * a  # int64: wraps past 2**63, the high word stays right after the mask
    return (product >> 32) & _M32, product & _M32


def philox(seed: int, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor) -> tuple[Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding uint32 values (Triton's ``tl.philox``)."""
    k0 = torch.tensor(seed & _M32, dtype=torch.int64, device=c0.device)
    k1 = torch.tensor((seed >> 32) & _M32, dtype=torch.int64, device=c0.device)
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_PHILOX_ROUND[1], c2)
        hi_a, lo_a = _mulhilo(_PHILOX_ROUND[0], c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY[0]) & _M32
        k1 = (k1 + _PHILOX_KEY[1]) & _M32
    return c0, c1, c2, c3


def random_words(seed: int, param_id: int, step: Tensor, shape: tuple[int, ...],
                 device: torch.device, *, quantized: bool = False) -> tuple[Tensor, ...]:
    """The kernels' stochastic-rounding bits for a tensor of ``shape``: four int64 tensors of
    that shape holding each element's 16-bit field for store k (0 the param, 1-3 the slots),
    at ``step`` (a device tensor, never read on the host).

    One Philox call per pair of neighbouring elements in the kernel's walk (flat, or the 8-bit
    blocks of ``quantized`` tensors), counter = (offset of the pair's first element low/high
    word, param id, step); the low half of each word goes to the first element, the high half
    to the second."""
    numel = math.prod(shape)
    offsets = torch.arange(numel, dtype=torch.int64, device=device)
    if quantized:  # pairs inside each block of the 8-bit layout (padding lanes: unused)
        lanes = _blocks(offsets.reshape(shape), fill=-1)
    else:
        lanes = torch.nn.functional.pad(offsets, (0, numel % 2), value=-1).reshape(-1, 2)
    first = lanes.reshape(lanes.shape[0], -1, 2)[..., 0].clamp(min=0)
    step_word = step.to(device=device, dtype=torch.int64).reshape(()) & _M32
    words = philox(seed, first & _M32, first >> 32, torch.full_like(first, param_id & _M32),
                   step_word.expand(first.shape))
    fields = []
    for w in words:
        pair = torch.stack([w & 0xFFFF, w >> 16], dim=-1).reshape(lanes.shape)
        valid = lanes >= 0
        flat = torch.empty(numel, dtype=torch.int64, device=device)
        flat[lanes[valid]] = pair[valid]
        fields.append(flat.reshape(shape))
    return tuple(fields)


# ------------------------------------------------------------------ bf16 / fp16 rounding
def round_bf16(x: Tensor, bits: Tensor | None) -> Tensor:
    """fp32 → bf16 in integer bits: to nearest even (``bits`` None) or stochastically (the low
    16 bits of ``bits``, a random field, decide). NaN stays NaN, inf stays inf."""
    u = x.float().contiguous().view(torch.int32).to(torch.int64) & _M32
    if bits is None:
        r = 0x7FFF + ((u >> 16) & 1)
    else:
        r = bits.reshape(u.shape) & 0xFFFF
    y = ((u + r) & 0xFFFF0000).to(torch.int32).view(torch.float32)  # wraps to the sign bit
    # (a carry out of a positive max can only reach inf; the int32 view keeps the sign)
    y = torch.where(torch.isnan(x), torch.full_like(y, math.nan), y)
    return y.to(torch.bfloat16)  # exact: the low 16 bits are zero


def round_fp16(x: Tensor, bits: Tensor | None) -> Tensor:
    """fp32 → fp16 in exact power-of-two arithmetic: to nearest even (``bits`` None) or
    stochastically (the low 16 bits of ``bits`` are a uniform number in [0, 1): exact for
    normal values, whose fraction has at most 13 bits). fp16 subnormals are rounded on their
    own grid; values past fp16's range become inf."""
    x = x.float()
    u = x.contiguous().view(torch.int32).to(torch.int64) & _M32
    exponent = (((u >> 23) & 0xFF) - 127).clamp(-14, 15)  # spacing 2**(e - 10)
    scale = torch.pow(2.0, (10 - exponent).float())
    t = x.abs() * scale  # exact
    lo = torch.floor(t)
    frac = t - lo
    if bits is None:
        odd = torch.remainder(lo, 2) == 1
        up = (frac > 0.5) | ((frac == 0.5) & odd)
    else:
        uniform = (bits.reshape(u.shape) & 0xFFFF).float() * (1.0 / 65536.0)
        up = uniform < frac
    y = (lo + up.float()) / scale  # exact
    y = torch.where(x < 0, -y, y)
    y = torch.where(x == 0, x, y)  # keep the sign of zero
    return y.to(torch.float16)  # exact, or inf past the range


def round_to(x: Tensor, dtype: torch.dtype, bits: Tensor | None) -> Tensor:
    """``x`` (fp32) stored as ``dtype``: bf16/fp16 rounded as above (stochastically if ``bits``
    is given), fp32/fp64 as they are."""
    if dtype == torch.bfloat16:
        return round_bf16(x, bits)
    if dtype == torch.float16:
        return round_fp16(x, bits)
    return x.to(dtype)


# ------------------------------------------------------------------ 8-bit code maps
@cache
def code_map(signed: bool) -> tuple[float, ...]:
    """bitsandbytes' dynamic quantization map (Dettmers et al. 2022, "8-bit optimizers via
    block-wise quantization"), built as bitsandbytes and torchao build it: after the sign bit
    (signed map) a run of zeros whose length is a decimal exponent 10^-6 … 10^0, then a linear
    fraction in the bits left; plus 0 and 1. 256 sorted fp32 values; the signed map (first
    moment) spans [−0.9929, 1], the unsigned one (second moment, one more fraction bit) [0, 1]."""
    max_exponent_bits, non_sign_bits = 7, 7
    data: list[float] = []
    for i in range(max_exponent_bits):
        items = (2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                 else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        boundaries = torch.linspace(0.1, 1, items)  # fp32, as theirs
        means = ((boundaries[:-1] + boundaries[1:]) / 2.0).tolist()
        data += [10 ** (-(max_exponent_bits - 1) + i) * m for m in means]
        if signed:
            data += [-(10 ** (-(max_exponent_bits - 1) + i)) * m for m in means]
    data += [0.0, 1.0]
    assert len(data) == 256, len(data)
    return tuple(torch.tensor(sorted(data), dtype=torch.float32).tolist())


def code_map_tensor(signed: bool, device: torch.device | str = "cpu") -> Tensor:
    return torch.tensor(code_map(signed), dtype=torch.float32, device=device)


def quantizes(shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether a tensor of this (local) shape gets 8-bit state: at least 4096 elements."""
    return math.prod(shape) >= QUANTIZE_MIN_NUMEL


def row_length(shape: torch.Size | tuple[int, ...]) -> int:
    """Elements per row: everything but dim 0; 1-D (and 0-d) tensors are cut into rows of 256."""
    if len(shape) <= 1:
        return QBLOCK
    return math.prod(shape[1:])


def scales_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the per-block absmax of a tensor of this shape: (rows, blocks per row), or
    (blocks,) for a 1-D tensor."""
    numel = math.prod(shape)
    if len(shape) <= 1:
        return (-(-numel // QBLOCK),)
    c = row_length(shape)
    return (shape[0], -(-c // QBLOCK))


def _blocks(x: Tensor, fill: float = 0) -> Tensor:
    """``x`` as (blocks, QBLOCK) rows padded with ``fill``, in ``scales_shape`` order."""
    flat = x.reshape(-1)
    c = row_length(x.shape)
    n_rows = -(-flat.numel() // c)
    rows = torch.nn.functional.pad(flat, (0, n_rows * c - flat.numel()), value=fill)
    rows = rows.reshape(n_rows, c)
    nb = -(-c // QBLOCK)
    rows = torch.nn.functional.pad(rows, (0, nb * QBLOCK - c), value=fill)
    return rows.reshape(n_rows * nb, QBLOCK)


def _unblocks(blocks: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    c = row_length(shape)
    numel = math.prod(shape)
    n_rows = -(-numel // c)
    rows = blocks.reshape(n_rows, -1)[:, :c]
    return rows.reshape(-1)[:numel].reshape(shape)


def quantize(x: Tensor, signed: bool, bits: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """fp32 ``x`` → (uint8 codes of x's shape, fp32 scales of ``scales_shape``): each block is
    divided by its absmax and mapped to the nearest code (ties up), or stochastically to one of
    the two codes around it with ``bits`` (16-bit random fields as a uniform number)."""
    qmap = code_map_tensor(signed, x.device)
    blocks = _blocks(x.float())
    absmax = blocks.abs().amax(dim=1)
    normalized = blocks * torch.where(absmax > 0, 1.0 / absmax, 0.0)[:, None]
    codes = torch.zeros_like(normalized, dtype=torch.int64)
    for step in (128, 64, 32, 16, 8, 4, 2, 1):  # the largest code whose value is <= x
        probe = codes + step
        codes = torch.where(qmap[probe] <= normalized, probe, codes)
    up = (codes + 1).clamp(max=255)
    below, above = qmap[codes], qmap[up]
    if bits is None:  # to nearest, ties up (torchao's rule)
        go_up = (normalized - below) >= (above - below) * 0.5
    else:
        uniform = (_blocks(bits.reshape(x.shape).to(torch.int64)) & 0xFFFF).float() / 65536.0
        gap = above - below
        go_up = uniform * gap < (normalized - below)
    codes = torch.where(go_up & (codes < 255), up, codes)
    return (_unblocks(codes.to(torch.uint8), x.shape),
            absmax.reshape(scales_shape(x.shape)).contiguous())


def dequantize(codes: Tensor, scales: Tensor, signed: bool) -> Tensor:
    """uint8 codes + fp32 scales → fp32 values of the codes' shape."""
    qmap = code_map_tensor(signed, codes.device)
    blocks = _blocks(qmap[codes.to(torch.int64)])
    return _unblocks(blocks * scales.reshape(-1, 1).float(), codes.shape)
