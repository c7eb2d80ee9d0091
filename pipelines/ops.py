"""One view's augmentation as a plain DALI function (no pipeline, no reader).

``augment_view`` turns a decoded uint8 HWC image batch into one normalized float view,
following a ``ViewSpec``. It runs unchanged on CPU and GPU data: the image batch lives
on whatever device the decoder put it, the per-sample coins are always CPU booleans.

Per-sample randomness uses DALI conditionals (``if coin:`` on a CPU boolean splits the
batch), so an op the coin skipped costs nothing. The caller's ``@pipeline_def`` must pass
``enable_conditionals=True``.

Order and units (what differs from torchvision, each bounded in tests/test_pipeline_faithful.py;
CPU costs per 224-px view on one core of the 2-core reference machine, docs/pipelines.md):

1. crop + resize: ``fn.random_resized_crop`` (same area/log-ratio sampling, 10 attempts,
   antialiased bicubic), or a crop decoded straight from the JPEG (``decode="roi"``).
2. color jitter with p=jitter_p, fixed order brightness, contrast, saturation, hue
   (torchvision draws a random order per sample). Default ``hue="linear"``
   (``color_transform``): brightness as DALI's clamped uint8 scaling, then contrast
   (around the mean grey, like torchvision), saturation and hue as one 3x3 colour matrix
   per sample, hue being a rotation about the grey axis: the best linear stand-in for
   the HSV shift, not the shift (~15/255 mean difference at hue 0.1 on saturated
   colours). ``hue="hsv"`` (``color_jitter_hsv``): torchvision's exact HSV shift in
   DALI float arithmetic, ~4 ms more per jittered view.
3. grayscale with p=grayscale_p: the 0.299/0.587/0.114 luma, repeated to 3 channels.
4. gaussian blur with p=blur_p: sigma ~ U(blur_sigma), ``2*ceil(3*max sigma)+1`` taps
   (13 for sigma <= 2) instead of torchvision's fixed 23 at 224 px (the dropped taps
   carry < 0.3% of the weight); on the CPU two 1-D ``fn.filter`` passes.
5. solarize with p=solarize_p: a 256-entry lookup table (v >= 128 -> 255 - v).
6. flip with p=flip_p, normalize, cast to float, all fused in ``crop_mirror_normalize``
   (a flip commutes with every op above, so doing it last is exact).

Everything up to 6 stays uint8: DALI's CPU operators are several times cheaper on uint8
than on float, and its float->uint8 rounding is itself a costly pass.
"""

from __future__ import annotations

import math

import numpy as np
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


HUES = ("linear", "hsv")
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
"""torchvision's grey weights (ITU-R 601-2 luma)."""


def augment_view(view, spec: ViewSpec, hue: str = "linear"):
    """Colour/blur/solarize/flip/normalize one cropped uint8 HWC view batch.

    Returns ``(float32 HWC view normalized with spec.mean/std, coins)`` where ``coins``
    is a list of five int32 per-sample 0/1 flags in ``COINS`` order (debug output).
    ``hue="linear"`` (default): jitter as a brightness scaling plus one 3x3 colour matrix
    per sample, hue as a rotation about the grey axis (~0.8 ms per jittered 224-px view;
    see ``color_transform`` for how far that hue is from torchvision's). ``"hsv"``:
    torchvision's exact HSV hue shift in float arithmetic (~4 ms per view more).
    """
    if hue not in HUES:
        raise ValueError(f"hue={hue!r}: use one of {HUES}")
    flip, jitter, gray, blur, solar = (_coin(p) for p in (spec.flip_p, spec.jitter_p,
                                                          spec.grayscale_p, spec.blur_p,
                                                          spec.solarize_p))
    # ``if coin:`` splits the batch (only the chosen samples run the op); a Python-level
    # check on p skips the split entirely when p is 0 or 1.
    jitter_fn = color_transform if hue == "linear" else color_jitter_hsv
    if spec.jitter_p == 1.0:
        view = jitter_fn(view, *_jitter_factors(spec))
    elif spec.jitter_p > 0.0:
        if jitter:
            view = jitter_fn(view, *_jitter_factors(spec))
    if spec.grayscale_p == 1.0:
        view = grayscale(view)
    elif spec.grayscale_p > 0.0:
        if gray:
            view = grayscale(view)
    if spec.blur_p == 1.0:
        view = gaussian_blur(view, fn.random.uniform(range=list(spec.blur_sigma)), spec.blur_sigma[1])
    elif spec.blur_p > 0.0:
        if blur:
            view = gaussian_blur(view, fn.random.uniform(range=list(spec.blur_sigma)), spec.blur_sigma[1])
    if spec.solarize_p == 1.0:
        view = solarize(view)
    elif spec.solarize_p > 0.0:
        if solar:
            view = solarize(view)
    out = flip_normalize(view, fn.cast(flip, dtype=types.INT32), spec.mean, spec.std)
    coins = [fn.cast(c, dtype=types.INT32) for c in (flip, jitter, gray, blur, solar)]
    return out, coins


