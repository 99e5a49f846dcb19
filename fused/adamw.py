"""FusedAdamW: torch.optim.AdamW's math in one Triton launch per (device, dtype) bucket, with the
learning rate read from a device tensor.

The class validates, keeps state and groups tensors; :func:`fused_adamw` is the functional form;
:mod:`fused.kernel` holds the kernel and its launcher; :mod:`fused.reference` the same math in
plain torch, which CPU parameters use when the Triton interpreter is off.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from .reference import adamw_step_reference_

try:
    from . import kernel as _kernel
except ImportError:  # triton missing: CPU params still work through the torch path
    _kernel = None

__all__ = ["FusedAdamW", "fused_adamw"]

_TRITON_HINT = "FusedAdamW needs triton for CUDA tensors: pip install 'triton>=3.6'"


def _uses_kernel(device: torch.device) -> bool:
    """CUDA tensors run the Triton kernel; CPU tensors only under TRITON_INTERPRET=1 (tests)."""
    if device.type == "cuda":
        if _kernel is None:
            raise ImportError(_TRITON_HINT)
        return True
    return device.type == "cpu" and _kernel is not None and _kernel.interpreter_enabled()


class FusedAdamW(Optimizer):
    r"""AdamW (decoupled weight decay) as a fused Triton kernel that reads the LR from the device.

    .. math::
        p &\leftarrow p\,(1 - \mathrm{lr}\cdot\lambda) \\
        m &\leftarrow \beta_1 m + (1-\beta_1)\, g \\
        v &\leftarrow \beta_2 v + (1-\beta_2)\, g^2 \qquad
            (\text{amsgrad: } \hat v \leftarrow \max(\hat v, v)) \\
        p &\leftarrow p - \frac{\mathrm{lr}}{1-\beta_1^t}\,
            \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

    computed in fp32 for fp32, bf16 and fp16 params (state is always fp32), identical to
    ``torch.optim.AdamW`` up to float32 rounding.

    ``param_groups[i]["lr"]`` is a 0-dim float32 tensor on the group's device. Schedulers
    (torch's, and ``warmup.GradualWarmupScheduler``) update it in place with ``fill_``, and the
    kernel loads it, so ``scheduler.step(); opt.step()`` never syncs with the host and never
    invalidates a compiled graph or a captured CUDA graph. If a float is assigned to
    ``param_groups[i]["lr"]`` instead, the next ``step()`` adopts it: it ``fill_``s the group's
    own LR tensor with the value and puts that tensor back (same address, so graphs stay valid).

    ``state_dict()`` saves the LR as a float and the state under torch.optim.AdamW's keys
    (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), so checkpoints move both ways
    between this optimizer and ``torch.optim.AdamW``; loading keeps fp32 state in fp32.

    ``torch.amp.GradScaler`` hands the unscale and the inf check to the step (``grad_scale`` /
    ``found_inf``, as with torch's fused optimizers): with ``found_inf`` set, params and state are
    left untouched.

    Args:
        params (iterable): parameters or dicts defining parameter groups.
        lr (float or Tensor, optional): learning rate (default: 1e-3)
        betas (tuple[float, float], optional): coefficients of the running averages of the
            gradient and its square (default: (0.9, 0.999))
        eps (float, optional): added to the denominator (default: 1e-8)
        weight_decay (float, optional): decoupled weight decay coefficient (default: 1e-2)
        amsgrad (bool, optional): use the AMSGrad variant (default: False)
        maximize (bool, optional): maximize the objective instead of minimizing (default: False)

    Example:
        >>> opt = FusedAdamW(model.parameters(), lr=1e-3)
        >>> sched = warmup.GradualWarmupScheduler(opt, multiplier=1, total_epoch=1000)
        >>> for batch in loader:
        ...     loss_fn(model(batch)).backward()
        ...     opt.step(); opt.zero_grad(); sched.step()
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize)
        # the defaults first, as torch does: a bad default is refused even if every group
        # overrides it, and before `params` is looked at
        _validate(defaults)
        self._lr_tensors: list[Tensor] = []
        self._plan: _Plan | None = None
        self._clip_coef: Tensor | None = None
        self._tables = _kernel.TableCache() if _kernel is not None else None
        super().__init__(params, defaults)
        # GradScaler: hand grad_scale / found_inf to step() instead of unscaling the grads itself
        self._step_supports_amp_scaling = True

    # ---------------------------------------------------------------- groups and validation
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _validate(group)
            device = _group_device(group)
        except ValueError:
            self.param_groups.pop()
            raise
        self._plan = None
        group["betas"] = _float_betas(group["betas"])
        lr = group["lr"]
        lr_dtype = _lr_dtype(group["params"])
        lr_tensor = (lr.detach().to(device=device, dtype=lr_dtype).reshape(()).clone()
                     if isinstance(lr, Tensor)
                     else torch.tensor(float(lr), dtype=lr_dtype, device=device))
        group["lr"] = lr_tensor
        self._lr_tensors.append(lr_tensor)

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
            if not (isinstance(lr, (int, float)) and lr >= 0.0):
                raise ValueError(f"Invalid learning rate: {lr}")
            own.fill_(lr)
        group["lr"] = own
        return own

    # ---------------------------------------------------------------- the step
    # torch.compile: the step is one opaque launch per bucket, kept out of compiled graphs, so a
    # compiled training step graph-breaks here and never guards on (or recompiles for) the LR.
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
        grad_mul = self._take_grad_mul()
        for bucket in self._current_plan().buckets:
            device = bucket.device
            bucket.step(self._tables, grad_scale=_on(grad_scale, device),
                        found_inf=_on(found_inf, device), grad_mul=_on(grad_mul, device))
        return loss

    def _current_plan(self) -> _Plan:
        """The buckets of this step, rebuilt only when the groups, their hyperparameters or the
        set of params with grads changed (the per-step cost is a few list comprehensions)."""
        signature = []
        has_grad = []
        for index, group in enumerate(self.param_groups):
            self._group_lr(index, group)
            signature.append((len(group["params"]), tuple(group["betas"]), group["eps"],
                              group["weight_decay"], group["amsgrad"], group["maximize"]))
            has_grad.append([p.grad is None for p in group["params"]])
        key = (signature, has_grad)
        if self._plan is None or self._plan.key != key:
            self._plan = _Plan(key, self)
        return self._plan

    def _take_grad_mul(self) -> Tensor | None:
        """The clip coefficient left by :meth:`clip_grad_norm_` for this step (then cleared)."""
        coef, self._clip_coef = self._clip_coef, None
        return coef

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
        parts = [part for bucket in self._current_plan().buckets
                 for part in bucket.norm_parts(self._tables, norm_type)]
        if not parts:
            self._clip_coef = None
            return torch.zeros(())
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
        total_norm = (totals.max() if norm_type == math.inf
                      else totals.sum().pow(1.0 / norm_type))
        if grad_scaler is not None and grad_scaler.is_enabled():
            total_norm = total_norm / grad_scaler._get_scale_async().to(device)
        if error_if_nonfinite and not torch.isfinite(total_norm):
            raise RuntimeError(
                f"The total norm of order {norm_type} for gradients from `parameters` is "
                "non-finite, so it cannot be clipped. To disable this error and scale the "
                "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`")
        self._clip_coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        return total_norm

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """torch.optim.AdamW-compatible: the LR is saved as a float (a host read, once)."""
        sd = super().state_dict()
        for group in sd["param_groups"]:
            for key in ("lr", "initial_lr"):
                if isinstance(group.get(key), Tensor):
                    group[key] = group[key].item()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads ours or torch.optim.AdamW's. The state keeps its own dtype (fp32, or fp64 /
        complex for such params; torch would cast it to a bf16 param's dtype) on the param's
        device, and holds exactly the keys that were saved."""
        saved_state = state_dict["state"]
        id_to_param = {}
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            id_to_param.update(zip(saved_group["params"], group["params"]))
        super().load_state_dict(state_dict)
        self._plan = None
        for index, group in enumerate(self.param_groups):
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            _validate(group)
            group["betas"] = _float_betas(group["betas"])
            self._group_lr(index, group)  # adopt the saved LR into the group's device tensor
        # torch casts floating state to the param dtype (and keeps `step` where it was saved);
        # redo it from the saved values: state in its own dtype and a 0-dim fp32 step on the
        # param's device
        for param_id, saved in saved_state.items():
            p = id_to_param.get(param_id)
            if p is None:
                continue
            state = self.state[p]
            for key, value in saved.items():
                if key == "step":
                    value = value if isinstance(value, Tensor) else torch.tensor(float(value))
                    state[key] = value.detach().to(device=p.device, dtype=torch.float32).reshape(
                        ()).clone()
                elif isinstance(value, Tensor) and (value.is_floating_point()
                                                    or value.is_complex()):
                    state[key] = value.detach().to(device=p.device, dtype=_state_dtype(p),
                                                   copy=True)


class _Plan:
    """The step's buckets: one per (device, real dtype, amsgrad, maximize, LR dtype), each one
    launch (a group mixing fp64 and fp32 params has an fp64 LR: its fp32 params get their own)."""

    def __init__(self, key: tuple, opt: FusedAdamW):
        self.key = key
        buckets: dict[tuple, _Bucket] = {}
        for group in opt.param_groups:
            beta1, beta2 = _float_betas(group["betas"])
            hyper = (beta1, beta2, float(group["eps"]), float(group["weight_decay"]))
            amsgrad = group["amsgrad"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = opt.state[p]
                if len(state) == 0:
                    _init_state(state, p, amsgrad)
                elif amsgrad and "max_exp_avg_sq" not in state:  # e.g. a non-amsgrad checkpoint
                    state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])
                bucket_key = (p.device, _real(p).dtype, amsgrad, group["maximize"],
                              group["lr"].dtype)
                if bucket_key not in buckets:
                    buckets[bucket_key] = _Bucket(*bucket_key)
                buckets[bucket_key].add(p, state, group["lr"], hyper)
        self.buckets = list(buckets.values())
        for bucket in self.buckets:
            bucket.finish()


class _Bucket:
    """The tensors of one launch, with the per-step fast path: the step counts live in one flat
    fp32 buffer (``state["step"]`` are 0-dim views of it: one ``add_`` per step instead of a
    foreach over every tensor), and the kernel's tables are rebuilt only when an address moved.

    Complex params are stepped as their real views (``torch.view_as_real``: real/imaginary
    pairs, as torch does); DTensor params (FSDP2) through their local shards.

    Backends, by device and dtype: the Triton kernel (CUDA fp32/bf16/fp16; CPU under
    ``TRITON_INTERPRET=1``); torch's own fused AdamW op where its math is ours and its state
    dtype is ours (CPU fp32, fp64 anywhere); the torch reference for everything else."""

    def __init__(self, device, dtype, amsgrad, maximize, lr_dtype):
        self.device, self.dtype, self.amsgrad, self.maximize = device, dtype, amsgrad, maximize
        self.lr_dtype = lr_dtype
        self.params, self.states, self.lrs, self.hypers = [], [], [], []
        if _uses_kernel(device) and dtype in _kernel.SUPPORTED_DTYPES:
            self.backend = "kernel"
        elif dtype in (torch.float32, torch.float64) and device.type in ("cpu", "cuda"):
            self.backend = "torch"
        else:
            self.backend = "reference"
        self.addresses = None
        self.tables = None

    def add(self, p, state, lr, hyper):
        self.params.append(p)
        self.states.append(state)
        self.lrs.append(lr)
        self.hypers.append(hyper)

    def finish(self):
        steps = [s["step"].detach().reshape(()).to(self.device, torch.float32)
                 for s in self.states]
        self.step_buffer = torch.stack(steps)
        for i, state in enumerate(self.states):
            state["step"] = self.step_buffer[i]
        self.steps = [s["step"] for s in self.states]
        self.sharded = [_sharding_group(p) for p in self.params]
        self.distributed = any(_is_dtensor(p) for p in self.params)
        self.locals = [_real(_local(p)) for p in self.params]
        self.exp_avgs = [_real(_local(s["exp_avg"])) for s in self.states]
        self.exp_avg_sqs = [_real(_local(s["exp_avg_sq"])) for s in self.states]
        self.max_exp_avg_sqs = ([_real(_local(s["max_exp_avg_sq"])) for s in self.states]
                                if self.amsgrad else None)
        self.state_contiguous = all(
            t.is_contiguous() for t in (*self.locals, *self.exp_avgs, *self.exp_avg_sqs,
                                        *(self.max_exp_avg_sqs or ())))
        # torch's fused op takes one LR and one set of hyperparameters per call
        self.torch_calls = {}
        for i, (lr, hyper) in enumerate(zip(self.lrs, self.hypers)):
            self.torch_calls.setdefault((id(lr), hyper), (lr, hyper, []))[2].append(i)

    def grads(self) -> tuple[list[Tensor], bool]:
        """This step's (local, real) grads, and whether the fast path takes them."""
        grads = [p.grad for p in self.params]
        if self.distributed:
            grads = [_local(g) for g in grads]
        # (a sparse grad is not contiguous: it takes the general path, which refuses it)
        fast = (self.backend != "reference" and self.state_contiguous
                and all(map(Tensor.is_contiguous, grads)))
        if not fast and any(g.is_sparse for g in grads):
            raise RuntimeError("FusedAdamW does not support sparse gradients")
        return [_real(g) for g in grads], fast

    def refresh_tables(self, grads: list[Tensor], cache) -> tuple:
        """The kernel's tables for these grads; rebuilt only if an address moved."""
        addresses = (list(map(Tensor.data_ptr, self.locals)), list(map(Tensor.data_ptr, grads)))
        if addresses != self.addresses:
            rows = _kernel.tensor_rows(self.locals, grads, self.exp_avgs, self.exp_avg_sqs,
                                       self.max_exp_avg_sqs, self.steps, self.lrs)
            self.tables = _kernel.tables_for(rows, self.hypers, self.device, cache,
                                             keep_alive=self.step_buffer)
            self.addresses = addresses
        return self.tables

    def step(self, tables_cache, *, grad_scale, found_inf, grad_mul):
        grads, fast = self.grads()
        self.step_buffer.add_(1)
        if fast and self.backend == "kernel":
            _kernel.launch(self.refresh_tables(grads, tables_cache), self.dtype,
                           amsgrad=self.amsgrad, maximize=self.maximize, grad_scale=grad_scale,
                           found_inf=found_inf, grad_mul=grad_mul, lr_dtype=self.lr_dtype)
        elif fast:
            grads = _prescaled(grads, grad_scale, grad_mul)
            for lr, hyper, idx in self.torch_calls.values():
                _torch_fused_adamw(
                    _pick(self.locals, idx), _pick(grads, idx), _pick(self.exp_avgs, idx),
                    _pick(self.exp_avg_sqs, idx),
                    _pick(self.max_exp_avg_sqs, idx) if self.amsgrad else None,
                    _pick(self.steps, idx), lr, hyper, amsgrad=self.amsgrad,
                    maximize=self.maximize, found_inf=found_inf)
        else:
            self.addresses = None
            _update(self.locals, grads, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs,
                    self.steps, self.lrs, self.hypers, amsgrad=self.amsgrad,
                    maximize=self.maximize, grad_scale=grad_scale, found_inf=found_inf,
                    grad_mul=grad_mul, tables=tables_cache)
        if found_inf is not None:  # a skipped step does not count
            self.step_buffer.sub_(found_inf)

    def norm_parts(self, tables_cache, norm_type: float) -> list[tuple[Tensor, object]]:
        """(Σ|g|^p or max |g|, process group to all-reduce over or None) per sharding group."""
        grads, fast = self.grads()
        parts = []
        for group in dict.fromkeys(self.sharded):
            idx = [i for i, g in enumerate(self.sharded) if g is group]
            if fast and len(idx) == len(grads):
                partial = _kernel.grad_norm_partials(self.refresh_tables(grads, tables_cache),
                                                     self.dtype, norm_type)
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


def _is_dtensor(t: Tensor) -> bool:
    return hasattr(t, "_local_tensor")


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (sharing its storage); any other tensor as it is."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def _sharding_group(p: Tensor):
    """The process group whose ranks hold different shards of ``p`` (FSDP2), else None."""
    if not _is_dtensor(p):
        return None
    from torch.distributed.tensor import Shard

    mesh = p.device_mesh
    dims = [d for d, placement in enumerate(p.placements) if isinstance(placement, Shard)]
    if not dims:
        return None
    if len(dims) > 1:
        raise NotImplementedError("FusedAdamW.clip_grad_norm_: params sharded over more than one "
                                  "mesh dimension are not supported")
    return mesh.get_group(dims[0])


def _init_state(state: dict, p: Tensor, amsgrad: bool) -> None:
    dtype = _state_dtype(p)
    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    if amsgrad:
        state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=dtype,
                                                   memory_format=torch.preserve_format)


