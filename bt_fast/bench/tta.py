"""``bt-fast bench tta --config C --target knn=X [--budget S] [--every N] [--json]``: time to accuracy.

Trains bt_fast (``bt-fast train``) and the plain-PyTorch baseline (bt_fast/bench/plain.py:
torchvision transforms in a DataLoader, NCHW fp32, the official dense loss) with the
same model, recipe and monitor, on this machine, one after the other, each in a fresh
process until it reaches the target (``train.stop_at``) or spends ``--budget`` wall
seconds, and reports both times, both curves and ``ratio = baseline / contender``.

A side's time to the target is the wall time of its first monitor at or above the
target, minus the time spent inside the monitor up to it (``elapsed_s - monitor_s`` of
its metrics.jsonl): training time, start-up (DALI or DataLoader workers) included, the
evaluation pauses excluded, for both alike (the online probe, when the config has it,
runs on both sides and counts as monitor time).
Because the sides run one after the other on shared cores, each point also carries its
CPU seconds (``cpu_s - monitor_cpu_s``: the process, its threads and its worker
processes), and the JSON gives the ratio in CPU time too, with the load average seen
around each side: where the two ratios disagree, the machine's load moved between them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bt_fast import safeio
from bt_fast.pipelines.bounds import Range, flag_problem


def add_arguments(parser) -> None:
    parser.add_argument("--config", default="configs/fmnist.yaml", help="the recipe both sides train")
    parser.add_argument("--target", required=True, help="knn=TOP1 (kNN top-1 %% at model.readout)")
    parser.add_argument("--budget", type=float, default=900.0,
                        help="wall seconds each side may run, start-up and monitors included (default 900)")
    parser.add_argument("--every", type=int, default=25, metavar="STEPS",
                        help="steps between kNN monitors on both sides (default 25): the time to the "
                             "target is known to this many steps; the monitor's own time is not counted")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for both sides (an eval.every here wins over --every)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for both sides' run folders (default: a temporary one, removed)")


def curve(run_dir: Path) -> list[dict]:
    """The monitor's points of a side: step, images, train seconds (wall and CPU), top-1."""
    from bt_fast.report import read_jsonl

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [{"step": r["step"], "images": int(r["images_seen"]),
             "seconds": round(r["elapsed_s"] - r["monitor_s"], 2),
             "cpu_seconds": round(r["cpu_s"] - r["monitor_cpu_s"], 2),
             "knn_top1": round(r["eval_knn_top1"], 2)}
            for r in read_jsonl(path, "eval_knn_top1")]


def baselines_of(run_dir: Path) -> dict:
    """The reference lines (random init, pixels) the side's monitor logged."""
    from bt_fast.report import read_jsonl

    path = run_dir / "metrics.jsonl"
    last = read_jsonl(path, "eval_knn_top1")[-1:] if path.is_file() else []
    return {k: round(v, 2) for r in last for k, v in r.items() if k.startswith("baseline_")}


def first_at(points: list[dict], target: float) -> dict | None:
    return next((p for p in points if p["knn_top1"] >= target), None)


def verdict(curves: dict[str, list[dict]], target: float) -> dict:
    """Each side's time (wall and CPU) and images to the target, None where it never got
    there; ``ratio`` = baseline / contender (None unless both got there)."""
    out = {}
    for name, points in curves.items():
        hit = first_at(points, target)
        for key, field in (("seconds", "seconds"), ("cpu_seconds", "cpu_seconds"), ("images", "images")):
            out[f"{name}_{key}"] = hit[field] if hit else None
    both = out["contender_seconds"] and out["baseline_seconds"]
    out["ratio"] = round(out["baseline_seconds"] / out["contender_seconds"], 2) if both else None
    out["cpu_ratio"] = (round(out["baseline_cpu_seconds"] / out["contender_cpu_seconds"], 2)
                        if both else None)
    return out


def run_side(cmd: list[str], budget: float, log: Path) -> dict:
    """Run one side to its end or the budget (SIGTERM: the trainer checkpoints and exits 0)."""
    load0, t0, stopped = os.getloadavg()[0], time.perf_counter(), False
    with safeio.open_append(log) as f:  # never through a link
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            stopped = True  # our SIGTERM: the trainer checkpoints and exits 0, the plain loop just ends
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if proc.returncode != 0 and not (stopped and proc.returncode in (-signal.SIGTERM, -signal.SIGKILL)):
        tail = log.read_text()[-1500:]
        raise RuntimeError(f"{cmd[2:4]} exited {proc.returncode}; the end of {log}:\n{tail}")
    return {"wall_seconds": round(time.perf_counter() - t0, 1), "load_avg_1m_start": round(load0, 2),
            "load_avg_1m_end": round(os.getloadavg()[0], 2)}


FLAG_RANGES = {"budget": Range(lo=1.0, hi=1e7), "every": Range(lo=1, hi=10**6)}


def race(args, root: Path) -> dict:
    from bt_fast import config, specs
    from bt_fast.errors import ConfigError, UsageError

    problem = flag_problem(args, FLAG_RANGES)
    if problem:
        raise UsageError(problem)

    try:
        metric, value = specs.parse_stop_at(args.target) or (None, None)
    except ValueError as e:
        raise UsageError(f"--target {args.target}: {str(e).split(': ', 1)[-1]}") from None
    if metric != "knn":
        raise ConfigError(f"--target {args.target!r}: bench tta races to a kNN top-1, e.g. knn=85.0")
    sets = [f"eval.every={args.every}", *args.set, f"train.stop_at={args.target}"]
    cfg = config.load(args.config, sets)
    config.validate(cfg)  # one line and exit 2 here, not in a child process
    flags = [a for s in sets for a in ("--set", s)]
    sides = {
        "contender": [sys.executable, "-m", "bt_fast", "train", "--config", args.config, *flags,
                      "--set", f"train.run_dir={root / 'contender'}", "--set", "train.checkpoint_every=0"],
        "baseline": [sys.executable, "-m", "bt_fast.bench.plain", "--config", args.config, *flags,
                     "--out", str(root / "baseline"), "--budget", str(args.budget)],
    }
    result = {"bench": "tta", "config": args.config, "target": args.target, "budget_s": args.budget,
              "readout": cfg.model.readout, "eval_every": cfg.eval.every, "bank": cfg.eval.bank,
              "query": cfg.eval.query, "cores": os.cpu_count()}
    curves = {}
    for name, cmd in sides.items():
        print(f"bench tta: training the {name} (log: {root / (name + '.log')})", file=sys.stderr, flush=True)
        info = run_side(cmd, args.budget, root / f"{name}.log")
        curves[name] = curve(root / name)
        result[f"{name}_budget_used_s"] = info["wall_seconds"]
        result[f"{name}_load_avg_1m"] = [info["load_avg_1m_start"], info["load_avg_1m_end"]]
    result.update(verdict(curves, value))
    result["baselines"] = baselines_of(root / "contender")
    result.update({f"{name}_curve": points for name, points in curves.items()})
    return result


def run(args) -> int:
    from bt_fast.bench import emit

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        result = race(args, args.out.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="bt-fast-tta-") as tmp:
            result = race(args, Path(tmp))
    if args.json:
        print(json.dumps(result))
        return 0
    curves = {k: result.pop(k) for k in ("contender_curve", "baseline_curve")}
    emit(result, False)
    for name, points in curves.items():
        print(f"{name}: " + ", ".join(f"{p['seconds']:.0f}s/{p['knn_top1']:.1f}" for p in points))
    return 0
