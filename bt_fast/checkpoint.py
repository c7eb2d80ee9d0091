"""Atomic checkpoints that resume exactly.

A checkpoint is a plain dict loadable with ``torch.load(weights_only=True)``:
model (unwrapped state_dict), optimizer, scaler, step, rng (torch CPU/CUDA and Python
states), pipeline (the data loader's state: position inside the epoch) and config (the
resolved config as plain data). It is written to a temp file in the same folder,
fsynced, then renamed over ``last.pt``, so a killed run leaves either the old or the
new checkpoint, never a torn one.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Optional

import torch

LAST = "last.pt"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: dict, path: str | Path) -> None:
    """torch.save to a temp file, fsync, rename, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint with weights_only=True; a clear error if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"{path}: not a readable bt_fast checkpoint ({type(e).__name__}: {e})") from None
    missing = {"model", "step", "config"} - set(ckpt)
    if missing:
        raise RuntimeError(f"{path}: not a bt_fast checkpoint (missing {sorted(missing)})")
    return ckpt


def latest(run_dir: str | Path) -> Optional[Path]:
    path = checkpoint_dir(run_dir) / LAST
    return path if path.is_file() else None
