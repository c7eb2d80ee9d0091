"""``barlow_twins_loss``: one entry point, four implementations, the official semantics.

    a1, a2 = each column normalized with the GLOBAL batch's mean and biased variance
    c      = sum_ranks a1_r^T a2_r / N_global                    (never formed by dense/gram)
    loss   = sum_i (c_ii - 1)^2 + lambd * sum_{i!=j} c_ij^2      fp32 scalar

Collectives per step (W > 1), all in ``collectives.py`` so they can be counted:
reference all-gathers z; dense all-reduces [2D] sums twice (normalize.py), all-gathers
the normalized pair and all-reduces [4D] in backward; gram all-gathers z once and
all-reduces [2D] (gram.py), nothing in backward.

Gradient scale (README, "Gradient scale and world size"): on every rank, backward yields exactly d loss / d z_local
of the global loss; DDP then averages over ranks, which reproduces the official
convention (true gradient / world size) that the published learning rates assume.
"""

from __future__ import annotations

import torch

from bt_fast.kernels.cost import choose_impl, resolve
from bt_fast.kernels.gram import gram_terms
from bt_fast.kernels.normalize import normalize_pair
from bt_fast.kernels.reference import barlow_twins_loss_reference

IMPLS = ("auto", "reference", "dense", "gram")


def resolve_impl(impl: str, z: torch.Tensor, group=None) -> str:
    """The concrete implementation ``impl`` stands for with these inputs."""
    return resolve(impl, IMPLS, choose_impl, z, group)


def barlow_twins_loss(z1, z2, *, lambd=0.0051, eps=1e-5, group=None, impl="auto", return_terms=False):
    """Barlow Twins loss of embeddings z1, z2 [n_local, D] over the global batch of ``group``.

    impl: "reference" (plain torch oracle), "dense" (Triton, tile by tile), "gram"
    (N x N Gram matrices) or "auto" (kernels.cost.choose_impl). Local batch sizes must
    be equal on all ranks. With ``return_terms`` returns (loss, on_diag, off_diag),
    off_diag unweighted, all fp32 scalars.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be [N, D]; got {tuple(z1.shape)} and {tuple(z2.shape)}")
    impl = resolve_impl(impl, z1, group)
    if impl == "reference":
        return barlow_twins_loss_reference(z1, z2, lambd=lambd, eps=eps, group=group, return_terms=return_terms)
    half = z1.dtype in (torch.float16, torch.bfloat16)
    gather_dtype = z1.dtype if half else torch.promote_types(z1.dtype, torch.float32)  # on the wire
    if impl == "gram":  # normalization fused in: backward issues no collective
        on_diag, off_diag = gram_terms(z1, z2, eps=eps, group=group, gather_dtype=gather_dtype)
    else:
        from bt_fast.kernels.dense import dense_terms  # imports triton (interpreter on CPU)

        a1, a2 = normalize_pair(z1, z2, eps=eps, group=group)  # [n, D] fp32 (fp64 for fp64 z)
        on_diag, off_diag = dense_terms(a1.float(), a2.float(), group=group,
                                        gather_dtype=gather_dtype if half else torch.float32)
    loss = on_diag + lambd * off_diag
    return (loss, on_diag, off_diag) if return_terms else loss
