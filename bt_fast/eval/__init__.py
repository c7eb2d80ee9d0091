"""``bt-fast eval {knn,linear,semi} --checkpoint PATH [--random-init] [--json]``.

Three standard SSL evaluations of a pretrained backbone (projector dropped):

    bt-fast eval knn    --checkpoint runs/fmnist/checkpoints/last.pt       # k=20, 200; T=0.07
    bt-fast eval linear --checkpoint runs/fmnist/checkpoints/last.pt       # frozen + linear
    bt-fast eval semi   --checkpoint runs/fmnist/checkpoints/last.pt --percent 10

Add ``--random-init`` for the baseline: the same backbone (same config) at a seeded
random init; add ``--pixels`` (knn and linear) for the other baseline: the normalised
pixels themselves as features (``--config PATH`` instead of a checkpoint works too), so
every table has three rows. Data defaults to the checkpoint config's data.train_dir / data.val_dir
(override with --train-dir / --val-dir); any ImageFolder pair with file lists works.
Each prints a short table; ``--json`` prints one JSON object instead
(``{"protocol", "top1", "top5", "checkpoint", ...}``). Progress goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from bt_fast.eval.features import (EvalError, ImageList, Prep, bf16_default, default_cache_dir,
                                   eval_transform, extract, load_backbone, module_device, split_features,
                                   stderr_log)
from bt_fast.eval.bank import subset_indices
from bt_fast.eval.knn import knn_accuracy
from bt_fast.eval.linear import linear_probe
from bt_fast.eval.pixels import load_pixels
from bt_fast.eval.readout import apply_readout
from bt_fast.eval.semi import balanced_subset, finetune
from bt_fast.eval.splits import check_splits
from bt_fast.pipelines.bounds import Range, flag_problem

__all__ = ["add_arguments", "run", "knn_eval", "knn_accuracy", "linear_probe", "balanced_subset",
           "finetune", "load_backbone", "split_features"]


def knn_eval(backbone, cfg, *, train_dir: str | None = None, val_dir: str | None = None,
             ks=(20, 200), temperature: float = 0.07, workers: int = 1, precision: str = "auto",
             log=None) -> dict[int, dict[str, float]]:
    """Weighted-kNN {k: {"top1", "top5"}} of a live backbone (e.g. inside the trainer).

    Uses cfg.data.train_dir / val_dir unless given; no cache (the weights are changing).
    The backbone is put back in the train/eval mode it was in.
    """
    was_training = backbone.training
    bf16 = bf16_default(precision)
    feats = []
    train_dir, val_dir = train_dir or cfg.data.train_dir, val_dir or cfg.data.val_dir
    check_splits(train_dir, val_dir)  # memoised: the trainer asks at every eval
    try:
        for root in (train_dir, val_dir):
            dataset = ImageList(root, eval_transform(cfg))
            feats += extract(backbone, dataset, Prep(cfg, module_device(backbone)), workers=workers,
                             bf16=bf16, log=log)
    finally:
        backbone.train(was_training)
    return knn_accuracy(*feats, ks=tuple(ks), temperature=temperature)


def _common(p) -> None:
    p.add_argument("--checkpoint", help="bt_fast checkpoint (RUN_DIR/checkpoints/last.pt); required "
                   "except with --pixels --config")
    p.add_argument("--random-init", action="store_true",
                   help="baseline: same backbone as the checkpoint's config, seeded random init")
    p.add_argument("--seed", type=int, default=0, help="random-init, subset and SGD seed (default 0)")
    p.add_argument("--train-dir", help="ImageFolder root with filelist.txt (default: config data.train_dir)")
    p.add_argument("--val-dir", help="ImageFolder root with filelist.txt (default: config data.val_dir)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="DataLoader worker processes (default: half the cores)")
    p.add_argument("--extract-batch", type=int, default=512, help="feature-extraction batch (default 512)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="autocast dtype; auto = bf16 where the CPU supports it natively")
    p.add_argument("--cache-dir", help="feature cache folder (default RUN_DIR/eval-cache)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--readout", help="features the probe reads, e.g. layer4:1 (global pool of the "
                                     "last stage) or layer2:7; default: the config's model.readout")


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="protocol", required=True, metavar="{knn,linear,semi}")
    p = sub.add_parser("knn", help="weighted kNN on frozen, L2-normalised features")
    _common(p)
    p.add_argument("--k", type=int, nargs="+", default=[20, 200], help="neighbours (default 20 200)")
    p.add_argument("--temperature", type=float, default=0.07, help="weight exp(sim/T) (default 0.07)")
    p.add_argument("--bank", type=int, default=0, metavar="N",
                   help="use a seeded subset of N train images as the bank (default: all); the "
                        "same subset the trainer's monitor uses (eval.bank) at the same --seed 0")
    p.add_argument("--query", type=int, default=0, metavar="M",
                   help="score a seeded subset of M val images (default: all), as eval.query does")
    _pixels_arguments(p)
    p = sub.add_parser("linear", help="linear probe on frozen features (official protocol, cached features)")
    _common(p)
    p.add_argument("--epochs", type=int, default=100, help="default 100 (official)")
    p.add_argument("--batch-size", type=int, default=256, help="default 256 (official)")
    p.add_argument("--lr", type=float, default=0.1, help="classifier lr, cosine to 0 (default 0.1, official)")
    p.add_argument("--weight-decay", type=float, default=1e-6, help="default 1e-6 (official)")
    _pixels_arguments(p)
    p = sub.add_parser("semi", help="fine-tune backbone + classifier on a balanced 1%%/10%% subset")
    _common(p)
    p.add_argument("--percent", type=float, required=True, metavar="{1,10}",
                   help="labelled fraction of train: 1 or 10")
    p.add_argument("--epochs", type=int, default=20, help="default 20 (official)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="default 256, reduced to keep >= 10 steps/epoch; lrs scale with it")
    p.add_argument("--lr-backbone", type=float, default=0.002, help="per 256 images (default 0.002)")
    p.add_argument("--lr-classifier", type=float, default=0.5, help="per 256 images (default 0.5)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="default 0 (official)")


def _pixels_arguments(p) -> None:
    p.add_argument("--pixels", action="store_true",
                   help="baseline: the normalised pixels themselves as features (same splits, "
                        "transform and protocol; data settings from --checkpoint or --config)")
    p.add_argument("--config", help="with --pixels and no --checkpoint: the recipe whose data "
                                    "dirs, image size and normalisation to use")


FLAG_RANGES = {"k": Range(lo=1), "temperature": Range(lo=0, lo_open=True), "epochs": Range(lo=1),
               "batch_size": Range(lo=1), "extract_batch": Range(lo=1), "workers": Range(lo=0, hi=1024),
               "seed": Range(lo=0, hi=2**32 - 1), "lr": Range(lo=0), "lr_backbone": Range(lo=0),
               "lr_classifier": Range(lo=0), "weight_decay": Range(lo=0)}
"""Valid values of the numeric flags (the same Range the config fields declare)."""


def check_flags(args) -> None:
    """EvalError naming the first numeric flag outside its range (``--k 0``, ``--epochs -1``,
    ``--batch-size 0``, ``--percent 0``, NaN), before any data is read."""
    problem = flag_problem(args, FLAG_RANGES)
    if problem:
        raise EvalError(problem)
    if getattr(args, "percent", None) is not None and args.percent not in (1.0, 10.0):
        raise EvalError(f"--percent {args.percent:g}: choose 1 or 10 (the official label fractions)")


def _load(args):
    """The weights to evaluate: the checkpoint's backbone, its random init, or the pixels."""
    pixels = getattr(args, "pixels", False)
    if pixels and args.random_init:
        raise EvalError("--pixels and --random-init exclude each other (pixels have no weights)")
    if pixels:
        return load_pixels(args.checkpoint, getattr(args, "config", None))
    if getattr(args, "config", None):
        raise EvalError("--config only goes with --pixels; a backbone's config is in its checkpoint")
    if not args.checkpoint:
        raise EvalError(f"eval {args.protocol}: --checkpoint is required")
    loaded = load_backbone(args.checkpoint, random_init=args.random_init, seed=args.seed)
    return apply_readout(loaded, args.readout)  # what the probes read: model.readout or --readout


