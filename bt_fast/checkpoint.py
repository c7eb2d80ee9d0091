"""Atomic checkpoints that resume exactly, and survive a bad copy or a full disk.

A checkpoint is a plain dict loadable with ``torch.load(weights_only=True)``:
model (unwrapped state_dict), optimizer, scaler, step, rng (per rank: torch CPU, this
rank's CUDA device and Python states), pipeline (per rank: the data loader's state),
data_entries (hashes of the file list's entries, see ``FileList.entry_hashes``) and
config (the resolved config as plain data).

Writing (``save``): a temp file in the same folder is written and fsynced, the current
``last.pt`` is kept as ``prev.pt`` (a hard link, so ``last.pt`` never disappears), and
the temp file is renamed over ``last.pt``. A killed run therefore leaves the old or the
new checkpoint, never a torn one; a full disk leaves the previous checkpoint and no
temp file; a ``last.pt`` that no longer loads (a copy gone wrong) falls back to
``prev.pt`` with a warning (``load_latest``). Temp files of killed runs are removed
when the next run starts (``prepare``), and only theirs: a temp file carries its
writer's host and PID (bt_fast.safeio, the one gate every written file goes through).
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Optional

import torch

from bt_fast import runlock, safeio
from bt_fast.checkpoint_schema import WRAPPERS, problems, strip_wrappers  # noqa: F401 (re-exported)
from bt_fast.errors import CheckpointError, DiskFullError, RunDirError, WriteError

LAST, PREV = "last.pt", "prev.pt"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


# ------------------------------------------------------------------ RNG


def rng_state() -> dict:
    """This process's RNG states. On a GPU only this rank's device: every rank saves
    its own, and another rank's device state is neither ours to restore nor cheap."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible device
            cuda = cuda[torch.cuda.current_device()]
        torch.cuda.set_rng_state(cuda)


# ------------------------------------------------------------------ writing


