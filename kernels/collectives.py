"""The few collectives the loss issues, in one place, each with its cost.

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


def world_size(group=None) -> int:
    """Ranks in ``group``; 1 when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank(group=None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


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
