"""The multi-crop losses: ``swav_loss`` (SwAV) and ``dino_loss`` (DINO), per-crop lists.

Both take one tensor per crop, global crops first, each [n_local, K] (K prototypes or
DINO head outputs), and both keep the official codes' gradient convention rather than
the exact-local-gradient one of the two-view losses: each rank evaluates the loss of ITS
rows (the targets, SwAV's codes and DINO's sharpened teacher, carry no gradient and are
the only place other ranks' rows enter), the returned value is the mean over ranks
(= the loss of the global batch, the same on every rank), and backward hands each rank's
rows W x the exact gradient of that value (``collectives.rank_mean``), so DDP's average
is the exact gradient and the published learning rates apply at any world size.

SwAV (Caron et al., NeurIPS 2020; facebookresearch/swav main_swav.py), with s_v the
scores of crop v (cosines of unit embeddings with unit prototypes), V crops:

    q_i  = SinkhornKnopp(s_i / epsilon)      for each global crop i, over the GLOBAL batch,
                                             no gradient
    loss = (1 / n_global) sum_i (1 / (V - 1)) sum_{v != i} mean_n [ -sum_k q_i,nk log softmax(s_v,n / t)_k ]

With the optional queue (main_swav.py, for small batches), global crop i's Sinkhorn runs on
its batch rows stacked under the scores of each rank's L_local past embeddings of crop i
against the current prototypes (B = W (L_local + n) samples), and only the batch rows'
codes enter the loss.

SinkhornKnopp (the paper's appendix, official ``distributed_sinkhorn``) with B = W n:
Q = exp(s / epsilon) [n, K] divided by its global total, then ``iters`` times: divide
every prototype column by its global sum and by K, every sample row by its (local) sum
and by B; finally times B (each row sums to 1). Across ranks only the total (one scalar)
and the ``iters`` column sums [K] are all-reduced; the [n, K] codes never travel.

DINO (Caron et al., ICCV 2021; facebookresearch/dino main_dino.py ``DINOLoss``), with
student outputs x_v (all V crops) and teacher outputs y_i (the global crops), centre c:

    p_i  = softmax((y_i - c) / teacher_temp)          no gradient (sharpened, centred)
    loss = mean over pairs (i, v != i) of mean_n [ -sum_k p_i,nk log softmax(x_v,n / student_temp)_k ]

The centre's moving average (``dino_batch_center`` gives the batch term) is the
method's run state, updated after the loss as in the official code.

Costs per rank: SwAV O(n_global (V n + L_local) K) flops, sent (1 + iters) K + 2 floats
per global crop plus one scalar (the queue adds no traffic); DINO O(n_teacher V n K), one
scalar (plus [K] for the centre).
Everything is computed in fp32 (fp64 for fp64 inputs) whatever a caller's autocast says.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bt_fast.kernels import collectives


def _check_crops(name: str, crops, what: str) -> None:
    if not isinstance(crops, (list, tuple)) or not crops:
        raise ValueError(f"{name}: {what} must be a non-empty list of [n, K] tensors, one per crop")
    shapes = {tuple(t.shape) for t in crops}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"{name}: every crop in {what} must be the same [n, K]; got {sorted(shapes)}")


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, *, epsilon: float = 0.05, iters: int = 3, group=None) -> torch.Tensor:
    """SwAV's codes [n_local, K] of prototype ``scores`` over the global batch of ``group``.

    Rows sum to 1 (an assignment per sample); column sums are pushed towards B / K.
    Official semantics: exp(s / epsilon) without max-subtraction (cosine scores, |s| <= 1,
    reach at most e^20 at epsilon = 0.05), 1 + ``iters`` all-reduces ([1] and [K]).
    """
    dtype = torch.promote_types(scores.dtype, torch.float32)
    q = torch.exp(scores.to(dtype) / epsilon)  # [n, K]
    n, k = q.shape
    b = n * collectives.world_size(group)  # samples to assign, all ranks
    q /= collectives.all_reduce_sum_(q.sum().reshape(1), group)
    for _ in range(iters):
        q /= collectives.all_reduce_sum_(q.sum(dim=0), group) * k  # every prototype gets 1/K
        q /= q.sum(dim=1, keepdim=True) * b  # every sample gets 1/B
    return q * b


def _cross_entropy(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """mean_n -sum_k target_nk log softmax(logits_n)_k: a scalar."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _check_queue(queue_scores, n_global: int, k: int) -> None:
    if not isinstance(queue_scores, (list, tuple)) or len(queue_scores) != n_global:
        raise ValueError(f"swav_loss: queue_scores must be a list of {n_global} [L, K] tensors, one per global crop")
    shapes = {tuple(t.shape) for t in queue_scores}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or next(iter(shapes))[1] != k:
        raise ValueError(f"swav_loss: every queue_scores entry must be the same [L, K={k}]; got {sorted(shapes)}")


