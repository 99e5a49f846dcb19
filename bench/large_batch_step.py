"""Large-batch optimizer-step benchmark (GPU): FusedSGD / FusedLARS / FusedLAMB against torch's
SGD and timm's Lars / Lamb, beside the copy bandwidth.

For each case it times one ``step()`` (median of ``triton.testing.do_bench`` after warm-up, all
implementations in one process), converts it to GB/s from the fewest bytes the algorithm must move
per param (``BYTES_PER_PARAM``, fp32) and sets it beside the device-to-device copy bandwidth
measured in the same run:

- SGD, momentum 0.9, weight decay 1e-4 (the Goyal / ResNet recipes), on flat-1e9, GPT-2-124M and
  ResNet-50: torch's for-loop / foreach / fused SGD vs FusedSGD (target: ≤ 1.0x torch fused);
- LARS (momentum 0.9, weight decay 1e-4, every tensor adapted) and LAMB (timm's defaults: global
  clip at 1.0, weight decay 0.01; and without the clip) on GPT-2-124M and flat-1e9: timm's Lars /
  Lamb vs FusedLARS / FusedLAMB (targets: ≥ 5x timm, ≥ 85% of copy bandwidth).

timm is optional (``pip install --no-deps timm==1.0.29``; its optimizers are loaded without
``timm/__init__``, which imports torchvision). timm 1.0.29's Lamb and Lars have no ``foreach``
option (one loop over the tensors): where a timm version has one, it is passed ``foreach=True``.

    python -m bench.large_batch_step            # everything (GPU)
    python -m bench.large_batch_step --quick    # GPT-2 and ResNet-50 only, shorter timings
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import inspect
import sys
import types

import torch

from bench.common import format_table, log, pyplot, save_figure, write_json
from bench.param_sets import PARAM_SETS, make_params, numel

# The fewest bytes one fp32 step must move per param (read + write), as counted in the README:
#   SGD (momentum):  read p, g, buf; write p, buf                                      = 20
#   LARS:  norm pass (read p, g: 8) + update (read p, g, buf; write p, buf: 20)       = 28
#   LAMB:  global grad norm (read g: 4) + moments (read p, g, m, v; write m, v: 24)
#          + apply (read p, m, v; write p: 16)                                        = 44
#   LAMB without max_grad_norm: no global norm pass                                   = 40
# A trust ratio needs the whole tensor's norm before any element is updated: two passes.
BYTES_PER_PARAM = {"sgd": 20, "lars": 28, "lamb": 44, "lamb-no-clip": 40}

SGD_SETS = ("flat-1e9", "gpt2-124m", "resnet50")
TRUST_SETS = ("gpt2-124m", "flat-1e9")


def load_timm_optimizers():
    """(Lamb, Lars) from the installed timm, or None: ``timm/optim/lamb.py`` and ``lars.py``
    loaded under a private package name, without ``timm/__init__`` (which needs torchvision).
    Shared with the tests."""
    name = "_timm_optim_for_fused"
    if name not in sys.modules:
        spec = importlib.util.find_spec("timm")
        if spec is None or not spec.submodule_search_locations:
            return None
        package = types.ModuleType(name)
        package.__path__ = [f"{spec.submodule_search_locations[0]}/optim"]
        sys.modules[name] = package
    try:
        lamb = importlib.import_module(f"{name}.lamb")
        lars = importlib.import_module(f"{name}.lars")
    except ImportError:
        return None
    return lamb.Lamb, lars.Lars


def _with_foreach(cls, **kwargs):
    """``cls(params, **kwargs)``, plus ``foreach=True`` where the class takes it."""
    if "foreach" in inspect.signature(cls).parameters:
        kwargs["foreach"] = True
    return lambda ps: cls(ps, **kwargs)


def cases(quick: bool = False) -> list[dict]:
    """Every row to time: set, algorithm, name, constructor over a list of params."""
    from fused import FusedLAMB, FusedLARS, FusedSGD

    sgd = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    lars = dict(lr=1.0, momentum=0.9, weight_decay=1e-4)
    lamb = dict(lr=1e-3, weight_decay=0.01)
    timm = load_timm_optimizers()
    if timm is None:
        log("timm not installed: the timm rows are skipped (pip install --no-deps timm==1.0.29)")
    rows = []
    for set_name in SGD_SETS if not quick else ("gpt2-124m", "resnet50"):
        for name, make in (
            ("torch SGD for-loop", lambda ps: torch.optim.SGD(ps, foreach=False, **sgd)),
            ("torch SGD foreach", lambda ps: torch.optim.SGD(ps, foreach=True, **sgd)),
            ("torch SGD fused", lambda ps: torch.optim.SGD(ps, fused=True, **sgd)),
            ("FusedSGD", lambda ps: FusedSGD(ps, **sgd)),
        ):
            if quick and name == "torch SGD for-loop":
                continue
            rows.append(dict(set=set_name, algorithm="sgd", optimizer=name, make=make,
                             baseline=name == "torch SGD fused"))
    for set_name in TRUST_SETS if not quick else ("gpt2-124m",):
        if timm is not None:
            timm_lamb, timm_lars = timm
            rows.append(dict(set=set_name, algorithm="lars", optimizer="timm Lars",
                             make=_with_foreach(timm_lars, **lars), baseline=True))
        rows.append(dict(set=set_name, algorithm="lars", optimizer="FusedLARS",
                         make=lambda ps: FusedLARS(ps, **lars), baseline=False))
        if timm is not None:
            rows.append(dict(set=set_name, algorithm="lamb", optimizer="timm Lamb",
                             make=_with_foreach(timm_lamb, **lamb), baseline=True))
        rows.append(dict(set=set_name, algorithm="lamb", optimizer="FusedLAMB",
                         make=lambda ps: FusedLAMB(ps, **lamb), baseline=False))
        rows.append(dict(set=set_name, algorithm="lamb-no-clip",
                         optimizer="FusedLAMB (max_grad_norm=None)",
                         make=lambda ps: FusedLAMB(ps, max_grad_norm=None, **lamb),
                         baseline=False))
    return rows


def run(quick: bool = False) -> dict:
    if not torch.cuda.is_available():
        log("bench.large_batch_step: no CUDA device, skipped")
        return {"skipped": "no CUDA device"}
    from triton.testing import do_bench

    from bench.step import copy_bandwidth

    bandwidth = copy_bandwidth()
    log(f"copy bandwidth: {bandwidth:.0f} GB/s (read + write)")
    rows = []
    for case in cases(quick):
        shapes = PARAM_SETS[case["set"]]()
        n = numel(shapes)
        params = make_params(shapes, device="cuda")
        opt = case["make"](params)
        opt.step()  # state allocation, compilation
        torch.cuda.synchronize()
        ms = do_bench(opt.step, warmup=50 if quick else 200, rep=200 if quick else 1000,
                      return_mode="median")
        nbytes = BYTES_PER_PARAM[case["algorithm"]]
        gbps = nbytes * n / (ms * 1e-3) / 1e9
        rows.append({"set": case["set"], "algorithm": case["algorithm"],
                     "optimizer": case["optimizer"], "ms": ms, "bytes/param": nbytes,
                     "GB/s": gbps, "of copy BW": gbps / bandwidth,
                     "baseline": case["baseline"]})
        log(f"{case['set']} {case['optimizer']}: {ms:.3f} ms, {gbps:.0f} GB/s")
        del opt, params
        gc.collect()
        torch.cuda.empty_cache()
    for row in rows:  # speed-up over the case's baseline (torch fused SGD, timm)
        algorithm = "lamb" if row["algorithm"] == "lamb-no-clip" else row["algorithm"]
        base = [r["ms"] for r in rows if r["baseline"] and r["set"] == row["set"]
                and r["algorithm"] == algorithm]
        row["time vs baseline"] = row["ms"] / base[0] if base else None
    columns = ["set", "algorithm", "optimizer", "ms", "bytes/param", "GB/s", "of copy BW",
               "time vs baseline"]
    print(f"copy bandwidth (read + write): {bandwidth:.0f} GB/s")
    print(format_table(rows, columns))
    result = {"copy_bandwidth_GBps": bandwidth, "bytes_per_param": BYTES_PER_PARAM,
              "rows": rows}
    write_json("step_large_batch", result)
    _plot(rows, bandwidth)
    return result


def _plot(rows: list[dict], bandwidth: float) -> None:
    plt = pyplot()

    labels = [f"{r['set']}\n{r['optimizer']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(rows)), 4.5))
    colors = ["tab:gray" if not r["optimizer"].startswith("Fused") else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), [r["of copy BW"] for r in rows], color=colors)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.axhline(0.85, color="tab:red", lw=0.8, ls=":")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"fraction of copy bandwidth ({bandwidth:.0f} GB/s)")
    ax.set_title(f"SGD / LARS / LAMB step (fewest bytes), {torch.cuda.get_device_name()}")
    save_figure(fig, "step_large_batch")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="GPT-2 and ResNet-50 only, shorter timings")
    args = parser.parse_args(argv)
    run(quick=args.quick)


if __name__ == "__main__":
    main()
