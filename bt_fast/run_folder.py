"""What a training run does with its folder: claims it, resumes from it, records its config.

``claim``: global rank 0 takes the folder's lock (one trainer per folder,
bt_fast.runlock), checks it is writable and removes dead writers' temp files, and
every rank learns the outcome. ``resume``: a checkpoint whose layout
``bt_fast.checkpoint_schema`` passed is loaded into this config's model, optimizer,
scaler and RNG, or refused in one line naming the part that does not fit; ``resume_run``
adds the trainer's checks (same method, this rank's method state, changed schedule).
``save_config``: RUN_DIR/config.yaml through the write gate, never over an input.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bt_fast import checkpoint, config, dist, errors, runlock
from bt_fast.checkpoint_schema import check_optimizer
from bt_fast.errors import ResumeError, UserError


def resume(ckpt: dict, last: Path, model, optimizer, scaler, env: dist.Env) -> tuple:
    """Load a checkpoint (already checked by bt_fast.checkpoint_schema for its layout)
    into the model, optimizer, scaler and RNG: (step, this rank's pipeline state, data
    entries). What does not fit this config is one ResumeError line naming the part."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ResumeError(f"{last}: its weights do not fit this config's model "
                          f"({str(e).strip().splitlines()[0]})") from None
    misfit = check_optimizer(ckpt["optimizer"], optimizer)
    if misfit:
        raise ResumeError(f"{last}: its optimizer state does not fit this config's model ({misfit})")
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler.is_enabled() and ckpt["scaler"]:
        try:
            scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, TypeError, RuntimeError) as e:
            raise ResumeError(f"{last}: its GradScaler state does not load ({type(e).__name__}: {e})") from None
    try:
        checkpoint.set_rng_state(dist.rank_state(ckpt, "rng", last, env))
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:  # sizes/values the schema cannot see
        raise ResumeError(f"{last}: its RNG state does not load ({type(e).__name__}: {e})") from None
    return ckpt["step"], dist.rank_state(ckpt, "pipeline", last, env), ckpt.get("data_entries")


def resume_run(ckpt: dict, last: Path, cfg: config.Config, model, optimizer, scaler,
               env: dist.Env) -> tuple:
    """``resume`` for the trainer: also refuses another method's checkpoint, loads this
    rank's method state (SwAV's queue) and says what it resumed and what changed."""
    trained = ckpt.get("config", {}).get("method", {}).get("name", cfg.method.name)
    if trained != cfg.method.name:
        raise ResumeError(f"{last}: trained with method.name={trained!r}, this config says "
                          f"{cfg.method.name!r}; a new train.run_dir starts a new run")
    out = resume(ckpt, last, model, optimizer, scaler, env)
    own = dist.rank_state(ckpt, "method_state", last, env) if ckpt.get("method_state") else None
    misfit = model.load_rank_state(own, env.device)
    if env.is_main:
        print(f"resuming from {last} at step {out[0]}", file=sys.stderr)
        warn_schedule_changes(ckpt["config"], cfg)
        if misfit:
            print(f"warning: {last}: {misfit}", file=sys.stderr)
    return out


def warn_schedule_changes(saved: dict, cfg: config.Config) -> None:
    """Resuming with other optim settings or batch size silently bends the lr schedule."""
    now = config.to_dict(cfg)
    optim_saved, data_saved = saved.get("optim") or {}, saved.get("data") or {}  # older layouts: partial
    changed = [f"optim.{k}: {v} -> {now['optim'].get(k)}" for k, v in dict(optim_saved).items()
               if now["optim"].get(k) != v]
    if data_saved.get("batch_size", cfg.data.batch_size) != cfg.data.batch_size:
        changed.append(f"data.batch_size: {data_saved['batch_size']} -> {cfg.data.batch_size}")
    if changed:
        print(f"warning: resuming with a changed schedule ({'; '.join(changed)})", file=sys.stderr)


def claim(run_dir: Path, env: dist.Env) -> "runlock.RunLock | None":
    """Rank 0 locks the run folder (one trainer per folder, bt_fast.runlock), checks it is
    writable and removes dead writers' temp files; every rank learns the outcome, so a
    refusal is the same one line on all of them, never a rank waiting at a collective."""
    lock, refusal = None, None
    if env.is_main:
        try:
            lock = runlock.acquire(run_dir)
            checkpoint.prepare(run_dir)  # writable? temp files of dead writers removed
        except UserError as e:
            refusal = (type(e).__name__, str(e))
    outcomes = dist.gather_per_rank(refusal)  # one all-gather at start; a world of one: none
    if outcomes[0] is not None:
        if lock is not None:
            lock.release()
        name, message = outcomes[0]
        raise getattr(errors, name, UserError)(message)
    return lock


def save_config(cfg: config.Config, path: Path, inputs) -> None:
    """RUN_DIR/config.yaml, the resolved config. When it is this command's own --config
    (resuming from the saved recipe), an unchanged one is left as it is and a changed
    one (--set, --overlay) is refused by the write gate: a run never edits its input."""
    try:
        if path.is_file() and not path.is_symlink() and path.read_text(encoding="utf-8") == config.dump(cfg):
            return
    except (OSError, UnicodeDecodeError):
        pass  # unreadable: the gate below decides
    config.save(cfg, path, inputs=inputs)
