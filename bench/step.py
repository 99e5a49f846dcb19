"""Optimizer-step benchmark: FusedAdamW vs torch.optim.AdamW against the copy bandwidth.

GPU (the default with CUDA): for each parameter set (a 1e9-element flat tensor, GPT-2-124M shapes,
ResNet-50 shapes) and param dtype (fp32, bf16) it times one ``step()`` of every optimizer (median
of ``triton.testing.do_bench``, after warm-up): torch's for-loop / foreach / fused AdamW and
FusedAdamW in each state format (fp32 state; bf16 state, with and without stochastic rounding;
8-bit blockwise state, with and without). It converts each time to GB/s from the bytes the update
must move (``bytes_per_param``) and sets it beside the device-to-device copy bandwidth measured in
the same run and beside torch's fused AdamW; the optimizer-state memory each one allocated is
measured too (``state MB``, ``state B/param``).

CPU (``--device cpu``, and part of ``python -m bench`` on a CPU-only machine): ResNet-50 in fp32,
FusedAdamW's CPU path against torch's for-loop / foreach / fused CPU AdamW (median of timed
steps with ``time.perf_counter``), beside the CPU's measured copy bandwidth.

    python -m bench.step                 # all sets (GPU)
    python -m bench.step --sets gpt2-124m resnet50 --dtypes fp32
    python -m bench.step --device cpu    # the CPU row
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from bench.common import format_table, log, pyplot, save_figure, write_json
from bench.param_sets import PARAM_SETS, make_params, numel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read + written."""
    from triton.testing import do_bench

    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=100, rep=500, return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e9


def optimizers(lr: float = 1e-3, device: str = "cuda") -> dict:
    """name → (constructor over a list of params, state format for ``bytes_per_param``):
    every optimizer the step bench compares. The state format is "param" where the optimizer
    keeps its moments in the param's dtype (torch), else the dtype FusedAdamW stores them in."""
    from fused import FusedAdamW

    def torch_adamw(**kw):
        return lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=1e-2, **kw)

    def torch_adamw_tensor_lr(**kw):
        return lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(lr, device=device),
                                            weight_decay=1e-2, **kw)

    def fused(**kw):
        return lambda ps: FusedAdamW(ps, lr=lr, weight_decay=1e-2, **kw)

    bf16, u8 = torch.bfloat16, torch.uint8
    return {
        "torch for-loop": (torch_adamw(foreach=False), "param"),
        "torch foreach": (torch_adamw(foreach=True), "param"),
        "torch fused": (torch_adamw(fused=True), "param"),
        "torch fused (tensor lr)": (torch_adamw_tensor_lr(fused=True), "param"),
        "FusedAdamW": (fused(), torch.float32),
        "FusedAdamW (bf16 state)": (fused(state_dtype=bf16), bf16),
        "FusedAdamW (bf16 state, SR)": (fused(state_dtype=bf16, stochastic_rounding=True), bf16),
        "FusedAdamW (8-bit state)": (fused(state_dtype=u8), u8),
        "FusedAdamW (8-bit state, SR)": (fused(state_dtype=u8, stochastic_rounding=True), u8),
    }


def bytes_per_param(state, dtype: torch.dtype) -> float:
    """Fewest bytes one AdamW step moves per element: read p, g, m, v; write p, m, v. ``state``:
    "param" (the moments in the param's dtype), fp32, bf16, or uint8 (8-bit codes, plus one
    fp32 scale per 256-element block read and written per moment)."""
    p = torch.finfo(dtype).bits // 8
    if state == "param":
        slot = p
    elif state == torch.uint8:
        slot = 1 + 4 / 256
    else:
        slot = torch.finfo(state).bits // 8
    return 2 * p + p + 2 * slot + 2 * slot  # read p, g, m, v; write p, m, v


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
            for name, (make, state) in optimizers().items():
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
                moved = bytes_per_param(state, dtype) * n
                row = {
                    "set": set_name, "dtype": dtype_name, "optimizer": name, "ms": ms,
                    "bytes/param": bytes_per_param(state, dtype),
                    "GB/s": moved / (ms * 1e-3) / 1e9,
                    "of copy BW": moved / (ms * 1e-3) / 1e9 / bandwidth,
                    "state MB": state_bytes / 2**20,
                    "state B/param": state_bytes / n,
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
               "vs torch fused", "state MB", "state B/param", "peak added MB"]
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