def _state_dtype(p: Tensor) -> torch.dtype:
    """fp32 state for fp32/bf16/fp16 params; fp64 and complex params keep their own dtype (as
    torch does: fp64 is never stepped in fp32)."""
    if p.dtype in (torch.float64, torch.complex64, torch.complex128):
        return p.dtype
    return torch.float32


def _lr_dtype(params) -> torch.dtype:
    """A group's LR tensor is float32, or float64 when the group holds fp64 (or complex128)
    params: they then see the double LR torch uses, not one rounded to fp32."""
    wide = any(p.dtype in (torch.float64, torch.complex128) for p in params)
    return torch.float64 if wide else torch.float32


def _real(t: Tensor) -> Tensor:
    """A complex tensor's real view (real/imaginary pairs, sharing its storage)."""
    return torch.view_as_real(t) if t.is_complex() else t


def _float_betas(betas) -> tuple[float, float]:
    """Betas as Python floats (0-dim or 1-element tensor betas are read once, on the host)."""
    return tuple(float(b) for b in betas)


def _prescaled(grads: list[Tensor], grad_scale: Tensor | None,
               grad_mul: Tensor | None) -> list[Tensor]:
    """Unscaled / clipped copies of the grads for torch's fused op (which would write the
    unscaled grads back into ``.grad``; ours never change them)."""
    if grad_scale is not None:
        grads = torch._foreach_div(grads, grad_scale)
    if grad_mul is not None:
        grads = torch._foreach_mul(grads, grad_mul)
    return grads