def prepare(run_dir: str | Path, clean: bool = True) -> Path:
    """Create (or check) the checkpoint folder and remove temp files of dead writers.

    Called by the one process that writes checkpoints, before training (it holds the run
    folder's lock, bt_fast.runlock). Only temp files whose writer is gone are removed
    (``safeio.remove_stale_temps``: no such PID on this host), so even a start beside a
    live writer deletes nothing of it; ``clean=False`` for checks that only probe (the
    preflight). An unwritable run folder is one line (RunDirError) here rather than a
    traceback at the first checkpoint.
    """
    ckdir = checkpoint_dir(runlock.check_run_dir(run_dir))
    try:
        safeio.make_dir(ckdir)
        probe = safeio.write_atomic(ckdir / f".write-test.{os.getpid()}", b"", durable=False, sweep=False)
        probe.unlink(missing_ok=True)
    except (OSError, WriteError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise RunDirError(f"run folder {run_dir} is not writable ({reason}): "
                          "set train.run_dir to a folder you can write") from None
    # A link or folder planted where the run writes is refused now, before any step is
    # trained, not at the first checkpoint (the write gate would refuse it there too).
    for target in (ckdir / LAST, ckdir / PREV, Path(run_dir) / "config.yaml", Path(run_dir) / "metrics.jsonl"):
        safeio.check_target(target)
    if not clean:
        return ckdir
    stale = safeio.remove_stale_temps(ckdir)
    stale += safeio.remove_stale_temps(ckdir / "feedback")  # per-rank files (save_rank_file)
    if stale:
        print(f"removed {len(stale)} temp file(s) of an interrupted checkpoint write in {ckdir}",
              file=sys.stderr)
    return ckdir


def save_atomic(obj: dict, path: str | Path, keep_previous: bool = False) -> None:
    """torch.save through the write gate (temp file, fsync, rename, fsync); with
    ``keep_previous`` the current file is kept as prev.pt just before the rename.

    On any error the temp file is removed; a full disk becomes DiskFullError naming
    what survived.
    """
    path = Path(path)
    keep = (lambda p: safeio.keep_previous(p, p.with_name(PREV))) if keep_previous else None
    try:
        safeio.write_atomic(path, lambda f: torch.save(obj, f), before_replace=keep)
    except DiskFullError:
        raise DiskFullError(f"disk full while writing {path}; {_survivor(path)}") from None


def _survivor(path: Path) -> str:
    for p in (path, path.with_name(PREV)):
        try:
            step = torch.load(p, map_location="cpu", weights_only=True, mmap=True)["step"]
            return f"the previous checkpoint at step {step} is intact ({p})"
        except Exception:  # noqa: BLE001 - absent or unreadable: try the next
            continue
    return "there is no earlier checkpoint"


def save(obj: dict, run_dir: str | Path) -> Path:
    """Write RUN_DIR/checkpoints/last.pt atomically, keeping the previous one as prev.pt."""
    path = checkpoint_dir(run_dir) / LAST
    save_atomic(obj, path, keep_previous=True)
    return path


def rank_file(run_dir: str | Path, kind: str, step: int, rank: int) -> Path:
    return checkpoint_dir(run_dir) / kind / f"step{step:09d}.rank{rank:05d}.pt"


def save_rank_file(obj: dict, run_dir: str | Path, kind: str, step: int, rank: int, keep: int = 3) -> Path:
    """One rank's own state at ``step`` (e.g. PowerSGD's error feedback), written atomically
    by that rank, beside last.pt; files of all but the ``keep`` newest steps are removed.

    Written before last.pt names ``step``, so the files of the steps last.pt and prev.pt
    name are always among the three newest, whenever a kill comes.
    """
    path = rank_file(run_dir, kind, step, rank)
    save_atomic(obj, path)
    mine = sorted(path.parent.glob(f"step*.rank{rank:05d}.pt"))
    for old in mine[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_rank_file(run_dir: str | Path, kind: str, step: int, rank: int) -> dict:
    """What ``save_rank_file`` wrote; CheckpointError naming the file if it is absent or torn."""
    return load(rank_file(run_dir, kind, step, rank), need=None)


# ------------------------------------------------------------------ reading


def load(path: str | Path, map_location="cpu", need: str | None = "weights") -> dict:
    """Load a checkpoint with weights_only=True and check it holds what ``need`` asks
    ("weights": eval/export; "resume": train; bt_fast.checkpoint_schema; None: any dict,
    for a rank's own side file): CheckpointError, one line naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a torn or foreign file
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: not a readable bt_fast checkpoint ({type(e).__name__}: {first})") from None
    found = problems(ckpt, need) if need else [] if isinstance(ckpt, dict) else [f"a {type(ckpt).__name__}, not a dict"]
    if found:
        what = "resume from" if need == "resume" else "read the weights of"
        raise CheckpointError(f"{path}: not a bt_fast checkpoint this command can {what}: {found[0]}"
                              + (f" (and {len(found) - 1} more problem(s))" if len(found) > 1 else ""))
    return ckpt


def load_latest(run_dir: str | Path) -> Optional[tuple[dict, Path]]:
    """(checkpoint, path) to resume from: last.pt, else prev.pt with a warning; None if
    the run has none. CheckpointError when neither loads."""
    ckdir = checkpoint_dir(run_dir)
    last, prev = ckdir / LAST, ckdir / PREV
    if not last.is_file() and not prev.is_file():
        return None
    try:
        return load(last, need="resume"), last
    except CheckpointError as e:
        if not prev.is_file():
            raise CheckpointError(f"{e}; no {PREV} to fall back to: move {last} away to start over") from None
        try:
            ckpt = load(prev, need="resume")
        except CheckpointError as e2:
            raise CheckpointError(f"neither checkpoint loads: {e}; {e2}") from None
        print(f"warning: {e}; resuming from the previous checkpoint {prev} (step {ckpt['step']})",
              file=sys.stderr)
        return ckpt, prev


def latest(run_dir: str | Path) -> Optional[Path]:
    """RUN_DIR/checkpoints/last.pt (or prev.pt) if present; does not load it."""
    for name in (LAST, PREV):
        path = checkpoint_dir(run_dir) / name
        if path.is_file():
            return path
    return None
