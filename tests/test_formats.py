"""The state formats (fused/formats.py) and their kernel twins (fused/kernels/common.py):
rounding to bf16/fp16 to nearest and stochastically, Philox bits, 8-bit blockwise quantization.

The kernels' helpers run here through small Triton kernels (in the interpreter on CPU); they
must produce the same bits as the torch versions, which the reference path and checkpoints use.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from fused import formats
from fused.kernels import common

from .conftest import HAS_CUDA, INTERPRET

kernel_only = pytest.mark.skipif(not INTERPRET and not HAS_CUDA,
                                 reason="the Triton kernel needs a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if HAS_CUDA else "cpu"


# ------------------------------------------------------------------ kernel harnesses
@triton.jit
def _round_kernel(x_ptr, bits_ptr, out_ptr, n, TARGET: tl.constexpr, STOCHASTIC: tl.constexpr,
                  BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    bits = tl.load(bits_ptr + offs, mask=mask, other=0).to(tl.uint32)
    common.store_param(out_ptr, offs, mask, x, bits, TARGET, STOCHASTIC)


def _kernel_round(x: torch.Tensor, dtype: torch.dtype, bits: torch.Tensor | None):
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    b = (bits if bits is not None else torch.zeros_like(x, dtype=torch.int64)).to(torch.int64)
    n = x.numel()
    _round_kernel[(triton.cdiv(n, 1024),)](x, b, out, n, TARGET=common.TL_DTYPES[dtype],
                                           STOCHASTIC=bits is not None, BLOCK=1024)
    return out


@triton.jit
def _philox_kernel(row_ptr, step_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """The four fields of a flat chunk walk (BLOCK even)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w0, w1, w2, w3 = common.random_words(row_ptr, tl.load(step_ptr), offs)
    tl.store(out_ptr + 4 * offs, w0.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * offs + 1, w1.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * offs + 2, w2.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * offs + 3, w3.to(tl.int64), mask=mask)


@triton.jit
def _philox_tile_kernel(row_ptr, step_ptr, out_ptr, n):
    """The four fields of an 8-bit tile walk."""
    q, offs, mask, _ = common.quant_tile(row_ptr, tl.program_id(0).to(tl.int64), n, 16, 256)
    w0, w1, w2, w3 = common.random_words(row_ptr, tl.load(step_ptr), offs)
    tl.store(out_ptr + 4 * offs, w0.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * offs + 1, w1.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * offs + 2, w2.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * offs + 3, w3.to(tl.int64), mask=mask)


@triton.jit
def _quant_kernel(row_ptr, value_ptr, bits_ptr, qmap_ptr, n, STOCHASTIC: tl.constexpr):
    """Store values into slot 0 as 8-bit codes + scales, through the engine's tile walk."""
    q, offs, mask, exists = common.quant_tile(row_ptr, tl.program_id(0).to(tl.int64), n, 16,
                                              256)
    x = tl.load(value_ptr + offs, mask=mask, other=0.0)
    bits = tl.load(bits_ptr + offs, mask=mask, other=0).to(tl.uint32)
    common.store_slot(row_ptr, 0, offs, mask, q, exists, qmap_ptr, x, bits, 2, STOCHASTIC,
                      False)


@triton.jit
def _dequant_kernel(row_ptr, out_ptr, qmap_ptr, n):
    q, offs, mask, exists = common.quant_tile(row_ptr, tl.program_id(0).to(tl.int64), n, 16,
                                              256)
    tl.store(out_ptr + offs, common.load_slot(row_ptr, 0, offs, mask, q, exists, qmap_ptr, 2,
                                              False), mask=mask)


def _row(codes, scales, numel, shape):
    row = [0] * common.COLS
    row[common.SLOT], row[common.SCALE] = codes.data_ptr(), scales.data_ptr()
    row[common.NUMEL], row[common.ROW] = numel, formats.row_length(shape)
    return torch.tensor(row, dtype=torch.int64, device=codes.device)


