"""Optimizer-step benchmark (GPU): FusedAdamW vs torch.optim.AdamW against the copy bandwidth.

For each parameter set (a 1e9-element flat tensor, GPT-2-124M shapes, ResNet-50 shapes) and
storage (fp32; bf16 params with fp32 state for FusedAdamW — torch keeps bf16 state for bf16
params) it times one ``step()`` of every optimizer (median of ``triton.testing.do_bench``, after
warm-up), converts it to GB/s from the bytes the update must move, and sets it beside the
device-to-device copy bandwidth measured in the same run and beside torch's fused AdamW.

    python -m bench.step                 # all sets
    python -m bench.step --sets gpt2-124m resnet50 --dtypes fp32
"""

from __future__ import annotations

import argparse
import gc

import torch

from bench.common import format_table, log, save_figure, write_json
from bench.param_sets import PARAM_SETS, make_params, numel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read + written."""
    from triton.testing import do_bench

    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=100, rep=500, return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e9


def optimizers(lr: float = 1e-3):
    """name → constructor over a list of params (every optimizer the step bench compares)."""
    from fused import FusedAdamW

    def torch_adamw(**kw):
        return lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=1e-2, **kw)

    def torch_adamw_tensor_lr(**kw):
        return lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(lr, device="cuda"),
                                            weight_decay=1e-2, **kw)

    return {
        "torch for-loop": torch_adamw(foreach=False),
        "torch foreach": torch_adamw(foreach=True),
        "torch fused": torch_adamw(fused=True),
        "torch fused (tensor lr)": torch_adamw_tensor_lr(fused=True),
        "FusedAdamW": lambda ps: FusedAdamW(ps, lr=lr, weight_decay=1e-2),
    }


def bytes_per_param(name: str, dtype: torch.dtype) -> int:
    """Fewest bytes the update moves per element: read p, g, m, v; write p, m, v."""
    p = torch.finfo(dtype).bits // 8
    state = 4 if (name == "FusedAdamW" or dtype == torch.float32) else p
    return 2 * p + p + 2 * state + 2 * state  # read p, g, m, v; write p, m, v


def time_step(opt, *, warmup_ms: int, rep_ms: int) -> float:
    from triton.testing import do_bench

    return do_bench(opt.step, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def run(sets=None, dtypes=None, impls=None, quick: bool = False) -> dict:
    if not torch.cuda.is_available():
        log("bench.step: no CUDA device, skipped")
        return {"skipped": "no CUDA device"}
    sets = sets or list(PARAM_SETS)
    dtypes = dtypes or list(DTYPES)
    bandwidth = copy_bandwidth()
    log(f"copy bandwidth: {bandwidth:.0f} GB/s (read + write)")
    rows = []
    for set_name in sets:
        shapes = PARAM_SETS[set_name]()
        n = numel(shapes)
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            fused_ms = None
            case_rows = []
            for name, make in optimizers().items():
                if impls and name not in impls:
                    continue
                if name == "torch for-loop" and len(shapes) > 1 and quick:
                    continue
                params = make_params(shapes, dtype=dtype, device="cuda")
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                opt = make(params)
                opt.step()  # state allocation, compilation
                torch.cuda.synchronize()
                added_peak = torch.cuda.max_memory_allocated() - base
                state_bytes = torch.cuda.memory_allocated() - base
                ms = time_step(opt, warmup_ms=50 if quick else 200, rep_ms=200 if quick else 1000)
                moved = bytes_per_param(name, dtype) * n
                row = {
                    "set": set_name, "dtype": dtype_name, "optimizer": name, "ms": ms,
                    "bytes/param": bytes_per_param(name, dtype),
                    "GB/s": moved / (ms * 1e-3) / 1e9,
                    "of copy BW": moved / (ms * 1e-3) / 1e9 / bandwidth,
                    "state MB": state_bytes / 2**20,
                    "peak added MB": added_peak / 2**20,
                }
                if name == "torch fused":
                    fused_ms = ms
                case_rows.append(row)
                log(f"{set_name} {dtype_name} {name}: {ms:.3f} ms, {row['GB/s']:.0f} GB/s")
                del opt, params
                gc.collect()
                torch.cuda.empty_cache()
            for row in case_rows:
                row["vs torch fused"] = row["ms"] / fused_ms if fused_ms else None
            rows += case_rows
    columns = ["set", "dtype", "optimizer", "ms", "bytes/param", "GB/s", "of copy BW",
               "vs torch fused", "state MB", "peak added MB"]
    print(f"copy bandwidth (read + write): {bandwidth:.0f} GB/s")
    print(format_table(rows, columns))
    result = {"copy_bandwidth_GBps": bandwidth, "rows": rows}
    write_json("step", result)
    _plot(rows, bandwidth)
    result["clip"] = run_clip(quick=quick, bandwidth=bandwidth)
    return result


def run_clip(sets=("gpt2-124m", "flat-1e9"), quick: bool = False,
             bandwidth: float | None = None) -> dict:
    """Global-norm clip + step: ``clip_grad_norm_(foreach=True)`` + ``AdamW(fused=True)`` (a norm
    pass, a pass rewriting the grads, the step: ≥ 40 bytes/param in fp32) against
    ``FusedAdamW.clip_grad_norm_`` + ``step()`` (a norm pass, the step applying the clip: 32)."""
    from triton.testing import do_bench

    from fused import FusedAdamW

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    bandwidth = bandwidth or copy_bandwidth()
    rows = []
    for set_name in sets:
        shapes = PARAM_SETS[set_name]()
        n = numel(shapes)
        cases = {
            "torch clip_grad_norm_(foreach) + AdamW(fused)": (
                lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
                lambda opt, ps: torch.nn.utils.clip_grad_norm_(ps, 1.0, foreach=True), 40),
            "FusedAdamW.clip_grad_norm_ + step": (
                lambda ps: FusedAdamW(ps, lr=1e-3),
                lambda opt, ps: opt.clip_grad_norm_(1.0), 32),
        }
        base_ms = None
        for name, (make, clip, nbytes) in cases.items():
            params = make_params(shapes, device="cuda")
            opt = make(params)

            def step(opt=opt, params=params, clip=clip):
                clip(opt, params)
                opt.step()

            step()
            ms = do_bench(step, warmup=50 if quick else 200, rep=200 if quick else 1000,
                          return_mode="median")
            base_ms = base_ms or ms
            gbps = nbytes * n / (ms * 1e-3) / 1e9
            rows.append({"set": set_name, "pipeline": name, "ms": ms, "bytes/param": nbytes,
                         "GB/s": gbps, "of copy BW": gbps / bandwidth,
                         "vs torch": ms / base_ms})
            log(f"clip {set_name} {name}: {ms:.3f} ms")
            del opt, params
            gc.collect()
            torch.cuda.empty_cache()
    print(format_table(rows, ["set", "pipeline", "ms", "bytes/param", "GB/s", "of copy BW",
                              "vs torch"]))
    result = {"copy_bandwidth_GBps": bandwidth, "rows": rows}
    write_json("clip_step", result)
    return result


def _plot(rows: list[dict], bandwidth: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r["set"], r["dtype"]) for r in rows))
    names = list(dict.fromkeys(r["optimizer"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(cases)), 4.5))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        xs, ys = [], []
        for i, case in enumerate(cases):
            for r in rows:
                if (r["set"], r["dtype"]) == case and r["optimizer"] == name:
                    xs.append(i + j * width)
                    ys.append(r["of copy BW"])
        ax.bar(xs, ys, width, label=name)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels([f"{s}\n{d}" for s, d in cases])
    ax.set_ylabel(f"fraction of copy bandwidth ({bandwidth:.0f} GB/s)")
    ax.set_title(f"AdamW step, {torch.cuda.get_device_name()}")
    ax.legend(fontsize=8)
    save_figure(fig, "step")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="*", choices=list(PARAM_SETS))
    parser.add_argument("--dtypes", nargs="*", choices=list(DTYPES))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    run(args.sets, args.dtypes, quick=args.quick)


if __name__ == "__main__":
    main()
