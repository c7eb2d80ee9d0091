"""The kNN bank and query sets: one code path for ``bt-fast eval knn --bank N --query M``
and the trainer's monitor (bt_fast/monitor.py).

Both pick the same seeded subsets of a split's file list (``subset_indices``), read
them with the same deterministic eval transform, featurise them with
``features.extract`` (same batch size, same precision rule) and score them with
``knn_top1`` (weighted kNN, k = 20, T = 0.07, cosine). The monitor only adds two
things that leave the numbers unchanged: each rank featurises a strided shard of the
subset (``shard``), and the decoded images are kept in memory between monitors
(``Preloaded``: the same uint8 tensors the transform produces, decoded once).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from bt_fast.eval.features import ImageList, Prep, bf16_default, eval_transform, extract, module_device  # noqa: F401
from bt_fast.eval.knn import knn_accuracy

K, TEMPERATURE = 20, 0.07
EXTRACT_BATCH = 512  # eval's --extract-batch default: the monitor featurises in the same batches


def subset_indices(n: int, size: int | None, seed: int = 0) -> list[int] | None:
    """Sorted indices of a seeded ``size``-subset of ``range(n)``; None = all of it.

    ``size`` <= 0, None or >= n means the whole split (callers say so once).
    """
    if not size or size <= 0 or size >= n:
        return None
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:size].tolist())


def shard(indices: list[int], rank: int, world: int) -> list[int]:
    """This rank's strided share of ``indices`` (rank r: positions r, r + world, ...)."""
    return indices[rank::world]


def unshard(parts: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of ``shard`` on per-rank results [n_r, ...]: the rows in subset order."""
    n = sum(len(p) for p in parts)
    out = parts[0].new_empty((n, *parts[0].shape[1:]))
    for r, p in enumerate(parts):
        out[r::len(parts)] = p
    return out


class Preloaded(Dataset):
    """A dataset's items decoded once and kept: [(uint8 image, label), ...].

    Bank and query are featurised every monitor; decoding their JPEGs again each time
    would cost more than the forward pass at small image sizes. Memory: 3 x S x S bytes
    per image (28 px: 2.4 KB; 224 px: 150 KB).
    """

    def __init__(self, dataset: Dataset):
        self.items = [dataset[i] for i in range(len(dataset))]
        self.labels = [y for _, y in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def image_set(cfg, root, indices: list[int] | None, preload: bool = False) -> Dataset:
    """The images of ``root`` at ``indices`` (all when None) under the eval transform."""
    dataset = ImageList(root, eval_transform(cfg), indices)
    return Preloaded(dataset) if preload else dataset


def featurize(module, dataset: Dataset, cfg, *, bf16: bool, workers: int = 0,
              channels_last: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """features.extract with eval's batch size: [N, D] fp32 and labels [N] (host)."""
    return extract(module, dataset, Prep(cfg, module_device(module)), batch_size=EXTRACT_BATCH,
                   workers=workers, bf16=bf16, channels_last=channels_last)


def knn_top1(bank_x, bank_y, query_x, query_y) -> float:
    """Weighted-kNN top-1 (%) of query against bank: k = 20, T = 0.07, cosine."""
    return knn_accuracy(bank_x, bank_y, query_x, query_y, ks=(K,), temperature=TEMPERATURE)[K]["top1"]