def cpu_bandwidths(nbytes: int = 1 << 30, repeats: int = 10) -> dict[str, float]:
    """Host memory bandwidths in GB/s, median of ``repeats``: ``copy`` (``dst.copy_(src)``,
    bytes read + written) and ``in-place`` (``a.add_(b)``: read a and b, write a: the
    read-modify-write pattern of an optimizer step, with no write-allocate of a fresh
    destination). Neither bounds a step that keeps more streams in flight (AdamW reads 4 and
    writes 3); they are the machine's yardsticks, measured in the same run."""
    src = torch.randn(nbytes // 4)
    dst = torch.randn(nbytes // 4)
    result = {}
    for name, fn, moved in (("copy", lambda: dst.copy_(src), 2 * nbytes),
                            ("in-place", lambda: dst.add_(src), 3 * nbytes)):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        result[name] = moved / statistics.median(times) / 1e9
    return result


def run_cpu(quick: bool = False, set_name: str = "resnet50") -> dict:
    """The CPU row: ResNet-50 fp32, FusedAdamW's CPU path (torch's fused CPU op behind the
    engine's plan) against torch's AdamW implementations, interleaved, median of timed steps."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("bench.step --device cpu times the CPU path: unset TRITON_INTERPRET")
    shapes = PARAM_SETS[set_name]()
    n = numel(shapes)
    bandwidths = cpu_bandwidths(repeats=3 if quick else 10)
    bandwidth = bandwidths["in-place"]
    log(f"CPU bandwidth: copy {bandwidths['copy']:.1f} GB/s, in-place "
        f"{bandwidths['in-place']:.1f} GB/s (read + write)")
    names = ["torch for-loop", "torch foreach", "torch fused", "FusedAdamW"]
    makers = optimizers(device="cpu")
    opts = {}
    for name in names:
        opts[name] = makers[name][0](make_params(shapes))
        opts[name].step()  # state allocation
    times: dict[str, list[float]] = {name: [] for name in names}
    rounds = 3 if quick else 15
    for _ in range(rounds):  # interleaved: a slow moment of the machine hits every optimizer
        for name in names:
            start = time.perf_counter()
            opts[name].step()
            times[name].append(time.perf_counter() - start)
    rows = []
    fused_ms = statistics.median(times["torch fused"]) * 1e3
    for name in names:
        ms = statistics.median(times[name]) * 1e3
        moved = bytes_per_param("param", torch.float32) * n
        rows.append({"set": set_name, "dtype": "fp32", "optimizer": name, "ms": ms,
                     "p10 ms": _quantile(times[name], 0.1) * 1e3,
                     "p90 ms": _quantile(times[name], 0.9) * 1e3,
                     "bytes/param": bytes_per_param("param", torch.float32),
                     "GB/s": moved / (ms * 1e-3) / 1e9,
                     "of in-place BW": moved / (ms * 1e-3) / 1e9 / bandwidth,
                     "vs torch fused": ms / fused_ms})
    print(f"CPU bandwidth (read + write): copy {bandwidths['copy']:.1f} GB/s, in-place "
          f"{bandwidth:.1f} GB/s; {torch.get_num_threads()} threads")
    print(format_table(rows, ["set", "dtype", "optimizer", "ms", "p10 ms", "p90 ms",
                              "bytes/param", "GB/s", "of in-place BW", "vs torch fused"]))
    result = {"copy_bandwidth_GBps": bandwidths["copy"],
              "inplace_bandwidth_GBps": bandwidths["in-place"],
              "threads": torch.get_num_threads(), "rounds": rounds, "rows": rows}
    write_json("step_cpu", result)
    return result


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _plot(rows: list[dict], bandwidth: float) -> None:
    plt = pyplot()

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
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        run_cpu(quick=args.quick)
    else:
        run(args.sets, args.dtypes, quick=args.quick)


if __name__ == "__main__":
    main()
