"""LARS and the learning-rate schedule of Barlow Twins (official semantics).

Peaks: ``optim.lr_weights`` (0.2) for weights and ``optim.lr_biases`` (0.0048) for
biases and BN parameters, each multiplied by global_batch / 256. Linear warm-up, then
cosine to 0.001x of the peak.

Gradient scale: these peaks were tuned by the official code, where each GPU's backward
gave 1/world_size of the global-loss gradient (raw all_reduce of c + DDP's mean).
bt_fast.kernels.barlow_twins_loss gives each rank the exact local gradient of the
global loss and DDP averages it, which reproduces that same convention, so the
published learning rates carry over unchanged (README, "Gradient scale and world size").

Speed: ResNet-50 + the 8192 projector has ~170 parameter tensors. A per-parameter loop
costs about 14 small kernels each (~2.4k launches per step, a few ms of pure launch
latency on a GPU); ``LARS.step`` instead issues multi-tensor (``torch._foreach_*``) ops
per group, plus one elementwise op per tensor where torch has no multi-tensor form
(the per-tensor trust ratio, and the finite mask). See docs/gpu.md.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import nn


def lr_at(step: int, peak: float, *, warmup_steps: int, total_steps: int) -> float:
    """Learning rate at ``step``: linear warm-up to ``peak``, then cosine to peak/1000."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    q = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    end = peak * 0.001
    return peak * q + end * (1 - q)


def lars_update(p: torch.Tensor, grad: torch.Tensor, *, weight_decay: float, eta: float,
                adapt: bool) -> torch.Tensor:
    """The LARS direction for one parameter (before momentum and lr).

    d = g + wd * p; if adapted, d *= eta * ||p|| / ||d|| (1 where either norm is 0).
    """
    d = grad.add(p, alpha=weight_decay) if weight_decay else grad.clone()
    if adapt:
        d.mul_(trust_ratio(torch.norm(p), torch.norm(d), eta))
    return d


