"""``vicreg_loss``: VICReg with its covariance term in Gram form, never a D x D tensor.

The official loss (reference.vicreg_loss_reference, main_vicreg.py) forms the two
covariances cov = X^T X / (N - 1), [D, D] each, to sum their squared off-diagonal
entries: O(N D^2) flops, O(D^2) memory (2 x 256 MiB of fp32 at D = 8192). For the
centred global batch X [N, D] (X = z - mean over the global batch), with
v_j = sum_n X_nj^2 [D] (= (N - 1) var_j) and the Gram matrix G = X X^T [N, N]:

    ||X^T X||_F^2 = trace(X^T X X^T X) = ||X X^T||_F^2 = ||G||_F^2
    sum_{i!=j} (X^T X)_ij^2 = ||G||_F^2 - sum_j v_j^2
    cov_x = (||G||_F^2 - sum_j v_j^2) / ((N - 1)^2 D)                  per branch

O(N^2 D) flops, O(N^2 + N D) memory. Gradients, all already centred (1^T X = 0, so
1^T G X = 0: the mean subtraction's backward is the identity on them):

    d cov_x / d z      = 4 (G X - X diag(v)) / ((N - 1)^2 D)
    d std_loss / d z   = -[std < 1] X / (2 D (N - 1) std)     std = sqrt(v / (N-1) + eps)
    d repr_loss / d z1 = 2 (z1 - z2) / (N D) = -d repr_loss / d z2

Distributed over W ranks (n = N / W local rows r): one all-gather of the raw [n, 2D]
pair (input dtype; every rank then centres all N rows itself, so the mean is the
global one and exact), each rank forms only ITS rows G_r = X_r X^T [n, N] and
P_r = G_r X [n, D], and one all-reduce of 3 fp64 scalars (||G_r||^2 of both
branches, sum (z1 - z2)^2 of its rows) completes the value. Row r of every gradient
above needs only X_r, P_r and [D] vectors, so backward is local and exact: no
collective, no D x D all-reduce. Flops per rank 8 n N D (4 matmuls), memory about
4 (4 N D + 2 n N + 4 n D) bytes.

Precision: the covariance term is a difference. ||G||^2 is accumulated in fp64 from
fp32 squares of an fp32 G; its rounding error is about eps_fp32 (sum_n G_nn^2 +
sum_j v_j^2), so the relative error of cov_x is eps_fp32 times that over the
off-diagonal sum: ~1e-7 at random init (N < D: the off-diagonal sum is then at least
(sum_j v_j)^2 / (N - 1), comparable to sum_n G_nn^2), larger when one feature's
variance dominates or N >> D with decorrelated features (where "auto" picks the
reference anyway). The tests pin it against float64 at N = 40, D = 8192.
"""

from __future__ import annotations

import torch

from bt_fast.kernels import collectives
from bt_fast.kernels.cost import choose_vicreg_impl, resolve
from bt_fast.kernels.reference import vicreg_loss_reference

VICREG_IMPLS = ("auto", "reference", "gram")


def _branch(z: torch.Tensor, r0: int, n: int, needs_grad: bool):
    """Centre the global batch z [N, D]; (X_r [n, D], v [D], ||G_r||^2 fp64, P_r [n, D] or None)."""
    x = z - z.mean(0)  # [N, D], two passes: no cancellation in v when |mean| >> std
    v = x.pow(2).sum(0)  # [D] = (N - 1) unbiased variance
    x_r = x[r0 : r0 + n] if n == x.shape[0] else x[r0 : r0 + n].clone()  # saved: a view would keep [N, D]
    g_r = x_r @ x.T  # [n, N]: rows r of G = X X^T, 2 n N D flops
    g_sq = g_r.pow(2).sum(dtype=torch.float64)  # fp32 squares, fp64 sum of N^2 / W terms
    p_r = g_r @ x if needs_grad else None  # [n, D]: rows r of G X, 2 n N D flops
    return x_r, v, g_sq, p_r


