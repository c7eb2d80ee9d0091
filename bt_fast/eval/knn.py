"""Weighted k-nearest-neighbour classification on frozen, L2-normalised features.

The common SSL protocol (Wu et al. 2018, used by DINO and others): for a query q, take
the k training features f_i with the largest cosine similarity s_i = q . f_i, give each
the weight exp(s_i / T) and score class c by the sum of the weights of neighbours
labelled c. T = 0.07. Top-1/top-5 are read off the class scores.

The similarity matrix of 10k queries against 60k training features would be 2.4 GB,
so queries go through in chunks: one [chunk, N] matmul + top-k per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor,
               *, k: int, temperature: float = 0.07, num_classes: int | None = None,
               chunk: int = 1024) -> torch.Tensor:
    """Class scores [Q, C] of weighted kNN; features are L2-normalised here.

    train_feats [N, D], train_labels [N] int, query_feats [Q, D].
    """
    return knn_scores_multi(train_feats, train_labels, query_feats, ks=(k,),
                            temperature=temperature, num_classes=num_classes, chunk=chunk)[k]


def knn_scores_multi(train_feats, train_labels, query_feats, *, ks=(20, 200), temperature=0.07,
                     num_classes=None, chunk=1024) -> dict[int, torch.Tensor]:
    """Like knn_scores for several k at once: one top-max(k) search serves them all."""
    train = F.normalize(train_feats.float(), dim=1)
    query = F.normalize(query_feats.float(), dim=1)
    labels = train_labels.long()
    c = int(num_classes or int(labels.max()) + 1)
    kmax = min(max(ks), len(train))
    out = {k: [] for k in ks}
    for start in range(0, len(query), chunk):
        sim = query[start:start + chunk] @ train.T          # [q, N] cosine similarities
        top_sim, top_idx = sim.topk(kmax, dim=1)             # [q, kmax], sorted descending
        weights = (top_sim / temperature).exp()              # [q, kmax]
        onehot = F.one_hot(labels[top_idx], c).float()       # [q, kmax, C]
        for k in ks:
            kk = min(k, kmax)
            # scores[q, c] = sum over the kk nearest of weight * [label == c]
            out[k].append(torch.einsum("qk,qkc->qc", weights[:, :kk], onehot[:, :kk]))
    return {k: torch.cat(v) for k, v in out.items()}


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Percentage of rows whose label is among the top-k scores (k capped at C)."""
    result = {}
    for k in ks:
        kk = min(k, scores.shape[1])
        hit = (scores.topk(kk, dim=1).indices == labels.view(-1, 1)).any(dim=1)
        result[k] = 100.0 * hit.float().mean().item()
    return result


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                 val_labels: torch.Tensor, *, ks=(20, 200), temperature: float = 0.07,
                 chunk: int = 1024) -> dict[int, dict[str, float]]:
    """{k: {"top1": %, "top5": %}} of weighted kNN; the function the trainer can call."""
    c = int(max(train_labels.max(), val_labels.max())) + 1
    scores = knn_scores_multi(train_feats, train_labels, val_feats, ks=ks,
                              temperature=temperature, num_classes=c, chunk=chunk)
    out = {}
    for k, s in scores.items():
        acc = topk_accuracy(s, val_labels)
        out[k] = {"top1": acc[1], "top5": acc[5]}
    return out