def _jitter_factors(spec: ViewSpec):
    # torchvision draws brightness/contrast/saturation factors from [max(0, 1-s), 1+s]
    # and the hue shift from [-hue, hue] turns.
    return (_uniform(max(0.0, 1 - spec.brightness), 1 + spec.brightness),
            _uniform(max(0.0, 1 - spec.contrast), 1 + spec.contrast),
            _uniform(max(0.0, 1 - spec.saturation), 1 + spec.saturation),
            _uniform(-spec.hue, spec.hue))


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


# Constant 3x3 matrices the per-sample colour matrix is a combination of (x = RGB column).
_I = np.eye(3, dtype=np.float32)
_P = np.full((3, 3), 1 / 3, np.float32)  # projection on the grey axis: mean(R, G, B) per channel
_N = 1 / math.sqrt(3)
_K = np.array([[0, -_N, _N], [_N, 0, -_N], [-_N, _N, 0]], np.float32)  # x -> n x x, n = grey axis
_W = np.repeat(LUMA[None, :], 3, 0)  # 1 w^T: x -> luma in every channel


def color_transform(view, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0):
    """torchvision's ColorJitter with given factors (hue in turns), fixed order brightness,
    contrast, saturation, hue, in two uint8 passes: brightness (DALI's clamped uint8
    scaling, as torchvision clamps it), then contrast, saturation and hue as ONE affine
    colour map per sample, out = clamp(M x + T), rounded once.

    Arguments are Python floats or per-sample DALI scalars. After brightness each step
    is linear in the RGB pixel x:
      contrast    c x + (1 - c) m 1         m = mean grey of the image (torchvision's pivot)
      saturation  s x + (1 - s) (w.x) 1     w = luma weights
      hue         H x                        rotation by 2 pi hue about the grey axis 1
    so M = H (s I + (1 - s) 1 w^T) c = c (s H + (1 - s) 1 w^T) (H fixes grey) and
    T = (1 - c) m 1. What differs from torchvision, bounded in
    tests/test_pipeline_faithful.py: the hue rotation is the least-squares best LINEAR
    approximation of the HSV hue shift, not the shift itself (mean |diff| ~15/255 at
    hue 0.1 on saturated test colours, where no shift at all is ~23); no clamp and no
    rounding between contrast, saturation and hue. ``hue="hsv"`` (``color_jitter_hsv``)
    is the exact, ~5x dearer alternative.
    """
    if not (isinstance(brightness, float) and brightness == 1.0):
        view = fn.brightness_contrast(view, brightness=brightness)
    cos_h, sin_h = _cos_sin(hue)
    cs = contrast * saturation
    # H = cos I + (1 - cos) P + sin K, with P the projection on the grey axis and K the
    # cross product with its unit vector; 1 w^T is _W.
    coefs = (cs * cos_h, cs * (1.0 - cos_h), cs * sin_h, contrast * (1.0 - saturation))
    no_pivot = isinstance(contrast, float) and contrast == 1.0
    if not no_pivot:  # the pivot: mean grey of the brightened image, via per-channel means
        mean_grey = fn.reductions.sum(fn.reductions.mean(view, axes=[0, 1]) * types.Constant(LUMA))
    if view.device == "cpu":
        # Three 1-channel transforms + a concat: ~0.3 ms per 224-px view on one core,
        # where one 3x3 coord_transform (or color_twist) to 3 channels takes ~0.9 ms.
        t = None if no_pivot else ((1.0 - contrast) * mean_grey) * types.Constant(np.ones(1, np.float32))
        rows = [fn.coord_transform(view, M=_combine(coefs, i), T=t, dtype=types.UINT8) for i in range(3)]
        return fn.cat(*rows, axis=2)
    # GPU: argument inputs (T) must live on the CPU, the mean is on the GPU: add it here.
    x = fn.coord_transform(view, M=_combine(coefs), dtype=types.FLOAT)
    if not no_pivot:
        k = 1.0 - contrast
        x = x + (k if isinstance(k, float) else fn.cast(k, dtype=types.FLOAT).gpu()) * mean_grey
    return fn.reshape(fn.cast(dmath.clamp(x, 0.0, 255.0), dtype=types.UINT8), layout="HWC")


