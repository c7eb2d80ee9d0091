"""The online linear probe: a linear classifier trained beside the SSL method, every step.

As solo-learn does: the backbone's features of the step's views (the globally pooled
output of the training forward, read by a forward hook) are DETACHED, so no gradient
reaches the backbone or the heads, and a ``Linear(feature_dim, classes)`` is trained on
them with the loader's labels by its own SGD (momentum 0.9, ``eval.probe_lr``, no weight
decay), outside LARS and outside the model that DDP wraps and checkpoints store as
``model``. The SSL step's gradients are therefore bit-identical with the probe on or off
(tests/test_monitor.py pins it).

Multi-crop methods (SwAV, DINO: ``n_views`` None) train it on the GLOBAL crops only, the
first ``n_global`` views: the local crops (e.g. 96 px of a 224 image, 5-14 % of its area)
are not what the linear evaluation sees, and would be three quarters of its rows. The
backbone's outputs arrive in view order (``Method.encode`` runs one pass per run of
same-size views), so the global crops are the first n_global x B rows.

Under DDP each rank's probe sees its shard; its two small gradients (feature_dim x C + C
floats: 2 M for ResNet-50 on ImageNet, 8 MB a step) are averaged with one all-reduce, so
every rank holds the same probe, as DDP would keep it. Train top-1 counts stay on the
device and are summed across ranks at log steps only (the trainer's one sync point).
Cost per step: one [V*B, D] x [D, C] matmul forward and backward (V: the views it trains
on; negligible next to the backbone).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100  # cross_entropy's ignore_index: labels outside [0, C) are skipped, not fatal


class OnlineProbe:
    def __init__(self, model: nn.Module, num_classes: int, *, lr: float, device, seed: int = 0):
        self.num_classes = num_classes
        self.linear = nn.Linear(model.feature_dim, num_classes).to(device)
        # Its own generator: the probe's init must not move the global RNG stream, which
        # checkpoints store and the bit-identity with a probe-free run depends on.
        g = torch.Generator().manual_seed(seed)
        bound = 1 / math.sqrt(model.feature_dim)
        with torch.no_grad():
            self.linear.weight.copy_(torch.rand(self.linear.weight.shape, generator=g) * 2 * bound - bound)
            self.linear.bias.zero_()
        self.opt = torch.optim.SGD(self.linear.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
        self.backbone = model.backbone
        # views it trains on: multi-crop methods' global crops, else every view (None)
        self.views = model.n_global if getattr(model, "n_views", 2) is None else None
        self.feats: list[torch.Tensor] = []
        self.handle = None
        self.counts = torch.zeros(2, dtype=torch.float64, device=device)  # [correct, seen]

    def attach(self) -> None:
        """Start reading the backbone's outputs (the trainer calls it before its loop)."""
        if self.handle is None:
            self.handle = self.backbone.register_forward_hook(self._hook)

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def _hook(self, module, args, output) -> None:
        # Training forwards only: evaluation (eval mode, inference mode) is not a step.
        if module.training and torch.is_grad_enabled():
            self.feats.append(output.detach())  # [B_view, D]; no graph kept

    def step(self, labels: torch.Tensor) -> None:
        """One SGD step on this step's features; labels [B] (any device)."""
        feats, self.feats = self.feats, []
        b = len(labels)
        feats = [f for f in feats if len(f) and len(f) % b == 0]  # views of this batch, stacked or not
        if not feats:
            return
        x = torch.cat([f.float() for f in feats])  # [V*B, D] fp32, view-major
        if self.views is not None:
            x = x[: self.views * b]  # the global crops only (module docstring)
        y = labels.to(x.device, torch.long).repeat(len(x) // b)  # view-major, like x
        y = torch.where((y >= 0) & (y < self.num_classes), y, torch.full_like(y, IGNORE))
        logits = self.linear(x)  # [V*B, C]
        valid = (y != IGNORE).sum()
        # mean over valid rows; no NaN when none is (sum / max(n, 1))
        loss = F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum") / valid.clamp_min(1)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self._average_grads()
        self.opt.step()
        with torch.no_grad():
            correct = (logits.argmax(1) == y).sum()
            self.counts += torch.stack([correct, valid]).double()

    def _average_grads(self) -> None:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        grads = [p.grad for p in self.linear.parameters()]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)  # SUM (gloo has no AVG); the same on every rank
        flat /= dist.get_world_size()
        torch.nn.utils.vector_to_parameters(flat, grads)  # writes back into the .grad tensors

    def train_top1(self) -> float | None:
        """Train top-1 (%) since the last call, over all ranks. SYNC POINT: log steps only."""
        counts, self.counts = self.counts, torch.zeros_like(self.counts)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        correct, seen = counts.tolist()
        return 100.0 * correct / seen if seen else None

    @torch.no_grad()
    def top1(self, feats: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 (%) of the probe on held-out features [N, D] (eval-mode backbone)."""
        w = self.linear.weight.detach().float().to(feats.device)
        b = self.linear.bias.detach().float().to(feats.device)
        pred = (feats.float() @ w.T + b).argmax(1)
        return 100.0 * (pred == labels.to(pred.device)).float().mean().item()

    def state_dict(self) -> dict:
        return {"linear": self.linear.state_dict(), "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.linear.load_state_dict(state["linear"])
        self.opt.load_state_dict(state["optimizer"])
