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

from .bounds import bounded, check

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_SIDE = 8192
"""Largest view side in pixels (a typo guard: 8192^2 x 3 floats is already 800 MB a view)."""


@dataclass
class ViewSpec:
    """Augmentation parameters of one kind of view (``count`` crops of it per image)."""

    size: int = bounded(224, ge=0, le=MAX_SIDE)
    """Output side in pixels (square); 0 = unset, the caller fills it in (the trainer
    uses ``data.image_size``). A loader refuses a view whose size is still 0."""
    scale: Tuple[float, float] = bounded((0.08, 1.0), gt=0, le=1, ordered=True)
    """RandomResizedCrop area fraction range."""
    ratio: Tuple[float, float] = bounded((3 / 4, 4 / 3), gt=0, le=100, ordered=True)
    """RandomResizedCrop aspect-ratio range."""
    interp: str = "bicubic"
    """Resize interpolation: bicubic | bilinear | nearest."""
    flip_p: float = bounded(0.5, ge=0, le=1)
    """Probability of a horizontal flip."""
    brightness: float = bounded(0.4, ge=0, le=10)
    """Color-jitter brightness strength (factor drawn from [1-b, 1+b])."""
    contrast: float = bounded(0.4, ge=0, le=10)
    """Color-jitter contrast strength."""
    saturation: float = bounded(0.2, ge=0, le=10)
    """Color-jitter saturation strength."""
    hue: float = bounded(0.1, ge=0, le=0.5)
    """Color-jitter hue strength as a fraction of a turn (torchvision units)."""
    jitter_p: float = bounded(0.8, ge=0, le=1)
    """Probability of applying color jitter."""
    grayscale_p: float = bounded(0.2, ge=0, le=1)
    """Probability of converting to (3-channel) grayscale."""
    blur_sigma: Tuple[float, float] = bounded((0.1, 2.0), gt=0, le=100, ordered=True)
    """Gaussian blur sigma range in pixels of the output view."""
    blur_p: float = bounded(0.0, ge=0, le=1)
    """Probability of gaussian blur."""
    solarize_p: float = bounded(0.0, ge=0, le=1)
    """Probability of solarization (invert pixels >= 128)."""
    mean: Tuple[float, float, float] = bounded(IMAGENET_MEAN, ge=0, le=1)
    """Per-channel mean for normalization, in [0, 1] units."""
    std: Tuple[float, float, float] = bounded(IMAGENET_STD, gt=0, le=1)
    """Per-channel std for normalization, in [0, 1] units."""
    count: int = bounded(1, ge=1, le=64)
    """How many crops of this kind each image yields."""

    def __post_init__(self) -> None:
        for name in ("scale", "ratio", "blur_sigma", "mean", "std"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):  # a bad type is named by the range check
                setattr(self, name, tuple(float(v) if isinstance(v, int) and not isinstance(v, bool) else v
                                          for v in value))
        check(self)  # every numeric field against its declared range; ValueError names it
        if self.interp not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"interp={self.interp!r}: use bicubic, bilinear or nearest")


def expand(views: list[ViewSpec]) -> list[ViewSpec]:
    """One entry per output tensor: a spec with count=k appears k times."""
    return [v for v in views for _ in range(v.count)]