def _kernel_quantize(x, signed, bits=None):
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    scales = torch.empty(formats.scales_shape(x.shape), device=x.device)
    row = _row(codes, scales, x.numel(), x.shape)
    b = (bits if bits is not None else torch.zeros(x.shape, dtype=torch.int64)).to(x.device)
    grid = common.programs_per_tensor(x.numel(), formats.row_length(x.shape), True)
    _quant_kernel[(grid,)](row, x.contiguous(), b.contiguous(),
                           formats.code_map_tensor(signed, x.device), x.numel(),
                           STOCHASTIC=bits is not None)
    return codes, scales, row


def _kernel_dequantize(codes, scales, signed):
    out = torch.empty(codes.shape, device=codes.device)
    row = _row(codes, scales, codes.numel(), codes.shape)
    grid = common.programs_per_tensor(codes.numel(), formats.row_length(codes.shape), True)
    _dequant_kernel[(grid,)](row, out, formats.code_map_tensor(signed, codes.device),
                             codes.numel())
    return out


def _between(dtype: torch.dtype, n: int, seed: int = 0) -> torch.Tensor:
    """fp32 values that are not representable in ``dtype``, across magnitudes and signs
    (fp16: subnormals included), plus some that are."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (-30, 10) if dtype == torch.float16 else (-60, 60)
    x = torch.randn(n, generator=gen) * torch.pow(2.0, torch.randint(lo, hi, (n,), generator=gen)
                                                 .float())
    x[:8] = torch.tensor([0.0, -0.0, 1.0, -2.5, 3e-8, -6e-5, 65504.0, 1e-3])
    return x


# ------------------------------------------------------------------ rounding
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_round_to_nearest_is_torchs_cast(dtype):
    x = _between(dtype, 20000)
    torch.testing.assert_close(formats.round_to(x, dtype, None), x.to(dtype), rtol=0, atol=0)


@kernel_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_kernel_rounds_bit_for_bit_like_torch(dtype, stochastic):
    x = _between(dtype, 8192, seed=1)
    bits = (torch.randint(0, 2**32, x.shape, dtype=torch.int64) if stochastic else None)
    ours = _kernel_round(x.to(DEVICE), dtype, None if bits is None else bits.to(DEVICE))
    torch.testing.assert_close(ours.cpu(), formats.round_to(x, dtype, bits), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_stochastic_rounding_picks_a_neighbour_and_is_unbiased(dtype):
    """Each of many roundings of one value is one of its two neighbours, and their mean is the
    value within 5 standard errors (the expected fraction p has variance p(1-p)/n)."""
    n = 200_000
    gen = torch.Generator().manual_seed(3)
    for value in (1.0 + 1 / 3 * 2**-7, -0.7 * 2**-20, 3.0e-6):
        x = torch.full((n,), value)
        lo = x.to(dtype).float()
        lo = torch.where(lo.abs() > abs(value), lo - torch.sign(lo) * _ulp(lo, dtype), lo)
        hi = lo + torch.sign(x) * _ulp(lo, dtype)
        bits = torch.randint(0, 2**32, (n,), generator=gen, dtype=torch.int64)
        rounded = formats.round_to(x, dtype, bits).float()
        assert bool(((rounded == lo) | (rounded == hi)).all())
        p = (value - lo[0].item()) / (hi[0].item() - lo[0].item())
        frac = (rounded == hi).double().mean().item()
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-12, (value, frac, p)


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mant = 7 if dtype == torch.bfloat16 else 10
    exponent = torch.floor(torch.log2(x.abs().clamp(min=torch.finfo(dtype).tiny)))
    if dtype == torch.float16:
        exponent = exponent.clamp(min=-14)
    return torch.pow(2.0, exponent - mant)


def test_rounding_keeps_nan_inf_and_signed_zero():
    x = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0])
    bits = torch.full((5,), 0xFFFFFFFF, dtype=torch.int64)
    for dtype in (torch.bfloat16, torch.float16):
        for b in (None, bits):
            y = formats.round_to(x, dtype, b).float()
            assert math.isnan(y[0]) and y[1] == math.inf and y[2] == -math.inf
            assert y[3] == 0 and math.copysign(1, y[3]) == -1 and math.copysign(1, y[4]) == 1


# ------------------------------------------------------------------ Philox
@kernel_only
@pytest.mark.parametrize("shape,quantized", [((3001,), False), ((70, 300), True),
                                             ((9, 7, 11), True)],
                         ids=["flat", "tiles", "tiles-odd-rows"])
def test_kernel_random_fields_equal_the_torch_stream(shape, quantized):
    """The kernels' random fields, flat or over 8-bit tiles (pairs inside blocks), equal
    ``formats.random_words`` element for element: the reference path draws the same bits."""
    seed, param_id, step = 0x1234_5678_9ABC, 7, torch.tensor(12.0, device=DEVICE)
    n = math.prod(shape)
    row = [0] * common.COLS
    row[common.PARAM_ID], row[common.SEED] = param_id, seed
    row[common.NUMEL], row[common.ROW] = n, formats.row_length(shape)
    row = torch.tensor(row, dtype=torch.int64, device=DEVICE)
    out = torch.zeros(n, 4, dtype=torch.int64, device=DEVICE)
    if quantized:
        grid = common.programs_per_tensor(n, formats.row_length(shape), True)
        _philox_tile_kernel[(grid,)](row, step, out, n)
    else:
        _philox_kernel[(triton.cdiv(n, 1024),)](row, step, out, n, BLOCK=1024)
    theirs = formats.random_words(seed, param_id, step, shape, torch.device(DEVICE),
                                  quantized=quantized)
    torch.testing.assert_close(out.cpu(), torch.stack([t.reshape(-1) for t in theirs],
                                                      dim=1).cpu(), rtol=0, atol=0)
    fields = torch.stack([t.reshape(-1) for t in theirs]).cpu()
    assert int(fields.min()) >= 0 and int(fields.max()) <= 0xFFFF
    # 16-bit fields of independent words: close to uniform, no two stores alike
    assert abs(fields.float().mean().item() / 65535 - 0.5) < 0.01
    assert (fields[0] != fields[1]).float().mean() > 0.99


def test_philox_known_answer():
    """Philox4x32-10 with counter 0 and key 0 (Random123's known-answer vector)."""
    zero = torch.zeros(1, dtype=torch.int64)
    words = [int(w) for w in formats.philox(0, zero, zero, zero, zero)]
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_random_words_depend_on_seed_param_step_and_offset():
    step = torch.tensor(3.0)
    cpu = torch.device("cpu")
    base = formats.random_words(1, 0, step, (256,), cpu)[0]
    for other in (formats.random_words(2, 0, step, (256,), cpu)[0],
                  formats.random_words(1, 1, step, (256,), cpu)[0],
                  formats.random_words(1, 0, step + 1, (256,), cpu)[0]):
        assert (other != base).float().mean() > 0.99
    assert len(set(base.tolist())) > 250


# ------------------------------------------------------------------ 8-bit
def test_code_maps_are_bitsandbytes_dynamic_maps():
    signed, unsigned = formats.code_map(True), formats.code_map(False)
    assert len(signed) == len(unsigned) == 256
    assert list(signed) == sorted(signed) and list(unsigned) == sorted(unsigned)
    assert len(set(signed)) == len(set(unsigned)) == 256
    assert signed[-1] == unsigned[-1] == 1.0 and 0.0 in signed and unsigned[0] == 0.0
    assert signed[0] == pytest.approx(-0.99296875)  # no −1 in the signed map
    # 7 decades: the smallest nonzero magnitudes are ~1e-7
    assert min(abs(v) for v in signed if v) < 1e-6 and min(v for v in unsigned if v) < 1e-6


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("shape", [(5000,), (70, 300), (33, 7, 9), (4097,)])
def test_quantize_error_bound(signed, shape):
    """Each value comes back within half the gap between its two neighbouring codes (times the
    block's absmax), and a block's largest positive value exactly (1.0 is a code; the signed
    map's lowest code is −0.9929, so a negative absmax comes back 0.7% smaller)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen) * 3)
    if not signed:
        x = x.abs()
    codes, scales = formats.quantize(x, signed)
    assert codes.shape == x.shape and codes.dtype == torch.uint8
    assert scales.shape == formats.scales_shape(shape)
    y = formats.dequantize(codes, scales, signed)
    qmap = formats.code_map_tensor(signed)
    blocks = formats._blocks(x)
    absmax = blocks.abs().amax(1, keepdim=True)
    normalized = blocks / absmax
    idx = torch.searchsorted(qmap, normalized.clamp(qmap[0], 1.0).contiguous(), right=True)
    below = qmap[(idx - 1).clamp(0, 255)]
    above = qmap[idx.clamp(max=255)]
    gap = torch.maximum(above - below, torch.full_like(above, 1e-12))
    bound = formats._unblocks(gap / 2 * absmax, shape)
    # below the smallest code only its own distance bounds it (signed: −1 maps to −0.9929)
    bound = torch.maximum(bound,
                          formats._unblocks((normalized - qmap[0]).abs() * absmax, shape))
    assert bool(((y - x).abs() <= bound * (1 + 1e-5) + 1e-30).all())
    positive = formats._blocks(x).amax(1) == absmax.squeeze(1)
    assert torch.equal(formats._blocks(y).amax(1)[positive], absmax.squeeze(1)[positive])


def test_stochastic_requantization_is_unbiased():
    n = 100_000
    x = torch.full((n,), 0.3)  # between two codes of the signed map, absmax set by x[0]
    x[::256] = 1.0
    gen = torch.Generator().manual_seed(5)
    bits = torch.randint(0, 2**32, (n,), generator=gen, dtype=torch.int64)
    y = formats.dequantize(*formats.quantize(x, True, bits), True)
    inner = torch.ones(n, dtype=torch.bool)
    inner[::256] = False
    values = y[inner].unique()
    assert len(values) == 2 and values[0] < 0.3 < values[1]
    assert y[inner].double().mean().item() == pytest.approx(0.3, abs=5 * 0.01 / math.sqrt(n))
    nearest = formats.dequantize(*formats.quantize(x, True), True)[inner]
    assert len(nearest.unique()) == 1


@kernel_only
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("shape", [(5000,), (70, 300), (33, 7, 9), (12, 1000)])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_kernel_quantizes_bit_for_bit_like_torch(signed, shape, stochastic):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen) * 2)
    if not signed:
        x = x.abs()
    bits = torch.randint(0, 2**32, shape, generator=gen, dtype=torch.int64) if stochastic \
        else None
    codes, scales, _ = _kernel_quantize(x.to(DEVICE), signed, bits)
    ref_codes, ref_scales = formats.quantize(x, signed, bits)
    torch.testing.assert_close(scales.cpu(), ref_scales, rtol=0, atol=0)
    mismatch = (codes.cpu() != ref_codes).float().mean().item()
    # the interpreter divides exactly like torch; a GPU's division may move a rare tie
    assert mismatch == 0.0 if INTERPRET else mismatch < 1e-4
    back = _kernel_dequantize(codes, scales, signed)
    torch.testing.assert_close(back.cpu(), formats.dequantize(codes.cpu(), scales.cpu(), signed),
                               rtol=0, atol=0)


def test_blocks_follow_rows_so_scales_shard_with_dim0():
    """Blocks never straddle a row: a dim-0 slice of the tensor quantizes to the same codes and
    the same dim-0 slice of the scales (how an FSDP2 shard holds its part of the state)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(50, 3, 100, generator=gen)  # rows of 300: blocks of 256 + 44
    codes, scales = formats.quantize(x, True)
    assert scales.shape == (50, 2)
    part_codes, part_scales = formats.quantize(x[17:33], True)
    assert torch.equal(part_codes, codes[17:33]) and torch.equal(part_scales, scales[17:33])
    assert formats.scales_shape((10_000,)) == (40,)
    assert not formats.quantizes((4095,)) and formats.quantizes((64, 64))
