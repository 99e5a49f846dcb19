"""Helpers the optimizer tests share: seeded params and grads, and a reference optimizer run on
fp32 master copies."""

from __future__ import annotations

import contextlib

import torch


def make_params(shapes, dtype=torch.float32, device="cpu", seed=0) -> list[torch.Tensor]:
    """Leaf params with seeded random values (the same values for every dtype and device)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_()
            for s in shapes]


def make_grads(shapes, step, seed=1) -> list[torch.Tensor]:
    """Seeded random fp32 grads for one step (scaled by 1, 2, 3 in turn), on the CPU."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(s, generator=gen) * (1 + step % 3) for s in shapes]


class Mirror:
    """A reference optimizer (``make(master_params)``) on fp32 master copies of ``params``,
    writing each step's result back into ``params``: the same math as ours for any param dtype
    (our state is fp32). With ``start`` (our params before the step) each step starts from
    ours, so low-precision rounding differences do not accumulate: every step is checked on its
    own, the fp32 state over all of them."""

    def __init__(self, make, params):
        self.params = params
        self.master = [p.detach().float().clone().requires_grad_() for p in params]
        self.opt = make(self.master)

    def step(self, grads, start=None, lr=None):
        if lr is not None:
            for group in self.opt.param_groups:
                group["lr"] = lr
        for q, s, g in zip(self.master, start or self.params, grads):
            with torch.no_grad():
                q.copy_(s.float())
            q.grad = None if g is None else g.float().to(q.device)
        self.opt.step()
        with torch.no_grad():
            for q, p in zip(self.master, self.params):
                p.copy_(q)


def capture_step(opt) -> torch.cuda.CUDAGraph:
    """``opt.step()`` captured in a CUDA graph, after one warm-up step on a side stream (tables,
    state and kernels are built there, outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph


@contextlib.contextmanager
def no_host_sync():
    """Any host synchronization inside raises (``torch.cuda.set_sync_debug_mode("error")``);
    the mode is restored after, and the device synchronized."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
