"""Semi-supervised evaluation: fine-tune backbone + classifier on 1% or 10% of the labels.

Official (facebookresearch/barlowtwins, evaluate.py --weights finetune): 20 epochs,
SGD momentum 0.9, backbone lr 0.002, classifier lr 0.5, no weight decay, batch 256,
cosine annealing, random-resized-crop + flip; the 1%/10% ImageNet subsets come from
downloaded lists. Here the subset is generated offline: the same number of images from
every class, drawn with a seeded generator from the training split only (never from
val). Scaled to small data: the batch shrinks so an epoch has at least 10 steps and
the learning rates scale linearly with it (lr x batch / 256); the crop scale is the
one of the config's first pretraining view. The classifier is BatchNorm (no affine)
+ Linear, so one learning rate suits pretrained and random-init features alike.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms

from bt_fast.eval.features import (EvalError, ImageList, Loaded, Prep, autocast_for, batches, eval_transform,
                                   extract, module_device)
from bt_fast.eval.knn import topk_accuracy
from bt_fast.eval.linear import set_cosine_lr, sgd_step
from bt_fast.eval.splits import disjoint


def balanced_subset(labels: list[int] | np.ndarray, percent: float, seed: int = 0) -> list[int]:
    """Sorted indices of a class-balanced subset holding about ``percent``% of ``labels``.

    Every class contributes the same number of images, round(percent% of N / C), at
    least 1 and at most the size of the smallest class; which images is decided by a
    numpy generator seeded with ``seed``, so the subset is a pure function of
    (labels, percent, seed).
    """
    if not 0 < percent <= 100:
        raise EvalError(f"--percent {percent}: must be in (0, 100]")
    labels = np.asarray(labels)
    classes = np.unique(labels)
    per_class = max(1, round(percent / 100 * len(labels) / len(classes)))
    per_class = min(per_class, min(int((labels == c).sum()) for c in classes))
    rng = np.random.default_rng(seed)
    chosen = []
    for c in classes:  # classes in sorted order: draws do not depend on dict order
        members = np.flatnonzero(labels == c)
        chosen.extend(rng.permutation(members)[:per_class].tolist())
    return sorted(chosen)


def check_disjoint(train: ImageList, val: ImageList) -> None:
    """Fail if any subset image is also a val image (bt_fast.eval.splits.disjoint: the same
    file, a link to it, or identical bytes)."""
    disjoint([train.root / p for p in train.paths], [val.root / p for p in val.paths],
             f"the {len(train)}-image subset of {train.root}", f"val {val.root}")


def train_transform(cfg) -> transforms.Compose:
    """uint8 [3, S, S]: random-resized crop (first view's scale) + flip; Prep normalises."""
    return transforms.Compose([
        transforms.RandomResizedCrop(cfg.data.image_size, scale=cfg.views[0].scale, antialias=True),
        transforms.RandomHorizontalFlip(),
        transforms.PILToTensor(),
    ])


class Classifier(nn.Module):
    """backbone -> BatchNorm1d(affine=False) -> Linear; logits [B, C]."""

    def __init__(self, backbone: nn.Module, dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.head = nn.Linear(dim, num_classes)
        nn.init.normal_(self.head.weight, 0.0, 0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.backbone(x)))


def finetune(loaded: Loaded, train_root: str | Path, val_root: str | Path, *, percent: float,
             seed: int = 0, epochs: int = 20, batch_size: int = 256, lr_backbone: float = 0.002,
             lr_classifier: float = 0.5, weight_decay: float = 0.0, workers: int = 1,
             bf16: bool = False, log=None) -> dict:
    """Fine-tune on a balanced subset of train_root, report val top-1/top-5 (%)."""
    cfg = loaded.cfg
    all_train = ImageList(train_root, None)
    indices = balanced_subset(all_train.labels, percent, seed)
    train = ImageList(train_root, train_transform(cfg), indices)
    val = ImageList(val_root, eval_transform(cfg))
    check_disjoint(train, val)
    c = 1 + max(max(all_train.labels), max(val.labels))

    if len(train) < 2:
        raise EvalError(f"{percent:g}% of {train_root} is {len(train)} image(s); need at least 2")
    # Small subsets: about 10 steps per epoch (batches of >= 16 for BatchNorm's sake);
    # lrs follow the batch linearly.
    batch = min(batch_size, len(train), max(16, math.ceil(len(train) / 10)))
    scale = batch / 256
    torch.manual_seed(seed)
    model = Classifier(loaded.backbone, loaded.feature_dim, c).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD([
        {"params": model.backbone.parameters(), "lr": lr_backbone * scale, "base": lr_backbone * scale},
        {"params": list(model.norm.parameters()) + list(model.head.parameters()),
         "lr": lr_classifier * scale, "base": lr_classifier * scale},
    ], momentum=0.9, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=batch, shuffle=True, drop_last=len(train) > batch,
                        num_workers=workers, persistent_workers=workers > 0, generator=gen)
    prep = Prep(cfg, module_device(model))
    total, step, t0 = epochs * len(loader), 0, time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for x, y in batches(loader):
            set_cosine_lr(opt, step, total)
            with autocast_for(model, bf16):
                logits = model(prep(x))
            loss = sgd_step(opt, F.cross_entropy(logits.float(), y.to(logits.device)))
            step += 1
        if log and (epoch + 1) % max(1, epochs // 5) == 0:
            log(f"  finetune epoch {epoch + 1}/{epochs} loss {loss.item():.4f} "  # sync: 5x per run
                f"({time.perf_counter() - t0:.0f}s)")
    logits, labels = extract(model, val, prep, workers=workers, bf16=bf16)  # eval mode, no grad
    acc = topk_accuracy(logits, labels)
    return {"top1": acc[1], "top5": acc[5], "n_train": len(all_train), "n_val": len(val),
            "percent": percent, "n_subset": len(train),
            "per_class": len(train) // len(set(train.labels)), "epochs": epochs,
            "batch_size": batch, "lr_backbone": lr_backbone * scale,
            "lr_classifier": lr_classifier * scale, "seed": seed}
