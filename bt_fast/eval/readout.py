"""Which backbone features the probes read: ``model.readout`` (e.g. "layer4:2").

A readout is a comma-separated list of ``layerK:G`` items: the output of ResNet stage K
(1-4) average-pooled to a G x G grid and flattened; the items are concatenated in the
order given. "layer4:1" is the global average pool torchvision's ResNet feeds its fc
layer, i.e. the backbone's own output: the default, and the standard SSL protocol.

Why more than one number per channel: global pooling throws away where things are.
On small, centred images such as Fashion-MNIST that layout carries much of the class
(the raw pixels score 85 % kNN on it), and a 2 x 2 grid of the last stage keeps it at
4x the feature size (measured in docs/fmnist.md). Pretraining is unchanged: the
projector still reads the globally pooled features; only evaluation reads the grid.
The random-init baseline uses the same readout, so its row stays comparable.
``bt-fast eval ... --readout SPEC`` overrides the config's choice; ``bt-fast export``
always writes the plain backbone (the readout is applied by the eval command only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bt_fast.specs import parse_readout
from bt_fast.errors import EvalError


def stage_channels(net: nn.Module, stage: int) -> int:
    """Output channels of ResNet stage ``stage`` (its last block's last BatchNorm)."""
    block = getattr(net, f"layer{stage}")[-1]
    return (getattr(block, "bn3", None) or block.bn2).num_features


class Readout(nn.Module):
    """A torchvision ResNet (fc = Identity) read at several stages: [B, 3, H, W] -> [B, D].

    D = sum over items of channels(stage) * grid**2. The stem and stages are the
    backbone's own modules (same weights, same state-dict keys under ``net.``).
    """

    def __init__(self, net: nn.Module, spec: str):
        super().__init__()
        self.net = net
        self.items = parse_readout(spec)
        self.last = max(stage for stage, _ in self.items)
        self.dim = sum(stage_channels(net, s) * g * g for s, g in self.items)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        maps = {}
        for stage in range(1, self.last + 1):  # stages after the last one read are skipped
            x = getattr(net, f"layer{stage}")(x)
            maps[stage] = x
        return torch.cat([F.adaptive_avg_pool2d(maps[s], g).flatten(1) for s, g in self.items], 1)


def with_readout(backbone: nn.Module, dim: int, spec: str) -> tuple[nn.Module, int]:
    """(module, feature_dim) the probes read; the backbone itself for "layer4:1"."""
    if parse_readout(spec) == [(4, 1)]:
        return backbone, dim
    readout = Readout(backbone, spec)
    return readout, readout.dim


def apply_readout(loaded, spec: str | None = None):
    """``loaded`` (a features.Loaded) with its backbone read per ``spec``, else per its
    config's ``model.readout``. The config is updated too, so the feature cache (keyed by
    the model config) never serves one readout's features for another."""
    spec = spec or loaded.cfg.model.readout
    try:
        parse_readout(spec)
    except ValueError as e:
        raise EvalError(f"--readout: {e}") from None
    loaded.cfg.model.readout = spec
    loaded.backbone, loaded.feature_dim = with_readout(loaded.backbone, loaded.feature_dim, spec)
    return loaded
