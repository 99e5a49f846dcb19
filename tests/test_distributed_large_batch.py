"""FusedSGD, FusedLARS and FusedLAMB under DistributedDataParallel and FSDP2: two CPU processes
over gloo (the spawn and rank helpers of tests/test_distributed.py).

Each test spawns two ranks that train the same small model (odd widths: FSDP2's dim-0 shards
are uneven) with each of the three optimizers in turn, on their half of every batch, with the
recipes' param groups (weight decay, and so LARS / LAMB adaptation, on the weight matrices
only), the warmup + cosine schedule, ``opt.clip_grad_norm_`` before the LARS step and LAMB's own
global clip. The parent trains the same model on the full batches in one process with
``torch.optim.SGD`` and timm's ``Lars`` / ``Lamb`` (their transcription in fused/reference.py
without timm) and ``torch.nn.utils.clip_grad_norm_``, and compares. Under FSDP2 the ranks also
gather the optimizer state with torch.distributed.checkpoint, load it into a fresh sharded
model and optimizer, and check that one more step matches the uninterrupted run.

Under FSDP2 a trust ratio needs the norms of the whole tensor while a rank holds a shard: the
per-shard sums of p² and g² (LARS) or p² and u² (LAMB) are all-reduced on the device, so the
sharded run equals the single process only if that works. The ranks run the real Triton kernels
in the interpreter (``TRITON_INTERPRET=1`` before ``fused`` is imported: this module imports it
only inside the workers) and report their launches.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .test_distributed import (
    MAX_NORM,
    STEPS,
    WORLD,
    _batch,
    _make_model,
    _make_scheduler,
    _spawn,
)

KINDS = ("sgd", "lars", "lamb")
CONFIGS = {
    "sgd": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "lars": dict(lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coeff=0.02),
    "lamb": dict(lr=1e-2, weight_decay=0.1, max_grad_norm=MAX_NORM),
}
CLIPPED = ("lars",)  # opt.clip_grad_norm_(MAX_NORM) before the step
# launches per step (one fp32 bucket): SGD the update; LARS the clip's norm pass, the norm pass,
# the segment sum, the update; LAMB the global norm, the moments, the segment sum, the update
LAUNCHES = {"sgd": 1, "lars": 4, "lamb": 4}
SLOTS = {"sgd": ("momentum_buffer",), "lars": ("momentum_buffer",),
         "lamb": ("exp_avg", "exp_avg_sq")}

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _groups(model: nn.Module, kind: str) -> list[dict]:
    weight_decay = CONFIGS[kind]["weight_decay"]
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _train(model: nn.Module, forward, opt, kind: str, rank: int | None = None) -> None:
    """STEPS steps on the full batch (rank None) or on this rank's half."""
    sched = _make_scheduler(opt)
    for step in range(STEPS):
        x, y = _batch(step)
        if rank is not None:
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        opt.zero_grad(set_to_none=True)
        F.mse_loss(forward(x), y).backward()
        if kind in CLIPPED:
            if rank is None:
                nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM, foreach=False)
            else:
                opt.clip_grad_norm_(MAX_NORM)
        opt.step()
        sched.step()


