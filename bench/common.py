"""Shared bench plumbing: the stamp every result file carries, JSON/PNG writers, table printing,
seed summaries and the worker pool of the CPU studies."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"


def stamp() -> dict:
    """Device, versions and date: written into every result file."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # the CPU-only parts of the bench do not need triton
        triton_version = None
    return {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def results_dir() -> Path:
    """Where result files go: ``$BENCH_RESULTS`` if set (the GPU suite points it at ``$OUT``)."""
    path = Path(os.environ.get("BENCH_RESULTS", RESULTS_DIR))
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(name: str, payload: dict) -> Path:
    path = results_dir() / f"{name}.json"
    path.write_text(json.dumps({"stamp": stamp(), **payload}, indent=2) + "\n")
    log(f"wrote {path}")
    return path


def save_figure(fig, name: str) -> Path:
    path = results_dir() / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    log(f"wrote {path}")
    return path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish_figure(fig, name: str, title: str, fontsize: float = 10) -> Path:
    """``title`` with the device and date as the figure's suptitle, tight layout, saved as
    ``name``.png (:func:`save_figure`), closed."""
    s = stamp()
    fig.suptitle(f"{title} — {s['device']}, {s['date']}", fontsize=fontsize)
    fig.tight_layout()
    path = save_figure(fig, name)
    pyplot().close(fig)
    return path


def log(msg: str) -> None:
    """Progress line (stderr, flushed), so a long run shows where it is."""
    print(msg, file=sys.stderr, flush=True)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain fixed-width table of ``rows`` (dicts) over ``columns``."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------------------------------------
# the CPU studies: seed summaries and runs in worker processes
# ---------------------------------------------------------------------------------------------
def summary(values: list[float]) -> dict:
    """Mean, std, min, max over seeds; mean and std NaN if any run diverged (non-finite)."""
    finite = [v for v in values if math.isfinite(v)]
    ok = len(finite) == len(values)
    return {"mean": statistics.fmean(values) if ok else float("nan"),
            "std": statistics.stdev(values) if ok and len(values) > 1 else float("nan"),
            "min": min(finite) if finite else float("nan"),
            "max": max(finite) if finite else float("nan"),
            "values": values, "diverged": len(values) - len(finite)}


def pm(s: dict, scale: float = 1.0, digits: int = 3) -> str:
    """A :func:`summary` as ``mean ± std [min, max]`` (times ``scale``)."""
    if not math.isfinite(s["mean"]):
        return f"diverged in {s['diverged']}/{len(s['values'])}"
    return (f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f} "
            f"[{s['min'] * scale:.{digits}f}, {s['max'] * scale:.{digits}f}]")


def se_diff(a: dict, b: dict) -> float:
    """Standard error of the difference of two arms' means (seeds taken as independent)."""
    return math.sqrt(a["std"] ** 2 / len(a["values"]) + b["std"] ** 2 / len(b["values"]))


def config_key(cfg: dict) -> tuple:
    """A config dict as a hashable key (lists as tuples), for per-process data caches."""
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(cfg.items()))


def _job(fn, kwargs: dict) -> tuple[dict, float]:
    """Worker entry: one run, single-threaded; its result and seconds."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    result = fn(**kwargs)
    return result, time.perf_counter() - t0


def run_jobs(jobs: dict, workers: int, threads: int, report, follow_up=None) -> dict:
    """Runs ``jobs`` (key → (priority, fn, kwargs); ``fn`` a module-level function), the lowest
    priority first, in ``workers`` spawned single-threaded processes (in this process with
    ``threads`` threads when 1). After each run ``report(done, key, result, seconds)`` logs it
    and ``follow_up(done)`` may add jobs (those that need a sweep's winner). Returns key →
    result."""
    done: dict = {}
    queue = dict(jobs)

    def finished(key, result, seconds):
        done[key] = result
        report(done, key, result, seconds)
        if follow_up is not None:
            queue.update({k: v for k, v in follow_up(done).items() if k not in done})

    def take():
        key = min(queue, key=lambda k: queue[k][0])
        return key, queue.pop(key)

    if workers <= 1:
        while queue:
            key, (_, fn, kwargs) = take()
            t0 = time.perf_counter()
            torch.set_num_threads(threads)
            finished(key, fn(**kwargs), time.perf_counter() - t0)
        return done
    submitted = set()
    # spawn, not fork: a forked child of a process that has used torch's thread pool can hang
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        running = {}
        while queue or running:
            while queue and len(running) < workers:
                key, (_, fn, kwargs) = take()
                if key not in submitted:
                    submitted.add(key)
                    running[pool.submit(_job, fn, kwargs)] = key
            ready, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in ready:
                key = running.pop(future)
                finished(key, *future.result())
            for key in list(queue):  # a follow-up that is already running or done
                if key in submitted:
                    queue.pop(key)
    return done