def _dirs(args, loaded) -> tuple[str, str]:
    train = args.train_dir or loaded.cfg.data.train_dir
    val = args.val_dir or loaded.cfg.data.val_dir
    for name, d in (("train", train), ("val", val)):
        if not d:
            raise EvalError(f"no {name} data: the checkpoint's config has no data.{name}_dir; "
                            f"pass --{name}-dir")
        if not Path(d, "filelist.txt").is_file():
            raise EvalError(f"{name} dir {d}: no filelist.txt (prepare it with `bt-fast data ...`, "
                            f"or pass --{name}-dir)")
    check_splits(train, val)  # same folder, other classes or shared images: refused
    return train, val


def _features(args, loaded, train_dir, val_dir, log):
    # Pixel features are never cached (see eval/pixels.py: cheap to decode, huge on disk).
    pixels = loaded.fingerprint == "pixels"
    cache = None if args.no_cache or pixels else Path(args.cache_dir or default_cache_dir(args.checkpoint))
    kw = dict(cache_dir=cache, batch_size=args.extract_batch, workers=args.workers,
              bf16=bf16_default(args.precision), log=log)
    subsets = [_subset(root, getattr(args, flag, 0), flag, args.seed, log)
               for root, flag in ((train_dir, "bank"), (val_dir, "query"))]
    return (split_features(loaded, train_dir, indices=subsets[0], **kw)
            + split_features(loaded, val_dir, indices=subsets[1], **kw))


