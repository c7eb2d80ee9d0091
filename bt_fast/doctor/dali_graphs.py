"""The doctor's DALI graph: decode + fixed resize, no randomness, CPU or GPU.

In its own file because it imports DALI at module level (the doctor imports it only
once DALI is known to be importable) and ``@pipeline_def`` wants real source.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from bt_fast.pipelines import filelist


@pipeline_def
def decode_resize(root: str, size: int, device: str):
    """Files in ``root/filelist.txt`` order -> uint8 HWC [size, size, 3]; `mixed` decode on GPU."""
    # The list goes through the one parser (the read gate), not DALI's file_list reader.
    listing = filelist.read(root)
    jpegs, _ = fn.readers.file(files=[str(Path(root) / p) for p in listing.paths], labels=listing.labels,
                               random_shuffle=False, name="Reader")
    images = fn.decoders.image(jpegs, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
    return fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=False)


def decoded(root: Path, device: str, batch: int, batches: int, size: int = 224) -> np.ndarray:
    """[batch * batches, size, size, 3] uint8 from the graph on ``device``."""
    pipe = decode_resize(str(root), size, device, batch_size=batch, num_threads=2,
                         device_id=0 if device == "gpu" else None, seed=0)
    pipe.build()
    out = []
    for _ in range(batches):
        (images,) = pipe.run()
        images = images.as_cpu() if device == "gpu" else images
        out.append(np.stack([np.asarray(images[i]) for i in range(batch)]))
    return np.concatenate(out)
