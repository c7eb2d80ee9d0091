"""Each DALI op with fixed parameters against torchvision's functional op on the same image.

Differences are mean absolute differences in 0-255 units, on a smooth natural-ish
64x48 test image. Each bound is the measured value (DALI 2.4, torchvision 0.29) with
headroom; the comment says where the difference comes from. Exact ops are asserted exact.

  op                 measured  why it differs
  crop+resize        0.28      PIL's bicubic vs DALI's cubic resampling, rounding
  flip               0         -
  brightness 1.3     0.38      rounding (DALI keeps floats between jitter steps)
  contrast 1.4       0.33      PIL rounds the mean-grey pivot (same formula otherwise)
  saturation 1.5     0.20      rounding
  hue 0.1 turn       1.03      PIL quantizes HSV to uint8; vs torchvision on float tensors
                               < 0.1 (the same exact HSV shift). DALI's own color_twist/hsv
                               (YIQ rotation) is ~21 here, about as far as no shift at all.
  grayscale          0.17      rounding (same 0.299/0.587/0.114 weights)
  blur sigma 1.5     0.01      13 taps (2*ceil(3 sigma)+1) vs torchvision's 23
  blur vs PIL        0.51      PIL approximates a gaussian by box blurs (official BT code)
  solarize           0         -
  normalize          <1e-4     float arithmetic
Not compared: torchvision applies the four jitter ops in a random order per sample;
DALI uses the fixed order brightness, contrast, saturation, hue.
"""

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def, types
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from bt_fast.pipelines import ops
from bt_fast.pipelines.spec import IMAGENET_MEAN, IMAGENET_STD


