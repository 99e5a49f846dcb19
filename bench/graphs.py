"""Sync, CUDA graphs and torch.compile (GPU): what a changing learning rate costs.

1. Host syncs per iteration of ``scheduler.step(); opt.step()``, counted with
   ``torch.cuda.set_sync_debug_mode("warn")`` (each synchronizing call warns once per call).
2. ``opt.step()`` captured in a CUDA graph and replayed while the warmup schedule changes the LR
   between replays: the result must equal the eager run (the LR moved without a re-capture), and
   the replay time is set beside the eager step.
3. Recompiles of a ``torch.compile``d training step while the schedule changes the LR, counted
   with a backend that counts its invocations: torch.optim.AdamW with a float LR vs FusedAdamW.

    python -m bench.graphs
"""

from __future__ import annotations

import warnings

import torch

from bench.common import format_table, log, write_json
from bench.param_sets import gpt2_124m_shapes, make_params
from warmup import GradualWarmupScheduler


def _schedule(opt, total: int = 100):
    return GradualWarmupScheduler(
        opt, multiplier=8, total_epoch=total // 2,
        after_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total))


def count_syncs(iterations: int = 100) -> list[dict]:
    from fused import FusedAdamW

    shapes = [(1024, 1024), (1024,), (4096, 1024), (4096,)] * 4
    makers = {
        "FusedAdamW (tensor lr)": lambda ps: FusedAdamW(ps, lr=1e-3),
        "torch AdamW fused (float lr)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "torch AdamW fused (tensor lr)": lambda ps: torch.optim.AdamW(
            ps, lr=torch.tensor(1e-3, device="cuda"), fused=True),
        "torch AdamW foreach (float lr)": lambda ps: torch.optim.AdamW(ps, lr=1e-3,
                                                                       foreach=True),
        "torch AdamW foreach capturable (tensor lr)": lambda ps: torch.optim.AdamW(
            ps, lr=torch.tensor(1e-3, device="cuda"), foreach=True, capturable=True),
        # control: proves the counter counts (one .item() per iteration = one sync)
        "control: FusedAdamW + lr.item()": lambda ps: FusedAdamW(ps, lr=1e-3),
    }
    rows = []
    for name, make in makers.items():
        params = make_params(shapes, device="cuda")
        opt = make(params)
        sched = _schedule(opt, iterations)
        opt.step()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(iterations):
                    sched.step()
                    opt.step()
                    if name.startswith("control"):
                        opt.param_groups[0]["lr"].item()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # the warning each synchronizing call raises (not the mode's own "prototype" notice)
        syncs = [w for w in caught
                 if "synchroniz" in str(w.message) and "prototype" not in str(w.message)]
        rows.append({"optimizer + GradualWarmupScheduler": name,
                     "host syncs / iteration": len(syncs) / iterations,
                     "first": str(syncs[0].message)[:80] if syncs else ""})
        log(f"syncs {name}: {len(syncs)} in {iterations} iterations")
    return rows


def graph_replay(iterations: int = 100) -> dict:
    from triton.testing import do_bench

    from fused import FusedAdamW

    shapes = gpt2_124m_shapes()
    captured = make_params(shapes, device="cuda", seed=1)
    eager = make_params(shapes, device="cuda", seed=1)
    opt_graph, opt_eager = FusedAdamW(captured, lr=1e-4), FusedAdamW(eager, lr=1e-4)
    sched_graph, sched_eager = _schedule(opt_graph, iterations), _schedule(opt_eager, iterations)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt_graph.step()  # state, tables and compilation outside the capture
    torch.cuda.current_stream().wait_stream(side)
    opt_eager.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_graph.step()
    lrs = []
    for _ in range(iterations):
        sched_graph.step()
        sched_eager.step()
        graph.replay()
        opt_eager.step()
        lrs.append(sched_graph.get_last_lr()[0])  # a tensor: read after the loop
    torch.cuda.synchronize()
    lrs = [float(lr) for lr in lrs]
    max_diff = max((a - b).abs().max().item() for a, b in zip(captured, eager))
    replay_ms = do_bench(graph.replay, warmup=100, rep=500, return_mode="median")
    eager_ms = do_bench(opt_eager.step, warmup=100, rep=500, return_mode="median")
    result = {"param set": "gpt2-124m fp32", "replays": iterations,
              "lr first/peak/last": [lrs[0], max(lrs), lrs[-1]],
              "max |graph - eager|": max_diff, "replay ms": replay_ms, "eager ms": eager_ms,
              "replay / eager": replay_ms / eager_ms}
    log(f"graph: max diff {max_diff}, replay {replay_ms:.3f} ms vs eager {eager_ms:.3f} ms")
    return result


def count_recompiles(iterations: int = 12) -> list[dict]:
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    from fused import FusedAdamW

    rows = []
    makers = {
        "torch AdamW (float lr)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "FusedAdamW (tensor lr)": lambda ps: FusedAdamW(ps, lr=1e-3),
    }
    for name, make in makers.items():
        torch._dynamo.reset()
        counter = CompileCounter()  # a backend that counts its invocations (= compilations)

        model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(),
                                    torch.nn.Linear(256, 256)).cuda()
        opt = make(list(model.parameters()))
        sched = _schedule(opt, iterations)
        x = torch.randn(64, 256, device="cuda")

        @torch.compile(backend=counter)
        def train_step(x, model=model, opt=opt):
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        train_step(x)
        after_first = counter.frame_count
        for _ in range(iterations):
            sched.step()  # the LR changes every iteration
            train_step(x)
        more = counter.frame_count - after_first
        rows.append({"compiled training step": name, "compiles (first call)": after_first,
                     f"recompiles over {iterations} LR changes": more})
        log(f"compile {name}: {after_first} then {more} more")
    torch._dynamo.reset()
    return rows


def run(quick: bool = False) -> dict:
    if not torch.cuda.is_available():
        log("bench.graphs: no CUDA device, skipped")
        return {"skipped": "no CUDA device"}
    syncs = count_syncs()
    graph = graph_replay()
    recompiles = count_recompiles()
    print(format_table(syncs, list(syncs[0])))
    print(format_table([graph], list(graph)))
    print(format_table(recompiles, list(recompiles[0])))
    result = {"syncs": syncs, "graph": graph, "recompiles": recompiles}
    write_json("graphs", result)
    return result


if __name__ == "__main__":
    run()