def _torch_fused_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, hyper,
                       *, amsgrad, maximize, found_inf):
    """torch's own fused AdamW op (its CPU kernel, or CUDA for fp64): the same math, steps
    already incremented."""
    beta1, beta2, eps, weight_decay = hyper
    torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or [], steps,
                        lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                        amsgrad=amsgrad, maximize=maximize, grad_scale=None,
                        found_inf=found_inf)


def _on(t: Tensor | None, device: torch.device) -> Tensor | None:
    if t is None:
        return None
    return t.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())


def _validate(group: dict, read_lr: bool = True) -> None:
    """ValueError naming the argument and the value (torch's messages); ``read_lr=False`` skips
    reading a tensor LR on the host (the functional form must not sync)."""
    lr = group["lr"]
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
    if not (isinstance(lr, Tensor) and not read_lr):
        lr_value = lr.detach().reshape(-1)[0].item() if isinstance(lr, Tensor) else lr
        if isinstance(lr_value, bool) or not (
                isinstance(lr_value, (int, float)) and 0.0 <= lr_value < math.inf):
            raise ValueError(f"Invalid learning rate: {lr_value}")
    eps = group["eps"]
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and 0.0 <= eps < math.inf):
        raise ValueError(f"Invalid epsilon value: {eps}")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair of floats)")
    if sum(isinstance(b, Tensor) for b in betas) == 1:
        raise ValueError("betas must be either both floats or both Tensors")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor):
            if beta.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
            beta = beta.detach().reshape(-1)[0].item()
        if isinstance(beta, bool) or not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    wd = group["weight_decay"]
    if isinstance(wd, bool) or not (isinstance(wd, (int, float)) and 0.0 <= wd < math.inf):
        raise ValueError(f"Invalid weight_decay value: {wd}")


