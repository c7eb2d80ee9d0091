"""``nt_xent_loss``: SimCLR's NT-Xent over the global batch, each rank doing only its rows.

For the global batch of N samples, u = the 2N rows [z1; z2] scaled to unit length
(view 1 of every rank in rank order, then view 2), t the temperature, logits
L_ik = u_i.u_k / t, and for each row i its positive pos(i) (the other view of the
same sample; the other 2N - 2 rows are its negatives):

    lse_i = log sum_{k != i} exp(L_ik)
    l_i   = lse_i - L_i,pos(i)
    loss  = (1 / 2N) sum_i l_i                         (reference.nt_xent_loss_reference)

Split over W ranks (n = N / W samples each): a rank gathers u once, takes ITS 2n rows
as anchors against all 2N candidates ([2n, 2N] logits, not [2N, 2N]) and all-gathers
the per-anchor (lse_i, l_i) so that every rank has the same loss. Backward needs no
collective: row j of u enters the loss as an anchor (its own l_j) and as a candidate
of every other anchor i, and since L is symmetric (L_ij = L_ji) both parts come from
this rank's block of logits and the gathered lse:

    d loss / d u_j = (1 / (2N t)) sum_k (exp(L_jk - lse_j) + exp(L_jk - lse_k) - 2 [k = pos(j)]) u_k

(self excluded; at k = pos(j), exp(L_jk - lse_j) - 1 = expm1(-l_j), which keeps its
digits when l_j is small, as the forward's l_i = softplus(...) does). So each rank's
backward is exactly g * d(global loss)/d(its rows) for its own upstream g, the
gradient convention of every loss here (README, "Gradient scale and world size"); the row
normalization before it is local and left to autograd.

Per rank: 16 n N D flops (8 n N D for the [2n, 2N] logits, as many for backward's
[2n, 2N] x [2N, D] matmul), [2n, 2N] fp32 logits held for backward; sent: an
all-gather of [n, 2D] and one of [2n, 2] fp32. u travels in fp32 whatever the input
dtype: SimCLR's D is 128, so the gather is small next to the backbone's gradients,
and every rank keeps exact rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bt_fast.kernels import collectives


class NTXentGlobal(torch.autograd.Function):
    """(u1, u2) [n_local, D] unit rows -> NT-Xent of the global batch (fp32 / fp64 scalar)."""

    @staticmethod
    def forward(ctx, u1, u2, temperature, group):
        with torch.autocast(u1.device.type, enabled=False):  # a caller's autocast must not make logits bf16
            return NTXentGlobal._forward(ctx, u1, u2, temperature, group)

    @staticmethod
    def _forward(ctx, u1, u2, temperature, group):
        n = u1.shape[0]
        w, r = collectives.world_size(group), collectives.rank(group)
        U1, U2 = collectives.all_gather_pair(u1, u2, group, u1.dtype)  # [N, D] each
        N = U1.shape[0]
        cand = torch.cat([U1, U2])  # [2N, D], the reference's row order
        ar = torch.arange(n, device=u1.device)
        rows = torch.cat([r * n + ar, N + r * n + ar])  # [2n] global indices of this rank's anchors
        pos = (rows + N) % (2 * N)  # [2n] their positives
        logits = cand[rows] @ cand.T / temperature  # [2n, 2N], 2 (2n)(2N) D flops
        at = torch.arange(2 * n, device=u1.device)
        logits[at, rows] = float("-inf")  # no row is its own candidate
        # l_i = lse_i - L_i,pos loses digits once training makes l_i small (lse and L_pos
        # ~ 1/t, l_i ~ 1e-3); softplus of the negatives' logsumexp relative to L_pos keeps them
        l_pos = logits[at, pos]  # [2n]
        neg_lse = torch.logsumexp(logits.index_put((at, pos), l_pos.new_tensor(float("-inf"))), dim=1)
        l_i = F.softplus(neg_lse - l_pos)  # [2n] = log(1 + sum_neg exp(L_ik - L_pos))
        lse = l_pos + l_i  # [2n] logsumexp over every candidate of anchor i
        per_anchor = torch.stack([lse, l_i], dim=1)  # [2n, 2]
        stats = collectives.all_gather_rows(per_anchor, group)  # [W * 2n, 2], rank-major
        stats = stats.view(w, 2, n, 2).transpose(0, 1).reshape(2 * N, 2)  # candidate order
        ctx.save_for_backward(cand, logits, lse, stats[:, 0].contiguous(), l_i, stats[:, 1][pos], at, pos)
        ctx.scale, ctx.n = 1.0 / (2 * N * temperature), n
        return stats[:, 1].sum() / (2 * N)  # the same value, summed in the same order, on every rank

    @staticmethod
    def backward(ctx, g):  # no collective: lse of every anchor was gathered in forward
        cand, logits, lse, lse_all, l_i, l_pos_anchor, at, pos = ctx.saved_tensors
        m = torch.exp(logits - lse[:, None]).add_(torch.exp(logits - lse_all[None, :]))  # [2n, 2N]
        # at k = pos(j) the two terms are p - 1 = exp(-l) - 1: expm1 of the accurate l (of
        # anchor j, and of anchor pos(j), whose positive is j) instead of 1 - (1 - tiny)
        m[at, pos] = torch.expm1(-l_i) + torch.expm1(-l_pos_anchor)
        du = (m @ cand).mul_(g.to(cand.dtype) * ctx.scale)  # [2n, D]
        return du[: ctx.n], du[ctx.n :], None, None


def nt_xent_loss(z1, z2, *, temperature=0.1, group=None):
    """NT-Xent of embeddings z1, z2 [n_local, D] with 2N - 2 negatives from the global batch.

    Cosine similarities (rows scaled to unit length in fp32), temperature t; the mean
    over all 2N anchors of the global batch of ``group``. Each rank's backward gives
    exactly d loss / d z_local; local batch sizes must be equal on all ranks. Returns an
    fp32 scalar (fp64 for fp64 inputs).
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be [N, D]; got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if z1.shape[0] * collectives.world_size(group) < 2:
        raise ValueError("nt_xent_loss needs a global batch of at least 2 (negatives)")
    dtype = torch.promote_types(z1.dtype, torch.float32)
    u1, u2 = F.normalize(z1.to(dtype), dim=1), F.normalize(z2.to(dtype), dim=1)
    return NTXentGlobal.apply(u1, u2, float(temperature), group)
