"""The Barlow Twins terms through N x N Gram matrices: O(N^2 D) instead of O(N D^2).

For normalized views A, B [N, D] and c = A^T B / N, nothing D x D is ever formed:

    c_ii            = (1/N) sum_n A_ni B_ni                               [D], O(N D)
    ||c||_F^2       = (1/N^2) sum_{n,m} (A A^T)_nm (B B^T)_nm             (trace identity)
                    = (1/N^2) sum_{n,i} A_ni ((B B^T) A)_ni = sum_i r_i
    r_i = (c c^T)_ii, s_j = (c^T c)_jj  (row / column norms of c, [D] each)
    on_diag         = sum_i (c_ii - 1)^2
    off_diag        = ||c||_F^2 - sum_i c_ii^2

Gradients, for upstream g_on, g_off and w_i = 2 g_on (c_ii - 1) - 2 g_off c_ii:

    dA = (2 g_off / N^2) (B B^T) A + B diag(w) / N
    dB = (2 g_off / N^2) (A A^T) B + A diag(w) / N

and through the global-batch normalization (normalize.py) the column means it needs are
known in closed form, so backward has no collective at all:

    mean_N(dA)      = 0                      (B is centred, so 1^T B = 0)
    mean_N(dA * A)  = (2 g_off r + w * c_ii) / N

Distributed over W ranks (n = N / W local rows), each rank issues two collectives, both
in forward: one all-gather of the RAW [n, 2D] pair in the input dtype (bf16 under
autocast), from which it takes the global mean and variance itself (no normalization
all-reduce), then, after computing ITS rows P_A = (B_r B^T) A and P_B = (A_r A^T) B
([n, D], via the [n, N] Gram rows), one all-reduce of
[sum_n A_r * P_A, sum_n B_r * P_B] = N^2 [r, s] ([2D] fp32). Rows r of the formulas
above need only P_A, P_B, A_r, B_r and [D] vectors: the local gradient is exact and
local.

Triton where it fuses work: on CUDA the statistics, the normalization and c_ii come from
one kernel (colnorm.py, three passes instead of about ten).

Costs per rank: 8 n N D flops (4 matmuls), about 4 (4 N D + 2 n N + 4 n D) bytes of
extra memory, (W-1) n 2D s + 2 (W-1)/W 8D bytes sent. Matmuls stay in torch (cuBLAS /
MKL are the floor; the [n, N] Gram rows are small next to [n, D]); all accumulation is
fp32 (fp64 for fp64 inputs).

Precision note: off_diag is a difference. Once training has made c close to the
identity, ||c||^2 ~ D + off_diag and the subtraction costs log10(D / off_diag) digits
of fp32; the loss weights off_diag by lambd, so the loss itself stays accurate.
"""

from __future__ import annotations

import torch

from bt_fast.kernels import collectives
from bt_fast.kernels.normalize import normalize_backward


def gathered_normalize(z1, z2, eps, group, gather_dtype, fused=False):
    """All-gather the RAW pair once, normalize all N rows locally.

    Returns A, B [N, D] normalized with the global batch's mean and biased variance
    (two-pass, in >= fp32), inv_sigma [2D] and c_diag [D]. Every rank gathers the same
    rounded rows (its own included), so all ranks hold identical A, B and the same
    loss. This replaces normalization's two all-reduces by the gather that the Gram
    rows need anyway. ``fused``: one Triton kernel (colnorm.py) instead of ~10 torch
    passes over [N, 2D]; the default on CUDA.
    """
    if collectives.world_size(group) > 1:
        both = collectives.all_gather_rows(torch.cat([z1, z2], dim=1).to(gather_dtype), group)
        z1, z2 = both.chunk(2, dim=1)  # [N, D] each
    if fused:
        from bt_fast.kernels.colnorm import colnorm_pair  # imports triton

        return colnorm_pair(z1, z2, eps)
    dtype = torch.promote_types(z1.dtype, torch.float32)
    x1, x2 = z1.to(dtype), z2.to(dtype)
    n_global = x1.shape[0]
    x1, x2 = x1 - x1.mean(0), x2 - x2.mean(0)  # new tensors: z is never modified
    var = torch.cat([x1.pow(2).sum(0), x2.pow(2).sum(0)]) / n_global
    inv_sigma = torch.rsqrt(var + eps)  # [2D]
    inv1, inv2 = inv_sigma.chunk(2)
    A, B = x1.mul_(inv1), x2.mul_(inv2)
    return A, B, inv_sigma, (A * B).sum(0) / n_global


