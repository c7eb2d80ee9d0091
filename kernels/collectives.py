"""The collectives the losses issue, in one place, each with its cost.

Every collective of the loss goes through these helpers so that the set is explicit
(STYLE habit 4) and so that the benchmark can count what is actually sent. They look
``torch.distributed`` functions up at call time, on purpose: a counting wrapper
installed on ``torch.distributed`` sees every call.

Local batch sizes must be equal on all ranks of ``group`` (what DDP with a padded last
batch gives): the global batch is then ``world_size * n_local`` without a host sync.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _running() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    """Ranks in ``group``; 1 when torch.distributed is not initialized."""
    return dist.get_world_size(group) if _running() else 1


def rank(group=None) -> int:
    """This process's rank in ``group``; 0 when torch.distributed is not initialized."""
    return dist.get_rank(group) if _running() else 0


def all_reduce_sum_(x: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum over ranks (no autograd). Ring cost: 2(W-1)/W * x.nbytes sent per rank."""
    if world_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def all_gather_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate the [n_local, D] tensors of all ranks in rank order -> [W*n_local, D].

    No autograd. Ring cost: (W-1) * x.nbytes sent per rank.
    """
    w = world_size(group)
    if w == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((w * x.shape[0],) + tuple(x.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.14
    gather(out, x, group=group)
    return out


def all_gather_pair(a1: torch.Tensor, a2: torch.Tensor, group, gather_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the local rows of both views in ONE collective -> (A, B) [N, D], no autograd.

    Rows are rounded to ``gather_dtype`` on every rank (own rows included), so all
    ranks see identical global matrices and compute the same loss. One ring
    all-gather of [n, 2D]: (W-1) * n * 2D * itemsize bytes sent per rank.
    """
    if world_size(group) == 1:
        return a1, a2
    d = a1.shape[1]
    both = all_gather_rows(torch.cat([a1, a2], dim=1).to(gather_dtype), group)
    both = both.to(a1.dtype)  # [N, 2D], accumulate in a1's dtype (fp32)
    return both[:, :d], both[:, d:]


# ---------------------------------------------------------------- autograd-aware
# Three backward conventions, one per way a loss can depend on other ranks' rows.
# Every two-view loss in bt_fast.kernels gives each rank exactly d(global loss)/d(its own
# rows) (README, "Gradient scale and world size"); which class gives that depends on what
# each rank computes from the collective's output. The multi-crop losses (multicrop.py)
# keep their official codes' W x convention instead, through ``RankMean``.


class GatherRows(torch.autograd.Function):
    """[n_local, D] -> [W*n_local, D]; backward keeps this rank's rows of the gradient.

    For losses that EVERY rank evaluates in full on the gathered rows (the oracles):
    the gradient each rank computes for the gathered tensor is then already the whole,
    exact one, so no reduction is needed (a summing backward, as in the official
    VICReg/SimCLR gather layers, would multiply it by W).
    """

    @staticmethod
    def forward(ctx, x, group=None):
        ctx.n_local, ctx.rank = x.shape[0], rank(group)
        return all_gather_rows(x, group)

    @staticmethod
    def backward(ctx, grad):
        start = ctx.rank * ctx.n_local
        return grad[start : start + ctx.n_local], None


class AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients too (what SyncBatchNorm's statistics do).

    For statistics that every rank uses in a loss of its OWN (each rank's output depends
    on every rank's input), so d/d input collects every rank's upstream gradient.
    Cost: two all-reduces of x.nbytes, one each way.
    """

    @staticmethod
    def forward(ctx, x, group=None):
        ctx.group = group
        return all_reduce_sum_(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum_(grad.clone(), ctx.group), None


class GlobalSum(torch.autograd.Function):
    """Sum over ranks of per-rank terms that depend on this rank's rows only; backward passes through.

    For a global loss that is a sum of local pieces (BYOL's per-sample terms): every
    rank gets the same total, and d total / d local piece = 1, so the local upstream
    gradient goes to the local piece unchanged and backward issues no collective.
    """

    @staticmethod
    def forward(ctx, x, group=None):
        return all_reduce_sum_(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class RankMean(torch.autograd.Function):
    """Mean over ranks of a per-rank loss; backward passes the gradient through unchanged.

    The official multi-crop convention (SwAV, DINO): each rank's loss L_r is over its own
    rows only (the codes / teacher targets carry no gradient), the global loss is
    mean_r L_r, and d L_r / d x_r = W * d(global loss) / d x_r: every rank's rows get W
    times the exact gradient, which DDP's average turns into the exact one. Forward: one
    all-reduce of a scalar; backward: none.
    """

    @staticmethod
    def forward(ctx, x, group=None):
        return all_reduce_sum_(x.clone(), group) / world_size(group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def rank_mean(x: torch.Tensor, group=None) -> torch.Tensor:
    """Mean over ranks of a per-rank loss, W x the exact gradient (``RankMean``); identity on one rank."""
    return RankMean.apply(x, group) if world_size(group) > 1 else x


def gather_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather rows with autograd (``GatherRows``); the identity on a single rank."""
    return GatherRows.apply(x, group) if world_size(group) > 1 else x


def global_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of a per-rank local term over ranks with autograd (``GlobalSum``)."""
    return GlobalSum.apply(x, group) if world_size(group) > 1 else x


class GatherRowsSummed(torch.autograd.Function):
    """The official VICReg gather layer (main_vicreg.py ``FullGatherLayer``), for baselines only.

    Backward all-reduces the whole [W n, D] gradient and keeps this rank's rows: W times
    d loss / d x_local when every rank evaluates the same loss (the official convention
    DDP then averages back to the true gradient). Cost: forward (W-1) n D s bytes sent,
    backward 2 (W-1)/W * W n D s more, the part bt_fast's own losses never send.
    """

    @staticmethod
    def forward(ctx, x, group=None):
        ctx.n_local, ctx.rank, ctx.group = x.shape[0], rank(group), group
        return all_gather_rows(x, group)

    @staticmethod
    def backward(ctx, grad):
        grad = all_reduce_sum_(grad.contiguous().clone(), ctx.group)
        start = ctx.rank * ctx.n_local
        return grad[start : start + ctx.n_local], None
