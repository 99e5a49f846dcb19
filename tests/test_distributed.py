"""FusedAdamW under DistributedDataParallel and FSDP2: two CPU processes over gloo.

Each test spawns two ranks that train a small model on their half of every batch (FusedAdamW +
GradualWarmupScheduler + ``opt.clip_grad_norm_``) and write their results to ``tmp_path``; the
parent then trains the same model on the full batches in one process with ``torch.optim.AdamW``
and ``torch.nn.utils.clip_grad_norm_`` and compares. Mean losses make the two equivalent: the
average of the per-rank half-batch means is the full-batch mean.

The ranks set ``TRITON_INTERPRET=1`` before importing ``fused``, so the real Triton kernels (the
step and the norm reduction) run in the interpreter on the CPU shards; each rank reports how many
launches it made and the parent checks that they happened. The ranks pass an explicit CPU mesh to
``fully_shard``, so the same tests also run on a machine with a GPU. With a GPU, one more test runs
FSDP2 on one rank over NCCL with the compiled kernels and checks that clip + step never syncs.
Run with::

    .venv/bin/python -m pytest tests/test_distributed.py -v
"""

from __future__ import annotations

import datetime
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

WORLD = 2
STEPS = 6
BATCH = 16  # 8 rows per rank
LR = 1e-2
WEIGHT_DECAY = 0.1
MAX_NORM = 0.05  # well under the grad norms of this model: every step clips

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


# ------------------------------------------------------------------------------ shared pieces
def _make_model() -> nn.Module:
    """Same init everywhere. Odd widths: FSDP2's dim-0 shards come out uneven (17/16, 4/3,
    2/1 rows), so the padded last shard is exercised."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 33), nn.Tanh(), nn.Linear(33, 7), nn.Tanh(),
                         nn.Linear(7, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 12, generator=gen)
    y = torch.randn(BATCH, 3, generator=gen)
    return x, y


def _make_sharded(device: str = "cpu"):
    """The model with ``fully_shard`` per Linear and at the root, and FusedAdamW over it.

    The mesh is explicit: without one, ``fully_shard`` shards onto the accelerator whenever the
    machine has one, also for the ranks that run on the CPU over gloo."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fused import FusedAdamW

    mesh = init_device_mesh(device, (dist.get_world_size(),))
    model = _make_model().to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, FusedAdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


def _make_scheduler(opt):
    from warmup import GradualWarmupScheduler

    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    return GradualWarmupScheduler(opt, multiplier=1, total_epoch=3, after_scheduler=cosine,
                                  start_factor=0.1)


def _reference(norm_type: float, device: str = "cpu") -> dict:
    """Single process, full batch: torch.optim.AdamW + torch's clip, same scheduler."""
    model = _make_model().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, foreach=False)
    sched = _make_scheduler(opt)
    norms, losses = [], []
    for step in range(STEPS):
        x, y = (t.to(device) for t in _batch(step))
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        norms.append(nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM, norm_type,
                                              foreach=False))
        opt.step()
        sched.step()
        losses.append(loss.detach())
    return {"params": {k: v.detach().clone() for k, v in model.named_parameters()},
            "norms": torch.stack(norms), "losses": torch.stack(losses), "model": model,
            "opt": opt}


