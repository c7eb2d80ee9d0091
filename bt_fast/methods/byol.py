"""BYOL (Grill et al., NeurIPS 2020): an online network predicts a slowly moving target
network's projection of the other view.

    online:  z_θ = g_θ(f_θ(view)),   p = q_θ(z_θ)       (q: the predictor)   [B, D]
    target:  z_ξ = g_ξ(f_ξ(view)),   no gradient
    loss   = (1/N) Σ_n [2 - 2 cos(p1_n, z_ξ2_n)] + [2 - 2 cos(p2_n, z_ξ1_n)]
    after each applied step k of K:  ξ <- τ_k ξ + (1 - τ_k) θ,
                                     τ_k = 1 - (1 - τ_base) (cos(π k / K) + 1) / 2

The target (``target.backbone``, ``target.projector``) starts as a copy of the online
backbone and projector; its parameters have requires_grad=False (no optimizer state, no
DDP gradient) and sit in the state dict, so a resume restores them exactly. Its BN
statistics update in its own forward, as in the official code. Heads as in
deepmind-research byol/utils/networks.py: Linear (bias) -> BN -> ReLU -> Linear (no
bias). Defaults: byol/configs/byol.py at 1000 epochs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from bt_fast.backbone import parse_widths
from bt_fast.kernels import byol_loss, byol_loss_reference
from bt_fast.methods.base import Method, target_tau
from bt_fast.pipelines.bounds import bounded, check


@dataclass
class BYOLConfig:
    projector: str = "4096-256"
    """Projector widths (hidden-output), dash separated; the last is the embedding size."""
    predictor: str = "4096-256"
    """Predictor widths; its output size must equal the projector's."""
    base_tau: float = bounded(0.996, ge=0, le=1)
    """Target moving-average rate at step 0; it rises to 1 on a cosine over the schedule."""

    def __post_init__(self):
        check(self)  # each number against the range declared beside it
        proj, pred = parse_widths(self.projector, "projector"), parse_widths(self.predictor, "predictor")
        if proj[-1] != pred[-1]:
            raise ValueError(f"predictor={self.predictor!r} must end in the projector's size {proj[-1]}")


class BYOL(Method):
    """Online backbone + projector + predictor, and their moving-average target."""

    Config = BYOLConfig
    views_preset = "byol"

    def __init__(self, model_cfg, cfg: BYOLConfig):
        super().__init__(model_cfg, cfg)
        self.projector = self.mlp(cfg.projector, hidden_bias=True)
        embed_dim = parse_widths(cfg.projector, "projector")[-1]
        self.predictor = self.mlp(cfg.predictor, in_dim=embed_dim, hidden_bias=True)
        self.target = nn.ModuleDict({"backbone": copy.deepcopy(self.backbone),
                                     "projector": copy.deepcopy(self.projector)})
        self.target.requires_grad_(False)

    def forward(self, views):
        z_online = [self.projector(self.backbone(v)) for v in views]
        p1, p2 = [self.predictor(z) for z in z_online]  # [B, D] each
        with torch.no_grad():
            z1, z2 = [self.target["projector"](self.target["backbone"](v)) for v in views]
        return [p1, p2, z1, z2]

    def loss(self, outputs, group=None):
        return byol_loss(*outputs, group=group), {}

    def baseline_loss(self, outputs):
        return byol_loss_reference(*outputs)

    def momentum_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(target parameters, the online parameters they follow), in matching order."""
        online = [*self.backbone.parameters(), *self.projector.parameters()]
        target = [*self.target["backbone"].parameters(), *self.target["projector"].parameters()]
        return target, online

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int, applied: torch.Tensor) -> None:
        """ξ <- ξ + w (θ - ξ) with w = (1 - τ_k) on applied steps and 0 on skipped ones.

        τ_k comes from the step count (a host float: no sync); ``applied`` is a 0-d
        device bool, so the skip costs no sync either. One fused foreach lerp over all
        target tensors: ~2 reads + 1 write of the backbone + projector per step.
        """
        target, online = self.momentum_pairs()
        w = applied.to(torch.float32) * (1.0 - target_tau(self.cfg.base_tau, step, total_steps))
        torch._foreach_lerp_(target, online, w)
