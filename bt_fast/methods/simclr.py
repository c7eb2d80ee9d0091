"""SimCLR (Chen et al., ICML 2020): each view must pick its partner out of the other
2N - 2 views of the GLOBAL batch.

    z1, z2 = g(backbone(view1)), g(backbone(view2))                 [B, D] each
    loss   = NT-Xent(z1, z2; temperature): cross-entropy of cosine similarities / t,
             the positive the other view of the same image, 2N - 2 negatives

Projection head g as in google-research/simclr (model_util.projection_head, v2 with 3
layers): Linear (no bias) -> BN -> ReLU per hidden width, then Linear (no bias) -> BN.
(The official final BN has no shift; here it is learned from 0.) Defaults: the
README's ImageNet command and run.py's flags.
"""

from __future__ import annotations

from dataclasses import dataclass

from bt_fast.kernels import nt_xent_loss, nt_xent_loss_reference
from bt_fast.methods.base import Method, check_heads
from bt_fast.pipelines.bounds import bounded, check


@dataclass
class SimCLRConfig:
    projector: str = "2048-2048-128"
    """Projection-head widths, dash separated; the last is the embedding size."""
    temperature: float = bounded(0.1, gt=0, le=100)
    """Softmax temperature of NT-Xent."""

    def __post_init__(self):
        check(self)  # each number against the range declared beside it
        check_heads(self.projector)


class SimCLR(Method):
    """Backbone + projection head; two views -> [z1, z2]; NT-Xent over the global batch."""

    Config = SimCLRConfig
    views_preset = "simclr"

    def __init__(self, model_cfg, cfg: SimCLRConfig):
        super().__init__(model_cfg, cfg)
        self.projector = self.mlp(cfg.projector, last_bn=True)

    def loss(self, outputs, group=None):
        z1, z2 = outputs  # [B_local, D]; the loss normalises rows and accumulates in fp32
        return nt_xent_loss(z1, z2, temperature=self.cfg.temperature, group=group), {}

    def baseline_loss(self, outputs):
        return nt_xent_loss_reference(*outputs, temperature=self.cfg.temperature)
