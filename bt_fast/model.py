"""Backbone + projector of Barlow Twins.

backbone: a torchvision ResNet with ``zero_init_residual=True`` and ``fc = Identity``
(features of size 8 x width for bottleneck nets, e.g. 2048 for ResNet-50).
projector: Linear(no bias) -> BN -> ReLU, repeated, then a final Linear(no bias):
"8192-8192-8192" on ResNet-50 is 2048 -> 8192 -> 8192 -> 8192, about 151 M parameters.
The loss normalizes z itself (bt_fast.kernels), so there is no extra BN here.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from bt_fast.config import ModelConfig


def build_backbone(cfg: ModelConfig) -> tuple[nn.Module, int]:
    """ResNet trunk without its classifier; returns (module, feature_dim)."""
    ctor = getattr(torchvision.models, cfg.backbone, None)
    if ctor is None or not cfg.backbone.startswith("resnet"):
        raise ValueError(f"model.backbone={cfg.backbone!r}: use a torchvision ResNet (resnet18, resnet50, ...)")
    net = ctor(weights=None, zero_init_residual=True)
    if cfg.width != 64:
        block = type(net.layer1[0])
        layers = [len(getattr(net, f"layer{i}")) for i in range(1, 5)]
        net = NarrowResNet(block, layers, cfg.width)
    if cfg.small_stem:
        # 28-64 px inputs: a 7x7/2 conv + max-pool would leave a 1-2 px map at stage 4.
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


class NarrowResNet(torchvision.models.ResNet):
    """torchvision's ResNet with stage widths w, 2w, 4w, 8w instead of 64..512.

    torchvision hard-codes 64 in its constructor, so the stem and stages are rebuilt
    here with its own ``_make_layer`` and the same init (kaiming fan-out convs, BN
    weight 1 / bias 0, last BN of each residual branch zeroed).
    """

    def __init__(self, block, layers: list[int], width: int):
        super().__init__(block, layers)
        w = width
        self.inplanes = w
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.layer1 = self._make_layer(block, w, layers[0])
        self.layer2 = self._make_layer(block, 2 * w, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * w, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * w, layers[3], stride=2)
        self.fc = nn.Linear(8 * w * block.expansion, 1000)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            last_bn = getattr(m, "bn3", None) or getattr(m, "bn2", None)
            if isinstance(m, (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck)):
                nn.init.zeros_(last_bn.weight)


def build_projector(in_dim: int, spec: str) -> nn.Sequential:
    """'8192-8192-8192' -> Linear-BN-ReLU, Linear-BN-ReLU, Linear (all bias-free)."""
    try:
        sizes = [in_dim] + [int(s) for s in spec.split("-")]
    except ValueError:
        raise ValueError(f"model.projector={spec!r}: expected dash-separated integers") from None
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(a, b, bias=False), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
    return nn.Sequential(*layers)


class BarlowTwins(nn.Module):
    """Maps a list of views [B, 3, H, W] to their embeddings z [B, D]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.backbone, self.feature_dim = build_backbone(cfg)
        self.projector = build_projector(self.feature_dim, cfg.projector)
        self.embed_dim = int(cfg.projector.split("-")[-1])

    def forward(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        # One backbone pass per view: same-size views could be concatenated, but
        # separate passes keep BatchNorm statistics per view as in the official code.
        return [self.projector(self.backbone(v)) for v in views]
