"""Dataset preparation: ``bt-fast data {fashion-mnist,synthetic,check}``.

Every dataset bt_fast reads is an ImageFolder (``ROOT/<class>/<file>.jpg``) plus a
validated file list ``ROOT/filelist.txt`` ("relative/path label" per line, labels are
the sorted class-folder indices) and ``ROOT/classes.txt``. The DALI reader reads the
list, never the folder: a corrupt JPEG is a fatal pipeline error that cannot be skipped
mid-epoch (NVIDIA/DALI#3913), so ``check`` decodes every file first and lists only the
good ones.
"""

from __future__ import annotations

import gzip
import os
import struct
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from bt_fast import safeio
from bt_fast.errors import DataError, DiskFullError, UsageError
from bt_fast.pipelines import filelist
from bt_fast.pipelines.bounds import Range, flag_problem
from bt_fast.pipelines.errors import SourceError
from bt_fast.pipelines.filelist import FILELIST
from bt_fast.pipelines.images import max_pixels
from bt_fast.pipelines.spec import MAX_SIDE
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FMNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat",
                  "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
# Where the Debian package dataset-fashion-mnist puts the four idx files.
FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------ file lists


def write_file_list(root: Path, entries: list[tuple[str, int]], classes: list[str]) -> None:
    """Write ROOT/filelist.txt, classes.txt and filelist.checked through the write gate
    (bt_fast.safeio: atomic, never through a link; a full disk is one line).

    The list commits the set: images are written without an fsync each (``save_image``),
    so one sync() first makes them durable before the list that names them.
    """
    os.sync()
    try:
        for name, text in filelist.render(entries, classes):
            safeio.write_atomic(Path(root) / name, text)
    except DiskFullError:
        raise DiskFullError(f"disk full while writing the file list of {root}; "
                            "the previous list, if any, is intact") from None


def save_image(array: np.ndarray, path: Path, quality: int) -> None:
    """One JPEG through the write gate; no fsync (the file list is the commit point) and
    no sweep of the folder (thousands of files: sweeping per write would be quadratic)."""
    safeio.write_atomic(path, lambda f: Image.fromarray(array).save(f, format="JPEG", quality=quality),
                        durable=False, sweep=False)


def read_file_list(root: str | Path) -> tuple[list[str], list[int], list[str]]:
    """(relative paths, labels, class names) of a checked ImageFolder root."""
    try:
        listing = filelist.read(root)
    except SourceError as e:
        raise DataError(str(e)) from None
    return listing.paths, listing.labels, listing.classes


def _candidates(root: Path) -> dict[str, list[str]]:
    """{class folder: sorted relative image paths} for every folder under ROOT."""
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise DataError(f"{root}: no class folders (expected ROOT/<class>/<image>)")
    return {c: [str(f.relative_to(root)) for f in sorted((root / c).rglob("*"))
                if (f.is_file() or f.is_symlink()) and f.suffix.lower() in IMAGE_SUFFIXES] for c in folders}


def _printable(rel: str) -> str:
    # A name with undecodable bytes holds surrogates that print() cannot encode.
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def check_folder(root: Path, out=None) -> int:
    """Decode every image under an ImageFolder root; write the good list; count bad.

    Classes are the folders with at least one good image, numbered in sorted order:
    an empty (or all-bad) folder is not a class, so it cannot shift the labels of the
    folders after it (eval compares the class lists of its two splits).
    """
    out = out or sys.stdout
    candidates = _candidates(root)
    total = sum(len(v) for v in candidates.values())
    good: dict[str, list[str]] = {}
    bad = done = 0
    inside = filelist.RootGuard(root, follow_files=True)  # the reader's own rules, and DALI's
    for folder, rels in candidates.items():
        for rel in rels:
            reason = (filelist.name_problem(rel) or inside.problem(rel)
                      or filelist.image_problem(root / rel))
            if reason is None:
                good.setdefault(folder, []).append(rel)
            else:
                bad += 1
                print(f"bad image: {root / _printable(rel)}: {reason}", file=out)
            done += 1
            if done % 5000 == 0:
                print(f"  checked {done}/{total} in {root}", file=sys.stderr)
    classes = sorted(good)
    skipped = [_printable(c) for c in candidates if c not in good]
    if skipped:
        print(f"{root}: not classes (no good image): {', '.join(skipped)}", file=out)
    entries = [(rel, y) for y, c in enumerate(classes) for rel in good[c]]
    write_file_list(root, entries, classes)
    print(f"{root}: {len(entries)} good, {bad} bad, {len(classes)} classes -> {root / FILELIST}", file=out)
    return bad


