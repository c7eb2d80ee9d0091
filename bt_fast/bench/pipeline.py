"""``bt-fast bench pipeline [--json]``: the DALI recipe vs torchvision vs the DALI ceiling.

One process, the same cores, the same ImageNet-like JPEGs (~500x375, generated smooth
textures in a temp dir), the official Barlow Twins recipe (two 224-px views), or with
``--recipe multicrop|dino`` SwAV's (2 x 224 + 6 x 96) or DINO's (2 x 224 + 8 x 96)
multi-crop (``--local-size`` sets the local side; images/s counts images, each with all
its crops):

  a      bt_fast.pipelines.MultiViewLoader (defaults: decode once, crop each view from
         it, jitter as one colour matrix with the linear hue)
  a_hsv  the same with torchvision's exact HSV hue shift (``hue="hsv"``)
  a_roi  the same as a with each view decoded from its own crop window (ROI decode)
  b      the torchvision recipe (pipelines/torchvision_recipe.py) in a torch DataLoader
         with as many workers as cores
  c      DALI decode + random resized crop + resize only (the ceiling)

Prints images/s for each and the ratios a/b and a/c (targets on the CPU: >= 4, >= 0.5),
plus the CPU time each spent per image (all threads; for b the worker processes too,
counted once they exit, so it includes the first batch). On a machine shared with other
jobs images/s follows the share of the cores each contender gets, CPU time per image
follows the work: compare ratios within one run, never across runs.
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bt_fast.bench import emit
from bt_fast.data import save_image, write_file_list
from bt_fast.errors import UsageError
from bt_fast.pipelines.bounds import Range, flag_problem


RECIPES = ("barlow_twins", "multicrop", "dino")


def recipe_views(args) -> list:
    """The views of ``args.recipe`` (bt_fast.pipelines.presets) at ``args.size``; Barlow
    Twins' for callers whose args name no recipe (``bt-fast doctor``)."""
    from bt_fast.pipelines import presets

    recipe = getattr(args, "recipe", "barlow_twins")
    if recipe == "barlow_twins":
        return presets.barlow_twins(args.size)
    return presets.get(recipe, size=args.size, local_size=getattr(args, "local_size", 96))


def add_arguments(parser) -> None:
    parser.add_argument("--images", type=int, default=640, help="JPEGs to generate (default 640)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--size", type=int, default=224, help="view side (default 224)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="DALI threads = DataLoader workers (default: all cores)")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--recipe", choices=RECIPES, default="barlow_twins",
                        help="views per image: barlow_twins (2), multicrop (SwAV: 2 global + 6 local), "
                             "dino (2 global + 8 local)")
    parser.add_argument("--local-size", type=int, default=96, help="local crop side of the multi-crop recipes")
    parser.add_argument("--skip-torchvision", action="store_true", help="skip baseline b (slow)")


