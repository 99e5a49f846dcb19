"""Shared bench plumbing: the stamp every result file carries, JSON/PNG writers, table printing."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
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