def check(path: str | Path, out=None) -> int:
    """Check ROOT, or ROOT/train and ROOT/val when present. Returns the bad count."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: data folder not found")
    max_pixels()  # a bad BT_FAST_MAX_IMAGE_PIXELS stops here, before any list is rewritten
    splits = [path / s for s in ("train", "val") if (path / s).is_dir()]
    return sum(check_folder(r, out) for r in (splits or [path]))


# ------------------------------------------------------------------ Fashion-MNIST


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    _, dtype, ndim = struct.unpack(">HBB", data[:4])
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fmnist_arrays(cache: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    names = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
    if all((FMNIST_SYSTEM_DIR / n).is_file() for pair in names.values() for n in pair):
        src = FMNIST_SYSTEM_DIR
    else:
        try:  # fall back to torchvision's downloader
            from torchvision.datasets import FashionMNIST

            for train in (True, False):
                FashionMNIST(str(cache), train=train, download=True)
            src = cache / "FashionMNIST" / "raw"
        except Exception as e:
            raise DataError(
                "Fashion-MNIST not found: install the Debian package dataset-fashion-mnist "
                f"(make setup does, as root) or allow torchvision to download it ({e})") from None
    return {split: (_read_idx(src / x), _read_idx(src / y)) for split, (x, y) in names.items()}


def _write_split(root: Path, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    for c in classes:
        safeio.make_dir(root / c)
    entries = []
    for i, (img, y) in enumerate(zip(images, labels)):
        rel = f"{classes[y]}/{i:05d}.jpg"
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)  # RGB JPEGs, as the recipe expects
        save_image(img, root / rel, quality=95)
        entries.append((rel, int(y)))
        if (i + 1) % 10000 == 0:
            print(f"  wrote {i + 1}/{len(labels)} images to {root}", file=sys.stderr)
    write_file_list(root, entries, classes)


def prepare_fashion_mnist(out: str | Path) -> Path:
    """Write OUT/train (60,000) and OUT/val (10,000) RGB JPEGs with file lists."""
    out = Path(out)
    if all((out / s / FILELIST).is_file() for s in ("train", "val")):
        print(f"{out}: Fashion-MNIST already prepared", file=sys.stderr)
        if not all(filelist.read(out / s).checked for s in ("train", "val")):
            print(f"{out}: its file lists predate the data-check stamp ({filelist.STAMP}); run "
                  f"`bt-fast data check {out}` once, or every training start checks each "
                  "image header first", file=sys.stderr)
        return out
    arrays = _fmnist_arrays(out / ".download")
    for split, (x, y) in arrays.items():
        _write_split(out / split, x, y, FMNIST_CLASSES)
    print(f"{out}: Fashion-MNIST ready ({len(arrays['train'][1])} train, "
          f"{len(arrays['val'][1])} val)", file=sys.stderr)
    return out


# ------------------------------------------------------------------ synthetic


def synthetic_image(rng: np.random.Generator, label: int, size: tuple[int, int]) -> np.ndarray:
    """A textured HxWx3 uint8 image whose colour and stripe frequency depend on label."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    freq = 0.05 + 0.04 * label
    base = np.array([(37 * label) % 256, (91 * label + 40) % 256, (153 * label + 80) % 256], np.float32)
    stripes = 60 * np.sin(freq * (xx + rng.uniform(0, 50)) + 0.3 * yy)[..., None]
    noise = rng.normal(0, 12, (h, w, 3))
    return np.clip(base + stripes + noise, 0, 255).astype(np.uint8)