def natural_image(h=48, w=64, seed=0) -> np.ndarray:
    """Smooth random colour field plus a few edges: uint8 HWC."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.float32)
    img = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    img += 40 * ((xx // 9 + yy // 11) % 2)[..., None] - 20
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


IMG = natural_image()
PIL_IMG = Image.fromarray(IMG)


def dali(op) -> np.ndarray:
    """Run ``op(images)`` in a one-sample CPU pipeline on IMG; HWC numpy out."""
    @pipeline_def(batch_size=1, num_threads=1, device_id=None, seed=0)
    def pipe():
        return op(fn.external_source(source=lambda: [IMG], layout="HWC", dtype=types.UINT8))

    p = pipe()
    p.build()
    (out,) = p.run()
    return np.array(out.as_tensor())[0]


def tv(pil_out) -> np.ndarray:
    return np.asarray(pil_out, dtype=np.float32)


def mad(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


def test_crop_resize():
    top, left, h, w, size = 5, 7, 30, 40, 24
    d = dali(lambda x: ops.resized_crop(x, top, left, h, w, size, "bicubic"))
    t = tv(TF.resized_crop(PIL_IMG, top, left, h, w, [size, size], InterpolationMode.BICUBIC))
    assert d.shape == t.shape == (size, size, 3)
    assert mad(d, t) < 1.5


def test_flip_is_exact():
    d = dali(lambda x: ops.flip_normalize(x, 1, (0, 0, 0), (1 / 255,) * 3))
    assert mad(d, tv(TF.hflip(PIL_IMG))) < 1e-4


def test_normalize():
    d = dali(lambda x: ops.flip_normalize(x, 0, IMAGENET_MEAN, IMAGENET_STD))
    t = TF.normalize(TF.to_tensor(PIL_IMG), IMAGENET_MEAN, IMAGENET_STD).permute(1, 2, 0).numpy()
    assert np.abs(d - t).max() < 1e-4


@pytest.mark.parametrize("factor", [0.7, 1.3])
def test_brightness(factor):
    d = dali(lambda x: ops.color_jitter(x, brightness=factor))
    assert mad(d, tv(TF.adjust_brightness(PIL_IMG, factor))) < 1.0


@pytest.mark.parametrize("factor", [0.6, 1.4])
def test_contrast(factor):
    # Same pivot (the mean grey) as torchvision; PIL rounds the pivot to an integer.
    d = dali(lambda x: ops.color_jitter(x, contrast=factor))
    assert mad(d, tv(TF.adjust_contrast(PIL_IMG, factor))) < 1.0


@pytest.mark.parametrize("factor", [0.5, 1.5])
def test_saturation(factor):
    d = dali(lambda x: ops.color_jitter(x, saturation=factor))
    assert mad(d, tv(TF.adjust_saturation(PIL_IMG, factor))) < 2.0


@pytest.mark.parametrize("hue", [-0.1, 0.05, 0.1])
def test_hue(hue):
    d = dali(lambda x: ops.color_jitter(x, hue=hue))
    t = tv(TF.adjust_hue(PIL_IMG, hue))
    # Exact HSV shift in float; PIL quantizes H, S, V to uint8 (256 hue steps).
    assert mad(d, t) < 2.0
    tensor_ref = TF.adjust_hue(TF.to_tensor(PIL_IMG), hue).permute(1, 2, 0).numpy() * 255
    assert mad(d, tensor_ref) < 0.5


def test_grayscale():
    d = dali(ops.grayscale)
    assert mad(d, tv(TF.rgb_to_grayscale(PIL_IMG, num_output_channels=3))) < 1.0


@pytest.mark.parametrize("sigma", [0.5, 1.5, 2.0])
def test_blur(sigma):
    d = dali(lambda x: ops.gaussian_blur(x, sigma))
    t = TF.gaussian_blur(TF.pil_to_tensor(PIL_IMG), kernel_size=23, sigma=sigma)
    assert mad(d, t.permute(1, 2, 0).numpy()) < 1.0
    # The official Barlow Twins code blurs with PIL (box-blur approximation).
    assert mad(d, tv(PIL_IMG.filter(ImageFilter.GaussianBlur(radius=sigma)))) < 2.5


def test_solarize_is_exact():
    d = dali(ops.solarize)
    assert mad(d, tv(TF.solarize(PIL_IMG, 128))) == 0.0


def test_measured_differences_table(capsys):
    """Prints every difference (pytest -s shows it); keeps the module docstring honest."""
    rows = {
        "crop+resize": mad(dali(lambda x: ops.resized_crop(x, 5, 7, 30, 40, 24)),
                           tv(TF.resized_crop(PIL_IMG, 5, 7, 30, 40, [24, 24], InterpolationMode.BICUBIC))),
        "brightness 1.3": mad(dali(lambda x: ops.color_jitter(x, brightness=1.3)),
                              tv(TF.adjust_brightness(PIL_IMG, 1.3))),
        "contrast 1.4": mad(dali(lambda x: ops.color_jitter(x, contrast=1.4)),
                            tv(TF.adjust_contrast(PIL_IMG, 1.4))),
        "saturation 1.5": mad(dali(lambda x: ops.color_jitter(x, saturation=1.5)),
                              tv(TF.adjust_saturation(PIL_IMG, 1.5))),
        "hue 0.1": mad(dali(lambda x: ops.color_jitter(x, hue=0.1)), tv(TF.adjust_hue(PIL_IMG, 0.1))),
        "grayscale": mad(dali(ops.grayscale), tv(TF.rgb_to_grayscale(PIL_IMG, 3))),
        "blur 1.5 (tv k=23)": mad(dali(lambda x: ops.gaussian_blur(x, 1.5)),
                                  TF.gaussian_blur(TF.pil_to_tensor(PIL_IMG), 23, 1.5).permute(1, 2, 0).numpy()),
        "blur 1.5 (PIL)": mad(dali(lambda x: ops.gaussian_blur(x, 1.5)),
                              tv(PIL_IMG.filter(ImageFilter.GaussianBlur(1.5)))),
    }
    with capsys.disabled():
        print("\nDALI vs torchvision, mean |diff| in 0-255 units:")
        for name, v in rows.items():
            print(f"  {name:20s} {v:6.2f}")
    assert all(np.isfinite(v) for v in rows.values())
