"""SwAV (Caron et al., NeurIPS 2020): predict the cluster codes of one crop from another.

    f      = backbone(crops), one pass per size group               [V B, F]
    z      = normalize(projector(f))                                [V B, D] unit rows
    s_v    = z_v C^T, C the K prototypes, unit rows                 [B, K] per crop (fp32)
    q_i    = SinkhornKnopp(s_i) over the GLOBAL batch, global crops i only, no gradient
    loss   = mean_i mean_{v != i} CE(q_i, softmax(s_v / temperature))   (bt_fast.kernels.swav_loss)

Prototypes are re-normalised after every step (and at construction) and get no update
for the first ``freeze_prototypes_steps`` steps, as in facebookresearch/swav
main_swav.py. Projector as there: Linear -> BN -> ReLU -> Linear, with biases. Defaults:
the 800-epoch recipe (scripts/swav_800ep_pretrain.sh); the views are the ``multicrop``
preset (2 x 224 + 6 x 96) unless ``views`` names others.

Not implemented: the optional queue of past embeddings (queue_length, used by the
official code for batches under ~1024 at 200+ epochs); ``bt_fast`` runs without it, as
the 800-epoch recipe at batch 4096 does (queue_length 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from bt_fast.backbone import parse_widths
from bt_fast.kernels import swav_loss, swav_loss_reference
from bt_fast.methods.base import Method, check_heads
from bt_fast.pipelines.bounds import bounded, check
from bt_fast.pipelines.spec import ViewSpec


@dataclass
class SwAVConfig:
    projector: str = "2048-128"
    """Projection-head widths (hidden_mlp-feat_dim), dash separated; the last is D."""
    n_prototypes: int = bounded(3000, ge=1, le=1_000_000)
    """K, the number of prototypes (clusters)."""
    temperature: float = bounded(0.1, gt=0, le=100)
    """Softmax temperature of the predictions."""
    epsilon: float = bounded(0.05, ge=0.01, le=100)
    """Entropic regularisation of Sinkhorn-Knopp (the codes' softness); exp(score / epsilon)
    must stay finite in fp32, so not below 0.01 (the paper's value is 0.05)."""
    sinkhorn_iters: int = bounded(3, ge=1, le=1000)
    """Sinkhorn-Knopp iterations."""
    freeze_prototypes_steps: int = bounded(313, ge=0)
    """The prototypes get no update for this many first steps."""
    views: List[ViewSpec] = field(default_factory=list)
    """The crops SwAV trains with when it is ``method.name`` (global first); empty = the
    config's ``views`` (or the ``multicrop`` preset)."""

    def __post_init__(self):
        check(self)  # each number against the range declared beside it
        check_heads(self.projector)


class SwAV(Method):
    """Backbone + projector + prototypes; V crops -> V prototype-score tensors [B, K]."""

    Config = SwAVConfig
    views_preset = "multicrop"
    n_views = None  # multi-crop: 2 global crops, then any number of local ones

    def __init__(self, model_cfg, cfg: SwAVConfig):
        super().__init__(model_cfg, cfg)
        self.projector = self.mlp(cfg.projector, hidden_bias=True, last_bias=True)
        dim = parse_widths(cfg.projector, "projector")[-1]
        self.prototypes = nn.Linear(dim, cfg.n_prototypes, bias=False)
        self.normalize_prototypes()
        self.frozen = True

    @torch.no_grad()
    def normalize_prototypes(self, applied: torch.Tensor | None = None) -> None:
        """Rows of C to unit length; where ``applied`` (0-d device bool) is False, untouched."""
        w = self.prototypes.weight
        unit = F.normalize(w, dim=1)
        w.copy_(unit if applied is None else torch.where(applied, unit, w))

    def forward(self, views):
        z = F.normalize(self.projector(self.encode(views)), dim=1)  # [V B, D]
        # Scores in fp32 whatever the autocast: exp(s / 0.05) turns bf16's 3 digits of a
        # cosine into a 10 % error in the codes. K x D x V B flops: small next to the backbone.
        with torch.autocast(z.device.type, enabled=False):
            scores = z.float() @ self.prototypes.weight.float().T  # [V B, K]
        return list(scores.chunk(len(views)))

    def loss(self, outputs, group=None):
        c = self.cfg
        return swav_loss(outputs, n_global=self.n_global, temperature=c.temperature, epsilon=c.epsilon,
                         iters=c.sinkhorn_iters, group=group), {}

    def baseline_loss(self, outputs):
        c = self.cfg
        return swav_loss_reference(outputs, n_global=self.n_global, temperature=c.temperature,
                                   epsilon=c.epsilon, iters=c.sinkhorn_iters)

    def start_step(self, step: int, steps_per_epoch: int) -> None:
        self.frozen = step < self.cfg.freeze_prototypes_steps

    def drop_frozen_grads(self) -> None:
        if self.frozen:
            self.prototypes.weight.grad = None

    def after_step(self, step: int, total_steps: int, applied: torch.Tensor) -> None:
        """Prototypes back onto the unit sphere; a skipped step changes nothing, not even the
        last bit a re-normalisation would."""
        self.normalize_prototypes(applied)
