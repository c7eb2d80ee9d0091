"""bt_fast.kernels: the self-supervised losses, their torch references and Triton kernels.

    from bt_fast.kernels import barlow_twins_loss
    loss = barlow_twins_loss(z1, z2, lambd=0.0051, impl="auto")   # fp32 scalar

Every loss is exact over the global batch of ``group`` and gives each rank exactly
d loss / d z_local (README, "Gradient scale and world size"): barlow_twins_loss, vicreg_loss
(vicreg.py, Gram-form covariance), nt_xent_loss (ntxent.py, SimCLR) and byol_loss
(byol.py). The multi-crop losses swav_loss and dino_loss (multicrop.py) keep their
official codes' convention instead: every rank's rows get W x the exact gradient.
reference.py holds the oracles; dense.py the Triton kernels (imported
lazily, through triton_env.py, the one interpreter switch); collectives.py every
collective; gram.py the O(N^2 D) Barlow Twins path; normalize.py the global-batch
normalization; cost.py the models behind "auto".
"""

from bt_fast.kernels.byol import byol_loss
from bt_fast.kernels.cost import choose_impl, choose_vicreg_impl, loss_costs, vicreg_costs
from bt_fast.kernels.loss import IMPLS, barlow_twins_loss, resolve_impl
from bt_fast.kernels.multicrop import dino_batch_center, dino_loss, sinkhorn, swav_loss
from bt_fast.kernels.ntxent import nt_xent_loss
from bt_fast.kernels.reference import (
    barlow_twins_loss_reference,
    byol_loss_reference,
    dino_loss_reference,
    nt_xent_loss_reference,
    official_loss,
    sinkhorn_reference,
    swav_loss_reference,
    vicreg_loss_reference,
    vicreg_official_loss,
)
from bt_fast.kernels.vicreg import VICREG_IMPLS, resolve_vicreg_impl, vicreg_loss

__all__ = [
    "IMPLS",
    "VICREG_IMPLS",
    "barlow_twins_loss",
    "barlow_twins_loss_reference",
    "byol_loss",
    "byol_loss_reference",
    "choose_impl",
    "choose_vicreg_impl",
    "dino_batch_center",
    "dino_loss",
    "dino_loss_reference",
    "loss_costs",
    "nt_xent_loss",
    "nt_xent_loss_reference",
    "official_loss",
    "resolve_impl",
    "resolve_vicreg_impl",
    "sinkhorn",
    "sinkhorn_reference",
    "swav_loss",
    "swav_loss_reference",
    "vicreg_costs",
    "vicreg_loss",
    "vicreg_loss_reference",
    "vicreg_official_loss",
]
