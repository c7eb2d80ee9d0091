"""VICReg (Bardes, Ponce and LeCun, ICLR 2022): variance, invariance and covariance terms on
two views' embeddings, no negatives and no stop-gradient.

    z1, z2 = expander(backbone(view1)), expander(backbone(view2))      [B, D] each
    s      = MSE(z1, z2)                                               invariance
    v      = mean_j relu(1 - sqrt(Var_j + eps)), averaged over z1, z2  variance (hinge at 1)
    c      = sum_{i!=j} Cov_ij^2 / D, summed over z1, z2               covariance
    loss   = sim_coeff * s + std_coeff * v + cov_coeff * c

Statistics are over the GLOBAL batch; the covariance term is computed in Gram form
(bt_fast.kernels.vicreg_loss, impl "gram": no D x D matrix). Expander: Linear -> BN ->
ReLU (with biases), repeated, then a final Linear without bias. Defaults: the official
recipe (facebookresearch/vicreg, main_vicreg.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from bt_fast.kernels import VICREG_IMPLS, vicreg_loss
from bt_fast.methods.base import Method, check_heads
from bt_fast.pipelines.bounds import bounded, check


@dataclass
class VICRegConfig:
    projector: str = "8192-8192-8192"
    """Expander widths, dash separated (official --mlp); the last is the embedding size D."""
    sim_coeff: float = bounded(25.0, ge=0, le=1e4)
    """Weight of the invariance term (lambda in the paper)."""
    std_coeff: float = bounded(25.0, ge=0, le=1e4)
    """Weight of the variance term (mu in the paper)."""
    cov_coeff: float = bounded(1.0, ge=0, le=1e4)
    """Weight of the covariance term (nu in the paper)."""
    eps: float = bounded(1e-4, gt=0, le=1)
    """Inside the sqrt of the per-feature (unbiased) batch variance."""
    impl: str = "auto"
    """reference (forms the D x D covariances) | gram | auto (see bt_fast.kernels)."""

    def __post_init__(self):
        check(self)  # each number against the range declared beside it
        check_heads(self.projector, self.impl, VICREG_IMPLS)


class VICReg(Method):
    """Backbone + expander; two views -> [z1, z2]; the three terms over the global batch."""

    Config = VICRegConfig
    views_preset = "vicreg"
    terms = {"invariance": "invariance  MSE(z1, z2)", "variance": "variance  hinge on std (unweighted)",
             "covariance": "covariance  Σ_{i≠j} Cov_ij² / D (unweighted)"}

    def __init__(self, model_cfg, cfg: VICRegConfig):
        super().__init__(model_cfg, cfg)
        self.projector = self.mlp(cfg.projector, hidden_bias=True)

    def loss(self, outputs, group=None):
        z1, z2 = outputs  # [B_local, D] in the autocast dtype; the loss accumulates in fp32
        c = self.cfg
        loss, inv, var, cov = vicreg_loss(z1, z2, sim_coeff=c.sim_coeff, std_coeff=c.std_coeff,
                                          cov_coeff=c.cov_coeff, eps=c.eps, group=group, impl=c.impl,
                                          return_terms=True)
        return loss, {"invariance": inv, "variance": var, "covariance": cov}

    def baseline_loss(self, outputs):
        c = self.cfg
        return vicreg_loss(*outputs, sim_coeff=c.sim_coeff, std_coeff=c.std_coeff, cov_coeff=c.cov_coeff,
                           eps=c.eps, impl="reference")
