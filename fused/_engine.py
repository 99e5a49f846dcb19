"""The engine every fused optimizer runs on; it holds no optimizer math.

An algorithm (:mod:`fused.adamw`, :mod:`fused.sgd`, :mod:`fused.lamb`) subclasses
:class:`FusedOptimizer` and adds only its arguments and validation, its state slots, its
hyperparameter row, its kernel launch and its torch reference. The engine does the rest, the same
way for all of them:

- the learning rate: a 0-dim tensor per param group on the group's device, which schedulers
  ``fill_`` and the kernels load (fp32; fp64 for a group holding fp64 params);
- the step plan: params with grads grouped into buckets of one device, dtype, LR dtype, state
  format and set of kernel flags, each stepped with one launch (or a fixed few for two-pass
  algorithms); rebuilt only when the groups, their hyperparameters or the set of params with
  grads change;
- per bucket: the step counts in one flat fp32 buffer (``state["step"]`` are 0-dim views of it,
  one ``add_`` per step), and the kernel's tables, cached by address (graph-safe);
- state formats: fp32, bf16 or 8-bit blockwise (``state_dtype``), optionally written with
  stochastic rounding keyed by a per-optimizer seed and the device step count;
- GradScaler (``grad_scale`` / ``found_inf``), the fused global-norm clip, DTensor (FSDP2) local
  shards and the on-device all-reduce of norms, complex params as real views;
- checkpoints in torch's layout (the state keeps its dtype; 8-bit slots are saved as
  ``<slot>_codes`` + ``<slot>_scales``), and loading any format into any other;
- three ways to run an update: the Triton kernel (CUDA; CPU under ``TRITON_INTERPRET=1``), an
  algorithm's torch fused op where torch has one with the same math and state (CPU fp32, fp64),
  and the torch reference, which the engine wraps with the state formats, rounding and
  ``found_inf`` so that an algorithm's reference is only its fp32 math.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import formats

try:
    from .kernels import common as kernels
except ImportError:  # triton missing: CPU params still work through the torch path
    kernels = None

TRITON_HINT = "needs triton for CUDA tensors: pip install 'triton>=3.6'"
_NATIVE = "native"  # fp64 / complex params: state in the param's own dtype, no low-precision format
_STATE_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in formats.STATE_DTYPES}


def uses_kernel(device: torch.device, what: str = "the optimizer") -> bool:
    """CUDA tensors run the Triton kernels; CPU tensors only under TRITON_INTERPRET=1 (tests)."""
    if device.type == "cuda":
        if kernels is None:
            raise ImportError(f"{what} {TRITON_HINT}")
        return True
    return device.type == "cpu" and kernels is not None and kernels.interpreter_enabled()


@dataclass
class StepContext:
    """What one step hands every bucket: GradScaler's scale and inf flag, the pending clip
    coefficient (0-dim fp32 device tensors or None)."""
    grad_scale: Tensor | None
    found_inf: Tensor | None
    grad_mul: Tensor | None


class FusedOptimizer(Optimizer):
    """Base class of the fused optimizers (see the module docstring). Subclasses set ``SLOTS``
    (the state tensors an algorithm may keep, in kernel slot order) and ``SIGNED_SLOTS`` (those
    that take negative values: the signed 8-bit code map), and implement the hooks below."""

    SLOTS: tuple[str, ...] = ()
    SIGNED_SLOTS: frozenset[str] = frozenset()

    def __init__(self, params: Iterable, defaults: dict, *,
                 state_dtype: torch.dtype = torch.float32, stochastic_rounding: bool = False):
        defaults = dict(defaults, state_dtype=state_dtype,
                        stochastic_rounding=stochastic_rounding)
        # the defaults first, as torch does: a bad default is refused even if every group
        # overrides it, and before `params` is looked at
        self._validate(defaults)
        self._group_keys = tuple(defaults)  # torch's base class adds its own keys to defaults
        self._lr_tensors: list[Tensor] = []
        self._plan: _Plan | None = None
        self._clip_coef: Tensor | None = None
        self._seed: int | None = None
        self._tables = kernels.TableCache() if kernels is not None else None
        super().__init__(params, defaults)
        # GradScaler: hand grad_scale / found_inf to step() instead of unscaling the grads itself
        self._step_supports_amp_scaling = True

    # ------------------------------------------------------------------ algorithm hooks
    def _validate_hyperparameters(self, group: dict) -> None:
        """Raise ValueError naming the argument and value (everything but lr / state format)."""

    def _normalize(self, group: dict) -> None:
        """Canonicalize a validated group in place (e.g. tensor betas to floats)."""

    def _group_slots(self, group: dict) -> tuple[str, ...]:
        """The state slots this group's params keep."""
        return self.SLOTS

    def _hyper_row(self, group: dict) -> tuple[float, ...]:
        """The group's fp64 hyperparameter row for the kernel's table (≤ 8 values)."""
        raise NotImplementedError

    def _bucket_flags(self, group: dict) -> tuple:
        """The group's settings that are kernel constexprs (they split buckets)."""
        return ()

    def _torch_fused_ok(self, bucket: Bucket) -> bool:
        """Whether torch has a fused op with this bucket's math and state layout."""
        return False

    def _begin_step(self) -> None:
        """Called by :meth:`step` before the buckets (e.g. LAMB's global grad norm)."""

    def _end_step(self) -> None:
        """Called by :meth:`step` after the buckets, also when a bucket raised."""

    def _update(self, bucket: Bucket, idx: list[int], grads: list[Tensor], backend: str,
                ctx: StepContext) -> None:
        """Step tensors ``idx`` of ``bucket`` (steps already incremented) on ``backend``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ groups and validation
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate(group)
            device = _group_device(group, type(self).__name__)
        except ValueError:
            self.param_groups.pop()
            raise
        self._plan = None
        self._normalize(group)
        if group["stochastic_rounding"]:
            group.setdefault("rounding_seed", self._rounding_seed())
        lr = group["lr"]
        lr_dtype = _lr_dtype(group["params"])
        lr_tensor = (lr.detach().to(device=device, dtype=lr_dtype).reshape(()).clone()
                     if isinstance(lr, Tensor)
                     else torch.tensor(float(lr), dtype=lr_dtype, device=device))
        group["lr"] = lr_tensor
        self._lr_tensors.append(lr_tensor)

    def _validate(self, group: dict, read_lr: bool = True) -> None:
        """ValueError naming the argument and the value (torch's messages); ``read_lr=False``
        skips reading a tensor LR on the host (the functional forms must not sync)."""
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        if not (isinstance(lr, Tensor) and not read_lr):
            value = lr.detach().reshape(-1)[0].item() if isinstance(lr, Tensor) else lr
            validate_number("lr", value, label="learning rate")
        if "state_dtype" in group and group["state_dtype"] not in formats.STATE_DTYPES:
            raise ValueError(f"Invalid state_dtype: {group['state_dtype']!r} (expected "
                             "torch.float32, torch.bfloat16 or torch.uint8)")
        if "stochastic_rounding" in group and not isinstance(group["stochastic_rounding"], bool):
            raise ValueError(f"Invalid stochastic_rounding: {group['stochastic_rounding']!r} "
                             "(expected True or False)")
        self._validate_hyperparameters(group)

    def _rounding_seed(self) -> int:
        """The optimizer's stochastic-rounding seed: drawn once from torch's default generator
        (so ``torch.manual_seed`` makes a run reproducible), kept in every group's
        ``rounding_seed`` and in checkpoints."""
        if self._seed is None:
            self._seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        return self._seed

    def _group_lr(self, index: int, group: dict) -> Tensor:
        """The group's LR tensor; a float (or foreign tensor) assigned since is adopted back."""
        own = self._lr_tensors[index]
        lr = group["lr"]
        if lr is own:
            return own
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError(f"Invalid learning rate: param_groups[{index}]['lr'] has shape "
                                 f"{tuple(lr.shape)}, expected a single value")
            own.copy_(lr.detach().reshape(()))
        else:
            validate_number("lr", lr, high_inclusive=True, label="learning rate")
            own.fill_(lr)
        group["lr"] = own
        return own

    # ------------------------------------------------------------------ the step
    # torch.compile: the step is a fixed few launches per bucket, kept out of compiled graphs, so
    # a compiled training step graph-breaks here and never guards on (or recompiles for) the LR.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        self._begin_step()
        try:
            grad_mul, self._clip_coef = self._clip_coef, None
            for bucket in self._current_plan().buckets:
                device = bucket.device
                bucket.step(self, StepContext(_on(grad_scale, device), _on(found_inf, device),
                                              _on(grad_mul, device)))
        finally:
            self._end_step()
        return loss

    def _current_plan(self) -> _Plan:
        """The buckets of this step, rebuilt only when the groups, their settings or the set of
        params with grads changed (the per-step cost is a few list comprehensions)."""
        signature = []
        has_grad = []
        for index, group in enumerate(self.param_groups):
            self._group_lr(index, group)
            signature.append(tuple((k, _frozen(v)) for k, v in group.items()
                                   if k not in ("params", "lr", "param_names")))
            signature.append(len(group["params"]))
            has_grad.append([p.grad is None for p in group["params"]])
        key = (signature, has_grad)
        if self._plan is None or self._plan.key != key:
            self._plan = _Plan(key, self)
        return self._plan

    # ------------------------------------------------------------------ clipping
    @torch.compiler.disable
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False, *, grad_scaler=None) -> Tensor:
        r"""Clips the gradient norm of this optimizer's params inside the next :meth:`step`.

        Call it where ``torch.nn.utils.clip_grad_norm_`` goes (after backward, before
        ``step()``). One multi-tensor pass computes the total norm on the device; the next
        ``step()`` multiplies every grad by ``clamp(max_norm / (total_norm + 1e-6), max=1)``
        as it loads it, so the grads are never rewritten and nothing is read on the host. The
        grads themselves stay unclipped until then (the step applies the clip).

        Same result as ``torch.nn.utils.clip_grad_norm_`` followed by the step, non-finite norms
        included: a NaN/inf total norm gives a NaN/0 coefficient exactly as there (with
        ``GradScaler`` such a step is skipped anyway). With FSDP2 (DTensor params sharded over
        a mesh) the p-th power sums are all-reduced across ranks, asynchronously on the device.

        Args:
            max_norm (float): max norm of the gradients
            norm_type (float): type of the p-norm; ``inf`` for the max norm (default: 2.0)
            error_if_nonfinite (bool): raise if the total norm is NaN or inf; this reads the
                norm on the host, i.e. synchronizes (default: False)
            grad_scaler (torch.amp.GradScaler, optional): the grads are still scaled by it (no
                ``unscale_`` call): the norm is divided by its scale on the device, and the
                step unscales the grads as it loads them (default: None)

        Returns:
            Tensor: the total norm of the (unscaled) gradients, a 0-dim device tensor.
        """
        max_norm = float(max_norm)
        norm_type = float(norm_type)
        if not (norm_type > 0.0):
            raise ValueError(f"Invalid norm_type: {norm_type} (expected a p > 0 or inf)")
        if not (max_norm >= 0.0):
            raise ValueError(f"Invalid max_norm: {max_norm}")
        total_norm = self._global_grad_norm(norm_type)
        if total_norm is None:
            self._clip_coef = None
            return torch.zeros(())
        if grad_scaler is not None and grad_scaler.is_enabled():
            total_norm = total_norm / grad_scaler._get_scale_async().to(total_norm.device)
        if error_if_nonfinite and not torch.isfinite(total_norm):
            raise RuntimeError(
                f"The total norm of order {norm_type} for gradients from `parameters` is "
                "non-finite, so it cannot be clipped. To disable this error and scale the "
                "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`")
        self._clip_coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        return total_norm

    def _global_grad_norm(self, norm_type: float) -> Tensor | None:
        """The norm of all grads (as they are, still scaled), on the device; None if none."""
        parts = [part for bucket in self._current_plan().buckets
                 for part in bucket.norm_parts(self._tables, norm_type)]
        if not parts:
            return None
        device = parts[0][0].device
        totals = []
        for group in dict.fromkeys(g for _, g in parts):
            values = torch.stack([v.to(device) for v, g in parts if g is group])
            total = values.max() if norm_type == math.inf else values.sum()
            if group is not None:  # FSDP2 shards: combine across ranks, still on the device
                import torch.distributed as dist

                op = dist.ReduceOp.MAX if norm_type == math.inf else dist.ReduceOp.SUM
                dist.all_reduce(total, op=op, group=group)
            totals.append(total)
        totals = torch.stack(totals)
        return totals.max() if norm_type == math.inf else totals.sum().pow(1.0 / norm_type)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """torch's layout: the LR saved as a float (a host read, once), the state in its own
        dtype (8-bit slots as ``<slot>_codes`` + ``<slot>_scales``)."""
        sd = super().state_dict()
        for group in sd["param_groups"]:
            for key in ("lr", "initial_lr"):
                if isinstance(group.get(key), Tensor):
                    group[key] = group[key].item()
            if isinstance(group.get("state_dtype"), torch.dtype):  # plain data (DCP, weights_only)
                group["state_dtype"] = str(group["state_dtype"]).removeprefix("torch.")
        return sd

    def dequantized_state_dict(self) -> dict:
        """:meth:`state_dict` with every slot as an fp32 tensor under its own key (8-bit and
        bf16 state dequantized; the keys torch's optimizer uses), e.g. to hand a run to
        ``torch.optim.AdamW``. Loading it back into a low-precision optimizer re-quantizes."""
        sd = self.state_dict()
        for state in sd["state"].values():
            for slot in self.SLOTS:
                value = _slot_value(state, slot, slot in self.SIGNED_SLOTS)
                if value is None:
                    continue
                state.pop(f"{slot}_codes", None)
                state.pop(f"{slot}_scales", None)
                state[slot] = value if _is_native(value) else value.float()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads ours (any state format) or the torch optimizer's checkpoint. Each slot is
        converted to this optimizer's format for its param (kept bit-exact where the formats
        agree), on the param's device; the state holds the keys that were saved."""
        saved_state = state_dict["state"]
        id_to_param = {}
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            id_to_param.update(zip(saved_group["params"], group["params"]))
        own_seeds = [g.get("rounding_seed") for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            if isinstance(group.get("state_dtype"), str):
                group["state_dtype"] = _STATE_DTYPE_NAMES.get(group["state_dtype"],
                                                              group["state_dtype"])
        self._plan = None
        self._load_groups_hook(state_dict)
        for index, group in enumerate(self.param_groups):
            for key in self._group_keys:  # e.g. a torch checkpoint: no state_dtype
                group.setdefault(key, self.defaults[key])
            self._validate(group)
            self._normalize(group)
            if group["stochastic_rounding"] and "rounding_seed" not in group:
                group["rounding_seed"] = own_seeds[index] or self._rounding_seed()
            self._group_lr(index, group)  # adopt the saved LR into the group's device tensor
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        for param_id, saved in saved_state.items():
            p = id_to_param.get(param_id)
            if p is None:
                continue
            self.state[p] = self._load_param_state(p, group_of[p], saved)

    def _load_groups_hook(self, state_dict: dict) -> None:
        """After torch's load of the groups: algorithms with per-group state (timm's LAMB step)
        move it where they keep it."""

    def _load_param_state(self, p: Tensor, group: dict, saved: dict) -> dict:
        state: dict = {}
        for key, value in saved.items():
            if key == "step":
                value = value if isinstance(value, Tensor) else torch.tensor(float(value))
                state["step"] = value.detach().to(device=p.device, dtype=torch.float32).reshape(
                    ()).clone()
            elif isinstance(value, Tensor) and not _slot_key(key, self.SLOTS):
                state[key] = value.detach().to(device=p.device, copy=True)
            elif not isinstance(value, Tensor):
                state[key] = value
        if "step" not in state:
            state["step"] = self._initial_step(p, saved)
        fmt = _format_for(p, group["state_dtype"])
        for slot in self.SLOTS:
            if _slot_value(saved, slot, slot in self.SIGNED_SLOTS) is None:
                continue
            _set_slot(state, slot, p, fmt, saved, slot in self.SIGNED_SLOTS)
        return state

    def _initial_step(self, p: Tensor, saved: dict) -> Tensor:
        """The step count of a loaded state that has none (torch's SGD keeps none)."""
        return torch.zeros((), dtype=torch.float32, device=p.device)

    def _slot_added(self, p: Tensor, state: dict, slot: str) -> None:
        """A slot was just created (zeros) in the existing state of ``p``, e.g. a group's
        momentum turned on after steps without it (SGD restarts its count of momentum steps)."""

    def _init_state(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        fmt = _format_for(p, group["state_dtype"])
        for slot in self._group_slots(group):
            _set_slot(state, slot, p, fmt, None, slot in self.SIGNED_SLOTS)


# ====================================================================== plan and buckets
class _Plan:
    """The step's buckets: one per (device, real dtype, LR dtype, state format, stochastic
    rounding, algorithm flags), each stepped with one launch (or a fixed few)."""

    def __init__(self, key: tuple, opt: FusedOptimizer):
        self.key = key
        buckets: dict[tuple, Bucket] = {}
        param_id = 0
        for group in opt.param_groups:
            slots = opt._group_slots(group)
            hyper = opt._hyper_row(group)
            flags = opt._bucket_flags(group)
            if group["stochastic_rounding"] and "rounding_seed" not in group:
                group["rounding_seed"] = opt._rounding_seed()  # turned on after construction
            for p in group["params"]:
                param_id += 1
                if p.grad is None:
                    continue
                state = opt.state[p]
                if len(state) == 0:
                    opt._init_state(p, group)
                fmt = _format_for(p, group["state_dtype"])
                if _state_format(state, opt.SLOTS) not in (None, fmt):
                    # the group's state_dtype changed since the state was made: convert it
                    for slot in opt.SLOTS:
                        if _slot_value(state, slot, slot in opt.SIGNED_SLOTS) is not None:
                            _set_slot(state, slot, p, fmt, dict(state),
                                      slot in opt.SIGNED_SLOTS)
                for slot in slots:  # e.g. amsgrad turned on after a non-amsgrad checkpoint
                    if _slot_value(state, slot, slot in opt.SIGNED_SLOTS) is None:
                        _set_slot(state, slot, p, fmt, None, slot in opt.SIGNED_SLOTS)
                        opt._slot_added(p, state, slot)
                stochastic = group["stochastic_rounding"]
                bucket_key = (p.device, _real(p).dtype, group["lr"].dtype, fmt, stochastic,
                              slots, flags)
                if bucket_key not in buckets:
                    buckets[bucket_key] = Bucket(opt, *bucket_key)
                buckets[bucket_key].add(p, state, group, hyper, param_id - 1)
        self.buckets = list(buckets.values())
        for bucket in self.buckets:
            bucket.finish()


class Bucket:
    """The tensors of one launch.

    Complex params are stepped as their real views (``torch.view_as_real``: real/imaginary
    pairs, as torch does); DTensor params (FSDP2) through their local shards. Attributes an
    algorithm reads: ``params``, ``states``, ``groups`` (per tensor), ``locals`` (local real
    views of the params), ``slots[name]`` (local real views of each slot's values or 8-bit
    codes), ``scales[name]``, ``steps``, ``lrs``, ``hypers``, ``flags``, ``format``,
    ``stochastic``, ``dtype``, ``lr_dtype``, ``device``, ``backend``."""

    def __init__(self, opt: FusedOptimizer, device, dtype, lr_dtype, fmt, stochastic, slots,
                 flags):
        self.device, self.dtype, self.lr_dtype = device, dtype, lr_dtype
        self.format, self.stochastic, self.slot_names, self.flags = fmt, stochastic, slots, flags
        self.signed = tuple(s in opt.SIGNED_SLOTS for s in slots)
        self.name = type(opt).__name__
        self.params, self.states, self.groups, self.hypers, self.param_ids = [], [], [], [], []
        self.addresses = None
        self.cached_tables = None
        if uses_kernel(device, self.name) and dtype in kernels.SUPPORTED_DTYPES:
            self.backend = "kernel"
        elif opt._torch_fused_ok(self):
            self.backend = "torch"
        else:
            self.backend = "reference"

    def add(self, p, state, group, hyper, param_id):
        self.params.append(p)
        self.states.append(state)
        self.groups.append(group)
        self.hypers.append(hyper)
        self.param_ids.append(param_id)

    def finish(self):
        steps = [s["step"].detach().reshape(()).to(self.device, torch.float32)
                 for s in self.states]
        self.step_buffer = torch.stack(steps)
        for i, state in enumerate(self.states):
            state["step"] = self.step_buffer[i]
        self.steps = [s["step"] for s in self.states]
        self.lrs = [g["lr"] for g in self.groups]
        self.seeds = [g.get("rounding_seed", 0) for g in self.groups]
        self.sharded = [_sharding_group(p) for p in self.params]
        self.distributed = any(_is_dtensor(p) for p in self.params)
        self.locals = [_real(_local(p)) for p in self.params]
        self.slots, self.scales = {}, {}
        quantized = self.format == torch.uint8
        for name in self.slot_names:
            key = f"{name}_codes" if quantized else name
            self.slots[name] = [_real(_local(s[key])) for s in self.states]
            self.scales[name] = ([_local(s[f"{name}_scales"]) for s in self.states]
                                 if quantized else [None] * len(self.states))
        # the kernel walks memory flat: every tensor of a row must share one dense layout (8-bit
        # blocks follow rows, so there: contiguous)
        self.walkable = []
        for i, p in enumerate(self.locals):
            state_ts = [self.slots[n][i] for n in self.slot_names]
            ok = (p.is_contiguous() and all(t.is_contiguous() for t in state_ts)) if quantized \
                else (_is_dense(p) and all(t.stride() == p.stride() for t in state_ts))
            self.walkable.append(ok)

    def grads(self) -> tuple[list[Tensor], list[int], list[int]]:
        """This step's (local, real) grads, and which tensors the fast path takes (the rest go
        through the reference)."""
        grads = [p.grad for p in self.params]
        if self.distributed:
            grads = [_local(g) for g in grads]
        if any(g.is_sparse for g in grads):
            raise RuntimeError(f"{self.name} does not support sparse gradients")
        grads = [_real(g) for g in grads]
        if self.backend == "reference":
            return grads, [], list(range(len(grads)))
        fast, slow = [], []
        for i, (g, p) in enumerate(zip(grads, self.locals)):
            ok = self.walkable[i] and (g.is_contiguous() if self.format == torch.uint8
                                       else g.stride() == p.stride())
            (fast if ok else slow).append(i)
        return grads, fast, slow

    def tables(self, idx: list[int], grads: list[Tensor], cache):
        """The kernel's tables for tensors ``idx`` with these grads; rebuilt only if an address
        moved."""
        addresses = (tuple(idx), tuple(grads[i].data_ptr() for i in idx),
                     tuple(self.locals[i].data_ptr() for i in idx))
        if addresses != self.addresses:
            rows = [kernels.tensor_row(
                self.locals[i], grads[i], [self.slots[n][i] for n in self.slot_names],
                [self.scales[n][i] for n in self.slot_names], self.steps[i], self.lrs[i],
                param_id=self.param_ids[i], seed=self.seeds[i]) for i in idx]
            self.cached_tables = kernels.tables_for(
                rows, [self.hypers[i] for i in idx], self.device, cache,
                quant_tiles=self.format == torch.uint8, keep_alive=self.step_buffer,
                what=self.name)
            self.addresses = addresses
        return self.cached_tables

    def step(self, opt: FusedOptimizer, ctx: StepContext) -> None:
        grads, fast, slow = self.grads()
        self.step_buffer.add_(1)
        if fast:
            opt._update(self, fast, grads, self.backend, ctx)
        if slow:
            opt._update(self, slow, grads, "reference", ctx)
        if ctx.found_inf is not None:  # a skipped step does not count
            self.step_buffer.sub_(ctx.found_inf)

    def norm_parts(self, cache, norm_type: float) -> list[tuple[Tensor, object]]:
        """(Σ|g|^p or max |g|, process group to all-reduce over or None) per sharding group."""
        grads, fast, _ = self.grads()
        parts = []
        for group in dict.fromkeys(self.sharded):
            idx = [i for i, g in enumerate(self.sharded) if g is group]
            if self.backend == "kernel" and fast == idx == list(range(len(grads))):
                partial = kernels.grad_norm_partials(self.tables(idx, grads, cache), self.dtype,
                                                     norm_type)
                if partial.numel() == 0:  # only zero-size grads
                    part = torch.zeros((), device=self.device)
                else:
                    part = partial.max() if norm_type == math.inf else partial.sum()
            else:
                norms = torch.stack([torch.linalg.vector_norm(grads[i].float(), norm_type)
                                     for i in idx]) if idx else torch.zeros(1, device=self.device)
                part = norms.max() if norm_type == math.inf else norms.pow(norm_type).sum()
            parts.append((part, group))
        return parts

    def allreduce_tensor_sums(self, idx: list[int], sums: Tensor) -> Tensor:
        """Per-tensor sums [len(idx), K] of local shards → of the whole tensors: all-reduced
        (SUM) on the device over each sharded tensor's shard group; others left as they are."""
        groups = [self.sharded[i] for i in idx]
        if not any(g is not None for g in groups):
            return sums
        import torch.distributed as dist

        for group in dict.fromkeys(g for g in groups if g is not None):
            rows = [k for k, g in enumerate(groups) if g is group]
            if len(rows) == len(groups):
                dist.all_reduce(sums, group=group)
            else:
                index = torch.tensor(rows, device=sums.device)
                part = sums.index_select(0, index)
                dist.all_reduce(part, group=group)
                sums = sums.index_copy(0, index, part)
        return sums

    # -------------------------------------------------------------- the reference path
    def run_reference(self, idx: list[int], grads: list[Tensor], ctx: StepContext, math_fn,
                      hypers=None) -> None:
        """Step tensors ``idx`` with the algorithm's torch math ``math_fn(i, p, g, slots, step,
        lr, hyper)`` → (new p, new slots), all in the compute dtype. Around it the engine
        unscales / clips the grad, loads and stores each slot in its format, rounds the param
        and low-precision state (stochastically with the kernel's Philox bits), and keeps
        everything as it was under ``found_inf``. A pass of a multi-pass algorithm may leave
        the param (new p None) or slots (absent from new slots) as they are."""
        for i in idx:
            p = self.locals[i]
            if p.numel() == 0:
                continue
            dtype = formats_compute_dtype(p.dtype)
            g = grads[i].to(dtype)
            if ctx.grad_scale is not None:
                g = g / ctx.grad_scale.to(device=p.device, dtype=dtype)
            if ctx.grad_mul is not None:
                g = g * ctx.grad_mul.to(device=p.device, dtype=dtype)
            old = {n: self._load(n, k, i) for k, n in enumerate(self.slot_names)}
            new_p, new = math_fn(i, p.to(dtype), g, dict(old), self.steps[i], self.lrs[i],
                                 (hypers or self.hypers)[i])
            bits = (formats.random_words(self.seeds[i], self.param_ids[i], self.steps[i],
                                         tuple(p.shape), p.device,
                                         quantized=self.format == torch.uint8)
                    if self.stochastic else None)
            keep = None if ctx.found_inf is None else ctx.found_inf.to(p.device) != 0
            if new_p is not None:
                rounded = formats.round_to(new_p, p.dtype, None if bits is None else bits[0])
                p.copy_(rounded if keep is None
                        else torch.where(keep, p, rounded.reshape(p.shape)))
            for k, name in enumerate(self.slot_names):
                if name in new:
                    self._store(name, k, i, new[name], None if bits is None else bits[1 + k],
                                keep)

    def _load(self, name: str, k: int, i: int) -> Tensor:
        t = self.slots[name][i]
        if self.format == torch.uint8:
            return formats.dequantize(t, self.scales[name][i], self.signed[k])
        return t.to(formats_compute_dtype(self.locals[i].dtype))

    def _store(self, name: str, k: int, i: int, value: Tensor, bits: Tensor | None,
               keep: Tensor | None) -> None:
        t = self.slots[name][i]
        if self.format == torch.uint8:
            codes, scales = formats.quantize(value, self.signed[k], bits)
            if keep is not None:
                codes = torch.where(keep, t, codes)
                scales = torch.where(keep, self.scales[name][i], scales)
            t.copy_(codes)
            self.scales[name][i].copy_(scales)
            return
        stored = formats.round_to(value, t.dtype, bits)
        t.copy_(stored if keep is None else torch.where(keep, t, stored.reshape(t.shape)))


def formats_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the element-wise math: fp64 for fp64 tensors, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ====================================================================== state slots
def _format_for(p: Tensor, state_dtype: torch.dtype):
    """The state format of param ``p`` in a group with ``state_dtype``: fp64 and complex params
    keep their own precision; 8-bit only where blocks fit (else fp32, see ``_quantizable``)."""
    if p.dtype in (torch.float64, torch.complex64, torch.complex128):
        return _NATIVE
    if state_dtype == torch.uint8 and not _quantizable(p):
        return torch.float32
    return state_dtype


def _state_format(state: dict, slots: tuple[str, ...]):
    """The format the existing slots of a state are in (they share one), or None if it has no
    slot yet."""
    for slot in slots:
        if f"{slot}_codes" in state:
            return torch.uint8
        value = state.get(slot)
        if isinstance(value, Tensor):
            return _NATIVE if _is_native(value) else value.dtype
    return None


def _is_native(t: Tensor) -> bool:
    return t.dtype in (torch.float64, torch.complex64, torch.complex128)


def _slot_key(key: str, slots: tuple[str, ...]) -> bool:
    return key in slots or any(key in (f"{s}_codes", f"{s}_scales") for s in slots)


def _slot_value(state: dict, slot: str, signed: bool) -> Tensor | None:
    """A slot's values as a float tensor (dequantized from codes + scales), or None."""
    if f"{slot}_codes" in state:
        codes, scales = state[f"{slot}_codes"], state[f"{slot}_scales"]
        return _map_local(lambda c, s: formats.dequantize(c, s, signed), codes, scales,
                          like=codes, dtype=torch.float32)
    value = state.get(slot)
    return value if isinstance(value, Tensor) else None


def _set_slot(state: dict, slot: str, p: Tensor, fmt, saved: dict | None, signed: bool) -> None:
    """Create slot ``slot`` of ``p``'s state in format ``fmt``: zeros, or converted from a saved
    state (bit-exact where the saved format is already ``fmt``)."""
    for key in (slot, f"{slot}_codes", f"{slot}_scales"):
        state.pop(key, None)
    if fmt == torch.uint8:
        if saved is not None and f"{slot}_codes" in saved:
            state[f"{slot}_codes"] = _to_device(saved[f"{slot}_codes"], p)
            state[f"{slot}_scales"] = _to_device(saved[f"{slot}_scales"], p)
            return
        if saved is None:
            state[f"{slot}_codes"] = torch.zeros_like(p, dtype=torch.uint8,
                                                      memory_format=torch.contiguous_format)
            state[f"{slot}_scales"] = _new_scales(p)
            return
        value = _to_device(_slot_value(saved, slot, signed), p).float()
        codes = torch.empty_like(p, dtype=torch.uint8, memory_format=torch.contiguous_format)
        scales = _new_scales(p)
        _map_local(lambda v, c, s: _quantize_into(v, c, s, signed), value, codes, scales)
        state[f"{slot}_codes"], state[f"{slot}_scales"] = codes, scales
        return
    dtype = p.dtype if fmt == _NATIVE else fmt
    if saved is None:
        state[slot] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    else:
        value = _to_device(_slot_value(saved, slot, signed), p)
        state[slot] = value.to(dtype=dtype, copy=True)


def _quantize_into(value: Tensor, codes: Tensor, scales: Tensor, signed: bool) -> None:
    c, s = formats.quantize(value, signed)
    codes.copy_(c)
    scales.copy_(s)


def _to_device(t: Tensor, p: Tensor) -> Tensor:
    return t.detach().to(device=p.device, copy=True)


def _new_scales(p: Tensor) -> Tensor:
    """Zero 8-bit scales for ``p``: (rows, blocks per row) of its local shard; for a DTensor, a
    DTensor with the param's placements over the whole tensor's scales."""
    local = _local(p)
    scales = torch.zeros(formats.scales_shape(local.shape), dtype=torch.float32,
                         device=local.device)
    if not _is_dtensor(p):
        return scales
    from torch.distributed.tensor import DTensor

    shape = formats.scales_shape(p.shape)
    stride = tuple(math.prod(shape[d + 1:]) for d in range(len(shape)))
    return DTensor.from_local(scales, p.device_mesh, p.placements, run_check=False, shape=shape,
                              stride=stride)


def _quantizable(p: Tensor) -> bool:
    """Whether ``p`` gets 8-bit state. At least 4096 elements (per shard, smaller tensors keep
    fp32 state, as in bitsandbytes). A DTensor needs blocks that never straddle a shard and
    scales that shard like it: placements Shard(0) / Replicate only; 1-D: shards of whole
    256-blocks that DTensor's own chunking of the scales reproduces. The rule reads only global
    shapes and the mesh, so every rank decides the same."""
    if not _is_dtensor(p):
        return formats.quantizes(p.shape)
    from torch.distributed.tensor import Replicate, Shard

    placements = p.placements
    if not all(isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0)
               for pl in placements):
        return False
    shards = math.prod(p.device_mesh.size(d) for d, pl in enumerate(placements)
                       if isinstance(pl, Shard))
    if p.dim() <= 1:
        if sum(isinstance(pl, Shard) for pl in placements) > 1:
            return False
        numel = p.numel()
        chunk = -(-numel // shards)
        blocks = -(-numel // formats.QBLOCK)
        return (chunk >= formats.QUANTIZE_MIN_NUMEL and chunk % formats.QBLOCK == 0
                and -(-blocks // shards) == chunk // formats.QBLOCK)
    rows = -(-p.shape[0] // shards)
    return rows * formats.row_length(p.shape) >= formats.QUANTIZE_MIN_NUMEL


def _map_local(fn, *tensors: Tensor, like: Tensor | None = None, dtype=None):
    """Apply ``fn`` to the local shards of ``tensors``; with ``like``, return the result as a
    tensor shaped (and, for DTensors, placed) like it."""
    result = fn(*(_local(t) for t in tensors))
    if like is None or not _is_dtensor(like):
        return result
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(result.to(dtype) if dtype else result, like.device_mesh,
                              like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


# ====================================================================== small helpers
def _is_dtensor(t: Tensor) -> bool:
    return hasattr(t, "_local_tensor")


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (sharing its storage); any other tensor as it is."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def _real(t: Tensor) -> Tensor:
    """A complex tensor's real view (real/imaginary pairs, sharing its storage)."""
    return torch.view_as_real(t) if t.is_complex() else t


def _sharding_group(p: Tensor):
    """The process group whose ranks hold different shards of ``p`` (FSDP2), else None."""
    if not _is_dtensor(p):
        return None
    from torch.distributed.tensor import Shard

    dims = [d for d, placement in enumerate(p.placements) if isinstance(placement, Shard)]
    if not dims:
        return None
    if len(dims) > 1:
        raise NotImplementedError("params sharded over more than one mesh dimension are not "
                                  "supported by the fused optimizers' norms")
    return p.device_mesh.get_group(dims[0])


def _lr_dtype(params) -> torch.dtype:
    """A group's LR tensor is float32, or float64 when the group holds fp64 (or complex128)
    params: they then see the double LR torch uses, not one rounded to fp32."""
    wide = any(p.dtype in (torch.float64, torch.complex128) for p in params)
    return torch.float64 if wide else torch.float32


def _group_device(group: dict, name: str) -> torch.device:
    params = group["params"]
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"{name}: all params of a param group must be on one device, got "
                         f"{sorted(str(d) for d in devices)}; put them in separate groups")
    for p in params:
        if not (p.is_floating_point() or p.is_complex()):
            raise ValueError(f"{name}: params must be floating point or complex, got {p.dtype}")
    if params:
        return next(iter(devices))
    return torch.device("cpu")


def _is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: some order of its dims is contiguous (e.g. a transpose)."""
    if t.is_contiguous():
        return True
    expected = 1
    for d in sorted(range(t.dim()), key=t.stride):
        if t.size(d) == 1:
            continue
        if t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def _on(t: Tensor | None, device: torch.device) -> Tensor | None:
    if t is None:
        return None
    return t.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _frozen(value):
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, Tensor):
        return id(value)
    return value


def validate_betas(betas) -> None:
    """A pair of betas in [0, 1), as torch checks them (torch's messages): floats, or (as torch
    accepts) two 1-element tensors, which are read once, on the host."""
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair of floats)")
    if sum(isinstance(b, Tensor) for b in betas) == 1:
        raise ValueError("betas must be either both floats or both Tensors")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor):
            if beta.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
            beta = beta.detach().reshape(-1)[0].item()
        validate_number("betas", beta, high=1.0, label=f"beta parameter at index {i}")


def float_betas(betas) -> tuple[float, ...]:
    """Betas as Python floats (1-element tensor betas are read once, on the host)."""
    return tuple(float(b) for b in betas)


def validate_number(name: str, value, low: float = 0.0, high: float = math.inf, *,
                    low_inclusive: bool = True, high_inclusive: bool = False,
                    label: str | None = None) -> None:
    """ValueError ``Invalid <label>: <value>`` unless low <= value < high (``low_inclusive``
    False: low < value; ``high_inclusive``: value <= high). NaN is never in range."""
    ok = (_is_number(value) and (low <= value if low_inclusive else low < value)
          and (value <= high if high_inclusive else value < high))
    if not ok:
        raise ValueError(f"Invalid {label or name}: {value}")
