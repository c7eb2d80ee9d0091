"""The reference lines of the monitor's curve: kNN of the same bank and query with the
same backbone at random init, and with the raw pixels as features.

A representation is worth something only above both (on Fashion-MNIST the pixels score
~85 % and random conv features are close behind), so the dashboard and ``bt-fast report``
draw them under the curve. They depend on the data, the subsets, the model config, the
readouts and the precision, not on training: computed once (at a run's first monitor,
about one monitor's cost) and cached as JSON under ``$XDG_CACHE_HOME/bt_fast/baselines``
(default ``~/.cache``; written through bt_fast.safeio), keyed by all of those. The random init is eval's
(``bt-fast eval knn --random-init --seed 0``: torch.manual_seed(0), then the backbone),
built inside ``fork_rng`` so the run's own RNG stream does not move.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from bt_fast import safeio
from bt_fast.backbone import build_backbone
from bt_fast.errors import UserError
from bt_fast.eval import bank
from bt_fast.eval.pixels import Pixels

PIXELS_MAX_DIM = 16384
"""Above this (e.g. 224 px: 150,528-d) the pixel bank would take GBs: that line is skipped."""


def cache_dir() -> Path:
    return safeio.cache_home() / "baselines"


def _list_id(root: str) -> list:
    st = Path(root, "filelist.txt").stat()
    return [str(Path(root).resolve()), st.st_size, st.st_mtime_ns]


def key(cfg, readouts: list[str]) -> str:
    """Hash of everything the baselines depend on."""
    view = cfg.views[0]
    parts = {"v": 1, "train": _list_id(cfg.data.train_dir), "val": _list_id(cfg.data.val_dir),
             "bank": cfg.eval.bank, "query": cfg.eval.query, "model": vars(cfg.model),
             "readouts": readouts, "size": cfg.data.image_size, "mean": view.mean, "std": view.std,
             "bf16": bank.bf16_default("auto")}
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Failed(Exception):
    """The baselines could not be computed on some rank (raised on every rank alike)."""


def local_features(mon) -> dict:
    """This rank's shards of the bank and query at random init (every readout) and, where
    small enough, as raw pixels: {readout or "pixels": [bank_x, bank_y, query_x, query_y]}."""
    cfg = mon.cfg
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net, _ = build_backbone(cfg.model)
    out = mon.features(net.to(mon.env.device), mon.readouts)
    dim = len(cfg.views[0].mean) * cfg.data.image_size ** 2
    if dim <= PIXELS_MAX_DIM:
        out.update(mon.features(Pixels(), ["pixels"], flat_dim=dim))
    return out


def compute(mon) -> dict:
    """{baseline_knn_top1_random_init[_<readout>], baseline_knn_top1_pixels} for ``mon``'s
    bank and query (every rank featurises its shard; the result is the same everywhere)."""
    local, why = mon.all_ok(lambda: local_features(mon))
    if why is not None:
        raise Failed(f"baselines: {why}")
    out, why = mon.all_ok(lambda: _score(mon, mon.gather(local)))
    if why is not None:
        raise Failed(f"baselines: {why}")
    return out


def _score(mon, feats: dict) -> dict:
    out = {}
    for i, readout in enumerate(mon.readouts):
        suffix = "" if i == 0 else f"_{readout}"
        out[f"baseline_knn_top1_random_init{suffix}"] = bank.knn_top1(*feats[readout])
    if "pixels" in feats:
        out["baseline_knn_top1_pixels"] = bank.knn_top1(*feats["pixels"])
    return out


def get(mon) -> dict:
    """The cached baselines of ``mon``'s setting, computed and cached when absent."""
    path = cache_dir() / f"{key(mon.cfg, mon.readouts)}.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        cached = None
    if not (isinstance(cached, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                             for v in cached.values())):
        cached = None  # not ours (edited, another version's): computed again, never trusted
    if mon.agree(cached is not None):  # every rank read it: else all compute (collectives)
        return cached
    values = compute(mon)
    if mon.env.is_main:
        try:  # atomic, never through a link: a concurrent run never reads half a file
            safeio.write_atomic(path, json.dumps(values), durable=False)
        except UserError as e:
            print(f"monitor: baselines not cached ({e}); computed again next run", flush=True, file=sys.stderr)
    return values