class GramLoss(torch.autograd.Function):
    """(z1, z2) [n_local, D] raw embeddings -> (on_diag, off_diag) of the global c."""

    @staticmethod
    def forward(ctx, z1, z2, eps, group, gather_dtype, fused):
        n = z1.shape[0]
        A, B, inv_sigma, c_diag = gathered_normalize(z1, z2, eps, group, gather_dtype, fused)  # [N, D] x 2
        N = A.shape[0]
        r0 = collectives.rank(group) * n
        A_r, B_r = A[r0 : r0 + n], B[r0 : r0 + n]  # this rank's rows, as every rank sees them
        if n < N:  # saved for backward: copies, so that the [N, D] A and B can go after forward
            A_r, B_r = A_r.clone(), B_r.clone()
        P_A = (B_r @ B.T) @ A  # [n, N] @ [N, D] -> rows r of (B B^T) A
        P_B = (A_r @ A.T) @ B  # rows r of (A A^T) B
        norms = torch.cat([(A_r * P_A).sum(0), (B_r * P_B).sum(0)])  # [2D], local rows
        r, s = (collectives.all_reduce_sum_(norms, group) / (N * N)).chunk(2)
        on_diag = (c_diag - 1).pow(2).sum()
        off_diag = r.sum() - c_diag.pow(2).sum()
        ctx.save_for_backward(inv_sigma, A_r, B_r, P_A, P_B, c_diag, r, s)
        ctx.N, ctx.dtypes = N, (z1.dtype, z2.dtype)
        return on_diag, off_diag

    @staticmethod
    def backward(ctx, g_on, g_off):  # no collective: everything global was saved in forward
        inv_sigma, A_r, B_r, P_A, P_B, c_diag, r, s = ctx.saved_tensors
        N = ctx.N
        g_on = A_r.new_zeros(()) if g_on is None else g_on.to(A_r.dtype)
        g_off = A_r.new_zeros(()) if g_off is None else g_off.to(A_r.dtype)
        w = (2 * g_on) * (c_diag - 1) - (2 * g_off) * c_diag  # [D]
        scale = (2 * g_off) / (N * N)
        ga = (P_A * scale).addcmul_(B_r, w / N)  # d loss / d a1, [n, D]
        gb = (P_B * scale).addcmul_(A_r, w / N)  # d loss / d a2
        mean_ga = (2 * g_off * r + w * c_diag) / N  # mean over the global batch of ga * a1
        mean_gb = (2 * g_off * s + w * c_diag) / N
        inv1, inv2 = inv_sigma.chunk(2)
        dz1 = normalize_backward(ga, A_r, inv1, None, mean_ga)  # mean_N(ga) = 0 exactly
        dz2 = normalize_backward(gb, B_r, inv2, None, mean_gb)
        return dz1.to(ctx.dtypes[0]), dz2.to(ctx.dtypes[1]), None, None, None, None


def gram_terms(z1, z2, *, eps=1e-5, group=None, gather_dtype=None, fused=None):
    """(on_diag, off_diag) of the global cross-correlation of raw embeddings z1, z2 [n, D].

    gather_dtype: dtype on the wire; default the input dtype for fp16/bf16, else fp32.
    fused: normalize with the Triton kernel (default: on CUDA, for fp32/fp16/bf16).
    """
    if fused is None:
        fused = z1.is_cuda and z1.dtype != torch.float64
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be [N, D]; got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if gather_dtype is None:
        gather_dtype = z1.dtype if z1.dtype in (torch.float16, torch.bfloat16) else torch.promote_types(z1.dtype, torch.float32)
    return GramLoss.apply(z1, z2, eps, group, gather_dtype, fused)
