"""The oracle: the Barlow Twins loss in plain torch, written the way the paper reads.

Every test and benchmark imports this file; nothing else re-derives the loss.

Official semantics (Zbontar et al., 2021, and facebookresearch/barlowtwins main.py):

    z_hat[:, k] = (z[:, k] - mean_k) / sqrt(var_k + eps)     # batch mean, biased variance
    c           = z1_hat^T z2_hat / N                        # [D, D] cross-correlation
    loss        = sum_i (c_ii - 1)^2 + lambd * sum_{i != j} c_ij^2

with N, the means and the variances taken over the GLOBAL batch (all ranks of
``group``). Distributed, the oracle simply all-gathers z1 and z2 and evaluates the
single-process formula on the global batch. The gather's backward hands each rank the
rows of the global gradient that belong to it, so backward yields exactly
d loss / d z_local (README, "Gradient scale and world size"). It costs D^2 memory and N*D^2 flops
on every rank: an oracle, not a speed path.

``official_loss`` is the formulation of the official code, kept as the benchmark's
baseline: it materializes c, all-reduces it (D^2 floats per step) and copies its
off-diagonal. Its raw all-reduce is invisible to autograd, so its gradient is
1/world_size of the global-loss gradient; use it for timing, memory and bytes only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bt_fast.kernels import collectives


def off_diagonal(x: torch.Tensor) -> torch.Tensor:
    """Flattened view-copy of the off-diagonal elements of a square matrix (official trick)."""
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def batch_normalize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Each column to zero mean and unit (biased) variance; eps inside the sqrt."""
    mean = z.mean(dim=0)
    var = z.var(dim=0, unbiased=False)
    return (z - mean) / torch.sqrt(var + eps)


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor, eps: float) -> torch.Tensor:
    """c = z1_hat^T z2_hat / N, [D, D], in at least fp32."""
    dtype = torch.promote_types(z1.dtype, torch.float32)
    z1_hat = batch_normalize(z1.to(dtype), eps)
    z2_hat = batch_normalize(z2.to(dtype), eps)
    return z1_hat.T @ z2_hat / z1.shape[0]


def barlow_twins_loss_reference(z1, z2, *, lambd=0.0051, eps=1e-5, group=None, return_terms=False):
    """The official loss on the global batch; fp32 (fp64 for fp64 inputs) scalar."""
    if collectives.world_size(group) > 1:
        z1, z2 = collectives.gather_rows(z1, group), collectives.gather_rows(z2, group)
    c = cross_correlation(z1, z2, eps)
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    loss = on_diag + lambd * off_diag
    return (loss, on_diag, off_diag) if return_terms else loss


def official_loss(z1, z2, *, lambd=0.0051, eps=1e-5, group=None):
    """The official code's formulation (baseline): dense c, raw all-reduce, off-diagonal copy.

    Normalization uses global statistics through an autograd-aware all-reduce of the
    per-feature sums (what SyncBatchNorm does in the official model). Gradient is
    1/world_size of the global-loss gradient, as in the official code.
    """
    w = collectives.world_size(group)
    n = z1.shape[0] * w

    def sync_bn(z):
        z = z.float()
        if w == 1:
            return batch_normalize(z, eps)
        sums = collectives.AllReduceSum.apply(torch.cat([z.sum(0), z.pow(2).sum(0)]), group)
        mean, sq = sums.chunk(2)
        mean, var = mean / n, sq / n - (mean / n) ** 2
        return (z - mean) / torch.sqrt(var + eps)

    c = sync_bn(z1).T @ sync_bn(z2)
    c.div_(n)
    if w > 1:
        dist.all_reduce(c, group=group)  # D^2 floats every step; invisible to autograd
    on_diag = torch.diagonal(c).add(-1).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag
