"""The oracles: every loss of bt_fast.kernels in plain torch, written the way the papers read.

Every test and benchmark imports this file; nothing else re-derives a loss. Barlow
Twins first; VICReg, SimCLR's NT-Xent and BYOL at the end of the file, each the same
way: gather the global batch with ``collectives.gather_rows`` (backward keeps this
rank's rows), evaluate the single-process formula on it, so every rank gets exactly
d(global loss)/d(its rows).

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
import torch.nn.functional as F

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


# ---------------------------------------------------------------- other methods


def _vicreg_terms(x, y, repr_loss, sim_coeff, std_coeff, cov_coeff, eps):
    """main_vicreg.py's lines after the gather: x, y [N, D] global; (loss, repr, std, cov)."""
    n, d = x.shape
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + eps)
    std_y = torch.sqrt(y.var(dim=0) + eps)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (n - 1)  # [D, D]
    cov_y = (y.T @ y) / (n - 1)
    cov_loss = off_diagonal(cov_x).pow(2).sum().div(d) + off_diagonal(cov_y).pow(2).sum().div(d)
    loss = sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss
    return loss, repr_loss, std_loss, cov_loss


def vicreg_loss_reference(z1, z2, *, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4, group=None,
                          return_terms=False):
    """VICReg (Bardes et al., 2022) with facebookresearch/vicreg main_vicreg.py's semantics.

    x, y are the GLOBAL batches [N, D] of z1, z2; the two [D, D] covariances are formed.

        repr_loss = mean_{n,k} (x_nk - y_nk)^2                      invariance (MSE)
        std_x     = sqrt(unbiased var_k(x) + eps)                    [D]
        std_loss  = mean_k relu(1 - std_x) / 2 + mean_k relu(1 - std_y) / 2
        cov_x     = (x - mean)^T (x - mean) / (N - 1)                [D, D]
        cov_loss  = sum_{i!=j} cov_x,ij^2 / D + sum_{i!=j} cov_y,ij^2 / D
        loss      = sim_coeff repr_loss + std_coeff std_loss + cov_coeff cov_loss

    One difference from the official code (``vicreg_official_loss``): it takes
    repr_loss on each rank's rows and its gather layer SUMS gradients over ranks, so
    its gradient is W times d loss / d z_local; here repr_loss is over the global batch
    and the gradient is exactly d loss / d z_local (README, "Gradient scale and world size"). Its
    value on a rank carries that rank's repr_loss; their mean over ranks is this value. Returns (loss, repr_loss, std_loss,
    cov_loss) with ``return_terms``; fp32 (fp64 for fp64 inputs).
    """
    dtype = torch.promote_types(z1.dtype, torch.float32)
    x = collectives.gather_rows(z1, group).to(dtype)
    y = collectives.gather_rows(z2, group).to(dtype)
    terms = _vicreg_terms(x, y, F.mse_loss(x, y), sim_coeff, std_coeff, cov_coeff, eps)
    return terms if return_terms else terms[0]


def vicreg_official_loss(z1, z2, *, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4, group=None):
    """main_vicreg.py's forward as written, the benchmark's baseline: repr_loss on this
    rank's rows, ``FullGatherLayer`` (backward all-reduces the [N, D] gradients), two
    [D, D] covariances. Its gradient is W times the exact one (see above); use it for
    timing, memory and bytes. On one process it is ``vicreg_loss_reference``.
    """
    repr_loss = F.mse_loss(z1, z2)
    if collectives.world_size(group) > 1:
        z1, z2 = collectives.GatherRowsSummed.apply(z1, group), collectives.GatherRowsSummed.apply(z2, group)
    return _vicreg_terms(z1, z2, repr_loss, sim_coeff, std_coeff, cov_coeff, eps)[0]


