"""One view's augmentation parameters.

A self-supervised recipe is a list of ``ViewSpec``s: Barlow Twins has two asymmetric
ones, multi-crop has a global and a local kind with ``count`` > 1. The YAML ``views:``
list maps 1:1 onto these fields. Probabilities are per sample; strengths follow
torchvision's conventions (e.g. ``hue`` is a fraction of a full turn, 0.1 = ±36°) so
recipes can be copied from papers as written; the DALI graph converts units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ViewSpec:
    """Augmentation parameters of one kind of view (``count`` crops of it per image)."""

    size: int = 224
    """Output side in pixels (square); 0 = unset, the caller fills it in (the trainer
    uses ``data.image_size``). A loader refuses a view whose size is still 0."""
    scale: Tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area fraction range."""
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect-ratio range."""
    interp: str = "bicubic"
    """Resize interpolation: bicubic | bilinear | nearest."""
    flip_p: float = 0.5
    """Probability of a horizontal flip."""
    brightness: float = 0.4
    """Color-jitter brightness strength (factor drawn from [1-b, 1+b])."""
    contrast: float = 0.4
    """Color-jitter contrast strength."""
    saturation: float = 0.2
    """Color-jitter saturation strength."""
    hue: float = 0.1
    """Color-jitter hue strength as a fraction of a turn (torchvision units)."""
    jitter_p: float = 0.8
    """Probability of applying color jitter."""
    grayscale_p: float = 0.2
    """Probability of converting to (3-channel) grayscale."""
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    """Gaussian blur sigma range in pixels of the output view."""
    blur_p: float = 0.0
    """Probability of gaussian blur."""
    solarize_p: float = 0.0
    """Probability of solarization (invert pixels >= 128)."""
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean for normalization, in [0, 1] units."""
    std: Tuple[float, float, float] = IMAGENET_STD
    """Per-channel std for normalization, in [0, 1] units."""
    count: int = 1
    """How many crops of this kind each image yields."""

    def __post_init__(self) -> None:
        for name in ("scale", "ratio", "blur_sigma", "mean", "std"):
            setattr(self, name, tuple(float(v) for v in getattr(self, name)))
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"ViewSpec.{name}={p} is not a probability in [0, 1]")
        if self.size < 0 or self.count <= 0:
            raise ValueError(f"ViewSpec.size must be >= 0 and .count positive, got {self.size}, {self.count}")
        if self.interp not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"ViewSpec.interp={self.interp!r}: use bicubic, bilinear or nearest")


def expand(views: list[ViewSpec]) -> list[ViewSpec]:
    """One entry per output tensor: a spec with count=k appears k times."""
    return [v for v in views for _ in range(v.count)]

