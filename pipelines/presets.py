"""Published view recipes as lists of ``ViewSpec`` (torchvision units, as written in the papers).

Each function takes the output side (and the local side for multi-crop) and returns the
views of one image; ``get(name)`` looks one up by name.
"""

from __future__ import annotations

from .spec import ViewSpec


def barlow_twins(size: int = 224) -> list[ViewSpec]:
    """Barlow Twins (Zbontar et al., 2021), facebookresearch/barlowtwins main.py ``Transform``.

    Asymmetric: blur p=1.0 / 0.1 and solarize p=0.0 / 0.2; crop 0.08-1 bicubic, flip 0.5,
    jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale 0.2, ImageNet normalization.
    """
    return [ViewSpec(size=size, blur_p=1.0, solarize_p=0.0),
            ViewSpec(size=size, blur_p=0.1, solarize_p=0.2)]


def byol(size: int = 224) -> list[ViewSpec]:
    """BYOL (Grill et al., 2020), Table 6 of the paper: the asymmetric recipe Barlow Twins adopted."""
    return [ViewSpec(size=size, blur_p=1.0, solarize_p=0.0),
            ViewSpec(size=size, blur_p=0.1, solarize_p=0.2)]


def vicreg(size: int = 224) -> list[ViewSpec]:
    """VICReg (Bardes et al., 2022), facebookresearch/vicreg augmentations.py ``TrainTransform``.

    The same asymmetric blur/solarize split as BYOL and Barlow Twins.
    """
    return [ViewSpec(size=size, blur_p=1.0, solarize_p=0.0),
            ViewSpec(size=size, blur_p=0.1, solarize_p=0.2)]


def simclr(size: int = 224) -> list[ViewSpec]:
    """SimCLR (Chen et al., 2020), appendix A of the paper and google-research/simclr.

    Two identical views: colour distortion strength 1.0 (jitter 0.8, 0.8, 0.8, 0.2 with
    p=0.8, grayscale 0.2), blur p=0.5 with sigma 0.1-2.0, no solarization.
    """
    return [ViewSpec(size=size, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2,
                     blur_p=0.5, solarize_p=0.0, count=2)]


def multicrop(size: int = 224, local_size: int = 96, n_global: int = 2, n_local: int = 6) -> list[ViewSpec]:
    """Multi-crop as in SwAV (Caron et al., 2020), facebookresearch/swav main_swav.py.

    2 global 224-px crops of scale 0.14-1 and 6 local 96-px crops of scale 0.05-0.14,
    bilinear, colour distortion 1.0 (jitter 0.8, 0.8, 0.8, 0.2, p=0.8; grayscale 0.2),
    blur p=0.5. (DINO uses 0.4 as the split and asymmetric blur/solarize on the globals.)
    """
    common = dict(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, blur_p=0.5,
                  solarize_p=0.0, interp="bilinear")
    return [ViewSpec(size=size, scale=(0.14, 1.0), count=n_global, **common),
            ViewSpec(size=local_size, scale=(0.05, 0.14), count=n_local, **common)]


def dino(size: int = 224, local_size: int = 96, n_local: int = 8, split: float = 0.14) -> list[ViewSpec]:
    """DINO (Caron et al., 2021), facebookresearch/dino main_dino.py ``DataAugmentationDINO``.

    Two global crops (scale ``split``-1) with the asymmetric blur/solarize of BYOL (blur
    p=1.0 / 0.1, solarize p=0 / 0.2), ``n_local`` local crops (scale 0.05-``split``, blur
    p=0.5); bicubic, flip 0.5, jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale 0.2. ``split``
    0.14 is the README's ResNet-50 command (main_dino.py's default, for ViTs, is 0.4).
    """
    return [ViewSpec(size=size, scale=(split, 1.0), blur_p=1.0, solarize_p=0.0),
            ViewSpec(size=size, scale=(split, 1.0), blur_p=0.1, solarize_p=0.2),
            ViewSpec(size=local_size, scale=(0.05, split), blur_p=0.5, solarize_p=0.0, count=n_local)]


PRESETS = {"barlow_twins": barlow_twins, "simclr": simclr, "byol": byol, "vicreg": vicreg,
           "multicrop": multicrop, "dino": dino}


def get(name: str, **kwargs) -> list[ViewSpec]:
    """The views of the named preset; ValueError names the known presets."""
    if name not in PRESETS:
        raise ValueError(f"unknown view preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name](**kwargs)
