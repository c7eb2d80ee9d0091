"""bt_fast.kernels: the Barlow Twins loss, a torch reference and Triton kernels.

    from bt_fast.kernels import barlow_twins_loss
    loss = barlow_twins_loss(z1, z2, lambd=0.0051, impl="auto")   # fp32 scalar

reference.py is the oracle; dense.py holds the Triton kernels (imported lazily, through
triton_env.py, the one interpreter switch); collectives.py every collective; gram.py the O(N^2 D)
path; normalize.py the global-batch normalization; cost.py the model behind "auto".
"""

from bt_fast.kernels.cost import choose_impl, loss_costs
from bt_fast.kernels.loss import IMPLS, barlow_twins_loss, resolve_impl
from bt_fast.kernels.reference import barlow_twins_loss_reference, official_loss

__all__ = [
    "IMPLS",
    "barlow_twins_loss",
    "barlow_twins_loss_reference",
    "choose_impl",
    "loss_costs",
    "official_loss",
    "resolve_impl",
]
