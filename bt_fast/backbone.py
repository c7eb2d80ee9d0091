"""The backbone every method shares, and the MLP heads methods put on top of it.

backbone: a torchvision ResNet with ``zero_init_residual=True`` and ``fc = Identity``
(features of size 8 x width x expansion: 2048 for ResNet-50, 512 for ResNet-18), an
optional 3x3 stride-1 stem without max-pool for 28-64 px images, and stage widths
w, 2w, 4w, 8w for ``model.width`` != 64. It is what evaluation and export load
(state-dict prefix ``backbone.`` inside a method).

heads: ``build_mlp`` turns a width spec such as "8192-8192-8192" into
Linear -> BN -> ReLU, repeated, then a final Linear (optionally followed by BN).

torchvision is imported inside the builders, not at the top: ``bt_fast.config``
imports the methods (their config sections), and every CLI command imports the config.
For the same reason this module names no config type, not even for annotations: the
config imports the methods, which import this; ``BackboneSpec`` says what it reads.
"""

from __future__ import annotations

from typing import Protocol

from torch import nn


class BackboneSpec(Protocol):
    """What ``build_backbone`` reads of its argument (``bt_fast.config.ModelConfig``)."""

    backbone: str
    width: int
    small_stem: bool


def build_backbone(cfg: BackboneSpec) -> tuple[nn.Module, int]:
    """ResNet trunk without its classifier; returns (module, feature_dim)."""
    import torchvision

    ctor = getattr(torchvision.models, cfg.backbone, None)
    if ctor is None or not cfg.backbone.startswith("resnet"):
        raise ValueError(f"model.backbone={cfg.backbone!r}: use a torchvision ResNet (resnet18, resnet50, ...)")
    net = ctor(weights=None, zero_init_residual=True)
    if cfg.width != 64:
        block = type(net.layer1[0])
        layers = [len(getattr(net, f"layer{i}")) for i in range(1, 5)]
        net = narrow_resnet(block, layers, cfg.width)
    if cfg.small_stem:
        # 28-64 px inputs: a 7x7/2 conv + max-pool would leave a 1-2 px map at stage 4.
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def narrow_resnet(block, layers: list[int], width: int) -> nn.Module:
    """torchvision's ResNet with stage widths w, 2w, 4w, 8w instead of 64..512.

    torchvision hard-codes 64 in its constructor, so the stem and stages are rebuilt
    with its own ``_make_layer`` and the same init (kaiming fan-out convs, BN weight 1 /
    bias 0, last BN of each residual branch zeroed). The order of construction (and so
    of random draws) is that of the class this replaced: same seed, same weights.
    """
    import torchvision

    net = torchvision.models.ResNet(block, layers)
    w = width
    net.inplanes = w
    net.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
    net.bn1 = nn.BatchNorm2d(w)
    net.layer1 = net._make_layer(block, w, layers[0])
    net.layer2 = net._make_layer(block, 2 * w, layers[1], stride=2)
    net.layer3 = net._make_layer(block, 4 * w, layers[2], stride=2)
    net.layer4 = net._make_layer(block, 8 * w, layers[3], stride=2)
    net.fc = nn.Linear(8 * w * block.expansion, 1000)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    residual = (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck)
    for m in net.modules():
        if isinstance(m, residual):
            nn.init.zeros_((getattr(m, "bn3", None) or m.bn2).weight)
    return net


def parse_widths(spec: str, key: str) -> list[int]:
    """'8192-8192-8192' -> [8192, 8192, 8192]; ValueError naming ``key`` otherwise."""
    try:
        widths = [int(s) for s in str(spec).split("-")]
    except ValueError:
        raise ValueError(f"{key}={spec!r}: expected dash-separated integers, e.g. 512-512-512") from None
    if not widths or min(widths) <= 0:
        raise ValueError(f"{key}={spec!r}: widths must be positive")
    return widths


def build_mlp(in_dim: int, widths: list[int], *, hidden_bias: bool = False, last_bias: bool = False,
              last_bn: bool = False) -> nn.Sequential:
    """in_dim -> widths: (Linear -> BN -> ReLU) per hidden width, then Linear (-> BN).

    Biases before a BN are redundant (the BN shift absorbs them), but the published
    heads differ (VICReg and BYOL keep them), so each method says what it uses.
    """
    sizes = [in_dim, *widths]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(a, b, bias=hidden_bias), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=last_bias))
    if last_bn:
        layers.append(nn.BatchNorm1d(sizes[-1]))
    return nn.Sequential(*layers)