def _group_device(group: dict) -> torch.device:
    params = group["params"]
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError("FusedAdamW: all params of a param group must be on one device, got "
                         f"{sorted(str(d) for d in devices)}; put them in separate groups")
    for p in params:
        if not (p.is_floating_point() or p.is_complex()):
            raise ValueError(f"FusedAdamW: params must be floating point or complex, got "
                             f"{p.dtype}")
    if params:
        return next(iter(devices))
    return torch.device("cpu")


def _needs_copy(p: Tensor, *others: Tensor) -> bool:
    """The kernel walks memory flat: params, grads and state must share one dense layout."""
    if not _is_dense(p):
        return True
    return any(t.stride() != p.stride() for t in others)


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


def _update(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lrs, hypers, *,
            amsgrad, maximize, grad_scale, found_inf, grad_mul, tables):
    """One update of same-device, same-dtype tensors whose steps are already incremented: the
    kernel where it runs, else the torch reference."""
    if _uses_kernel(params[0].device) and params[0].dtype in _kernel.SUPPORTED_DTYPES:
        _kernel_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lrs, hypers,
                     amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale,
                     found_inf=found_inf, grad_mul=grad_mul, tables=tables)
        return
    for i, p in enumerate(params):
        beta1, beta2, eps, wd = hypers[i]
        adamw_step_reference_(
            p, grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else None,
            steps[i], lr=lrs[i], beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd,
            maximize=maximize, grad_scale=grad_scale, found_inf=found_inf, clip_coef=grad_mul)