def _subset(root, size: int, flag: str, seed: int, log) -> list[int] | None:
    """--bank / --query: the seeded subset the monitor uses (eval/bank.py); clamped."""
    if size < 0:
        raise EvalError(f"--{flag} {size}: must be >= 0 (0 = the whole split)")
    n = len(ImageList(root, None)) if size else 0
    if size > n > 0:
        print(f"eval: --{flag} {size} is more than the {n} images of {root}: using all of them",
              file=sys.stderr)
    return subset_indices(n, size, seed) if size else None


def _knn(args, loaded, train_dir, val_dir, log) -> tuple[dict, dict]:
    if any(k < 1 for k in args.k) or args.temperature <= 0:
        raise EvalError("--k must be >= 1 and --temperature > 0")
    tr_x, tr_y, va_x, va_y = _features(args, loaded, train_dir, val_dir, log)
    by_k = knn_accuracy(tr_x, tr_y, va_x, va_y, ks=tuple(args.k), temperature=args.temperature)
    return by_k[args.k[0]], {"n_train": len(tr_y), "n_val": len(va_y), "k": args.k[0],
                             "temperature": args.temperature,
                             "by_k": {str(k): v for k, v in by_k.items()}}


def _linear(args, loaded, train_dir, val_dir, log) -> tuple[dict, dict]:
    tr_x, tr_y, va_x, va_y = _features(args, loaded, train_dir, val_dir, log)
    acc = linear_probe(tr_x, tr_y, va_x, va_y, epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, weight_decay=args.weight_decay, seed=args.seed, log=log)
    return acc, {"n_train": len(tr_y), "n_val": len(va_y), "epochs": args.epochs,
                 "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
                 "train_top1": acc["train_top1"]}


def _semi(args, loaded, train_dir, val_dir, log) -> tuple[dict, dict]:
    r = finetune(loaded, train_dir, val_dir, percent=args.percent, seed=args.seed,
                 epochs=args.epochs, batch_size=args.batch_size, lr_backbone=args.lr_backbone,
                 lr_classifier=args.lr_classifier, weight_decay=args.weight_decay,
                 workers=args.workers, bf16=bf16_default(args.precision), log=log)
    return r, {k: v for k, v in r.items() if k not in ("top1", "top5")}


def run(args) -> int:
    t0 = time.perf_counter()
    log = None if args.quiet or args.json else stderr_log
    protocol = {"knn": _knn, "linear": _linear, "semi": _semi}[args.protocol]
    check_flags(args)
    loaded = _load(args)
    train_dir, val_dir = _dirs(args, loaded)
    acc, extra = protocol(args, loaded, train_dir, val_dir, log)
    init = "pixels" if loaded.fingerprint == "pixels" else "random" if args.random_init else "pretrained"
    result = {
        "protocol": args.protocol if args.protocol != "semi" else f"semi{args.percent:g}",
        "top1": round(acc["top1"], 2), "top5": round(acc["top5"], 2),
        "checkpoint": args.checkpoint or loaded.checkpoint, "step": loaded.step,
        "init": init, "seed": args.seed,
        "backbone": "pixels" if init == "pixels" else f"{loaded.cfg.model.backbone} width {loaded.cfg.model.width}",
        "feature_dim": loaded.feature_dim, "train_dir": train_dir, "val_dir": val_dir,
        "precision": "bf16" if bf16_default(args.precision) else "fp32",
        **extra, "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def format_table(r: dict) -> str:
    """A few lines: what was evaluated, then one row per result."""
    step = f" step {r['step']}" if r.get("step") is not None else ""
    head = (f"{r['protocol']} | {r['init']} {r['backbone']} ({r['feature_dim']}-d) | "
            f"{r['checkpoint']}{step} | {r['seconds']:.0f}s")
    if r["protocol"] == "knn":
        rows = [f"  k={k:<4} T={r['temperature']:<5g} top1 {v['top1']:6.2f}  top5 {v['top5']:6.2f}"
                for k, v in r["by_k"].items()]
    elif r["protocol"] == "linear":
        rows = [f"  linear {r['epochs']} ep    top1 {r['top1']:6.2f}  top5 {r['top5']:6.2f}"
                f"  (train top1 {r['train_top1']:.2f})"]
    else:
        rows = [f"  {r['percent']:g}% = {r['n_subset']} imgs, {r['epochs']} ep  "
                f"top1 {r['top1']:6.2f}  top5 {r['top5']:6.2f}"]
    return "\n".join([head, *rows])

