"""The ``@pipeline_def``: read one shard, decode, and augment N views per image.

A thin wrapper around ``ops.augment_view``. It lives in its own .py file because DALI
conditionals (AutoGraph) need the source of the function they convert.
"""

from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types

from . import ops
from .spec import ViewSpec

READER = "Reader"
DECODES = ("once", "roi")


@pipeline_def(enable_conditionals=True)
def multiview_pipeline(source, views: list[ViewSpec], *, shard_id: int, num_shards: int,
                       reader_seed: int, device: str = "cpu", decode: str = "once", debug: bool = False,
                       hue: str = "linear"):
    """Outputs: one float32 HWC view per entry of ``views`` (already expanded), the
    int32 labels, then, if ``debug``, the five per-sample coins of every view.

    decode="once": decode the whole JPEG once and crop each view from it.
    decode="roi": each view decodes only its own crop window (fn.decoders.image_random_crop).
    """
    if decode not in DECODES:
        raise ValueError(f"decode={decode!r}: use one of {DECODES}")
    jpegs, labels = source.reader(shard_id=shard_id, num_shards=num_shards, seed=reader_seed,
                                  name=READER)
    decode_device = "mixed" if device == "gpu" else "cpu"
    if decode == "once":
        images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
    outputs, coins = [], []
    for spec in views:
        if decode == "once":
            view = ops.random_crop(images, spec)
        else:
            view = ops.random_crop_decode(jpegs, spec, decode_device)
        view, view_coins = ops.augment_view(view, spec, hue)
        outputs.append(view)
        coins.extend(view_coins)
    labels = fn.cast(labels, dtype=types.INT64)
    if device == "gpu":
        labels = labels.gpu()
    return tuple(outputs) + (labels,) + (tuple(coins) if debug else ())


def crop_only_pipeline(source, views: list[ViewSpec], *, shard_id: int = 0, num_shards: int = 1,
                       reader_seed: int = 0, device: str = "cpu", decode: str = "once", **kwargs):
    """The benchmark's ceiling: decode + random resized crop of every view, nothing else."""
    @pipeline_def(**kwargs)
    def _crop_only():
        jpegs, _ = source.reader(shard_id=shard_id, num_shards=num_shards, seed=reader_seed,
                                 name=READER)
        decode_device = "mixed" if device == "gpu" else "cpu"
        if decode == "roi":
            return tuple(ops.random_crop_decode(jpegs, s, decode_device) for s in views)
        images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
        return tuple(ops.random_crop(images, s) for s in views)

    return _crop_only()
