"""The ``bt-fast`` command (also ``python -m bt_fast``).

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; only the chosen module is imported, so ``bt-fast --help`` is fast.
A bad invocation or config exits 2 with one line; a failed run exits non-zero.
Exit codes (bt_fast.errors): 2 bad input, 3 loss stayed non-finite, 4 out of memory,
5 an operating-system error naming its path, 130 interrupted; a bug keeps its
traceback (exit 1). ``BT_FAST_DEBUG=1`` prints the traceback of the one-line ones too.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bt_fast.errors import EXIT_INTERRUPTED, EXIT_USER, way_out

COMMANDS = {
    "train": ("bt_fast.train", "pretrain (Barlow Twins, VICReg, SimCLR, BYOL, SwAV, DINO): bt-fast train --config PATH [--set k=v ...]"),
    "eval": ("bt_fast.eval", "evaluate a checkpoint: bt-fast eval {knn,linear,semi} --checkpoint PATH"),
    "data": ("bt_fast.data", "prepare or validate data: bt-fast data {fashion-mnist,synthetic,check}"),
    "bench": ("bt_fast.bench", "side-by-side benchmarks: bt-fast bench {pipeline,loss,step,comm,tta} [--json]"),
    "tune": ("bt_fast.tune", "probe throughput knobs, write the best as a config overlay"),
    "report": ("bt_fast.report", "plots from a run folder: bt-fast report RUN_DIR"),
    "doctor": ("bt_fast.doctor", "check this node: versions, GPU correctness and speed: bt-fast doctor [--json] [--quick]"),
    "export": ("bt_fast.export", "backbone weights for torchvision: bt-fast export CHECKPOINT --out PATH"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line and exit 2, like every other user error
    (argparse's own prints the whole usage block first). Sub-parsers (``eval knn``) are
    made of the same class, so they inherit it."""

    def error(self, message: str):
        print(f"{self.prog}: usage error: {' '.join(message.split())} (see {self.prog} --help)",
              file=sys.stderr)
        raise SystemExit(EXIT_USER)


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="bt-fast", description="Barlow Twins (and VICReg, SimCLR, BYOL, SwAV, DINO) at hardware speed.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = _parser()
        if argv and not argv[0].startswith("-"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    parser = OneLineParser(prog=f"bt-fast {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"bt-fast {name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - classify: user-caused -> one line, bug -> re-raise
        return way_out(name, e)


if __name__ == "__main__":
    sys.exit(main())
