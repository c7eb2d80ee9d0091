"""One view's augmentation as a plain DALI function (no pipeline, no reader).

``augment_view`` turns a decoded uint8 HWC image batch into one normalized float view,
following a ``ViewSpec``. It runs unchanged on CPU and GPU data: the image batch lives
on whatever device the decoder put it, the per-sample coins are always CPU booleans.

Per-sample randomness uses DALI conditionals (``if coin:`` on a CPU boolean splits the
batch), so an op the coin skipped costs nothing. The caller's ``@pipeline_def`` must pass
``enable_conditionals=True``.

Order and units (what differs from torchvision, each bounded in tests/test_pipeline_faithful.py):

1. crop + resize: ``fn.random_resized_crop`` (same area/log-ratio sampling, 10 attempts,
   antialiased bicubic), or a crop decoded straight from the JPEG (``decode="roi"``).
2. color jitter with p=jitter_p: torchvision's formulas (contrast around the mean grey,
   exact HSV hue shift) in DALI arithmetic, fixed order brightness, contrast,
   saturation, hue (torchvision draws a random order per sample); no uint8 rounding
   between the four steps (PIL rounds after each).
3. grayscale with p=grayscale_p: ``color_twist(saturation=0)`` (Y of YIQ, the same
   0.299/0.587/0.114 weights as torchvision), still 3 channels.
4. gaussian blur with p=blur_p: sigma ~ U(blur_sigma), kernel ``2*ceil(3*sigma)+1``
   taps (7-13 for the BT range) instead of torchvision's fixed 23 at 224 px; the taps
   dropped beyond 3 sigma carry < 0.3% of the weight.
5. solarize with p=solarize_p: a 256-entry lookup table (v >= 128 -> 255 - v).
6. flip with p=flip_p, normalize, cast to float, all fused in ``crop_mirror_normalize``
   (a flip commutes with every op above, so doing it last is exact).
"""

from __future__ import annotations

from nvidia.dali import fn, types
from nvidia.dali import math as dmath

from .spec import ViewSpec

INTERP = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR,
          "nearest": types.INTERP_NN}
COINS = ("flip", "jitter", "grayscale", "blur", "solarize")
"""Names of the per-sample coin flips, in the order ``augment_view`` returns them."""

SOLARIZE_LUT = [v if v < 128 else 255 - v for v in range(256)]


def random_crop(images, spec: ViewSpec):
    """Random resized crop of an already decoded uint8 HWC batch to spec.size²."""
    return fn.random_resized_crop(images, size=[spec.size, spec.size], random_area=list(spec.scale),
                                  random_aspect_ratio=list(spec.ratio),
                                  interp_type=INTERP[spec.interp], antialias=True)


def random_crop_decode(jpegs, spec: ViewSpec, decode_device: str):
    """Decode only a random crop window of each JPEG (ROI decode), then resize to size²."""
    crops = fn.decoders.image_random_crop(jpegs, device=decode_device, output_type=types.RGB,
                                          random_area=list(spec.scale),
                                          random_aspect_ratio=list(spec.ratio))
    return fn.resize(crops, size=[spec.size, spec.size], interp_type=INTERP[spec.interp],
                     antialias=True)


def _coin(p: float):
    # Always drawn, even for p in {0, 1}, so the RNG graph (and hence every other
    # random draw) does not depend on the probabilities.
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


HUES = ("hsv", "yiq")


def augment_view(view, spec: ViewSpec, hue: str = "hsv"):
    """Colour/blur/solarize/flip/normalize one cropped uint8 HWC view batch.

    Returns ``(float32 HWC view normalized with spec.mean/std, coins)`` where ``coins``
    is a list of five int32 per-sample 0/1 flags in ``COINS`` order (debug output).
    ``hue="hsv"`` is torchvision's exact HSV shift (~10 ms per 224-px view on one CPU
    core); ``"yiq"`` is DALI's fused color_twist rotation (~1.5 ms, ~20 units off at
    hue 0.1 on saturated colours, see tests/test_pipeline_faithful.py).
    """
    if hue not in HUES:
        raise ValueError(f"hue={hue!r}: use one of {HUES}")
    flip, jitter, gray, blur, solar = (_coin(p) for p in (spec.flip_p, spec.jitter_p,
                                                          spec.grayscale_p, spec.blur_p,
                                                          spec.solarize_p))
    # ``if coin:`` splits the batch (only the chosen samples run the op); a Python-level
    # check on p skips the split entirely when p is 0 or 1.
    if spec.jitter_p == 1.0:
        view = _random_jitter(view, spec, hue)
    elif spec.jitter_p > 0.0:
        if jitter:
            view = _random_jitter(view, spec, hue)
    if spec.grayscale_p == 1.0:
        view = grayscale(view)
    elif spec.grayscale_p > 0.0:
        if gray:
            view = grayscale(view)
    if spec.blur_p == 1.0:
        view = gaussian_blur(view, fn.random.uniform(range=list(spec.blur_sigma)))
    elif spec.blur_p > 0.0:
        if blur:
            view = gaussian_blur(view, fn.random.uniform(range=list(spec.blur_sigma)))
    if spec.solarize_p == 1.0:
        view = solarize(view)
    elif spec.solarize_p > 0.0:
        if solar:
            view = solarize(view)
    out = flip_normalize(view, fn.cast(flip, dtype=types.INT32), spec.mean, spec.std)
    coins = [fn.cast(c, dtype=types.INT32) for c in (flip, jitter, gray, blur, solar)]
    return out, coins


