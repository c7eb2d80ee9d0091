"""Linear probe on frozen features: the official evaluate.py protocol on cached features.

Official (facebookresearch/barlowtwins, evaluate.py, README): frozen ResNet, one
Linear layer (weights N(0, 0.01), bias 0), cross-entropy, SGD momentum 0.9, weight
decay 1e-6, batch 256, lr 0.1, cosine annealing over 100 epochs, random-resized-crop
augmentation. Scaled to a CPU machine: features are extracted once without
augmentation (so an epoch is a few hundred small matmuls) and standardised with the
training set's mean/std. Standardisation is an affine map folded into the classifier,
so the probe stays linear; it makes one learning rate work for a pretrained and a
random-init backbone, whose feature scales differ by orders of magnitude.

Cost: 100 epochs of 60k x 128-d features are 23k SGD steps on [256, 128] batches. Ops
that small are all overhead: one thread runs them ~15x faster than two on this 2-core
machine (0.46 vs 6.6 ms/step with other jobs running), so training pins one thread.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from bt_fast.eval.knn import topk_accuracy


def standardize(train: torch.Tensor, *others: torch.Tensor, eps: float = 1e-6):
    """(train, *others) scaled by the training mean/std of each feature."""
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True) + eps
    return tuple((x - mean) / std for x in (train, *others))


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train_linear(train_feats: torch.Tensor, train_labels: torch.Tensor, *, num_classes: int,
                 epochs: int = 100, batch_size: int = 256, lr: float = 0.1,
                 weight_decay: float = 1e-6, momentum: float = 0.9, seed: int = 0,
                 log=None) -> nn.Linear:
    """SGD + per-step cosine schedule on (already standardised) features [N, D]."""
    gen = torch.Generator().manual_seed(seed)
    n, d = train_feats.shape
    head = nn.Linear(d, num_classes)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=gen)
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    y_all = train_labels.long()
    step = 0
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            set_cosine_lr(opt, step, total, lr)
            loss = sgd_step(opt, F.cross_entropy(head(train_feats[idx]), y_all[idx]))
            step += 1
        if log and (epoch + 1) % max(1, epochs // 5) == 0:
            log(f"  linear epoch {epoch + 1}/{epochs} loss {loss.item():.4f}")  # sync: 5x per run
    return head


def set_cosine_lr(opt: torch.optim.Optimizer, step: int, total: int, lr: float | None = None) -> None:
    """Cosine from the peak to 0 over ``total`` steps: ``lr``, or each group's "base"."""
    for group in opt.param_groups:
        peak = lr if lr is not None else group["base"]
        group["lr"] = peak * 0.5 * (1 + math.cos(math.pi * step / total))


def sgd_step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> torch.Tensor:
    """zero_grad, backward, step; returns the loss (logging reads it, 5x per run)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


@torch.no_grad()
def linear_probe(train_feats, train_labels, val_feats, val_labels, *, epochs=100, batch_size=256,
                 lr=0.1, weight_decay=1e-6, seed=0, log=None) -> dict[str, float]:
    """Train on (train_feats, train_labels), report val top-1/top-5 (%) of the last epoch."""
    train_x, val_x = standardize(train_feats.float(), val_feats.float())
    c = int(max(train_labels.max(), val_labels.max())) + 1
    with torch.enable_grad(), _threads(1):
        head = train_linear(train_x, train_labels, num_classes=c, epochs=epochs,
                            batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                            seed=seed, log=log)
    acc = topk_accuracy(head(val_x), val_labels.long())
    train_acc = topk_accuracy(head(train_x), train_labels.long(), ks=(1,))
    return {"top1": acc[1], "top5": acc[5], "train_top1": train_acc[1]}
