"""``python -m bench``: the benchmark suite that fits this machine.

Always (CPU): the warmup recipes' LR curves, the scheduler's host overhead, the warmup-effect
study, the low-precision training study (bf16 / 8-bit state, stochastic rounding), and the
optimizer step on the CPU (FusedAdamW's CPU path vs torch's CPU AdamW). With a CUDA device, also:
the optimizer step against torch.optim and the copy bandwidth (plus clip + step), the large-batch
optimizers' step, and sync / CUDA-graph / recompile counts. Results (JSON + PNG, stamped with
device, versions and date) go to ``bench/results/`` (or ``$BENCH_RESULTS``).

    python -m bench                 # everything that fits the machine
    python -m bench --quick         # shorter runs (smoke test)
    python -m bench --only step graphs
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import log, results_dir

CPU_PARTS = ("recipes", "sched", "warmup", "precision", "step-cpu")
GPU_PARTS = ("step", "large-batch", "graphs")


def _run_part(name: str, quick: bool) -> None:
    if name == "recipes":
        from bench import plot_recipes

        plot_recipes.main()
    elif name == "sched":
        from bench import sched_overhead

        sched_overhead.run(quick=quick)
    elif name == "warmup":
        from bench import warmup_effect

        warmup_effect.run(quick=quick)
    elif name == "precision":
        from bench import precision_study

        precision_study.run(quick=quick)
    elif name == "step-cpu":
        from bench import step

        step.run_cpu(quick=quick)
    elif name == "step":
        from bench import step

        step.run(quick=quick)
    elif name == "large-batch":
        from bench import large_batch_step

        large_batch_step.run(quick=quick)
    elif name == "graphs":
        from bench import graphs

        graphs.run(quick=quick)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--only", nargs="+", choices=CPU_PARTS + GPU_PARTS,
                        help="run only these parts")
    args = parser.parse_args(argv)
    has_cuda = torch.cuda.is_available()
    parts = list(args.only or (CPU_PARTS + (GPU_PARTS if has_cuda else ())))
    if not has_cuda:
        skipped = [p for p in parts if p in GPU_PARTS]
        if skipped:
            log(f"no CUDA device: skipping {', '.join(skipped)} (GPU-only parts)")
        parts = [p for p in parts if p not in GPU_PARTS]
        if not args.only:
            log("no CUDA device: GPU parts (step, large-batch, graphs) skipped; see "
                "bench/gpu_suite.sh")
    start = time.perf_counter()
    for i, part in enumerate(parts, 1):
        log(f"[{i}/{len(parts)}] {part} ...")
        t0 = time.perf_counter()
        _run_part(part, args.quick)
        log(f"[{i}/{len(parts)}] {part} done in {time.perf_counter() - t0:.0f} s")
    log(f"all done in {time.perf_counter() - start:.0f} s; results in {results_dir()}")


if __name__ == "__main__":
    main()
