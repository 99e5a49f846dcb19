"""torch.compile and CUDA graphs around FusedAdamW while the schedule changes the LR."""

from __future__ import annotations

import pytest
import torch

from fused import FusedAdamW
from warmup import GradualWarmupScheduler

from .conftest import DEVICES


def _model(device, seed=0):
    torch.manual_seed(seed)
    # the first weight has 4096 elements: it gets 8-bit state where asked
    return torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(),
                               torch.nn.Linear(128, 8)).to(device)


def _schedule(opt):
    return GradualWarmupScheduler(
        opt, multiplier=4, total_epoch=5,
        after_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state", [{}, dict(state_dtype=torch.bfloat16, stochastic_rounding=True),
                                   dict(state_dtype=torch.uint8)],
                         ids=["fp32-state", "bf16-state-sr", "8bit-state"])
def test_compiled_training_step_does_not_recompile_when_the_lr_changes(device, state):
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()  # a backend that counts its invocations (= compilations)

    model, twin = _model(device), _model(device)
    torch.manual_seed(1)  # the same rounding seed for both
    opt = FusedAdamW(model.parameters(), lr=1e-3, **state)
    torch.manual_seed(1)
    twin_opt = FusedAdamW(twin.parameters(), lr=1e-3, **state)
    sched, twin_sched = _schedule(opt), _schedule(twin_opt)
    x = torch.randn(16, 32, device=device)

    def train_step(model, opt, x):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    compiled = torch.compile(train_step, backend=counter)
    compiled(model, opt, x)
    train_step(twin, twin_opt, x)
    first = counter.frame_count
    assert first >= 1
    lrs = set()
    for _ in range(12):
        sched.step()
        twin_sched.step()
        lrs.add(float(sched.get_last_lr()[0]))
        compiled(model, opt, x)
        train_step(twin, twin_opt, x)
    assert len(lrs) == 12  # the LR really changed every step
    if state.get("state_dtype") == torch.uint8:
        assert "exp_avg_codes" in opt.state[model[0].weight]
    assert counter.frame_count == first  # ... and nothing was recompiled for it
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.cuda
def test_cuda_graph_of_forward_backward_step_follows_the_schedule():
    """The documented recipe: warm up on a side stream, capture forward + backward + step with
    zero_grad(set_to_none=False) inside (grads keep their addresses), scheduler.step() between
    replays. Matches the eager loop exactly."""
    model, twin = _model("cuda"), _model("cuda")
    opt, twin_opt = FusedAdamW(model.parameters(), lr=1e-3), FusedAdamW(twin.parameters(),
                                                                          lr=1e-3)
    sched, twin_sched = _schedule(opt), _schedule(twin_opt)
    static_x = torch.randn(16, 32, device="cuda")

    def step(model, opt, x):
        opt.zero_grad(set_to_none=False)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(model, opt, static_x)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(2):
        step(twin, twin_opt, static_x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(model, opt, static_x)
    losses, twin_losses = [], []
    for i in range(15):
        sched.step()
        twin_sched.step()
        static_x.copy_(torch.randn(16, 32, device="cuda", generator=torch.Generator(
            "cuda").manual_seed(i)))
        graph.replay()
        losses.append(static_loss.item())
        twin_losses.append(step(twin, twin_opt, static_x).item())
    assert losses == pytest.approx(twin_losses, rel=1e-6)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
