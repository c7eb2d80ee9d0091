"""``byol_loss``: BYOL's regression loss as a pure function (the EMA target is the method's).

    loss = (1/N) sum_n [ (2 - 2 cos(p1_n, sg(z2_n))) + (2 - 2 cos(p2_n, sg(z1_n))) ]

p1, p2: the online network's predictions of views 1 and 2; z1, z2: the target
network's projections of views 1 and 2 (sg: no gradient reaches them); N the global
batch of ``group``. Symmetric as in the paper and the official code (range 0..8).

Each term depends on one sample only, so a rank sums its own rows, divides by the
global N and one all-reduce of that scalar (``collectives.global_sum``, backward the
identity) gives every rank the global value while its backward stays exactly
d loss / d p_local (README, "Gradient scale and world size"). Cost: O(n D), 4 bytes sent twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bt_fast.kernels import collectives


def _regression(p: torch.Tensor, z: torch.Tensor, dtype) -> torch.Tensor:
    """[n] 2 - 2 cos(p_n, z_n), z detached, in ``dtype``."""
    return 2 - 2 * (F.normalize(p.to(dtype), dim=1) * F.normalize(z.detach().to(dtype), dim=1)).sum(1)


def byol_loss(p1, p2, z1, z2, *, group=None):
    """BYOL loss of predictions p1, p2 and target projections z1, z2 [n_local, D]; fp32 scalar."""
    if not (p1.shape == p2.shape == z1.shape == z2.shape) or p1.dim() != 2:
        raise ValueError(f"p1, p2, z1, z2 must all be [N, D]; got {[tuple(t.shape) for t in (p1, p2, z1, z2)]}")
    dtype = torch.promote_types(p1.dtype, torch.float32)
    n_global = p1.shape[0] * collectives.world_size(group)
    local = (_regression(p1, z2, dtype) + _regression(p2, z1, dtype)).sum() / n_global
    return collectives.global_sum(local, group)
