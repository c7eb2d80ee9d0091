"""The DALI parts: GPU graph vs CPU graph, pipeline speed, data-wait share.

Each SKIPs with its reason without DALI or without a GPU; the rest of the doctor then
runs on synthetic tensors. JPEGs are generated (bench pipeline's ImageNet-like 500x375
textures), so no dataset is needed.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from bt_fast.doctor.environment import Host
from bt_fast.doctor.report import FAIL, PASS, Check, skip

# nvJPEG and libjpeg-turbo differ in IDCT and chroma upsampling: a few grey levels
MAX_MEAN_ABS_DIFF = 4.0  # uint8 levels, over all pixels
MAX_CHANNEL_MEAN_DIFF = 1.5  # uint8 levels, per RGB channel mean


def _needs(host: Host, what: str) -> Check | None:
    if not host.dali:
        return skip(what, f"{host.dali_why}")
    if not host.cuda:
        return skip(what, "no GPU: the CPU graph is what tests/test_pipeline_*.py check")
    return None


def _jpegs(tmp: str, n: int) -> Path:
    from bt_fast.bench.pipeline import make_jpegs

    return make_jpegs(Path(tmp), n)


def compare_graphs(root: Path, devices=("cpu", "gpu"), batch: int = 16, batches: int = 2) -> dict:
    """Decode + fixed resize of the same files on two devices: pixel differences (uint8 levels)."""
    from bt_fast.doctor.dali_graphs import decoded

    a, b = (decoded(root, d, batch, batches).astype(np.float32) for d in devices)
    return {"mean_abs": float(np.abs(a - b).mean()),
            "channel_mean": float(np.abs(a.mean((0, 1, 2)) - b.mean((0, 1, 2))).max()),
            "images": int(a.shape[0])}


def gpu_vs_cpu(host: Host, quick: bool) -> list[Check]:
    """`mixed` decode + GPU resize against the CPU graph, then the real loader on the GPU."""
    missing = _needs(host, "dali.gpu_vs_cpu")
    if missing:
        return [missing, skip("dali.gpu_loader", missing.detail)]
    with tempfile.TemporaryDirectory(prefix="bt-doctor-") as tmp:
        root = _jpegs(tmp, 64)
        diff = compare_graphs(root, batch=16, batches=2 if quick else 4)
        ok = diff["mean_abs"] <= MAX_MEAN_ABS_DIFF and diff["channel_mean"] <= MAX_CHANNEL_MEAN_DIFF
        graphs = Check("dali.gpu_vs_cpu", PASS if ok else FAIL,
                       f"{diff['images']} JPEGs decoded + resized on GPU vs CPU: mean |diff| "
                       f"{diff['mean_abs']:.2f}, channel means {diff['channel_mean']:.2f} levels "
                       f"(limits {MAX_MEAN_ABS_DIFF}, {MAX_CHANNEL_MEAN_DIFF})", diff)
        return [graphs, loader_on_gpu(root)]


def loader_on_gpu(root: Path, batch: int = 16) -> Check:
    """The recipe's MultiViewLoader with device="gpu": where and how its views arrive."""
    from bt_fast.pipelines import FolderSource, MultiViewLoader, presets

    loader = MultiViewLoader(FolderSource(root), presets.barlow_twins(224), batch, device="gpu", num_threads=2)
    views, _ = next(iter(loader))
    problems = []
    for i, v in enumerate(views):
        if v.device.type != "cuda" or tuple(v.shape) != (batch, 3, 224, 224):
            problems.append(f"view {i}: {tuple(v.shape)} on {v.device}")
        elif not v.is_contiguous(memory_format=torch.channels_last):
            problems.append(f"view {i}: not channels-last")
        elif not torch.isfinite(v).all() or v.float().std() < 0.05:
            problems.append(f"view {i}: non-finite or constant")
    if problems:
        return Check("dali.gpu_loader", FAIL, "; ".join(problems))
    return Check("dali.gpu_loader", PASS, f"{len(views)} views [{batch}, 3, 224, 224] on cuda, channels-last, finite")


def pipeline_speed(host: Host, quick: bool, threads: int) -> Check:
    """bench pipeline's recipe (decode once, two 224-px views) on the GPU, in images/s."""
    missing = _needs(host, "pipeline_images_per_s")
    if missing:
        return missing
    from bt_fast.bench.pipeline import bench_dali

    args = SimpleNamespace(size=224, batch=64, threads=threads)
    with tempfile.TemporaryDirectory(prefix="bt-doctor-") as tmp:
        root = _jpegs(tmp, 512 if quick else 1536)
        rate, cpu_ms = bench_dali(root, args, "gpu")
    return Check("pipeline_images_per_s", PASS, f"{rate:,.0f} img/s ({2 * rate:,.0f} views/s) with {threads} "
                 f"threads, {cpu_ms:.2f} CPU-ms/img", {"images_per_s": rate, "cpu_ms_per_image": cpu_ms})


def data_wait(host: Host, cfg, quick: bool, threads: int) -> Check:
    """The trainer's loop on GPU-decoded JPEGs: share of step time the GPU waited for data."""
    missing = _needs(host, "data_wait_share")
    if missing:
        return missing
    from bt_fast import config, metrics
    from bt_fast.bench.step import contender, contender_step
    from bt_fast.pipelines import FolderSource, MultiViewLoader

    batch, steps = (32, 6) if quick else (64, 12)
    run, _ = contender(cfg, batch, torch.device("cuda"))
    with tempfile.TemporaryDirectory(prefix="bt-doctor-") as tmp:
        root = _jpegs(tmp, batch * (steps + 2))
        loader = MultiViewLoader(FolderSource(root), config.resolved_views(cfg), batch, device="gpu",
                                 num_threads=threads)  # the recipe's own views
        it, timer = iter(loader), metrics.StepTimer("cuda")
        for i in range(steps + 2):
            timer.start()
            views, _ = next(it)
            timer.mark("data_wait")
            contender_step(run, views, timer)
            if i == 1:
                timer.collect()  # drop the two warm-up steps (allocator, cuDNN autotuning)
        d = timer.collect()
    share = sum(d["data_wait"]) / sum(d["step"])
    step_s = statistics.median(d["step"])
    return Check("data_wait_share", PASS, f"{100 * share:.1f} % of step time waiting for data "
                 f"(batch {batch}, {batch / step_s:,.0f} img/s with real JPEGs; README: > 10-20 % = starved)",
                 {"share": share, "images_per_s": batch / step_s})