def _sharded_model() -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = _make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _worker(rank: int, out_dir: str, mode: str) -> None:
    import fused
    import fused.kernels.common as fk

    classes = {"sgd": fused.FusedSGD, "lars": fused.FusedLARS, "lamb": fused.FusedLAMB}
    results = {"interpreted": fk.interpreter_enabled()}
    for kind in KINDS:
        if mode == "ddp":
            model = _make_model()
            # the grads are views into DDP's all-reduce buckets: their addresses never move
            forward = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
        else:
            model = forward = _sharded_model()
        opt = classes[kind](_groups(model, kind), **CONFIGS[kind])
        before = fk.launches
        _train(model, forward, opt, kind, rank)
        result = {"launches": fk.launches - before}
        if mode == "ddp":
            result["params"] = {k: v.detach().clone() for k, v in model.named_parameters()}
        else:
            result.update(_fsdp_results(model, opt, classes[kind], kind, rank))
        results[kind] = result
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _fsdp_results(model, opt, cls, kind: str, rank: int) -> dict:
    """Whole params and gathered state; then a resume: a fresh sharded model and optimizer
    loaded from the full state dicts (torch.distributed.checkpoint) take one more step, as the
    original does: the results must be the same."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    result = {"params": {k: v.full_tensor().detach().clone()
                         for k, v in model.named_parameters()},
              "shard_rows": model[0].weight.to_local().shape[0]}
    # the optimizer state gathered into whole tensors, keyed by parameter FQN
    osd = get_optimizer_state_dict(model, opt, options=options)
    result["state"] = {fqn: {k: (v.full_tensor() if hasattr(v, "full_tensor") else v)
                             .detach().clone() for k, v in s.items()}
                       for fqn, s in osd["state"].items()}
    result["group_steps"] = [g.get("step") for g in osd["param_groups"]]
    msd = get_model_state_dict(model, options=options)
    restored = _sharded_model()
    restored_opt = cls(_groups(restored, kind), **dict(CONFIGS[kind], lr=123.0))
    _make_scheduler(restored_opt)  # (its initial_lr is in the checkpoint's groups)
    set_model_state_dict(restored, msd, options=options)
    set_optimizer_state_dict(restored, restored_opt, osd, options=options)
    x, y = (t.chunk(WORLD)[rank] for t in _batch(STEPS))
    for m, o in ((model, opt), (restored, restored_opt)):
        o.zero_grad(set_to_none=True)
        F.mse_loss(m(x), y).backward()
        o.step()
    result["resumed"] = [{k: v.full_tensor().detach().clone() for k, v in m.named_parameters()}
                         for m in (model, restored)]
    return result


def _reference(kind: str):
    from .test_large_batch import reference_class

    model = _make_model()
    opt = reference_class(kind)(_groups(model, kind), **CONFIGS[kind])
    _train(model, model, opt, kind)
    return model, opt


def _check(results: list[dict], mode: str) -> None:
    for rank, res in enumerate(results):
        assert res["interpreted"], f"rank {rank} did not run the kernels in the interpreter"
        for kind in KINDS:
            assert res[kind]["launches"] == LAUNCHES[kind] * STEPS, (rank, kind)
    for kind in KINDS:
        model, opt = _reference(kind)
        for name, p in model.named_parameters():
            for res in results:
                torch.testing.assert_close(res[kind]["params"][name], p.detach(), rtol=1e-5,
                                           atol=1e-6, msg=lambda m, k=kind, n=name: f"{k} {n}: {m}")
        if mode == "ddp":  # same all-reduced grads, same kernels: replicas stay bitwise equal
            for name, p in results[0][kind]["params"].items():
                assert torch.equal(p, results[1][kind]["params"][name]), (kind, name)
            continue
        # FSDP2: the gathered state is the reference's (keys, values, whole shapes)
        assert [res[kind]["shard_rows"] for res in results] == [17, 16]  # uneven shards
        for name, p in model.named_parameters():
            theirs = opt.state[p]
            for res in results:
                ours = res[kind]["state"][name]
                for slot in SLOTS[kind]:
                    torch.testing.assert_close(ours[slot], theirs[slot], rtol=1e-5, atol=1e-7,
                                               msg=lambda m, k=kind, s=slot: f"{k} {s}: {m}")
                assert float(ours["step"]) == STEPS
        for res in results:
            if kind == "lamb":  # timm's per-group step count
                assert [float(s) for s in res[kind]["group_steps"]] == [STEPS, STEPS]
            # a resumed run steps exactly like the uninterrupted one
            uninterrupted, resumed = res[kind]["resumed"]
            for name, p in uninterrupted.items():
                assert torch.equal(p, resumed[name]), (kind, name)


def test_ddp_matches_single_process(tmp_path):
    results = _spawn(_worker, tmp_path, "ddp")
    _check(results, "ddp")


def test_fsdp2_matches_single_process(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2 (fully_shard)")
    results = _spawn(_worker, tmp_path, "fsdp2")
    _check(results, "fsdp2")