class VICRegGram(torch.autograd.Function):
    """(z1, z2) [n_local, D] -> (repr_loss, std_loss, cov_loss) of the global batch, Gram form."""

    @staticmethod
    def forward(ctx, z1, z2, eps, group, gather_dtype):
        with torch.autocast(z1.device.type, enabled=False):  # a caller's autocast must not make G bf16
            return VICRegGram._forward(ctx, z1, z2, eps, group, gather_dtype)

    @staticmethod
    def _forward(ctx, z1, z2, eps, group, gather_dtype):
        n = z1.shape[0]
        dtype = torch.promote_types(z1.dtype, torch.float32)
        # every rank gathers the same rounded rows (its own included): identical X, Y
        Z1, Z2 = collectives.all_gather_pair(z1, z2, group, gather_dtype)
        Z1, Z2 = Z1.to(dtype), Z2.to(dtype)  # [N, D] each
        N, D = Z1.shape
        r0 = collectives.rank(group) * n
        diff_r = Z1[r0 : r0 + n] - Z2[r0 : r0 + n]  # [n, D]
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        x_r, v_x, gx, p_x = _branch(Z1, r0, n, needs_grad)
        del Z1
        y_r, v_y, gy, p_y = _branch(Z2, r0, n, needs_grad)
        del Z2
        sums = torch.stack([gx, gy, diff_r.pow(2).sum(dtype=torch.float64)])
        sums = collectives.all_reduce_sum_(sums, group)  # [3] fp64, the step's only all-reduce
        repr_loss = (sums[2] / (N * D)).to(dtype)
        std_x, std_y = torch.sqrt(v_x / (N - 1) + eps), torch.sqrt(v_y / (N - 1) + eps)  # [D]
        std_loss = (torch.relu(1 - std_x).mean() + torch.relu(1 - std_y).mean()) / 2
        off = (sums[0] - v_x.double().pow(2).sum()) + (sums[1] - v_y.double().pow(2).sum())
        cov_loss = (off / ((N - 1) ** 2 * D)).to(dtype)
        ctx.save_for_backward(diff_r, x_r, y_r, p_x, p_y, v_x, v_y, std_x, std_y)
        ctx.N, ctx.D, ctx.dtypes = N, D, (z1.dtype, z2.dtype)
        return repr_loss, std_loss, cov_loss

    @staticmethod
    def backward(ctx, g_repr, g_std, g_cov):  # no collective: every global quantity was saved
        diff_r, x_r, y_r, p_x, p_y, v_x, v_y, std_x, std_y = ctx.saved_tensors
        N, D = ctx.N, ctx.D
        zero = diff_r.new_zeros(())
        g_repr, g_std, g_cov = (zero if g is None else g.to(diff_r.dtype) for g in (g_repr, g_std, g_cov))
        k_repr = 2 * g_repr / (N * D)
        k_cov = 4 * g_cov / ((N - 1) ** 2 * D)

        def grad(x_r, p_r, v, std, sign):
            w = -(g_std / 2) * (std < 1) / (D * (N - 1) * std) - k_cov * v  # [D]
            return (p_r * k_cov).addcmul_(x_r, w).add_(diff_r * (sign * k_repr))  # [n, D]

        dz1 = grad(x_r, p_x, v_x, std_x, 1.0)
        dz2 = grad(y_r, p_y, v_y, std_y, -1.0)
        return dz1.to(ctx.dtypes[0]), dz2.to(ctx.dtypes[1]), None, None, None


def resolve_vicreg_impl(impl: str, z: torch.Tensor, group=None) -> str:
    """The concrete implementation ``impl`` stands for with these inputs."""
    return resolve(impl, VICREG_IMPLS, choose_vicreg_impl, z, group, loss="vicreg")


def vicreg_loss(z1, z2, *, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4, group=None, impl="auto",
                return_terms=False):
    """VICReg loss of embeddings z1, z2 [n_local, D] over the global batch of ``group``.

    The official main_vicreg.py semantics (see reference.vicreg_loss_reference); each
    rank's backward gives exactly d loss / d z_local (README, "Gradient scale and world size"; the
    official code's gradient is W times larger, see the reference). impl: "reference"
    (forms the [D, D] covariances), "gram" (this module) or "auto"
    (cost.choose_vicreg_impl). Local batch sizes must be equal on all ranks. With
    ``return_terms`` returns (loss, repr_loss, std_loss, cov_loss), the terms
    unweighted; fp32 scalars (fp64 for fp64 inputs).
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be [N, D]; got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] * collectives.world_size(group) < 2:
        raise ValueError("vicreg_loss needs a global batch of at least 2 (unbiased variance)")
    impl = resolve_vicreg_impl(impl, z1, group)
    if impl == "reference":
        return vicreg_loss_reference(z1, z2, sim_coeff=sim_coeff, std_coeff=std_coeff, cov_coeff=cov_coeff,
                                     eps=eps, group=group, return_terms=return_terms)
    half = z1.dtype in (torch.float16, torch.bfloat16)
    gather_dtype = z1.dtype if half else torch.promote_types(z1.dtype, torch.float32)  # on the wire
    repr_loss, std_loss, cov_loss = VICRegGram.apply(z1, z2, eps, group, gather_dtype)
    loss = sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss
    return (loss, repr_loss, std_loss, cov_loss) if return_terms else loss
