"""Parameter sets the optimizer is measured and tested on: shapes only, built on any device.

Shared by the tests (which check the sizes and use the small ones) and the step benchmark.
"""

from __future__ import annotations

import torch


def gpt2_124m_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small (124,439,808 params, lm_head tied to wte), nanoGPT's layout."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,),  # ln_1
                   (3 * d, d), (3 * d,),  # attn.c_attn
                   (d, d), (d,),  # attn.c_proj
                   (d,), (d,),  # ln_2
                   (4 * d, d), (4 * d,),  # mlp.c_fc
                   (d, 4 * d), (d,)]  # mlp.c_proj
    shapes += [(d,), (d,)]  # ln_f
    return shapes


def resnet50_shapes() -> list[tuple[int, ...]]:
    """torchvision's resnet50 (25,557,032 params): convs, BatchNorm weight/bias, fc."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out_ch = width * 4
            shapes += [(width, in_ch, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (out_ch, width, 1, 1), (out_ch,), (out_ch,)]
            if b == 0:  # downsample
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
            in_ch = out_ch
    shapes += [(1000, 2048), (1000,)]
    return shapes


def flat_shapes(numel: int = 1_000_000_000) -> list[tuple[int, ...]]:
    return [(numel,)]


PARAM_SETS = {
    "flat-1e9": flat_shapes,
    "gpt2-124m": gpt2_124m_shapes,
    "resnet50": resnet50_shapes,
}


def numel(shapes: list[tuple[int, ...]]) -> int:
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        total += n
    return total


def make_params(shapes, *, dtype=torch.float32, device="cpu", seed=0) -> list[torch.Tensor]:
    """Leaf params with random values and random grads of the same dtype (never zeros)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.randn(s, generator=gen, device=device, dtype=torch.float32).to(dtype)
        p.requires_grad_(True)
        p.grad = torch.randn(s, generator=gen, device=device, dtype=torch.float32).to(dtype)
        params.append(p)
    return params