def nt_xent_loss_reference(z1, z2, *, temperature=0.1, group=None):
    """SimCLR's NT-Xent (Chen et al., 2020) on the global batch, forming [2N, 2N] logits.

    u = the 2N rows of [z1; z2] scaled to unit length; for each row i, its positive is
    the other view of the same sample and the 2N - 2 rows of the other samples are its
    negatives:

        l_i  = -log( exp(u_i.u_pos(i) / t) / sum_{k != i} exp(u_i.u_k / t) )
        loss = mean_i l_i                                      over all 2N rows
    """
    dtype = torch.promote_types(z1.dtype, torch.float32)
    z = torch.cat([collectives.gather_rows(z1, group), collectives.gather_rows(z2, group)]).to(dtype)
    u = F.normalize(z, dim=1)  # [2N, D]
    n2 = u.shape[0]
    logits = (u @ u.T / temperature).masked_fill(torch.eye(n2, dtype=torch.bool, device=u.device), float("-inf"))
    positives = (torch.arange(n2, device=u.device) + n2 // 2) % n2
    return F.cross_entropy(logits, positives)


def byol_loss_reference(p1, p2, z1, z2, *, group=None):
    """BYOL's loss (Grill et al., 2020): online predictions p of one view regress the
    target projections z of the other; z gets no gradient.

        loss = mean_n [ (2 - 2 cos(p1_n, z2_n)) + (2 - 2 cos(p2_n, z1_n)) ]     over the global batch
    """
    dtype = torch.promote_types(p1.dtype, torch.float32)
    p = torch.cat([collectives.gather_rows(p1, group), collectives.gather_rows(p2, group)]).to(dtype)
    z = torch.cat([collectives.gather_rows(z2.detach(), group), collectives.gather_rows(z1.detach(), group)])
    cos = (F.normalize(p, dim=1) * F.normalize(z.to(dtype), dim=1)).sum(1)  # [2N]
    return (2 - 2 * cos).sum() / (p.shape[0] // 2)


# ---------------------------------------------------------------- multi-crop (SwAV, DINO)
# The official codes' convention: every rank's rows get W x the exact gradient of the
# global-batch loss (kernels/multicrop.py). The oracles evaluate the single-process
# formula on the gathered global batch (exact gradient) and scale the gradient by W
# with a value-preserving identity.


def _w_times_gradient(loss: torch.Tensor, group) -> torch.Tensor:
    """Same value; gradient W times (W loss - (W - 1) loss, the second term constant)."""
    w = collectives.world_size(group)
    return loss if w == 1 else w * loss - (w - 1) * loss.detach()


def sinkhorn_reference(scores: torch.Tensor, *, epsilon=0.05, iters=3) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp on the whole batch [B, K], as the paper's appendix writes it
    (Q is K x B): Q = exp(scores^T / epsilon) / total; ``iters`` times rows (prototypes) to
    1/K, columns (samples) to 1/B; return B Q^T, whose rows sum to 1."""
    q = torch.exp(scores.detach() / epsilon).T  # [K, B]
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).T


def swav_loss_reference(scores, *, n_global=2, temperature=0.1, epsilon=0.05, iters=3, group=None,
                        queue_scores=None):
    """SwAV's swapped prediction on the global batch (all crops gathered), codes from
    ``sinkhorn_reference``; with ``queue_scores``, global crop i's codes are the last N rows of
    Sinkhorn-Knopp on every rank's queue rows stacked over the batch; W x gradient (see above)."""
    dtype = torch.promote_types(scores[0].dtype, torch.float32)
    s = [collectives.gather_rows(x, group).to(dtype) for x in scores]  # [N, K] each
    loss = 0
    for i in range(n_global):
        target = s[i]
        if queue_scores is not None:  # [W L + N, K]
            target = torch.cat([collectives.gather_rows(queue_scores[i].detach(), group).to(dtype), target])
        q = sinkhorn_reference(target, epsilon=epsilon, iters=iters)[-len(s[i]):]
        sub = [-(q * F.log_softmax(x / temperature, dim=1)).sum(dim=1).mean() for v, x in enumerate(s) if v != i]
        loss = loss + sum(sub) / (len(s) - 1)
    return _w_times_gradient(loss / n_global, group)


def dino_loss_reference(student, teacher, center, *, student_temp=0.1, teacher_temp=0.04, group=None):
    """DINO's loss on the global batch (all crops gathered): every student crop against
    every other global crop's centred, sharpened teacher distribution; W x gradient."""
    dtype = torch.promote_types(student[0].dtype, torch.float32)
    x = [collectives.gather_rows(t, group).to(dtype) for t in student]
    y = [collectives.gather_rows(t.detach(), group).to(dtype) for t in teacher]
    p = [F.softmax((t - center.to(dtype)) / teacher_temp, dim=1) for t in y]
    terms = [-(p[i] * F.log_softmax(x[v] / student_temp, dim=1)).sum(dim=1).mean()
             for i in range(len(p)) for v in range(len(x)) if v != i]
    return _w_times_gradient(sum(terms) / len(terms), group)
