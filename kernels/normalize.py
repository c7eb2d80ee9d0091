"""Global-batch normalization of the two embeddings, with an explicit backward.

Forward, for each view z [n_local, D] (computed in fp32 whatever z's dtype):

    mean_k = (1/N) sum_n z_nk                       # all-reduce #1: [2D] sums
    var_k  = (1/N) sum_n (z_nk - mean_k)^2          # all-reduce #2: [2D] centred squares
    sigma_k = sqrt(var_k + eps)
    a_nk   = (z_nk - mean_k) / sigma_k

N = world_size * n_local is the global batch. Two passes (not sum and sum of squares in
one) so the variance has no cancellation when |mean| >> std; both all-reduces together
move 4D floats, the same as one of [sum, sum of squares] for both views.

Backward, with g = d loss / d a for the LOCAL rows (exact, rows of the global loss):

    d loss / d z_nk = (g_nk - mean_N(g)_k - a_nk * mean_N(g * a)_k) / sigma_k

where mean_N averages over the GLOBAL batch (all-reduce #3: [4D] sums). The identity is
exact with eps inside the sqrt: d sigma / d z_m = (z_m - mean) / (N sigma).
"""

from __future__ import annotations

import torch

from bt_fast.kernels import collectives


def global_normalize(z1, z2, eps: float, group):
    """Forward only (no autograd): (a1, a2) [n, D] and inv_sigma [2D], in >= fp32."""
    n_global = z1.shape[0] * collectives.world_size(group)
    dtype = torch.promote_types(z1.dtype, torch.float32)  # fp32, or fp64 for gradcheck
    x1, x2 = z1.to(dtype), z2.to(dtype)
    mean = collectives.all_reduce_sum_(torch.cat([x1.sum(0), x2.sum(0)]), group) / n_global
    mean1, mean2 = mean.chunk(2)  # [D], [D]
    x1, x2 = x1 - mean1, x2 - mean2  # new tensors: z is never modified
    sq = torch.cat([x1.pow(2).sum(0), x2.pow(2).sum(0)])
    var = collectives.all_reduce_sum_(sq, group) / n_global
    inv_sigma = torch.rsqrt(var + eps)  # [2D]
    inv1, inv2 = inv_sigma.chunk(2)
    return x1.mul_(inv1), x2.mul_(inv2), inv_sigma


def normalize_backward(g, a, inv_sigma, mean_g, mean_ga):
    """d loss / d z [n, D] from g = d loss / d a and the global means of g and g * a [D]."""
    dz = g - mean_g if mean_g is not None else g.clone()
    return dz.addcmul_(a, mean_ga, value=-1).mul_(inv_sigma)  # one [n, D] temporary


class GlobalBatchNorm(torch.autograd.Function):
    """(z1, z2) [n_local, D] -> (a1, a2) [n_local, D] in >= fp32, normalized over the global batch."""

    @staticmethod
    def forward(ctx, z1, z2, eps: float, group):
        a1, a2, inv_sigma = global_normalize(z1, z2, eps, group)
        ctx.save_for_backward(a1, a2, inv_sigma)
        ctx.n_global, ctx.group = z1.shape[0] * collectives.world_size(group), group
        ctx.dtypes = (z1.dtype, z2.dtype)
        return a1, a2

    @staticmethod
    def backward(ctx, g1, g2):
        a1, a2, inv_sigma = ctx.saved_tensors
        g1 = torch.zeros_like(a1) if g1 is None else g1.to(a1.dtype)
        g2 = torch.zeros_like(a2) if g2 is None else g2.to(a2.dtype)
        sums = torch.cat([g1.sum(0), (g1 * a1).sum(0), g2.sum(0), (g2 * a2).sum(0)])
        sums = collectives.all_reduce_sum_(sums, ctx.group) / ctx.n_global
        mg1, mga1, mg2, mga2 = sums.chunk(4)
        inv1, inv2 = inv_sigma.chunk(2)
        dz1 = normalize_backward(g1, a1, inv1, mg1, mga1)
        dz2 = normalize_backward(g2, a2, inv2, mg2, mga2)
        return dz1.to(ctx.dtypes[0]), dz2.to(ctx.dtypes[1]), None, None


def normalize_pair(z1, z2, *, eps: float = 1e-5, group=None):
    """Normalize both views with global-batch statistics; returns (a1, a2) in fp32 (fp64 for fp64 z)."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be [N, D]; got {tuple(z1.shape)} and {tuple(z2.shape)}")
    return GlobalBatchNorm.apply(z1, z2, eps, group)