def _kernel_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lrs, hypers, *,
                 amsgrad, maximize, grad_scale, found_inf, grad_mul, tables):
    write_back = []  # (original, contiguous working copy) for tensors the kernel cannot walk flat
    if any(_needs_copy(p, g, m, v) for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs)):
        params, grads, exp_avgs, exp_avg_sqs = (list(x) for x in (params, grads, exp_avgs,
                                                                   exp_avg_sqs))
        max_exp_avg_sqs = list(max_exp_avg_sqs) if max_exp_avg_sqs is not None else None
        for i in range(len(params)):
            others = [grads[i], exp_avgs[i], exp_avg_sqs[i]]
            if max_exp_avg_sqs is not None:
                others.append(max_exp_avg_sqs[i])
            if not _needs_copy(params[i], *others):
                continue
            grads[i] = grads[i].contiguous()
            for lst in (params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs):
                if lst is not None and not lst[i].is_contiguous():
                    write_back.append((lst[i], lst[i].contiguous()))
                    lst[i] = write_back[-1][1]
    rows = _kernel.tensor_rows(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lrs)
    _kernel.launch(_kernel.tables_for(rows, hypers, params[0].device, tables), params[0].dtype,
                   amsgrad=amsgrad, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
                   grad_mul=grad_mul, lr_dtype=lrs[0].dtype)
    for original, working in write_back:
        original.copy_(working)