def _combine(coefs, row=None):
    """Per-sample a1 I + a2 P + a3 K + a4 W (3x3), or its row ``row`` (1x3)."""
    sel = slice(None) if row is None else slice(row, row + 1)
    out = None
    for a, const in zip(coefs, (_I, _P, _K, _W)):
        term = a * types.Constant(np.ascontiguousarray(const[sel]))
        out = term if out is None else out + term
    return out


def _cos_sin(hue):
    if isinstance(hue, (int, float)):
        return math.cos(2 * math.pi * hue), math.sin(2 * math.pi * hue)
    return dmath.cos(2 * math.pi * hue), dmath.sin(2 * math.pi * hue)


def color_jitter_hsv(view, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0):
    """torchvision's ColorJitter with given factors (hue in turns) and its EXACT HSV hue
    shift (``hue="hsv"``), in the fixed order brightness, contrast, saturation, hue, each
    step clamped to [0, 255] like torchvision.

    Brightness and saturation are DALI's uint8 ops (same formulas as torchvision: a
    factor, a blend with the 0.299/0.587/0.114 luma). Contrast blends with the image's
    mean grey like torchvision (DALI's default pivot is 128): on the CPU the per-sample
    mean feeds ``contrast_center``; GPU argument inputs must live on the CPU, so there
    the blend is DALI arithmetic. Hue is the exact HSV shift in float arithmetic
    (~30 elementwise passes over 3 planes: the costly part); ``hue=None`` skips it.
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
    """3-channel luma (0.299 R + 0.587 G + 0.114 B, rounded), like torchvision's
    Grayscale(3): one 1-channel transform, repeated (~4x cheaper than color_twist)."""
    grey = fn.coord_transform(view, M=LUMA.tolist(), dtype=types.UINT8)
    return fn.cat(grey, grey, grey, axis=2)


def gaussian_blur(view, sigma, max_sigma: float | None = None):
    """Gaussian blur with per-sample ``sigma`` (pixels), ``2*ceil(3*max_sigma)+1`` taps,
    reflect-101 borders (torchvision's "reflect" padding).

    On the CPU: two 1-D passes of ``fn.filter`` (OpenCV's SIMD filter2D underneath),
    uint8 in between, with the exact gaussian weights exp(-x^2 / 2 sigma^2) normalized
    over the window: ~0.3 ms per 224-px view where ``fn.gaussian_blur`` takes ~1.4 ms.
    On the GPU: ``fn.gaussian_blur`` (kernel 2*ceil(3*sigma)+1 per sample).
    ``max_sigma`` (a Python float, default ``sigma``) fixes the window for every sample.
    """
    if view.device != "cpu":
        return fn.gaussian_blur(view, sigma=sigma)
    radius = math.ceil(3 * (sigma if max_sigma is None else max_sigma))
    x2 = types.Constant(np.arange(-radius, radius + 1, dtype=np.float32) ** 2)
    inv = -0.5 / (sigma * sigma) if isinstance(sigma, float) else -0.5 / dmath.max(sigma * sigma, 1e-6)
    taps = dmath.exp(x2 * inv)
    taps = taps / fn.reductions.sum(taps)  # [2r+1] per sample
    n = 2 * radius + 1
    rows = fn.filter(view, fn.reshape(taps, shape=[1, n]), border="reflect_101")
    return fn.filter(rows, fn.reshape(taps, shape=[n, 1]), border="reflect_101")


def solarize(view):
    """Invert pixels >= 128 (uint8), by a 256-entry lookup table."""
    return fn.lookup_table(view, keys=list(range(256)), values=SOLARIZE_LUT, dtype=types.UINT8)


def flip_normalize(view, flip, mean, std):
    """Horizontal flip where ``flip`` is 1, then (x/255 - mean)/std as float32 HWC."""
    return fn.crop_mirror_normalize(view, mirror=flip, dtype=types.FLOAT, output_layout="HWC",
                                    mean=[255.0 * m for m in mean], std=[255.0 * s for s in std])