def _random_jitter(view, spec: ViewSpec, hue_impl: str):
    # torchvision draws brightness/contrast/saturation factors from [max(0, 1-s), 1+s]
    # and the hue shift from [-hue, hue] turns.
    b = _uniform(max(0.0, 1 - spec.brightness), 1 + spec.brightness)
    c = _uniform(max(0.0, 1 - spec.contrast), 1 + spec.contrast)
    s = _uniform(max(0.0, 1 - spec.saturation), 1 + spec.saturation)
    h = _uniform(-spec.hue, spec.hue)
    return color_jitter(view, brightness=b, contrast=c, saturation=s, hue=h)


def _uniform(lo: float, hi: float):
    # A strength of 0 is a constant (DALI rejects an empty range, e.g. hue 0 on grayscale data).
    return fn.random.uniform(range=[lo, hi]) if hi > lo else float(lo)


# ---- the ops with explicit parameters (scalars or per-sample nodes); the faithfulness
# ---- tests call these with fixed values and compare them with torchvision.


def resized_crop(images, top: float, left: float, height: float, width: float, size: int,
                 interp: str = "bicubic"):
    """Crop the pixel window (top, left, height, width) and resize it to size² (antialiased)."""
    return fn.resize(images, size=[size, size], roi_start=[top, left],
                     roi_end=[top + height, left + width], roi_relative=False,
                     interp_type=INTERP[interp], antialias=True)


def color_jitter(view, *, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0):
    """torchvision's ColorJitter with given factors (hue in turns), in the fixed order
    brightness, contrast, saturation, hue, each step clamped to [0, 255] like torchvision.

    Brightness and saturation are DALI's uint8 ops (same formulas as torchvision: a
    factor, a blend with the 0.299/0.587/0.114 luma). Contrast blends with the image's
    mean grey like torchvision (DALI's default pivot is 128): on the CPU the per-sample
    mean feeds ``contrast_center``; GPU argument inputs must live on the CPU, so there
    the blend is DALI arithmetic. Hue is the exact HSV shift in float arithmetic
    (DALI's color_twist/hsv rotate in YIQ: ~21 units from torchvision at hue 0.1); it
    is the costly part (~30 elementwise passes over 3 planes); ``hue=None`` skips it.
    """
    x = fn.brightness_contrast(view, brightness=brightness)
    grey = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)
    m = fn.reductions.mean(grey)  # per-sample mean grey: the contrast pivot
    if x.device == "cpu":
        x = fn.brightness_contrast(x, contrast=contrast, contrast_center=m)
    else:
        xf = fn.cast(x, dtype=types.FLOAT)
        x = fn.cast(dmath.clamp(contrast * xf + (1.0 - contrast) * m, 0.0, 255.0), dtype=types.UINT8)
        x = fn.reshape(x, layout="HWC")
    x = fn.color_twist(x, saturation=saturation)
    if hue is None:
        return x
    xf = fn.cast(x, dtype=types.FLOAT)
    r, g, b = _hsv_hue_shift(xf[:, :, 0], xf[:, :, 1], xf[:, :, 2], hue)
    out = fn.cast(fn.stack(r, g, b, axis=2), dtype=types.UINT8)
    return fn.reshape(out, layout="HWC")  # stack drops the layout; branches must agree


def _luma(r, g, b):
    return 0.299 * r + 0.587 * g + 0.114 * b


def _hsv_hue_shift(r, g, b, hue):
    """Shift the HSV hue by ``hue`` turns keeping V and S: branch-free HSV->RGB,
    f(n) = V - C * clamp(min(k, 4 - k), 0, 1) with k = (n + H/60) mod 6."""
    v = dmath.max(dmath.max(r, g), b)
    c = v - dmath.min(dmath.min(r, g), b)  # chroma = V * S
    inv_c = 1.0 / dmath.max(c, 1e-6)
    is_r = fn.cast(v == r, dtype=types.FLOAT)
    is_g = fn.cast(v == g, dtype=types.FLOAT) * (1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    h6 = (is_r * (g - b) + is_g * (b - r + 2.0 * c) + is_b * (r - g + 4.0 * c)) * inv_c + 6.0 * hue

    def channel(n):
        k = h6 + n
        k = k - 6.0 * dmath.floor(k * (1.0 / 6.0))
        return dmath.clamp(v - c * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0), 0.0, 255.0)

    return channel(5.0), channel(3.0), channel(1.0)


def grayscale(view):
    """3-channel luma (0.299 R + 0.587 G + 0.114 B), like torchvision's Grayscale(3)."""
    return fn.color_twist(view, saturation=0.0)


def gaussian_blur(view, sigma):
    """Only sigma is given, so DALI sizes the kernel 2*ceil(3*sigma)+1 per sample."""
    return fn.gaussian_blur(view, sigma=sigma)


def solarize(view):
    """Invert pixels >= 128 (uint8), by a 256-entry lookup table."""
    return fn.lookup_table(view, keys=list(range(256)), values=SOLARIZE_LUT, dtype=types.UINT8)


def flip_normalize(view, flip, mean, std):
    """Horizontal flip where ``flip`` is 1, then (x/255 - mean)/std as float32 HWC."""
    return fn.crop_mirror_normalize(view, mirror=flip, dtype=types.FLOAT, output_layout="HWC",
                                    mean=[255.0 * m for m in mean], std=[255.0 * s for s in std])
