"""A complete large-batch training loop with FusedAdamW and GradualWarmupScheduler, to copy.

The task is synthetic (a student MLP learns the labels a fixed random teacher MLP gives to
Gaussian inputs), so the script needs no data set; everything else is what a real loop does:

- the linear scaling rule with gradual warmup (Goyal et al.): ``lr = base_lr`` per 256 samples,
  ramped per *iteration* to ``base_lr * batch_size / 256`` over the first ``--warmup`` steps, then
  cosine-annealed to 0 by ``CosineAnnealingLR`` as the warmup's ``after_scheduler``;
- mixed precision: ``torch.autocast`` + ``torch.amp.GradScaler`` (fp16 needs the scaler; bf16
  does not, and the scaler is then built with ``enabled=False`` so the loop stays the same);
- global-norm clipping with ``opt.clip_grad_norm_(1.0, grad_scaler=scaler)``, then
  ``scaler.step(opt); scaler.update()``;
- optional ``--compile`` (the forward and the loss; the optimizer step stays eager) and, on CUDA,
  optional ``--cuda-graph``: forward + backward + clip + step captured once and replayed, with
  ``scheduler.step()`` between replays.

Nothing in the step reads a device value on the host: the LR is a device tensor that the
scheduler ``fill_``s and the kernel loads, the clip coefficient and the GradScaler's unscale /
inf check are applied inside the step's kernel. The only syncs are the loss printouts.

    python -m bench.train_example                       # CPU, bf16 autocast, < 1 minute
    python -m bench.train_example --device cuda         # fp16 autocast + GradScaler
    python -m bench.train_example --device cuda --compile --cuda-graph --amp bf16
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from fused import FusedAdamW
from warmup import GradualWarmupScheduler

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def make_mlp(in_dim: int, hidden: int, classes: int, depth: int = 3) -> nn.Sequential:
    layers, width = [], in_dim
    for _ in range(depth - 1):
        layers += [nn.Linear(width, hidden), nn.GELU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, classes))


class SyntheticTask:
    """An endless stream of (x, label) batches made on the device: x ~ N(0, 1), label = argmax of
    a fixed random teacher MLP. Generating on the device keeps the loop free of host copies."""

    def __init__(self, in_dim: int, classes: int, batch_size: int, device: torch.device,
                 seed: int = 0):
        self.batch_size, self.in_dim = batch_size, in_dim
        self.generator = torch.Generator(device).manual_seed(seed)
        torch.manual_seed(seed + 1)
        self.teacher = make_mlp(in_dim, 4 * classes, classes, depth=2).to(device)
        self.teacher.requires_grad_(False)

    @torch.no_grad()
    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(self.batch_size, self.in_dim, generator=self.generator,
                        device=self.generator.device)
        return x, self.teacher(x).argmax(dim=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=40, help="warmup iterations (default: 40)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--base-lr", type=float, default=5e-4, help="LR per 256 samples")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--clip", type=float, default=1.0, help="max global grad norm")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--in-dim", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--amp", choices=list(AMP_DTYPES), default=None,
                   help="autocast dtype (default: fp16 + GradScaler on CUDA, bf16 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward + loss")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture forward + backward + clip + step in a CUDA graph")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.amp is None:
        # CPU: bf16 is the native autocast type (fp16 autocast works on CPU in recent torch, but
        # is slower there and needs the scaler for nothing). CUDA: fp16 shows the GradScaler.
        args.amp = "fp16" if args.device.startswith("cuda") else "bf16"
    if args.cuda_graph and not args.device.startswith("cuda"):
        p.error("--cuda-graph needs --device cuda")
    if not 0 < args.warmup < args.steps:
        p.error(f"--warmup must be in (0, --steps), got {args.warmup}")
    return args


def train(args: argparse.Namespace) -> list[float]:
    """Runs the loop; returns the mean training loss of every ``log_every`` window."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = make_mlp(args.in_dim, args.hidden, args.classes).to(device)
    task = SyntheticTask(args.in_dim, args.classes, args.batch_size, device, seed=args.seed)

    # ---- optimizer and schedule: linear scaling rule + per-iteration warmup, then cosine
    # The LR lives in a 0-dim fp32 tensor on `device` (opt.param_groups[i]["lr"]): the
    # schedulers fill_ it in place and the kernel reads it, so a changing LR costs no sync.
    scale = args.batch_size / 256
    opt = FusedAdamW(model.parameters(), lr=args.base_lr, weight_decay=args.weight_decay)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps - args.warmup)
    scheduler = GradualWarmupScheduler(opt, multiplier=max(scale, 1.0), total_epoch=args.warmup,
                                       after_scheduler=cosine)

    # ---- mixed precision. fp16 needs loss scaling; bf16 (and fp32) do not, and a disabled
    # GradScaler is a pass-through (scale() returns the loss, step() calls opt.step()), so the
    # same lines serve every setting. FusedAdamW takes the scaler's unscale and inf check into
    # its kernel (as torch's fused optimizers do): with an overflow the step is skipped on the
    # device, params and state untouched, and the scaler lowers its scale.
    amp_dtype = AMP_DTYPES[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    def forward_loss(x, y):
        # autocast's cache of low-precision weight copies must be off under CUDA-graph capture
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None, cache_enabled=not args.cuda_graph):
            return F.cross_entropy(model(x), y)

    if args.compile:
        # Compile the model's forward and the loss (backward is compiled with them by
        # AOTAutograd). The optimizer step is not compiled: FusedAdamW.step is one Triton launch
        # per bucket and is marked torch.compiler.disable; it never guards on the LR, so the
        # schedule changing it triggers no recompile.
        forward_loss = torch.compile(forward_loss)

    def train_step(x, y):
        # set_to_none=False: the grads keep their addresses (required inside a CUDA graph, and
        # it spares FusedAdamW a rebuild of its pointer tables in eager mode too)
        opt.zero_grad(set_to_none=False)
        loss = forward_loss(x, y)
        scaler.scale(loss).backward()
        # one multi-tensor norm pass on the device; the clip coefficient (and the 1/scale
        # unscale) are applied by the step's kernel as it loads the grads: no grad rewrite, no sync
        opt.clip_grad_norm_(args.clip, grad_scaler=scaler)
        scaler.step(opt)  # passes grad_scale / found_inf to FusedAdamW.step
        scaler.update()
        return loss.detach()

    kernel = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    print(f"device={device} amp={args.amp} grad_scaler={scaler.is_enabled()} "
          f"compile={args.compile} cuda_graph={args.cuda_graph} batch={args.batch_size} "
          f"params={sum(p.numel() for p in model.parameters())} "
          f"step={'Triton kernel' if kernel else 'torch reference path (CPU)'} "
          f"peak_lr={args.base_lr * max(scale, 1.0):.3g}")

    step = 0
    if args.cuda_graph:
        # ---- CUDA graph: warm up eagerly on a side stream (allocates grads, optimizer state and
        # FusedAdamW's pointer tables, compiles kernels / the compiled forward), then capture one
        # whole step reading static input buffers. Each replay is one training step; the LR
        # changes between replays take effect because the kernel loads the LR tensor.
        static_x, static_y = task.batch()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                train_step(static_x, static_y)  # real steps: they train too
                scheduler.step()
                step += 1
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = train_step(static_x, static_y)  # recorded, not run

        def run_step(x, y):
            static_x.copy_(x)
            static_y.copy_(y)
            graph.replay()
            return static_loss.clone()
    else:
        run_step = train_step

    window = torch.zeros((), device=device)  # loss accumulated on the device: no sync per step
    window_steps, history = 0, []
    start = time.perf_counter()
    while step < args.steps:
        x, y = task.batch()
        window += run_step(x, y)
        scheduler.step()  # per-iteration warmup, then cosine
        step += 1
        window_steps += 1
        if step % args.log_every == 0 or step == args.steps:
            mean = (window / window_steps).item()  # the sync: once per log line
            history.append(mean)
            lr = opt.param_groups[0]["lr"].item()
            print(f"step {step:5d}  loss {mean:.4f}  lr {lr:.3e}  scale {scaler.get_scale():g}  "
                  f"{time.perf_counter() - start:6.1f}s")
            window.zero_()
            window_steps = 0
    print(f"final loss {history[-1]:.4f}")
    if not all(map(math.isfinite, history)):
        raise RuntimeError(f"non-finite training loss: {history}")
    return history


def main(argv: list[str] | None = None) -> list[float]:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
