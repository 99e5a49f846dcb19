"""FusedLAMB (timm.optim.Lamb = apex FusedLAMB's NVLAMB): two Triton passes per bucket with the
per-tensor norms between them, the learning rate read from a device tensor.

The class holds only what is LAMB's: arguments and validation, the ``exp_avg`` /
``exp_avg_sq`` slots, the hyperparameter row, the global grad-norm clip, timm's per-group step
in checkpoints and the dispatch (kernels :mod:`fused.kernels.lamb`, or the reference
:mod:`fused.reference`'s ``lamb_*``). Everything else is the engine's (:mod:`fused._engine`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from . import _engine
from ._engine import Bucket, FusedOptimizer, StepContext, float_betas
from .reference import lamb_apply, lamb_direction, lamb_moments

try:
    from .kernels import common as _common
    from .kernels import lamb as _kernel
except ImportError:  # triton missing: CPU params still work through the torch path
    _kernel = _common = None

__all__ = ["FusedLAMB"]

# timm.optim.Lamb options FusedLAMB does not implement: a checkpoint that turns one on is refused
_UNSUPPORTED_TIMM_OPTIONS = ("caution", "decoupled_decay", "corrected_weight_decay")


class FusedLAMB(FusedOptimizer):
    r"""LAMB (``timm.optim.Lamb``'s math, the NVLAMB variant of apex's FusedLAMB) as fused
    Triton kernels that read the LR from the device.

    .. math::
        c &\leftarrow \max(\lVert G\rVert / \text{max\_grad\_norm},\ 1), \quad
            g \leftarrow g / c \\
        m &\leftarrow \beta_1 m + \beta_3\, g \qquad
            (\beta_3 = 1 - \beta_1 \text{ with grad\_averaging, else } 1) \\
        v &\leftarrow \beta_2 v + (1 - \beta_2)\, g^2 \\
        u &\leftarrow \frac{m / (1 - \beta_1^t)}{\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon}
            + \lambda\, p \\
        r &\leftarrow \lVert p\rVert / \lVert u\rVert \quad
            (1 \text{ if either is } 0;\ \min(r, 1) \text{ with trust\_clip}) \\
        p &\leftarrow p - \mathrm{lr}\cdot r\, u

    ‖G‖ is the norm of all grads of all groups (no clip with ``max_grad_norm=None``); the bias
    corrections are 1 without ``bias_correction``; r = 1 for params whose group has
    ``weight_decay=0`` unless ``always_adapt`` (the recipes exclude biases and norm weights).
    Computed in fp32 for fp32, bf16 and fp16 params (fp64 for fp64 params).

    A step is, per bucket: the engine's grad-norm pass (only with ``max_grad_norm``), a pass
    that updates m, v and writes each program's Σp², Σu², a segment sum (all-reduced across
    ranks for FSDP2 shards: the ratio needs the whole tensor's norms), and a pass that applies
    the update: four launches (three without the global clip), nothing read on the host. The
    fewest bytes per param in fp32: read p, g, m, v and write m, v (24), read p, m, v and write
    p (16), plus reading g for the global norm (4): 44 (40 without). Norms are computed every
    step, never cached: params changed between steps (loaded weights, EMA swaps) are seen as
    they are.

    ``param_groups[i]["lr"]`` is a 0-dim device tensor that schedulers ``fill_``. GradScaler:
    the grads are unscaled on the device (the global norm too), a step with ``found_inf`` is
    skipped (params, state and step counts untouched). A pending ``clip_grad_norm_`` applies
    before LAMB's own clip, as if the grads had been clipped first.

    State: ``exp_avg``, ``exp_avg_sq`` in fp32, or bf16 with ``state_dtype=torch.bfloat16``
    (``stochastic_rounding`` as in :class:`fused.FusedAdamW`; 8-bit moments are refused: the
    update is recomputed from the stored moments, and an 8-bit second moment that rounds to 0
    would make u = m / eps), and the engine's per-param device step count ``step``.
    ``state_dict()`` is ``timm.optim.Lamb``'s layout: the moments per param and the step count
    per group (``param_groups[i]["step"]``, a tensor, read from the device once per group); a
    timm checkpoint's group step becomes the step count of the group's params.

    Args:
        params (iterable): parameters or dicts defining parameter groups.
        lr (float or Tensor, optional): learning rate (default: 1e-3)
        bias_correction (bool, optional): bias-correct the moments (default: True)
        betas (tuple[float, float], optional): coefficients of the running averages of the
            gradient and its square (default: (0.9, 0.999))
        eps (float, optional): added to the denominator (default: 1e-6)
        weight_decay (float, optional): weight decay, added to the update (default: 0.01)
        grad_averaging (bool, optional): scale the grad by 1 − β1 in the first moment
            (default: True)
        max_grad_norm (float, optional): clip the global grad norm to it; None disables the
            clip. One value for the optimizer, as in timm (default: 1.0)
        trust_clip (bool, optional): LAMBC: clip the trust ratio at 1 (default: False)
        always_adapt (bool, optional): adapt params whose group has weight_decay 0 too
            (default: False)
        state_dtype (torch.dtype, optional): storage of the moments: ``torch.float32`` or
            ``torch.bfloat16`` (default: torch.float32)
        stochastic_rounding (bool, optional): round low-precision stores stochastically
            (default: False)

    Example:
        >>> decay = [p for p in model.parameters() if p.dim() > 1]
        >>> no_decay = [p for p in model.parameters() if p.dim() <= 1]
        >>> opt = FusedLAMB([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        ...                 lr=2e-3, weight_decay=0.01)
    """

    SLOTS = ("exp_avg", "exp_avg_sq")
    SIGNED_SLOTS = frozenset({"exp_avg"})

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        grad_averaging: bool = True,
        max_grad_norm: float | None = 1.0,
        trust_clip: bool = False,
        always_adapt: bool = False,
        *,
        state_dtype: torch.dtype = torch.float32,
        stochastic_rounding: bool = False,
    ):
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                        weight_decay=weight_decay, grad_averaging=grad_averaging,
                        max_grad_norm=max_grad_norm, trust_clip=trust_clip,
                        always_adapt=always_adapt)
        self._grad_div: Tensor | None = None
        self._loaded_steps: dict = {}
        super().__init__(params, defaults, state_dtype=state_dtype,
                         stochastic_rounding=stochastic_rounding)

    # ------------------------------------------------------------------ the step
    def _begin_step(self) -> None:
        self._grad_div = self._global_clip()

    def _end_step(self) -> None:
        self._grad_div = None

    def _global_clip(self) -> Tensor | None:
        """timm's clip divisor max(‖G‖ / max_grad_norm, 1) of the unscaled grads (after a pending
        ``clip_grad_norm_``), a 0-dim device tensor; None without ``max_grad_norm``."""
        max_grad_norm = self.defaults["max_grad_norm"]
        if max_grad_norm is None:
            return None
        norm = self._global_grad_norm(2.0)  # of the grads as they are: one pass per bucket
        if norm is None:
            return None
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is not None:
            norm = norm / grad_scale.to(device=norm.device, dtype=norm.dtype)
        if self._clip_coef is not None:
            norm = norm * self._clip_coef.to(norm.device)
        return (norm / max_grad_norm).clamp(min=1.0)

    # ------------------------------------------------------------------ the engine's hooks
    def _validate_hyperparameters(self, group: dict) -> None:
        if group.get("state_dtype") == torch.uint8:
            # pass 2 must use the stored moments; an 8-bit exp_avg_sq that rounds to 0 under a
            # nonzero exp_avg (the dynamic map's floor is 1e-6 of the block's absmax) makes that
            # element's u = m / eps: 8-bit LAMB state would need another code map, not this one
            raise ValueError("Invalid state_dtype: torch.uint8 (FusedLAMB keeps its moments in "
                             "torch.float32 or torch.bfloat16; 8-bit second moments that round "
                             "to zero blow up LAMB's update)")
        _engine.validate_number("eps", group["eps"], label="epsilon value")
        _engine.validate_betas(group["betas"])
        _engine.validate_number("weight_decay", group["weight_decay"],
                                label="weight_decay value")
        max_grad_norm = group["max_grad_norm"]
        if max_grad_norm is not None and not (_engine._is_number(max_grad_norm)
                                              and 0.0 < max_grad_norm < math.inf):
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm} (expected a positive "
                             "number, or None to disable the global clip)")
        defaults = getattr(self, "defaults", None)
        if defaults is not None and max_grad_norm != defaults["max_grad_norm"]:
            raise ValueError(
                f"Invalid max_grad_norm: {max_grad_norm} in a param group; the clip is global "
                f"(one norm over every group's grads), max_grad_norm is the optimizer's "
                f"({defaults['max_grad_norm']})")
        for name in ("bias_correction", "grad_averaging", "trust_clip", "always_adapt"):
            if not isinstance(group[name], bool):
                raise ValueError(f"Invalid {name}: {group[name]!r} (expected True or False)")
        for name in _UNSUPPORTED_TIMM_OPTIONS:
            if group.get(name):
                raise ValueError(f"Invalid {name}: {group[name]!r} (timm.optim.Lamb's {name} "
                                 "is not supported by FusedLAMB)")

    def _normalize(self, group: dict) -> None:
        group["betas"] = float_betas(group["betas"])

    def _hyper_row(self, group: dict) -> tuple[float, ...]:
        beta1, beta2 = float_betas(group["betas"])
        adapt = group["weight_decay"] != 0 or group["always_adapt"]
        # 1 − β in double here, rounded once in the kernel (never from an fp32 β)
        return (beta1, beta2, 1.0 - beta1 if group["grad_averaging"] else 1.0, 1.0 - beta2,
                float(group["eps"]), float(group["weight_decay"]), 1.0 if adapt else 0.0,
                1.0 if group["bias_correction"] else 0.0)

    def _bucket_flags(self, group: dict) -> tuple:
        return (bool(group["trust_clip"]),)

    def _update(self, bucket: Bucket, idx: list[int], grads: list[Tensor], backend: str,
                ctx: StepContext) -> None:
        (trust_clip,) = bucket.flags
        grad_div = None if self._grad_div is None else self._grad_div.to(bucket.device)
        if backend == "kernel":
            tables = bucket.tables(idx, grads, self._tables)
            partial = _kernel.launch_moments(
                tables, bucket.dtype, state_format=bucket.format, stochastic=bucket.stochastic,
                grad_scale=ctx.grad_scale, found_inf=ctx.found_inf, grad_mul=ctx.grad_mul,
                grad_div=grad_div)
            sums = bucket.allreduce_tensor_sums(idx, _common.segment_sums(tables, partial))
            _kernel.launch_apply(tables, bucket.dtype, sums, lr_dtype=bucket.lr_dtype,
                                 state_format=bucket.format, stochastic=bucket.stochastic,
                                 trust_clip=trust_clip, found_inf=ctx.found_inf)
            return
        # the reference in the same passes: moments (+ the sums of p², u²), the sums
        # all-reduced over shards, the update
        sums = torch.zeros(len(idx), 2, dtype=torch.float64, device=bucket.device)
        position = {i: k for k, i in enumerate(idx)}

        def direction(i, p, m, v, step):
            group = bucket.groups[i]
            beta1, beta2 = group["betas"]
            return lamb_direction(p, m, v, step=step, beta1=beta1, beta2=beta2,
                                  eps=group["eps"], weight_decay=group["weight_decay"],
                                  bias_correction=group["bias_correction"])

        def moments(i, p, g, slots, step, lr, hyper):
            group = bucket.groups[i]
            if grad_div is not None:
                g = g / grad_div.to(g)
            beta1, beta2 = group["betas"]
            m, v = lamb_moments(g, slots["exp_avg"], slots["exp_avg_sq"], beta1=beta1,
                                beta2=beta2, grad_averaging=group["grad_averaging"])
            u = direction(i, p, m, v, step)
            sums[position[i]] = torch.stack([p.double().square().sum(),
                                             u.double().square().sum()])
            return None, {"exp_avg": m, "exp_avg_sq": v}

        bucket.run_reference(idx, grads, ctx, moments)
        norms = bucket.allreduce_tensor_sums(idx, sums).sqrt()

        def apply(i, p, g, slots, step, lr, hyper):
            group = bucket.groups[i]
            u = direction(i, p, slots["exp_avg"], slots["exp_avg_sq"], step)
            w_norm, u_norm = norms[position[i]].to(p.dtype)
            p = lamb_apply(p, u, lr=lr, adapt=group["weight_decay"] != 0 or
                           group["always_adapt"], trust_clip=trust_clip, norms=(w_norm, u_norm))
            return p, {}

        bucket.run_reference(idx, grads, ctx, apply)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The engine's (torch's) layout plus timm's per-group step count: ``param_groups[i]
        ["step"]``, a CPU float32 tensor (the largest count of the group's params, one host
        read per group)."""
        sd = super().state_dict()
        for group, saved in zip(self.param_groups, sd["param_groups"]):
            steps = [self.state[p]["step"] for p in group["params"]
                     if "step" in self.state.get(p, {})]
            if steps:
                saved["step"] = torch.stack([s.reshape(()).float() for s in steps]).max().cpu()
        return sd

    def _load_groups_hook(self, state_dict: dict) -> None:
        # timm keeps one step per group: it becomes the count of every param of the group that
        # a checkpoint has no count for (ours keep per-param counts, which take precedence)
        self._loaded_steps = {}
        max_grad_norms = {g.get("max_grad_norm", self.defaults["max_grad_norm"])
                          for g in self.param_groups}
        if len(max_grad_norms) > 1:
            raise ValueError(f"Invalid max_grad_norm: the checkpoint's param groups have "
                             f"{sorted(max_grad_norms, key=str)}; the clip is global, one value")
        if max_grad_norms:
            self.defaults["max_grad_norm"] = max_grad_norms.pop()
        for group in self.param_groups:
            step = group.pop("step", None)
            if step is None:
                continue
            value = step.detach().reshape(()).float() if isinstance(step, Tensor) else (
                torch.tensor(float(step)))
            for p in group["params"]:
                self._loaded_steps[p] = value

    def _initial_step(self, p: Tensor, saved: dict) -> Tensor:
        step = self._loaded_steps.get(p)
        if step is None:
            return torch.zeros((), dtype=torch.float32, device=p.device)
        return step.to(device=p.device, dtype=torch.float32).clone()
