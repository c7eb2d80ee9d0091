"""The reference: a ViewSpec as torchvision transforms, the way the papers' code does it.

For Barlow Twins this is facebookresearch/barlowtwins ``Transform``: PIL images,
RandomResizedCrop (bicubic), RandomHorizontalFlip, RandomApply(ColorJitter, p),
RandomGrayscale, a PIL GaussianBlur with sigma ~ U(0.1, 2.0) applied with p, PIL
solarization with p, ToTensor, Normalize. Defined once: the faithfulness tests,
``bt-fast bench pipeline`` (baseline b) and ``bt-fast report`` all import it. Needs
torchvision, not DALI.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from PIL import Image, ImageFilter, ImageOps

from . import filelist
from .images import load_rgb
from .spec import ViewSpec, expand

_INTERP = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST"}


class PILGaussianBlur:
    """Blur with sigma ~ U(lo, hi) with probability p (the official code's GaussianBlur)."""

    def __init__(self, p: float, sigma: tuple[float, float]):
        self.p, self.sigma = p, sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() < self.p:
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))
        return img


class PILSolarize:
    """Invert pixels >= 128 with probability p (the official code's Solarization)."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


def view_transform(spec: ViewSpec):
    """The torchvision transform of one view (PIL image in, normalized CHW tensor out)."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio,
                            interpolation=getattr(T.InterpolationMode, _INTERP[spec.interp])),
        T.RandomHorizontalFlip(p=spec.flip_p),
        T.RandomApply([T.ColorJitter(brightness=spec.brightness, contrast=spec.contrast,
                                     saturation=spec.saturation, hue=spec.hue)], p=spec.jitter_p),
        T.RandomGrayscale(p=spec.grayscale_p),
        PILGaussianBlur(spec.blur_p, spec.blur_sigma),
        PILSolarize(spec.solarize_p),
        T.ToTensor(),
        T.Normalize(mean=spec.mean, std=spec.std),
    ])


class MultiViewTransform:
    """PIL image -> list of view tensors, one per expanded ViewSpec."""

    def __init__(self, views: list[ViewSpec]):
        self.transforms = [view_transform(v) for v in expand(views)]

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [t(img) for t in self.transforms]


class FileListDataset(torch.utils.data.Dataset):
    """An ImageFolder root read through ROOT/filelist.txt, as the DALI FolderSource reads it."""

    def __init__(self, root: str | Path, transform):
        listing = filelist.read(root)
        self.root, self.transform = listing.root, transform
        self.items = list(zip(listing.paths, listing.labels))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        return self.transform(load_rgb(self.root / path)), label  # the read gate's rules
