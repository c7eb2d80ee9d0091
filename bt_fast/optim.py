"""LARS and the learning-rate schedule of Barlow Twins (official semantics).

Peaks: ``optim.lr_weights`` (0.2) for weights and ``optim.lr_biases`` (0.0048) for
biases and BN parameters, each multiplied by global_batch / 256. Linear warm-up, then
cosine to 0.001x of the peak.

Gradient scale: these peaks were tuned by the official code, where each GPU's backward
gave 1/world_size of the global-loss gradient (raw all_reduce of c + DDP's mean).
bt_fast.kernels.barlow_twins_loss gives each rank the exact local gradient of the
global loss and DDP averages it, which reproduces that same convention, so the
published learning rates carry over unchanged (README, "Gradient scale and world size").
"""

from __future__ import annotations

import math
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
        p_norm, d_norm = torch.norm(p), torch.norm(d)
        one = torch.ones_like(p_norm)
        q = torch.where(p_norm > 0, torch.where(d_norm > 0, eta * p_norm / d_norm, one), one)
        d.mul_(q)
    return d


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017).

    Groups with ``exclude=True`` (1-D params: biases, BN) get neither weight decay nor
    LARS adaptation, as in the official Barlow Twins code.
    ``step(finite=t)`` with a 0-d bool tensor skips the update on the device when t is
    False (a non-finite loss) without a host sync: momentum and weights stay unchanged.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      eta=eta, exclude=False))

    @torch.no_grad()
    def step(self, closure=None, finite: Optional[torch.Tensor] = None):
        assert closure is None, "LARS does not take a closure"
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = lars_update(p, p.grad, weight_decay=0.0 if g["exclude"] else g["weight_decay"],
                                eta=g["eta"], adapt=not g["exclude"])
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                if finite is None:
                    mu.mul_(g["momentum"]).add_(d)
                    p.add_(mu, alpha=-g["lr"])
                else:  # mu <- m*mu + d and p <- p - lr*mu when f = 1; unchanged when f = 0
                    f = finite.to(p.dtype)
                    d = torch.where(finite, d, 0.0)  # NaN * 0 would still be NaN
                    mu.mul_(1 - f * (1 - g["momentum"])).add_(d)
                    p.sub_(mu * (f * g["lr"]))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights (ndim > 1) in group 0, biases and BN (ndim == 1) in group 1, excluded."""
    weights = [p for p in model.parameters() if p.ndim != 1]
    biases = [p for p in model.parameters() if p.ndim == 1]
    return [dict(params=weights, weight_decay=weight_decay, exclude=False),
            dict(params=biases, weight_decay=0.0, exclude=True)]


def build(model: nn.Module, cfg) -> LARS:
    """LARS over ``model`` from an OptimConfig; learning rates are set per step."""
    return LARS(param_groups(model, cfg.weight_decay), lr=0.0, weight_decay=cfg.weight_decay,
                momentum=cfg.momentum, eta=cfg.eta)


def set_lr(optimizer: LARS, step: int, cfg, *, global_batch: int, warmup_steps: int,
           total_steps: int) -> tuple[float, float]:
    """Apply lr_at to both groups (peaks scaled by global_batch/256); returns both lrs."""
    scale = global_batch / 256
    lrs = [lr_at(step, peak * scale, warmup_steps=warmup_steps, total_steps=total_steps)
           for peak in (cfg.lr_weights, cfg.lr_biases)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    return lrs[0], lrs[1]