def trust_ratio(p_norm: torch.Tensor, d_norm: torch.Tensor, eta: float) -> torch.Tensor:
    """eta * ||p|| / ||d||, elementwise over norms of any shape; 1 where either is 0."""
    one = torch.ones_like(p_norm)
    return torch.where(p_norm > 0, torch.where(d_norm > 0, eta * p_norm / d_norm, one), one)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017).

    Groups with ``exclude=True`` (1-D params: biases, BN) get neither weight decay nor
    LARS adaptation, as in the official Barlow Twins code. Parameters whose ``grad`` is
    None are left alone (no momentum decay either).
    ``step(finite=t)`` with a 0-d bool tensor skips the update on the device when t is
    False (a non-finite loss) without a host sync: momentum and weights stay unchanged.
    ``foreach``: multi-tensor ops (default when a group's tensors share one device and
    dtype); False runs the per-parameter loop, the readable form of the same step.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001, foreach: Optional[bool] = None):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      eta=eta, exclude=False))
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure=None, finite: Optional[torch.Tensor] = None):
        assert closure is None, "LARS does not take a closure"
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            mus = [self._mu(p) for p in params]
            same = len({(p.device, p.dtype) for p in params}) == 1 and not any(p.grad.is_sparse for p in params)
            if self.foreach is False or not same:
                for p, mu in zip(params, mus):
                    _step_one(p, mu, g, finite)
            else:
                _step_foreach(params, mus, g, finite)

    def _mu(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "mu" not in state:
            state["mu"] = torch.zeros_like(p)
        return state["mu"]


def _step_one(p, mu, g, finite) -> None:
    """One parameter: d (lars_update), mu <- m mu + d, p <- p - lr mu."""
    d = lars_update(p, p.grad, weight_decay=0.0 if g["exclude"] else g["weight_decay"],
                    eta=g["eta"], adapt=not g["exclude"])
    if finite is None:
        mu.mul_(g["momentum"]).add_(d)
        p.add_(mu, alpha=-g["lr"])
    else:  # mu <- m*mu + d and p <- p - lr*mu when f = 1; unchanged when f = 0
        f = finite.to(p.dtype)
        d = torch.where(finite, d, 0.0)  # NaN * 0 would still be NaN
        mu.mul_(1 - f * (1 - g["momentum"])).add_(d)
        p.sub_(mu * (f * g["lr"]))


def _step_foreach(params, mus, g, finite) -> None:
    """The same step over a list of P tensors: ~8 multi-tensor ops + P or 2P per-tensor ones."""
    grads = [p.grad for p in params]
    wd = 0.0 if g["exclude"] else g["weight_decay"]
    d = torch._foreach_add(grads, params, alpha=wd) if wd else [x.clone() for x in grads]
    if finite is not None:
        # No multi-tensor select exists; a non-finite d must not reach the norms or mu.
        d = [torch.where(finite, x, 0.0) for x in d]
    if not g["exclude"]:
        p_norm = torch.stack(torch._foreach_norm(params))  # [P]
        d_norm = torch.stack(torch._foreach_norm(d))  # [P]
        q = trust_ratio(p_norm, d_norm, g["eta"]).to(params[0].dtype)  # [P], on the device
        # d_i *= q_i: a list of 0-d factors takes torch's per-tensor path (one launch each).
        torch._foreach_mul_(d, list(q.unbind(0)))
    if finite is None:
        torch._foreach_mul_(mus, g["momentum"])
        torch._foreach_add_(mus, d)
        torch._foreach_add_(params, mus, alpha=-g["lr"])
    else:
        f = finite.to(params[0].dtype)  # 0-d; the Tensor-scalar overloads need torch >= 2.1
        torch._foreach_mul_(mus, 1 - f * (1 - g["momentum"]))
        torch._foreach_add_(mus, d)
        torch._foreach_sub_(params, torch._foreach_mul(mus, f * g["lr"]))


def clip_per_parameter(grads: list[torch.Tensor], clip: float) -> None:
    """DINO's gradient clipping (facebookresearch/dino utils.py ``clip_gradients``): every
    gradient on its own, g <- g * min(1, clip / (||g||_2 + 1e-6)); not one global norm.

    In place, on the device (no sync): one multi-tensor norm and one multi-tensor multiply.
    A gradient under the threshold is multiplied by exactly 1 (bit-identical). Under LARS
    the trust ratio rescales each adapted weight's step anyway, so the clip there only
    shifts the balance against weight decay; it acts fully on biases and BN parameters.
    """
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))  # [n_params] fp32 for fp32 gradients
    coefs = (clip / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(coefs.unbind()))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights (ndim > 1) in group 0, biases and BN (ndim == 1) in group 1, excluded.

    Frozen parameters (``requires_grad=False``, e.g. BYOL's EMA target network) are left
    out: LARS must never update or hold momentum for them.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = [p for p in trainable if p.ndim != 1]
    biases = [p for p in trainable if p.ndim == 1]
    return [dict(params=weights, weight_decay=weight_decay, exclude=False),
            dict(params=biases, weight_decay=0.0, exclude=True)]


APEX_ENV = "BT_FAST_APEX_LARS"
"""Set to 1 to train with apex's FusedLARS instead (where importable; see apex_lars)."""


def apex_lars():
    """apex's FusedLARS class when importable with its CUDA extension, else None.

    Only some apex builds ship it (NVIDIA's MLPerf containers); plain apex does not. Its
    semantics differ from the official ones, so it is opt-in (``BT_FAST_APEX_LARS=1``):
    - trust ratio eta ||w|| / (||g|| + wd ||w|| + eps) instead of eta ||w|| / ||g + wd w||
      (the triangle bound: equal when g and w are parallel, and at wd = 1e-6 the
      difference is wd ||w|| / ||g||, tiny once gradients are not ~0);
    - lr is folded into its momentum buffer (mom = m mom - lr q d; w += mom), so a
      changing lr weights past steps by their own lr, not the current one: identical
      at constant lr, a small lag under the cosine schedule;
    - exclusion maps exactly: ``is_skipped=True`` (no adaptation) with weight_decay 0;
    - no ``finite`` argument (its noop flag would carry it); momentum is stored under
      ``momentum_buffer``, so checkpoints do not cross between the two.
    """
    try:
        from apex.optimizers import FusedLARS  # noqa: F401
        import amp_C  # noqa: F401  (the CUDA extension the class needs)
    except ImportError:
        return None
    return FusedLARS


def _with_finite(fused_cls):
    """apex's class with the trainer's ``step(finite=...)``: apex's kernels return early
    while their noop flag (a device int) is nonzero, so ``~finite`` goes there, no sync."""

    class ApexLARS(fused_cls):
        def step(self, closure=None, finite: Optional[torch.Tensor] = None):
            if finite is not None:
                self._dummy_overflow_buf.copy_(~finite)
            out = super().step(closure)
            self._dummy_overflow_buf.zero_()
            return out

    return ApexLARS


def build(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """LARS over ``model`` from an OptimConfig; learning rates are set per step."""
    groups = param_groups(model, cfg.weight_decay)
    fused = apex_lars() if os.environ.get(APEX_ENV) == "1" and torch.cuda.is_available() else None
    if fused is not None:  # never run here: no machine of this project has had apex + a GPU
        for group in groups:
            group["is_skipped"] = group.pop("exclude")
        return _with_finite(fused)(groups, lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                   trust_coefficient=cfg.eta)
    return LARS(groups, lr=0.0, weight_decay=cfg.weight_decay, momentum=cfg.momentum, eta=cfg.eta)


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg, *, global_batch: int, warmup_steps: int,
           total_steps: int) -> tuple[float, float]:
    """Apply lr_at to both groups (peaks scaled by global_batch/256); returns both lrs."""
    scale = global_batch / 256
    lrs = [lr_at(step, peak * scale, warmup_steps=warmup_steps, total_steps=total_steps)
           for peak in (cfg.lr_weights, cfg.lr_biases)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    return lrs[0], lrs[1]
