"""Barlow Twins (Zbontar et al., 2021): make the cross-correlation of two views' embeddings
the identity.

    z1, z2 = projector(backbone(view1)), projector(backbone(view2))      [B, D] each
    c      = (z1 normalised over the batch)^T (z2 normalised) / N        [D, D], never formed
    loss   = sum_i (1 - c_ii)^2  +  lambd * sum_{i!=j} c_ij^2            (on_diag, off_diag)

projector: Linear(no bias) -> BN -> ReLU, repeated, then a final Linear(no bias):
"8192-8192-8192" on ResNet-50 is 2048 -> 8192 -> 8192 -> 8192, about 151 M parameters.
The loss normalizes z itself, so there is no extra BN here. Defaults: the official
recipe (facebookresearch/barlowtwins, main.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from bt_fast.backbone import parse_widths
from bt_fast.kernels import barlow_twins_loss, official_loss
from bt_fast.kernels.loss import IMPLS
from bt_fast.methods.base import Method, check_heads
from bt_fast.pipelines.bounds import bounded, check


@dataclass
class BarlowTwinsConfig:
    projector: str = "8192-8192-8192"
    """Projector widths, dash separated; the last is the embedding size D."""
    lambd: float = bounded(0.0051, ge=0, le=1e3)
    """Weight of the off-diagonal (redundancy-reduction) term."""
    eps: float = bounded(1e-5, gt=0, le=1)
    """Inside the sqrt of the per-feature batch variance."""
    impl: str = "auto"
    """reference | dense | gram | auto (see bt_fast.kernels)."""

    def __post_init__(self):
        check(self)  # each number against the range declared beside it
        check_heads(self.projector, self.impl, IMPLS)


class BarlowTwins(Method):
    """Backbone + projector; two views -> [z1, z2]; the loss over the global batch."""

    Config = BarlowTwinsConfig
    views_preset = "barlow_twins"
    crosscorr = True
    terms = {"on_diag": "on-diagonal  Σ(1−c_ii)²", "off_diag": "off-diagonal  Σ c_ij² (unweighted)"}

    def __init__(self, model_cfg, cfg: BarlowTwinsConfig):
        super().__init__(model_cfg, cfg)
        self.projector = self.mlp(cfg.projector)
        self.embed_dim = parse_widths(cfg.projector, "projector")[-1]

    def loss(self, outputs, group=None):
        z1, z2 = outputs  # [B_local, D], still in the autocast dtype: the loss accumulates
        # in fp32 itself, and bf16 z halves what the gram path all-gathers across ranks.
        loss, on_diag, off_diag = barlow_twins_loss(
            z1, z2, lambd=self.cfg.lambd, eps=self.cfg.eps, group=group, impl=self.cfg.impl,
            return_terms=True)
        return loss, {"on_diag": on_diag, "off_diag": off_diag}

    def baseline_loss(self, outputs):
        return official_loss(*outputs, lambd=self.cfg.lambd, eps=self.cfg.eps)
