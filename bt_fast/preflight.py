"""Check a torchrun launch before any worker starts: ``python -m bt_fast.preflight``.

torchrun restarts a failed worker group up to ``--max-restarts`` times whatever the
exit code (torch.distributed.elastic has no "do not retry" code), so a configuration
error inside the workers would fail 1 + max_restarts times, each after a full start.
``scripts/train.sh`` runs this first, with the trainer's own arguments and every world
size torchrun may pick (NODES may be MIN:MAX), and starts torchrun only if it passes:

    python -m bt_fast.preflight --world-sizes 8 16 -- --config configs/imagenet.yaml --set k=v

It checks what is known before the workers start and cheap to know: the config
(keys, types, values), the global batch against each world size, the file list (it
exists, parses, holds a batch per rank), that the run folder is writable, and the
gradient compression against each world size and the run's length (PowerSGD on one
rank, a start step past the end, error feedback saved by another world size). A failure
is one line and exit 2, as ``bt-fast train`` would print it.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bt_fast import checkpoint, config, gradcomm, runlock, train
from bt_fast.errors import ResumeError, RunLockedError, way_out
from bt_fast.pipelines import filelist
from bt_fast.pipelines.loader import batches_per_epoch


def check(cfg: config.Config, world_sizes: list[int], run_id: str = "") -> None:
    """Raise the UserError ``bt-fast train`` would raise for this config and these sizes.

    ``run_id``: this launch's rendezvous id; a run folder locked by a live trainer of
    another job is refused here (torchrun would otherwise retry the refusal), one locked
    by this job's own rank 0 is a node joining it and passes.
    """
    config.validate(cfg)
    train.check_data(cfg, world_sizes)
    if cfg.data.reader == "folder":
        images = len(filelist.read(cfg.data.train_dir))  # SourceError if missing or malformed
        for w in world_sizes:
            steps = batches_per_epoch(images, w, cfg.data.batch_size // w, where=cfg.data.train_dir)
            total = max(1, round(cfg.optim.epochs * steps))  # as train.setup counts them
            last = min(total, cfg.train.max_steps) if cfg.train.max_steps > 0 else total
            gradcomm.check_run(cfg, w, round(cfg.optim.warmup_epochs * steps), last)
    else:  # no image count without reading the shards: the world size alone
        for w in world_sizes:
            gradcomm.check_run(cfg, w, 0, sys.maxsize)
    check_resume(cfg, world_sizes)
    # Writable? Temp files stay: a node joining a running elastic job must not touch them.
    checkpoint.prepare(cfg.train.run_dir, clean=False)
    holder = runlock.holder(cfg.train.run_dir)
    if holder is not None and not (run_id and holder.job == run_id):
        raise RunLockedError(f"run folder {cfg.train.run_dir} is in use by another bt-fast train, "
                             f"{holder}: wait for it to finish, stop it, or set another train.run_dir")


def check_resume(cfg: config.Config, world_sizes: list[int]) -> None:
    """A checkpoint whose PowerSGD error feedback was written by another world size, or
    whose per-rank files are gone, cannot resume (each rank's buffer is its own); read
    through mmap, so cheap."""
    path = checkpoint.latest(cfg.train.run_dir)
    if path is None or cfg.dist.grad_compression != "powersgd":
        return
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        saved, step = ckpt.get("grad_comm"), ckpt["step"]
    except Exception:  # noqa: BLE001 - unreadable: the trainer falls back to prev.pt and says so
        return
    if not saved:
        return
    if saved["world_size"] not in world_sizes:
        raise ResumeError(f"{path}: its PowerSGD state (error feedback) is from {saved['world_size']} "
                          f"rank(s), this launch has {' or '.join(map(str, world_sizes))}; start a new "
                          "train.run_dir or launch that many ranks")
    missing = [r for r in range(saved["world_size"])
               if not checkpoint.rank_file(cfg.train.run_dir, "feedback", step, r).is_file()]
    if missing:
        raise ResumeError(f"{path}: the PowerSGD error feedback of rank(s) {', '.join(map(str, missing))} for "
                          f"step {step} is missing from {checkpoint.checkpoint_dir(cfg.train.run_dir) / 'feedback'}: "
                          "copy the whole checkpoints folder, or set dist.grad_compression to none or bf16 "
                          "to resume without it")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, train_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m bt_fast.preflight", description=__doc__.splitlines()[0])
    p.add_argument("--world-sizes", type=int, nargs="+", required=True, metavar="N")
    p.add_argument("--run-id", default="", help="the torchrun rendezvous id (a node joining its own job passes)")
    ours = p.parse_args(ours)
    t = argparse.ArgumentParser(prog="bt-fast train")
    train.add_arguments(t)  # the trainer's own flags, parsed the same way
    args = t.parse_args(train_argv)
    try:
        overlays = [s for path in args.overlay for s in config.read_overlay(path)]
        check(config.load(args.config, overlays + args.set), ours.world_sizes, ours.run_id)
    except Exception as e:  # noqa: BLE001 - user-caused: one line and its code; a bug re-raises
        return way_out("train", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