def fused_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor] | None,
    state_steps: list[Tensor],
    *,
    lr: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool = False,
    maximize: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    r"""Functional FusedAdamW: one step over these tensors, in place (the math of
    :class:`FusedAdamW`). ``state_steps`` are 0-dim float32 tensors, incremented here; ``lr`` is a
    0-dim float32 tensor on the params' device (a float is accepted and put there). State tensors
    are fp32 (fp64 for fp64 params; complex params and their state are stepped as real views).
    Tensors are grouped by (device, dtype) and stepped with one launch per group.
    """
    if not params:
        return
    if not all(len(x) == len(params) for x in (grads, exp_avgs, exp_avg_sqs, state_steps)):
        raise ValueError("fused_adamw: params, grads, exp_avgs, exp_avg_sqs and state_steps must "
                         "have the same length")
    if amsgrad and (max_exp_avg_sqs is None or len(max_exp_avg_sqs) != len(params)):
        raise ValueError("fused_adamw: amsgrad=True needs one max_exp_avg_sq per param")
    _validate(dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay),
              read_lr=False)
    params, grads, exp_avgs, exp_avg_sqs = ([_real(t) for t in ts]
                                            for ts in (params, grads, exp_avgs, exp_avg_sqs))
    if max_exp_avg_sqs is not None:
        max_exp_avg_sqs = [_real(t) for t in max_exp_avg_sqs]
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    for (device, _), idx in groups.items():
        lr_dtype = _lr_dtype([params[i] for i in idx])
        lr_tensor = (lr.to(device=device, dtype=lr_dtype).reshape(())
                     if isinstance(lr, Tensor)
                     else torch.tensor(float(lr), dtype=lr_dtype, device=device))
        steps = _pick(state_steps, idx)
        device_found_inf = _on(found_inf, device)
        torch._foreach_add_(steps, 1)
        _update(
            _pick(params, idx), _pick(grads, idx), _pick(exp_avgs, idx), _pick(exp_avg_sqs, idx),
            _pick(max_exp_avg_sqs, idx) if amsgrad else None, steps,
            [lr_tensor] * len(idx), [(beta1, beta2, eps, weight_decay)] * len(idx),
            amsgrad=amsgrad, maximize=maximize, grad_scale=_on(grad_scale, device),
            found_inf=device_found_inf, grad_mul=None, tables=_FUNCTIONAL_TABLES)
        if device_found_inf is not None:  # a skipped step does not count
            torch._foreach_sub_(steps, [device_found_inf] * len(steps))


def _pick(xs: list, idx: list[int]) -> list:
    return [xs[i] for i in idx]


_FUNCTIONAL_TABLES = _kernel.TableCache() if _kernel is not None else None