def _spawn(worker, tmp_path: Path, *args, backend: str = "gloo",
           world: int = WORLD) -> list[dict]:
    """Runs ``worker(rank, out_dir, *args)`` on ``world`` ranks; their results."""
    init_method = (tmp_path / "rendezvous").resolve().as_uri()
    mp.spawn(_rank_main, args=(init_method, backend, world, str(tmp_path), worker, *args),
             nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _rank_main(rank: int, init_method: str, backend: str, world: int, out_dir: str, worker,
               *args) -> None:
    """One rank: join the group, run ``worker``, leave the group. Over gloo the kernels run in
    the Triton interpreter on the CPU; over NCCL they compile for the rank's GPU.

    A rank that succeeded ends with ``os._exit(0)``, after its results are on disk and the group
    is destroyed. DTensor's global sharding caches keep the FSDP2 DeviceMesh, and with it the
    gloo group's C++ threads, alive past ``destroy_process_group``; tearing those down during
    interpreter exit intermittently aborts the process ("terminate called without an active
    exception", about one FSDP2 run in twenty on two cores). A failing worker raises as usual,
    so ``mp.spawn`` reports its traceback."""
    # before `fused` is imported: triton.jit picks the interpreter at decoration time
    if backend == "gloo":
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
        torch.cuda.set_device(rank)
    torch.set_num_threads(1)  # two ranks on a small CPU box: no oversubscription
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        worker(rank, out_dir, *args)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _check_launches(results: list[dict]) -> None:
    for rank, res in enumerate(results):
        assert res["interpreted"], f"rank {rank} did not run the kernel in the interpreter"
        # per step: one norm-reduction launch and one AdamW launch (one fp32 CPU bucket)
        assert res["launches"] == 2 * STEPS, (rank, res["launches"])


# ------------------------------------------------------------------------------ DDP
def _ddp_worker(rank: int, out_dir: str, norm_type: float, bucket_view: bool) -> None:
    import fused.kernels.common as fk
    from fused import FusedAdamW

    model = _make_model()
    # gradient_as_bucket_view: the grads are views into DDP's all-reduce buckets, so their
    # addresses never move and FusedAdamW's pointer tables are built once
    ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
    opt = FusedAdamW(ddp.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    sched = _make_scheduler(opt)
    launches_before = fk.launches
    norms, losses, addresses = [], [], set()
    for step in range(STEPS):
        x, y = (t.chunk(WORLD)[rank] for t in _batch(step))
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(ddp(x), y)
        loss.backward()  # DDP all-reduces (averages) the grads here
        if step > 0:  # DDP rebuilds its buckets (in backward order) after iteration 0
            addresses.add(tuple(p.grad.data_ptr() for p in model.parameters()))
        norms.append(opt.clip_grad_norm_(MAX_NORM, norm_type))
        opt.step()
        sched.step()
        losses.append(loss.detach())
    torch.save({"params": {k: v.detach().clone() for k, v in model.named_parameters()},
                "norms": torch.stack(norms), "losses": torch.stack(losses),
                "launches": fk.launches - launches_before,
                "interpreted": fk.interpreter_enabled(), "grad_addresses": len(addresses)},
               Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.parametrize(("norm_type", "bucket_view"), [(2.0, False), (math.inf, True)],
                         ids=["l2", "inf-bucket-view"])
def test_ddp_matches_single_process(tmp_path, norm_type, bucket_view):
    results = _spawn(_ddp_worker, tmp_path, norm_type, bucket_view)
    _check_launches(results)
    ref = _reference(norm_type)
    assert (ref["norms"] > MAX_NORM).all(), "the test must clip on every step"
    if bucket_view:  # the grads stayed where DDP put them, even with set_to_none=True
        assert [res["grad_addresses"] for res in results] == [1, 1]
    rank0, rank1 = results
    for name, p in rank0["params"].items():
        # same all-reduced grads, same kernel: the replicas stay bitwise identical
        assert torch.equal(p, rank1["params"][name]), name
        torch.testing.assert_close(p, ref["params"][name], rtol=1e-5, atol=1e-6)
    for res in results:
        torch.testing.assert_close(res["norms"], ref["norms"], rtol=1e-5, atol=0)
    # the mean of the half-batch losses is the full-batch loss
    torch.testing.assert_close((rank0["losses"] + rank1["losses"]) / 2, ref["losses"],
                               rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ FSDP2
def _fsdp_worker(rank: int, out_dir: str, norm_type: float) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    import fused.kernels.common as fk

    model, opt = _make_sharded()
    sched = _make_scheduler(opt)
    launches_before = fk.launches
    norms, losses = [], []
    for step in range(STEPS):
        x, y = (t.chunk(WORLD)[rank] for t in _batch(step))
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        loss.backward()  # FSDP2 reduce-scatters (averages) the grads into sharded DTensors
        # the shards' |g|^p sums are all-reduced across the ranks inside
        norms.append(opt.clip_grad_norm_(MAX_NORM, norm_type))
        opt.step()
        sched.step()
        losses.append(loss.detach())
    launches = fk.launches - launches_before
    shard_shapes = {k: tuple(v.to_local().shape) for k, v in model.named_parameters()}
    params = {k: v.full_tensor().detach().clone() for k, v in model.named_parameters()}
    # optimizer state gathered into full tensors keyed by parameter FQN
    osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    state = {fqn: {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                   for k, v in s.items()}
             for fqn, s in osd["state"].items()}
    torch.save({"params": params, "norms": torch.stack(norms), "losses": torch.stack(losses),
                "launches": launches, "interpreted": fk.interpreter_enabled(),
                "shard_shapes": shard_shapes, "state": state,
                "lr": float(osd["param_groups"][0]["lr"])},
               Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
def test_fsdp2_matches_single_process(tmp_path, norm_type):
    pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2 (fully_shard)")
    results = _spawn(_fsdp_worker, tmp_path, norm_type)
    _check_launches(results)
    ref = _reference(norm_type)
    assert (ref["norms"] > MAX_NORM).all(), "the test must clip on every step"
    rank0, rank1 = results
    # really sharded, unevenly: the ranks hold different (and differently sized) pieces
    assert rank0["shard_shapes"]["0.weight"] == (17, 12)
    assert rank1["shard_shapes"]["0.weight"] == (16, 12)
    assert rank1["shard_shapes"]["4.bias"] == (1,)
    for name, p in ref["params"].items():
        for res in results:
            torch.testing.assert_close(res["params"][name], p, rtol=1e-5, atol=1e-6)
    for res in results:
        # the all-reduced total norm equals the single-process norm, on every rank
        torch.testing.assert_close(res["norms"], ref["norms"], rtol=1e-5, atol=0)
    torch.testing.assert_close((rank0["losses"] + rank1["losses"]) / 2, ref["losses"],
                               rtol=1e-5, atol=1e-7)
    # gathered optimizer state: torch.optim.AdamW's keys and values, full (unsharded) shapes
    ref_state = ref["opt"].state
    for name, p in ref["model"].named_parameters():
        theirs = ref_state[p]
        for res in results:
            ours = res["state"][name]
            assert float(ours["step"]) == float(theirs["step"]) == STEPS
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-8)
    for res in results:
        assert res["lr"] == pytest.approx(ref["opt"].param_groups[0]["lr"], rel=1e-6)


def _fsdp_resume_worker(rank: int, out_dir: str) -> None:
    """Train STEPS // 2 steps, checkpoint (full model + optimizer state dicts, scheduler state),
    rebuild everything from scratch, load, and train the rest."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    def build():
        model, opt = _make_sharded()
        return model, opt, _make_scheduler(opt)

    def train(model, opt, sched, steps):
        for step in steps:
            x, y = (t.chunk(WORLD)[rank] for t in _batch(step))
            opt.zero_grad(set_to_none=True)
            F.mse_loss(model(x), y).backward()
            opt.clip_grad_norm_(MAX_NORM)
            opt.step()
            sched.step()

    model, opt, sched = build()
    train(model, opt, sched, range(STEPS // 2))
    options = StateDictOptions(full_state_dict=True)
    checkpoint = {"model": get_model_state_dict(model, options=options),
                  "optim": get_optimizer_state_dict(model, opt, options=options),
                  "sched": sched.state_dict()}
    with torch.no_grad():  # a fresh model must not start from the trained weights
        for p in model.parameters():
            p.zero_()
    del model, opt, sched

    model, opt, sched = build()
    torch.manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    set_model_state_dict(model, checkpoint["model"], options=options)
    set_optimizer_state_dict(model, opt, checkpoint["optim"], options=options)
    sched.load_state_dict(checkpoint["sched"])
    lr_tensor = opt.param_groups[0]["lr"]
    train(model, opt, sched, range(STEPS // 2, STEPS))
    assert opt.param_groups[0]["lr"] is lr_tensor  # still the device tensor, never rebound
    torch.save({"params": {k: v.full_tensor().detach().clone()
                           for k, v in model.named_parameters()},
                "steps": [float(opt.state[p]["step"]) for p in model.parameters()]},
               Path(out_dir) / f"rank{rank}.pt")


def test_fsdp2_checkpoint_resume_matches_uninterrupted(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2 (fully_shard)")
    results = _spawn(_fsdp_resume_worker, tmp_path)
    ref = _reference(2.0)
    for res in results:
        assert res["steps"] == [float(STEPS)] * len(res["steps"])
        for name, p in ref["params"].items():
            torch.testing.assert_close(res["params"][name], p, rtol=1e-5, atol=1e-6)


SCALER_STEPS = 4
OVERFLOW_STEP = 1  # rank 0 plants an inf in its own shard of the first weight's grad


def _fsdp_scaler_worker(rank: int, out_dir: str) -> None:
    model, opt = _make_sharded()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    first = next(model.parameters())
    scales, steps, norms = [], [], []
    for step in range(SCALER_STEPS):
        x, y = (t.chunk(WORLD)[rank] for t in _batch(step))
        opt.zero_grad(set_to_none=True)
        scaler.scale(F.mse_loss(model(x), y)).backward()
        if step == OVERFLOW_STEP and rank == 0:
            with torch.no_grad():
                first.grad.to_local()[0, 0] = math.inf  # global element [0, 0]
        norms.append(opt.clip_grad_norm_(MAX_NORM, grad_scaler=scaler))
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        steps.append(float(opt.state[first]["step"]))
    torch.save({"params": {k: v.full_tensor().detach().clone()
                           for k, v in model.named_parameters()},
                "scales": scales, "steps": steps, "norms": torch.stack(norms)},
               Path(out_dir) / f"rank{rank}.pt")


def test_fsdp2_grad_scaler_overflow_on_one_rank_skips_on_all(tmp_path):
    """An inf in one rank's shard: every rank sees an inf norm and skips the step (the
    DTensor grads' inf check and our norm all-reduce both cover the whole gradient), and the
    run equals torch.optim.AdamW + GradScaler (unscale_, clip, step) in one process."""
    pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2 (fully_shard)")
    results = _spawn(_fsdp_scaler_worker, tmp_path)
    model = _make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scales, norms = [], []
    for step in range(SCALER_STEPS):
        x, y = _batch(step)
        opt.zero_grad(set_to_none=True)
        scaler.scale(F.mse_loss(model(x), y)).backward()
        if step == OVERFLOW_STEP:
            with torch.no_grad():
                model[0].weight.grad[0, 0] = math.inf
        scaler.unscale_(opt)
        norms.append(nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM, foreach=False))
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    assert scales == [2.0**10, 2.0**9, 2.0**9, 2.0**9]
    for res in results:
        assert res["scales"] == scales
        assert res["steps"] == [1.0, 1.0, 2.0, 3.0]  # the overflow step did not count
        assert math.isinf(res["norms"][OVERFLOW_STEP])
        finite = [i for i in range(SCALER_STEPS) if i != OVERFLOW_STEP]
        torch.testing.assert_close(res["norms"][finite], torch.stack(norms)[finite], rtol=1e-5,
                                   atol=0)
        for name, p in model.named_parameters():
            torch.testing.assert_close(res["params"][name], p.detach(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ FSDP2 on a GPU
def _fsdp_cuda_worker(rank: int, out_dir: str) -> None:
    import fused.kernels.common as fk

    model, opt = _make_sharded("cuda")
    sched = _make_scheduler(opt)
    launches_before = fk.launches
    norms = []
    for step in range(STEPS):
        x, y = (t.cuda() for t in _batch(step))
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        torch.cuda.set_sync_debug_mode("error")  # any host sync below raises
        try:
            norms.append(opt.clip_grad_norm_(MAX_NORM))  # all-reduce over NCCL inside
            opt.step()
            sched.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.save({"params": {k: v.full_tensor().detach().cpu()
                           for k, v in model.named_parameters()},
                "norms": torch.stack(norms).cpu(), "launches": fk.launches - launches_before,
                "interpreted": fk.interpreter_enabled(),
                "dtensor": all(hasattr(p, "device_mesh") for p in model.parameters())},
               Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.cuda
def test_fsdp2_cuda_nccl_one_rank_matches_and_never_syncs(tmp_path):
    """One GPU, one rank over NCCL: FSDP2's DTensor params, the compiled kernels on their local
    shards and the clip's all-reduce over NCCL, with no host sync in clip + step + schedule;
    equal to torch.optim.AdamW + clip_grad_norm_ on the same GPU. (Two ranks need two GPUs.)"""
    pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2 (fully_shard)")
    if not dist.is_nccl_available():
        pytest.skip("needs NCCL")
    (res,) = _spawn(_fsdp_cuda_worker, tmp_path, backend="nccl", world=1)
    assert res["dtensor"] and not res["interpreted"]
    assert res["launches"] == 2 * STEPS  # the norm reduction and the step, every step
    ref = _reference(2.0, "cuda")
    assert (ref["norms"] > MAX_NORM).all(), "the test must clip on every step"
    torch.testing.assert_close(res["norms"], ref["norms"].cpu(), rtol=1e-5, atol=0)
    for name, p in ref["params"].items():
        torch.testing.assert_close(res["params"][name], p.cpu(), rtol=1e-5, atol=1e-6)
