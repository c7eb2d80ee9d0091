"""Frozen-backbone features for evaluation: checkpoint loading, an offline image loader,
feature extraction and an on-disk feature cache.

Evaluation is offline and small next to pretraining, so images are read with PIL
through a plain torch DataLoader from the validated file list (``ROOT/filelist.txt``)
rather than through DALI. Every protocol sees the same deterministic transform:
resize + center crop to ``data.image_size`` (identity for Fashion-MNIST's native
28 px), then normalisation with the mean/std of the config's first view.

Features of a (backbone, split) pair are cached under ``RUN_DIR/eval-cache/``, keyed
by everything that changes them (checkpoint file, random-init seed, split file list,
image size, normalisation), so ``knn`` then ``linear`` on the same checkpoint extract
only once and linear-probe epochs cost a few matmuls.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from bt_fast import checkpoint, safeio
from bt_fast.config import Config, from_saved
from bt_fast.data import read_file_list
from bt_fast.errors import USER_ERRORS, DataError, DiskFullError, EvalError, WriteError
from bt_fast.pipelines.images import load_rgb
from bt_fast.backbone import build_backbone

CACHE_VERSION = 1


# ------------------------------------------------------------------ checkpoint


@dataclass
class Loaded:
    """A backbone ready for evaluation plus where it came from."""

    backbone: nn.Module
    feature_dim: int
    cfg: Config
    checkpoint: str
    step: int | None
    random_init: bool
    seed: int
    fingerprint: str
    """Identifies the weights: checkpoint file identity, or 'random:<seed>'."""


def _backbone_weights(state: dict, prefix: str = "backbone.") -> dict:
    """The backbone's weights of a method's state_dict (wrapper prefixes stripped)."""
    return {k[len(prefix):]: v for k, v in checkpoint.strip_wrappers(state).items() if k.startswith(prefix)}


def eval_device() -> torch.device:
    """Where evaluation runs: the first GPU when there is one (features of ImageNet on a
    CPU take hours), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def nonfinite_tensors(state: dict) -> list[str]:
    """Names of floating-point tensors in ``state`` holding NaN or inf (weights and BN
    statistics alike: a poisoned running_var gives NaN features in eval mode)."""
    return [k for k, v in state.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def load_backbone(checkpoint_path: str | Path, *, random_init: bool = False, seed: int = 0,
                  device: torch.device | None = None) -> Loaded:
    """Rebuild the backbone of a checkpoint on ``device`` (default :func:`eval_device`);
    with random_init, the same net at seeded init."""
    path = Path(checkpoint_path)
    ckpt = checkpoint.load(path)  # CheckpointError (one line) for a missing or torn file
    cfg = from_saved(ckpt["config"], f"{path}:config")  # ranges too: a doctored config is refused
    torch.manual_seed(seed)  # the random-init baseline is a pure function of the seed
    try:
        backbone, dim = build_backbone(cfg.model)
    except ValueError as e:
        raise EvalError(f"{path}: {e}") from None
    if random_init:
        fingerprint = f"random:{seed}"
    else:
        weights = _backbone_weights(ckpt["model"])
        if not weights:
            raise EvalError(f"{path}: checkpoint has no 'backbone.*' weights")
        bad = nonfinite_tensors(weights)
        if bad:
            raise EvalError(f"{path}: {len(bad)} backbone tensor(s) hold NaN/inf (first: {bad[0]}); "
                            "evaluating them would score chance — use an earlier checkpoint")
        try:
            backbone.load_state_dict(weights, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise EvalError(f"{path}: backbone weights do not match config model ({first})") from None
        st = path.stat()
        fingerprint = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    step = ckpt.get("step")
    backbone.to(device or eval_device())
    return Loaded(backbone, dim, cfg, str(path), int(step) if step is not None else None,
                  random_init, seed, fingerprint)


# ------------------------------------------------------------------ images


def eval_transform(cfg: Config) -> transforms.Compose:
    """Deterministic eval view as uint8 [3, S, S]: resize + center crop to data.image_size.

    Larger images follow the ImageNet convention (shorter side to size/0.875, then the
    center crop); images already at the size are only cropped to square. Normalisation
    happens per batch (``Prep``): per-sample float maths made the loader 3x slower.
    """
    size = cfg.data.image_size
    return transforms.Compose([_ResizeForEval(size), transforms.CenterCrop(size),
                               transforms.PILToTensor()])


class Prep:
    """uint8 batch [B, 3, H, W] -> float, normalised with the first view's mean/std,
    channels-last (the memory format the backbone runs fastest in)."""

    def __init__(self, cfg: Config, device: torch.device | str = "cpu"):
        view = cfg.views[0]
        self.device = torch.device(device)
        self.mean = torch.tensor(view.mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(view.std, device=self.device).view(1, 3, 1, 1) * 255

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # uint8 crosses to the GPU (a quarter of the float bytes), then is normalised there.
        x = x.to(self.device, non_blocking=True)
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)


def bf16_default(precision: str) -> bool:
    """auto -> bf16 where the eval device has native bf16 (about 2x faster on this
    project's CPUs), else fp32."""
    if precision == "auto":
        if torch.cuda.is_available():
            return torch.cuda.is_bf16_supported()
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return precision == "bf16"


class _ResizeForEval:
    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        short = min(img.size)
        if short == self.size:
            return img
        target = round(self.size / 0.875) if short > self.size else self.size
        return transforms.functional.resize(img, target, antialias=True)


class ImageList(Dataset):
    """(image tensor, label) pairs of an ImageFolder root, read from its file list."""

    def __init__(self, root: str | Path, transform, indices: list[int] | None = None):
        self.root = Path(root)
        try:
            paths, labels, classes = read_file_list(self.root)
        except DataError as e:
            raise EvalError(str(e)) from None
        if not paths:
            raise EvalError(f"{self.root}: file list is empty")
        if indices is not None:
            paths = [paths[i] for i in indices]
            labels = [labels[i] for i in indices]
        self.paths, self.labels, self.classes = paths, labels, classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        img = load_rgb(self.root / self.paths[i])  # pixel limit, DALI's formats; SourceError naming it
        return self.transform(img), self.labels[i]


def num_classes(*label_lists) -> int:
    return 1 + max(max(ls) for ls in label_lists)


# ------------------------------------------------------------------ extraction


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (CPU for a module without any)."""
    weight = next(module.parameters(), None)
    return weight.device if weight is not None else torch.device("cpu")


def autocast_for(module: nn.Module, bf16: bool):
    """bf16 autocast on the device the module's weights live on: CUDA autocast for a
    backbone on a GPU (a CPU context there would leave it in fp32), CPU autocast otherwise."""
    return torch.autocast(module_device(module).type, dtype=torch.bfloat16, enabled=bf16)


@torch.inference_mode()
def extract(module: nn.Module, dataset: Dataset, prep: Prep, *, batch_size: int = 512,
            workers: int = 1, bf16: bool = False, log=None,
            channels_last: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs [N, D] float32 of a frozen module (eval mode) and labels [N], in file-list order.

    ``channels_last=False`` leaves the module's memory format alone (the trainer's
    monitor featurises the live model, which must keep the format it trains in)."""
    module.eval()
    if channels_last:
        module.to(memory_format=torch.channels_last)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    feats, labels = [], []
    t0, done = time.perf_counter(), 0
    for x, y in batches(loader):
        with autocast_for(module, bf16):
            f = module(prep(x))  # [B, D]
        feats.append(f.float().cpu())  # the bank stays in host memory (kNN chunks over it)
        labels.append(y)
        done += len(y)
        if log and done % (batch_size * 40) < batch_size:
            log(f"  features {done}/{len(dataset)} ({done / (time.perf_counter() - t0):.0f} img/s)")
    return torch.cat(feats), torch.cat(labels).long()


def batches(loader: DataLoader):
    """Iterate ``loader``; a user error raised in a worker process comes back as itself.

    DataLoader re-raises a worker's exception with the worker's whole traceback as its
    message; a user error (an image deleted after ``data check``) must stay one line
    naming the file, so the message is cut back to the original's.
    """
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except USER_ERRORS as e:
            text = str(e)
            if "Original Traceback" in text:  # "...\npkg.module.SourceError: PATH: why"
                last = text.rstrip().splitlines()[-1]
                head, sep, rest = last.partition(": ")
                text = rest if sep and head.rsplit(".", 1)[-1] == type(e).__name__ else last
            raise type(e)(text) from None
        yield batch


def cache_key(loaded: Loaded, root: str | Path, bf16: bool = False, indices=None) -> str:
    """Hash of everything the features of (weights, split) depend on."""
    root = Path(root).resolve()
    lst = root / "filelist.txt"
    st = lst.stat() if lst.is_file() else None
    view = loaded.cfg.views[0]
    parts = {
        "v": CACHE_VERSION, "weights": loaded.fingerprint, "model": vars(loaded.cfg.model),
        "root": str(root), "list": [st.st_size, st.st_mtime_ns] if st else None,
        "size": loaded.cfg.data.image_size, "mean": view.mean, "std": view.std, "bf16": bf16,
        **({"subset": hashlib.sha1(str(indices).encode()).hexdigest()} if indices is not None else {}),
    }
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_cache_dir(checkpoint: str | Path) -> Path:
    """RUN_DIR/eval-cache for RUN_DIR/checkpoints/x.pt, else next to the checkpoint; when
    that folder cannot be written (a read-only run folder, another user's run), a folder
    under the user's cache ($XDG_CACHE_HOME/bt_fast or ~/.cache/bt_fast), one per run."""
    parent = Path(checkpoint).resolve().parent
    run_dir = parent.parent if parent.name == "checkpoints" else parent
    if safeio.writable_dir(run_dir / "eval-cache"):
        return run_dir / "eval-cache"
    tag = hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]
    return safeio.cache_home() / "eval-cache" / f"{run_dir.name}-{tag}"


def _cached(path: Path) -> dict | None:
    """A cache file's {"features": [N, D] float, "labels": [N] int64}, or None if it is
    not one (truncated, another tool's, doctored): a cache is only ever a shortcut."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unpickling errors come in many types; recompute
        return None
    ok = (isinstance(blob, dict) and isinstance(blob.get("features"), torch.Tensor)
          and isinstance(blob.get("labels"), torch.Tensor) and blob["features"].ndim == 2
          and blob["labels"].ndim == 1 and len(blob["features"]) == len(blob["labels"]))
    return blob if ok else None


def split_features(loaded: Loaded, root: str | Path, *, cache_dir: Path | None,
                   batch_size: int = 512, workers: int = 1, bf16: bool = False,
                   log=None, indices: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features + labels of one split (of its images at ``indices``, all when None),
    from the cache when present (cache_dir=None: off)."""
    path = None
    if cache_dir is not None:
        tag = "random" if loaded.random_init else "ckpt"
        path = Path(cache_dir) / f"{Path(root).name}-{tag}-{cache_key(loaded, root, bf16, indices)}.pt"
        if path.is_file():
            blob = _cached(path)
            if blob is not None:
                if log:
                    log(f"  features of {root} from cache {path}")
                return blob["features"], blob["labels"]
            print(f"warning: {path}: unreadable feature cache (cut off or not ours); "
                  "extracting again", file=sys.stderr)
    t0 = time.perf_counter()
    dataset = ImageList(root, eval_transform(loaded.cfg), indices)
    feats, labels = extract(loaded.backbone, dataset, Prep(loaded.cfg, module_device(loaded.backbone)),
                            batch_size=batch_size,
                            workers=workers, bf16=bf16, log=log)
    if log:
        dt = time.perf_counter() - t0
        log(f"  features of {root}: {tuple(feats.shape)} in {dt:.1f}s ({len(labels) / dt:.0f} img/s)")
    if path is not None:
        # Atomic (a concurrent eval never reads half a file). A cache is optional: one
        # that cannot be written is a warning, not minutes of extraction thrown away.
        try:
            safeio.write_atomic(path, lambda f: torch.save({"features": feats, "labels": labels}, f))
        except (WriteError, DiskFullError) as e:
            stderr_log(f"warning: features not cached ({e})")
    return feats, labels


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