def swav_loss(scores, *, n_global=2, temperature=0.1, epsilon=0.05, iters=3, group=None, queue_scores=None):
    """SwAV's swapped prediction over per-crop prototype ``scores`` [n_local, K], global crops first.

    ``queue_scores`` (optional): for each global crop i, the scores [L_local, K] of this
    rank's queue of past embeddings of crop i against the current prototypes (main_swav.py's
    queue for small batches). They join crop i's rows in Sinkhorn-Knopp (B = W (L_local +
    n_local) samples to spread over the prototypes), only the batch rows' codes enter the
    loss, and they get no gradient. Returns the loss of the global batch (fp32, fp64 for
    fp64 inputs), the same on every rank; each rank's rows get W x its exact gradient
    (module docstring).
    """
    _check_crops("swav_loss", scores, "scores")
    if not 1 <= n_global <= len(scores) or len(scores) < 2:
        raise ValueError(f"swav_loss: n_global={n_global} with {len(scores)} crops: need 1 <= n_global "
                         "<= crops and at least 2 crops")
    if not (temperature > 0 and epsilon > 0 and iters >= 1):
        raise ValueError(f"swav_loss: temperature={temperature}, epsilon={epsilon} must be > 0 and "
                         f"iters={iters} >= 1")
    if queue_scores is not None:
        _check_queue(queue_scores, n_global, scores[0].shape[1])
    dtype = torch.promote_types(scores[0].dtype, torch.float32)
    n = scores[0].shape[0]
    with torch.autocast(scores[0].device.type, enabled=False):
        logits = [s.to(dtype) / temperature for s in scores]  # [n, K] each
        loss = logits[0].new_zeros(())
        for i in range(n_global):
            s = scores[i].detach().to(dtype)
            if queue_scores is not None:  # [L + n, K]: the queue first, as main_swav.py stacks it
                s = torch.cat([queue_scores[i].detach().to(dtype), s])
            q = sinkhorn(s, epsilon=epsilon, iters=iters, group=group)[-n:]  # the batch rows' codes
            loss = loss + sum(_cross_entropy(q, x) for v, x in enumerate(logits) if v != i) / (len(scores) - 1)
        return collectives.rank_mean(loss / n_global, group)


def dino_loss(student, teacher, center, *, student_temp=0.1, teacher_temp=0.04, group=None):
    """DINO's cross-entropy of every student crop against every OTHER teacher crop.

    ``student``: per-crop [n_local, K] (global crops first); ``teacher``: the global
    crops' teacher outputs [n_local, K] (no gradient reaches them); ``center`` [K].
    Returns the loss of the global batch (fp32, fp64 for fp64 inputs), the same on every
    rank; each rank's rows get W x its exact gradient (module docstring).
    """
    _check_crops("dino_loss", student, "student")
    _check_crops("dino_loss", teacher, "teacher")
    if teacher[0].shape != student[0].shape or len(teacher) > len(student):
        raise ValueError(f"dino_loss: {len(teacher)} teacher crops of {tuple(teacher[0].shape)} do not fit "
                         f"{len(student)} student crops of {tuple(student[0].shape)} (teacher: the global crops)")
    if tuple(center.shape) != (student[0].shape[1],):
        raise ValueError(f"dino_loss: center must be [K] = [{student[0].shape[1]}]; got {tuple(center.shape)}")
    if not (student_temp > 0 and teacher_temp > 0):
        raise ValueError(f"dino_loss: temperatures must be > 0; got {student_temp}, {teacher_temp}")
    dtype = torch.promote_types(student[0].dtype, torch.float32)
    with torch.autocast(student[0].device.type, enabled=False):
        c = center.detach().to(dtype)
        targets = [F.softmax((y.detach().to(dtype) - c) / teacher_temp, dim=1) for y in teacher]
        logits = [x.to(dtype) / student_temp for x in student]
        terms = [_cross_entropy(p, x) for i, p in enumerate(targets) for v, x in enumerate(logits) if v != i]
        return collectives.rank_mean(sum(terms) / len(terms), group)


@torch.no_grad()
def dino_batch_center(teacher, group=None) -> torch.Tensor:
    """[K] mean of the teacher outputs over every global crop and the global batch.

    The term of DINO's centre update c <- m c + (1 - m) this; one all-reduce of [K].
    """
    _check_crops("dino_batch_center", teacher, "teacher")
    dtype = torch.promote_types(teacher[0].dtype, torch.float32)
    total = torch.stack([y.to(dtype).sum(dim=0) for y in teacher]).sum(dim=0)  # [K]
    rows = len(teacher) * teacher[0].shape[0] * collectives.world_size(group)
    return collectives.all_reduce_sum_(total, group) / rows