def make_jpegs(root: Path, n: int, seed: int = 0, size=(500, 375)) -> Path:
    """n natural-ish JPEGs (smooth colour fields + texture) as an ImageFolder + filelist."""
    rng = np.random.default_rng(seed)
    entries = []
    w, h = size
    for i in range(n):
        coarse = rng.uniform(0, 255, (rng.integers(3, 9), rng.integers(3, 9), 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
        fine = rng.uniform(0, 255, (h // 8, w // 8, 3)).astype(np.uint8)
        img += 0.25 * (np.asarray(Image.fromarray(fine).resize((w, h), Image.BILINEAR), np.float32) - 128)
        img += rng.normal(0, 4, img.shape)
        save_image(np.clip(img, 0, 255).astype(np.uint8), root / f"c0/{i:05d}.jpg", quality=90)
        entries.append((f"c0/{i:05d}.jpg", 0))
    write_file_list(root, entries, ["c0"])  # the one writer of file lists (bt_fast.data)
    return root


def _cpu_s(who=resource.RUSAGE_SELF) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _rate(batches, batch: int, warmup: int = 2) -> tuple[float, float]:
    """(images/s, CPU ms per image) over an iterable of batches, after ``warmup`` batches.

    CPU time is this process's (all threads) over the timed batches, plus that of child
    processes reaped meanwhile over all batches (DataLoader workers exit at the end).
    """
    kids0 = _cpu_s(resource.RUSAGE_CHILDREN)
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    n, t0, cpu0 = 0, time.perf_counter(), _cpu_s()
    # next() rather than ``for``: a DALI iterator's __iter__ tries to reset it mid-epoch.
    while next(it, None) is not None:
        n += batch
    wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    kids = _cpu_s(resource.RUSAGE_CHILDREN) - kids0
    return n / wall, 1e3 * (cpu / n + kids / (n + warmup * batch))


def bench_dali(root: Path, args, device: str, decode: str = "once", hue: str = "linear"):
    from bt_fast.pipelines import FolderSource, MultiViewLoader

    loader = MultiViewLoader(FolderSource(root), recipe_views(args), args.batch,
                             device=device, num_threads=args.threads, decode=decode, hue=hue)
    return _rate(loader, args.batch)


def bench_ceiling(root: Path, args, device: str):
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    from bt_fast.pipelines import FolderSource
    from bt_fast.pipelines.pipeline import READER, crop_only_pipeline
    from bt_fast.pipelines.spec import expand

    import torch

    views = expand(recipe_views(args))
    pipe = crop_only_pipeline(FolderSource(root), views, device=device,
                              batch_size=args.batch, num_threads=args.threads, seed=0,
                              device_id=torch.cuda.current_device() if device == "gpu" else None)
    it = DALIGenericIterator([pipe], [f"v{i}" for i in range(len(views))], reader_name=READER,
                             last_batch_policy=LastBatchPolicy.DROP)
    return _rate(it, args.batch)


def bench_torchvision(root: Path, args):
    import torch

    from bt_fast.pipelines.torchvision_recipe import FileListDataset, MultiViewTransform

    ds = FileListDataset(root, MultiViewTransform(recipe_views(args)))
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, drop_last=True,
                                     num_workers=args.threads, persistent_workers=False)
    return _rate(dl, args.batch)


FLAG_RANGES = {"images": Range(lo=1, hi=10**6), "batch": Range(lo=1, hi=2**16), "size": Range(lo=2, hi=8192),
               "threads": Range(lo=1, hi=1024), "local_size": Range(lo=2, hi=8192)}


def run(args) -> int:
    problem = flag_problem(args, FLAG_RANGES)
    if problem:
        raise UsageError(problem)
    import torch

    from bt_fast.pipelines.spec import expand

    device = args.device
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="bt-bench-") as tmp:
        root = make_jpegs(Path(tmp), args.images)
        res = {"device": device, "threads": args.threads, "images": args.images,
               "jpeg_size": [500, 375], "batch": args.batch, "view_size": args.size,
               "recipe": args.recipe, "view_sizes": [v.size for v in expand(recipe_views(args))]}
        runs = {"c_dali_crop_only": lambda: bench_ceiling(root, args, device),
                "a_dali_recipe": lambda: bench_dali(root, args, device),
                "a_hsv_dali_recipe_exact_hue": lambda: bench_dali(root, args, device, hue="hsv"),
                "a_roi_dali_recipe_roi_decode": lambda: bench_dali(root, args, device, "roi")}
        if not args.skip_torchvision:
            runs["b_torchvision_dataloader"] = lambda: bench_torchvision(root, args)
        for name, fn in runs.items():
            res[f"{name}_img_s"], res[f"{name}_cpu_ms_per_img"] = fn()
        a, c = res["a_dali_recipe_img_s"], res["c_dali_crop_only_img_s"]
        if not args.skip_torchvision:
            b = res["b_torchvision_dataloader_img_s"]
            res["a_over_b"], res["c_over_b"] = a / b, c / b
            res["a_over_b_cpu"] = (res["b_torchvision_dataloader_cpu_ms_per_img"]
                                   / res["a_dali_recipe_cpu_ms_per_img"])
        res["a_over_c"] = a / c
        res["a_over_c_cpu"] = res["c_dali_crop_only_cpu_ms_per_img"] / res["a_dali_recipe_cpu_ms_per_img"]
        res["a_hsv_over_c"] = res["a_hsv_dali_recipe_exact_hue_img_s"] / c
        res["roi_over_once"] = res["a_roi_dali_recipe_roi_decode_img_s"] / a
    res = {k: round(v, 3 if abs(v) < 10 else 1) if isinstance(v, float) else v for k, v in res.items()}
    emit(res, args.json)
    return 0
