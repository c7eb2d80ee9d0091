"""``bt-fast bench {pipeline,loss,step,comm,tta} [--json]``: contender and baseline side by side.

Each benchmark runs in one process on the same cores and prints ratios, because the
machines are shared and noisy; never compare numbers from different runs.
"""

from __future__ import annotations

import importlib
import json

BENCHES = {
    "pipeline": "bt_fast.bench.pipeline",  # DALI recipe vs torchvision DataLoader vs decode+crop ceiling
    "loss": "bt_fast.bench.loss",  # reference / dense / gram vs the official formulation
    "step": "bt_fast.bench.step",  # full train step vs the plain training loop
    "comm": "bt_fast.bench.comm",  # gradient bytes per step of each dist.grad_compression, vs the model
    "tta": "bt_fast.bench.tta",  # time to a kNN target: bt-fast train vs the plain loop, one after the other
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="{" + ",".join(BENCHES) + "}")
    for name, module in BENCHES.items():
        p = sub.add_parser(name)
        p.add_argument("--json", action="store_true", help="print one JSON object")
        importlib.import_module(module).add_arguments(p)


def run(args) -> int:
    return importlib.import_module(BENCHES[args.bench]).run(args)


def emit(result: dict, as_json: bool) -> None:
    """One JSON object (``--json``) or one aligned ``key: value`` line per entry."""
    if as_json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:>36}: {value:.3f}" if isinstance(value, float) else f"{key:>36}: {value}")
