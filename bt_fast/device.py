"""Where and how the training step runs on this machine: the autocast context, the data
device, views moved onto the model's device, cuDNN autotuning and torch's CPU threads.

Pure settings of the process and the tensors, split from the loop (bt_fast.train) so the
loop reads as the algorithm; each is a function of the config (and the rank's Env).
"""

from __future__ import annotations

import contextlib
import os

import torch

from bt_fast import config, dist


def autocast(cfg: config.Config, device: torch.device):
    if cfg.train.precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.precision]
    return torch.autocast(device.type, dtype=dtype)


def place_views(views: list[torch.Tensor], device: torch.device, channels_last: bool) -> list[torch.Tensor]:
    """Views on the model's device in the model's memory format, whatever ``data.device`` is.

    DALI's CPU pipeline hands over pageable host tensors; on a CUDA model they are pinned
    first (one host memcpy) so the copy to the GPU is asynchronous (non_blocking) and
    overlaps the previous step's kernels. Views already on ``device`` are not copied.
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = []
    for v in views:
        if v.device != device:
            if device.type == "cuda" and v.device.type == "cpu":
                v = v.pin_memory()
            v = v.to(device, non_blocking=True)
        out.append(v.contiguous(memory_format=fmt))
    return out


def set_cudnn(cfg: config.Config) -> None:
    """Autotune convolutions (input sizes are fixed per view), unless asked to be deterministic.

    ``train.deterministic`` trades speed for run-to-run identical GPU results (cuDNN's
    default backward kernels use atomics): what an exact-resume check on a GPU needs.
    """
    det = cfg.train.deterministic
    torch.backends.cudnn.benchmark = not det
    torch.backends.cudnn.deterministic = det
    if det:
        torch.use_deterministic_algorithms(True, warn_only=True)


def data_device(cfg: config.Config) -> str:
    if cfg.data.device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return cfg.data.device


def threads_for(cfg: config.Config, env: dist.Env) -> int:
    """torch's intra-op threads for this rank: ``train.threads``, or for 0 on a CPU run
    the cores of this rank (the process's cores / ranks on this node, at least 1); 0 =
    keep torch's choice (GPU runs, and runs whose OMP_NUM_THREADS says otherwise).

    Why: several CPU ranks on one machine would each start a thread per core and wait
    for each other. The DALI workers are not subtracted: at 28 px one worker needs a
    fraction of a core, and on an otherwise idle 2-core machine 2 torch threads beside it
    trained 1.45x faster than 1 (633 vs 437 img/s); on a machine whose cores other jobs
    hold, ``train.threads: 1`` was the faster one (docs/fmnist.md, "Throughput").
    """
    n = cfg.train.threads  # config.validate: >= 0
    if n == 0 and env.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        n = max(1, len(os.sched_getaffinity(0)) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return n


def set_threads(cfg: config.Config, env: dist.Env) -> int:
    """Apply :func:`threads_for`; returns the count torch now uses."""
    n = threads_for(cfg, env)
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()
