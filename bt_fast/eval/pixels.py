"""The raw-pixel baseline: ``bt-fast eval knn|linear --pixels``.

A representation is only worth something if it beats the pixels it was computed from.
``--pixels`` puts the normalised input image itself through the same protocol as a
backbone: the same splits, the same deterministic eval transform (resize + center crop
to ``data.image_size``), the same normalisation (the first view's mean/std), then the
image flattened to a [C*H*W] vector in place of the backbone's pooled features. kNN
then L2-normalises it (cosine similarity) and the linear probe standardises it, exactly
as they do features.

Fashion-MNIST's JPEGs are grayscale stored as RGB, so the vector holds three copies of
the 784 pixels: cosine similarity is unchanged by the copies, and the standardised
linear probe sees each pixel three times (no information added or lost).

Pixel features are never cached: they cost one JPEG decode per image (tens of seconds
for 70k images), while the cache would be 4 x C*H*W bytes per image (565 MB for
Fashion-MNIST's train split).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bt_fast.config import Config, load
from bt_fast.errors import ConfigError, EvalError
from bt_fast.eval.features import Loaded, load_backbone
from bt_fast.pipelines import bounds


class Pixels(nn.Module):
    """The identity as a "backbone": normalised images [B, C, H, W] -> [B, C*H*W] fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # flatten() is logical (NCHW) order whatever the memory format, so the feature
        # layout is the same for channels-last and contiguous batches.
        return x.float().flatten(1)


def load_pixels(checkpoint: str | Path | None = None, config: str | Path | None = None) -> Loaded:
    """A ``Loaded`` whose backbone is ``Pixels``, taking data dirs, image size and
    normalisation from a checkpoint's config, or from a YAML recipe when no checkpoint."""
    if checkpoint:
        cfg = load_backbone(checkpoint).cfg
        source = str(checkpoint)
    elif config:
        cfg: Config = load(config, [])
        for problem in bounds.problems(cfg):  # a recipe's sizes decide eval's memory
            raise ConfigError(f"{config}: {problem}")
        source = str(config)
    else:
        raise EvalError("--pixels needs --checkpoint (its config) or --config PATH "
                        "(data dirs, image size and normalisation)")
    size = cfg.data.image_size
    channels = len(cfg.views[0].mean)
    return Loaded(backbone=Pixels(), feature_dim=channels * size * size, cfg=cfg,
                  checkpoint=source, step=None, random_init=False, seed=0,
                  fingerprint="pixels")