def make_synthetic(out: str | Path, *, classes: int = 4, train_per_class: int = 16,
                   val_per_class: int = 4, size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    """A small labelled JPEG ImageFolder (OUT/train, OUT/val) with file lists, for tests."""
    out, rng = Path(out), np.random.default_rng(seed)
    names = [f"class{c}" for c in range(classes)]
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        entries = []
        for y, name in enumerate(names):
            safeio.make_dir(out / split / name)
            for i in range(per_class):
                rel = f"{name}/{i:04d}.jpg"
                save_image(synthetic_image(rng, y, size), out / split / rel, quality=90)
                entries.append((rel, y))
        write_file_list(out / split, entries, names)
    return out


# ------------------------------------------------------------------ dev split


def carve_dev(train_root: str | Path, out: str | Path, n_dev: int) -> tuple[Path, Path]:
    """OUT/train (TRAIN minus its last ``n_dev`` images) and OUT/dev (those images).

    The honest-tuning split: pretrain and fit probes on OUT/train, compare settings on
    OUT/dev, and keep the real val split for the final tables only. "Last" is by file
    name, then path: for Fashion-MNIST (``class/NNNNN.jpg``, NNNNN its index in the
    original training file) that is exactly training images 50,000-59,999 for
    ``n_dev=10000``. Files are hard links (no extra disk), copies across file systems.
    """
    train_root, out = Path(train_root), Path(out)
    paths, labels, classes = read_file_list(train_root)
    if not 0 < n_dev < len(paths):
        raise DataError(f"--dev {n_dev}: must be between 1 and {len(paths) - 1} "
                        f"({train_root} has {len(paths)} images)")
    order = sorted(range(len(paths)), key=lambda i: (Path(paths[i]).name, paths[i]))
    dev = set(order[-n_dev:])
    splits = {"train": [i for i in range(len(paths)) if i not in dev], "dev": sorted(dev)}
    for split, idx in splits.items():
        root = out / split
        for i in idx:  # a re-run with another n_dev replaces each file, never mixes
            safeio.link_or_copy(train_root / paths[i], root / paths[i])
        write_file_list(root, [(paths[i], labels[i]) for i in idx], classes)
    return out / "train", out / "dev"


# ------------------------------------------------------------------ CLI


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="what", required=True, metavar="{fashion-mnist,synthetic,check}")
    p = sub.add_parser("fashion-mnist", help="write Fashion-MNIST as an RGB JPEG ImageFolder")
    p.add_argument("--out", required=True, help="output folder (gets train/ and val/)")
    p.add_argument("--dev", type=int, default=0, metavar="N",
                   help="also write OUT/tune/train and OUT/tune/dev: train minus its last N "
                        "images, and those N, for tuning without touching val (e.g. 10000)")
    p = sub.add_parser("synthetic", help="write a small labelled JPEG set for tests")
    p.add_argument("--out", required=True)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--per-class", type=int, default=16)
    p.add_argument("--size", type=int, nargs=2, default=(48, 40), metavar=("W", "H"))
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("check", help="decode every image, name the bad ones, write the file list")
    p.add_argument("dir", help="ImageFolder root, or a folder with train/ and val/")


FLAG_RANGES = {"classes": Range(lo=1, hi=10_000), "per_class": Range(lo=1, hi=1_000_000),
               "size": Range(lo=1, hi=MAX_SIDE), "seed": Range(lo=0, hi=2**32 - 1), "dev": Range(lo=0)}
"""Valid values of the numeric flags (the Range the config fields declare)."""


def run(args) -> int:
    problem = flag_problem(args, FLAG_RANGES)
    if problem:
        raise UsageError(problem)
    if args.what == "fashion-mnist":
        prepare_fashion_mnist(args.out)
        if args.dev:
            train, dev = carve_dev(Path(args.out) / "train", Path(args.out) / "tune", args.dev)
            print(f"tuning split: {train} (pretrain + probe training), {dev} (decisions)",
                  file=sys.stderr)
    elif args.what == "synthetic":
        make_synthetic(args.out, classes=args.classes, train_per_class=args.per_class,
                       val_per_class=max(1, args.per_class // 4), size=tuple(args.size), seed=args.seed)
        print(f"{args.out}: synthetic dataset ready")
    else:
        return 1 if check(args.dir) else 0
    return 0
