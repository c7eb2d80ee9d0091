"""Check a torchrun launch before any worker starts: ``python -m bt_fast.preflight``.

torchrun restarts a failed worker group up to ``--max-restarts`` times whatever the
exit code (torch.distributed.elastic has no "do not retry" code), so a configuration
error inside the workers would fail 1 + max_restarts times, each after a full start.
``scripts/train.sh`` runs this first, with the trainer's own arguments and every world
size torchrun may pick (NODES may be MIN:MAX), and starts torchrun only if it passes:

    python -m bt_fast.preflight --world-sizes 8 16 -- --config configs/imagenet.yaml --set k=v

It checks what is known before the workers start and cheap to know: the config
(keys, types, values), the global batch against each world size, the file list (it
exists, parses, holds a batch per rank) and that the run folder is writable. A failure
is one line and exit 2, as ``bt-fast train`` would print it.
"""

from __future__ import annotations

import argparse
import sys

from bt_fast import checkpoint, config
from bt_fast.errors import EXIT_USER, ConfigError, DataError, UserError, one_line
from bt_fast.pipelines import filelist


def check(cfg: config.Config, world_sizes: list[int]) -> None:
    """Raise the UserError ``bt-fast train`` would raise for this config and these sizes."""
    config.validate(cfg)
    batch = cfg.data.batch_size
    bad = [w for w in world_sizes if batch % w]
    if bad:
        raise ConfigError(f"data.batch_size={batch} is not divisible by the world size "
                          f"{', '.join(map(str, bad))} (each rank reads batch_size / world size)")
    if cfg.data.reader == "folder":
        if not cfg.data.train_dir:
            raise ConfigError("data.train_dir is not set: name the ImageFolder root to train on "
                              "(configs/fmnist.yaml has Fashion-MNIST's), e.g. --set data.train_dir=PATH")
        n = len(filelist.read(cfg.data.train_dir))  # SourceError (a DataError) if missing or malformed
        short = [w for w in world_sizes if (n // w) // (batch // w) == 0]
        if short:
            raise DataError(f"{cfg.data.train_dir}: {n} images over {short[0]} rank(s) give no full "
                            f"batch of {batch // short[0]} per rank: lower data.batch_size or add images")
    checkpoint.prepare(cfg.train.run_dir)


def main(argv: list[str] | None = None) -> int:
    from bt_fast.train import add_arguments  # the trainer's own flags, parsed the same way

    argv = list(sys.argv[1:] if argv is None else argv)
    ours, train_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m bt_fast.preflight", description=__doc__.splitlines()[0])
    p.add_argument("--world-sizes", type=int, nargs="+", required=True, metavar="N")
    world = p.parse_args(ours).world_sizes
    t = argparse.ArgumentParser(prog="bt-fast train")
    add_arguments(t)
    args = t.parse_args(train_argv)
    try:
        overlays = [s for path in args.overlay for s in config.read_overlay(path)]
        check(config.load(args.config, overlays + args.set), world)
    except UserError as e:
        print(one_line("train", e), file=sys.stderr)
        return EXIT_USER
    return 0


if __name__ == "__main__":
    sys.exit(main())
