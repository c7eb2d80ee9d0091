"""The Barlow Twins terms through N x N Gram matrices: O(N^2 D) instead of O(N D^2).

For normalized views A, B [N, D] and c = A^T B / N:

    c_ii           = (1/N) sum_n A_ni B_ni                           # [D], O(N D)
    ||c||_F^2      = (1/N^2) ||A^T B||_F^2
                   = (1/N^2) sum_{n,m} (A A^T)_nm (B B^T)_nm          # trace identity
    on_diag        = sum_i (c_ii - 1)^2
    off_diag       = ||c||_F^2 - sum_i c_ii^2

and, for upstream gradients g_on, g_off (w_i = 2 g_on (c_ii - 1) - 2 g_off c_ii):

    d/dA = (2 g_off / N^2) (B B^T) A + B diag(w) / N
    d/dB = (2 g_off / N^2) (A A^T) B + A diag(w) / N

Distributed over W ranks with n = N / W local rows: one all-gather of the normalized
[n, 2D] pair (in the input dtype, so bf16 under autocast), then each rank computes ITS
rows of the Gram matrices, G_A[r] = A_r A^T and G_B[r] = B_r B^T ([n, N]), and
all-reduces one scalar sum(G_A[r] * G_B[r]). Row r of both formulas above needs only
G_B[r], G_A[r] and the gathered A, B, so backward is exact and local: no collective.

Costs per rank: 8 n N D flops (4 matmuls), 2 n N + 2 N D floats of extra memory,
(W-1) * n * 2D * itemsize bytes sent. Matmuls stay in torch (cuBLAS / MKL are the
floor); all accumulation is fp32 (fp64 for fp64 inputs).

Precision note: off_diag is a difference. When training has made c close to the
identity, ||c||^2 ~ D + off_diag and the subtraction costs log10(D / off_diag) digits
of fp32; the loss weights off_diag by lambd, so the loss itself stays accurate.
"""

from __future__ import annotations

import torch

from bt_fast.kernels import collectives


def gather_pair(a1, a2, group, gather_dtype):
    """Gather the normalized local rows of both views in one collective -> (A, B) [N, D].

    Rows are rounded to ``gather_dtype`` on every rank (own rows included), so all
    ranks see identical global matrices and compute the same loss.
    """
    if collectives.world_size(group) == 1:
        return a1, a2
    d = a1.shape[1]
    both = collectives.all_gather_rows(torch.cat([a1, a2], dim=1).to(gather_dtype), group)
    both = both.to(a1.dtype)  # [N, 2D], accumulate in fp32
    return both[:, :d], both[:, d:]


class GramTerms(torch.autograd.Function):
    """(a1, a2) [n_local, D] normalized -> (on_diag, off_diag) fp32 scalars of the global c."""

    @staticmethod
    def forward(ctx, a1, a2, group, gather_dtype):
        w = collectives.world_size(group)
        n = a1.shape[0]
        N = n * w
        A, B = gather_pair(a1, a2, group, gather_dtype)  # [N, D] each
        r0 = collectives.rank(group) * n
        A_r, B_r = A[r0 : r0 + n], B[r0 : r0 + n]  # this rank's rows, as every rank sees them
        c_diag = (A * B).sum(0) / N  # [D]
        GA_r = A_r @ A.T  # [n, N]
        GB_r = B_r @ B.T  # [n, N]
        fro = collectives.all_reduce_sum_((GA_r * GB_r).sum().reshape(1), group)[0] / (N * N)
        on_diag = (c_diag - 1).pow(2).sum()
        off_diag = fro - c_diag.pow(2).sum()
        ctx.save_for_backward(A, B, GA_r, GB_r, c_diag)
        ctx.r0, ctx.n, ctx.N = r0, n, N
        return on_diag, off_diag

    @staticmethod
    def backward(ctx, g_on, g_off):
        A, B, GA_r, GB_r, c_diag = ctx.saved_tensors
        r0, n, N = ctx.r0, ctx.n, ctx.N
        g_on = A.new_zeros(()) if g_on is None else g_on.to(A.dtype)
        g_off = A.new_zeros(()) if g_off is None else g_off.to(A.dtype)
        w = (2 * g_on) * (c_diag - 1) - (2 * g_off) * c_diag  # [D]
        scale = (2 * g_off) / (N * N)
        da = (GB_r @ A).mul_(scale).addcmul_(B[r0 : r0 + n], w / N)  # [n, D]
        db = (GA_r @ B).mul_(scale).addcmul_(A[r0 : r0 + n], w / N)  # [n, D]
        return da, db, None, None


def gram_terms(a1, a2, *, group=None, gather_dtype=torch.float32):
    """(on_diag, off_diag) of the global cross-correlation of normalized (a1, a2)."""
    return GramTerms.apply(a1, a2, group, gather_dtype)
