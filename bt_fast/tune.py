"""``bt-fast tune --config PATH``: measure the knobs that decide images/s, keep the best.

Each probe builds the real run (``bt_fast.train.setup``: DALI loader, the config's method
(``method.name``, so ``--set method.name=byol`` tunes BYOL's step), DDP,
optimizer) with one setting changed, runs ``--warmup`` untimed steps (DALI start-up,
cuDNN autotuning, torch.compile) and ``--steps`` timed ones through
``bt_fast.train.train_step``. The search is coordinate descent: knobs are probed one at
a time in the order below, each starting from the best settings so far, and a value
replaces the incumbent only if it is at least ``--min-gain`` faster (shared machines
are noisy). The table lists every probe; the winners go to a YAML overlay::

    bt-fast tune --config configs/imagenet.yaml --out runs/tuned.yaml
    bt-fast train --config configs/imagenet.yaml --overlay runs/tuned.yaml

Run it where training runs: on the CPU it measures CPU settings, on GPUs GPU ones,
and under torchrun (same command line as training) it measures the distributed step,
bucket size included; every rank probes, the slowest rank's time decides. The global
batch (``data.batch_size``) is a knob: a bigger one changes the recipe (the learning
rate scales with it), so leave ``batch`` out of ``--knobs`` to keep the recipe fixed.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bt_fast import config, dist, safeio
from bt_fast.errors import UsageError

KNOBS = ("threads", "prefetch", "batch", "bucket", "precision", "channels_last", "compile")
KEYS = {  # knob -> config key
    "threads": "data.num_threads", "prefetch": "data.prefetch", "batch": "data.batch_size",
    "bucket": "dist.bucket_cap_mb", "precision": "train.precision",
    "channels_last": "train.channels_last", "compile": "train.compile",
}


def get(cfg: config.Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def candidates(knob: str, cfg: config.Config, world: int, cuda: bool) -> list:
    """Values to probe for one knob (the current value always among them)."""
    current = get(cfg, KEYS[knob])
    if knob == "threads":
        cores = max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
        values = [v for v in (1, 2, 4, 8, 16) if v <= cores]
    elif knob == "prefetch":
        values = [1, 2, 3, 4]
    elif knob == "batch":  # global batch; per-rank batch = this / world
        values = [b for b in (current // 2, current, current * 2) if b >= world and b % world == 0]
    elif knob == "bucket":
        values = [10, 25, 50, 100] if world > 1 else []  # DDP only exists when distributed
    elif knob == "precision":
        values = ["fp32", "bf16", "fp16"] if cuda else ["fp32", "bf16"]
    else:  # channels_last, compile
        values = [False, True]
    if not values:
        return []
    return [current] + [v for v in values if v != current]  # the incumbent is measured first


def probe(cfg: config.Config, warmup: int, steps: int) -> dict:
    """Images/s of ``steps`` timed training steps (after ``warmup``); slowest rank's time."""
    from bt_fast import metrics, train

    run = train.setup(cfg)
    timer = metrics.StepTimer(run.env.device)
    done, t0, out = 0, None, None
    try:
        while done < warmup + steps:
            for views, _ in run.loader:
                if done == warmup:
                    _sync(run.env, out)
                    t0 = time.perf_counter()
                    timer.collect()
                timer.start()
                timer.mark("data_wait")
                out = train.train_step(run, views, timer)
                done += 1
                if done == warmup + steps:
                    break
        _sync(run.env, out)
        elapsed = time.perf_counter() - t0
        durations = timer.collect()
        # [elapsed, data wait] in seconds, one tensor: one reduce, one settle
        times = torch.tensor([elapsed, sum(durations.get("data_wait", [0.0]))], dtype=torch.float64)
        if run.env.distributed:  # every rank decides on the same numbers
            torch.distributed.all_reduce(times, op=torch.distributed.ReduceOp.MAX)
            dist.settle(times)  # the last probe's reduce may be the run's last collective
        seconds, wait = times.tolist()
        return {"images_per_s": steps * cfg.data.batch_size / seconds,
                "step_ms": 1e3 * seconds / steps, "data_wait": wait / seconds,
                "loss_finite": bool(torch.isfinite(out["loss"]).item())}
    finally:
        if run.lock is not None:  # the probe's own scratch run folder
            run.lock.release()
        del run
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _sync(env: dist.Env, out) -> None:
    if out is not None:
        out["loss"].item()  # SYNC POINT: the timed window starts/ends with the device idle
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()


def tune(cfg: config.Config, knobs: list[str], *, warmup: int, steps: int, min_gain: float,
         work_dir: Path, env: dist.Env, say=print) -> tuple[config.Config, list[dict]]:
    """Coordinate descent over ``knobs``; returns (best config, one row per probe)."""
    best_cfg, rows, best = cfg, [], None
    cuda = env.device.type == "cuda"
    n = 0
    for knob in knobs:
        key = KEYS[knob]
        values = candidates(knob, best_cfg, env.world_size, cuda)
        if not values:
            say(f"{key:<22}{'':>8}  skipped: only matters with more than one rank")
        for value in values:
            if best is not None and value == get(best_cfg, key):
                continue  # the incumbent, already measured
            n += 1
            trial = config.with_value(best_cfg, key, value)
            trial.train.run_dir = str(work_dir / f"probe{n}")  # fresh: no checkpoint to resume
            try:
                result = probe(trial, warmup, steps)
            except Exception as e:  # noqa: BLE001 - a setting that fails is a result too
                result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:60] if str(e) else ''}"}
            row = {"knob": key, "value": value, "kept": False, **result}
            ok = "images_per_s" in result and result["loss_finite"]
            if ok and (best is None or result["images_per_s"] > best * (1 + min_gain)):
                best, best_cfg = result["images_per_s"], trial
                row["kept"] = True
            rows.append(row)
            say(format_row(row))
    best_cfg.train.run_dir = cfg.train.run_dir
    return best_cfg, rows


HEADER = f"{'knob':<22}{'value':>8}{'images/s':>11}{'step ms':>10}{'data wait':>11}"


def format_row(row: dict) -> str:
    value = str(row["value"]).lower() if isinstance(row["value"], bool) else str(row["value"])
    if "error" in row:
        return f"{row['knob']:<22}{value:>8}  failed: {row['error']}"
    flag = "" if row["loss_finite"] else "  (loss not finite: not eligible)"
    kept = "  <- best so far" if row["kept"] else ""
    return (f"{row['knob']:<22}{value:>8}{row['images_per_s']:>11.1f}{row['step_ms']:>10.1f}"
            f"{100 * row['data_wait']:>10.0f}%{flag}{kept}")


def overlay(best: config.Config, knobs: list[str]) -> dict:
    """The tuned keys only, nested by section: what ``bt-fast train --overlay`` applies."""
    out: dict = {}
    for knob in knobs:
        section, name = KEYS[knob].split(".")
        out.setdefault(section, {})[name] = get(best, KEYS[knob])
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="the recipe to tune (YAML)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value before tuning (repeatable)")
    parser.add_argument("--knobs", default=",".join(KNOBS),
                        help=f"comma-separated subset of {','.join(KNOBS)} (in probe order)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per probe")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per probe")
    parser.add_argument("--min-gain", type=float, default=0.03,
                        help="a value must be this much faster than the incumbent to replace it")
    parser.add_argument("--out", default=None, help="overlay path (default RUN_DIR/tuned.yaml)")


def run(args) -> int:
    knobs = [k.strip() for k in args.knobs.split(",") if k.strip()]
    unknown = [k for k in knobs if k not in KNOBS]
    if unknown or not knobs:
        raise UsageError(f"--knobs: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(KNOBS)}")
    if args.steps < 1 or args.warmup < 0:
        raise UsageError("--steps must be >= 1 and --warmup >= 0")
    cfg = config.load(args.config, args.set)
    cfg.train.max_steps = 0  # probes stop themselves; the schedule length is irrelevant
    env = dist.init(want_cuda=torch.cuda.is_available())
    say = print if env.is_main else (lambda *a, **k: None)
    out = Path(args.out or Path(cfg.train.run_dir) / "tuned.yaml")
    safeio.check_target(out, inputs=[args.config])  # a bad --out fails now, not after the probes
    say(f"tuning {args.config} ({cfg.method.name}): {env.world_size} rank(s) on {env.device.type}, "
        f"{args.warmup}+{args.steps} steps per probe, global batch {cfg.data.batch_size}")
    from bt_fast.doctor import scaling  # docs/gpu.md's model, on paper: not a probed knob

    option, why = scaling.pick(env.world_size, cfg.data.batch_size / env.world_size, scaling.shapes_of(cfg))
    say(f"dist.grad_compression: {option} ({why}; docs/gpu.md, \"Gradient traffic\")")
    say(HEADER)
    try:
        with tempfile.TemporaryDirectory(prefix="bt-fast-tune-") as tmp:
            best, rows = tune(cfg, knobs, warmup=args.warmup, steps=args.steps,
                              min_gain=args.min_gain, work_dir=Path(tmp), env=env, say=say)
    finally:
        dist.close()
    measured = [r for r in rows if "images_per_s" in r and r["loss_finite"]]
    if not measured:
        print("bt-fast tune: every probe failed; no overlay written", file=sys.stderr)
        return 1
    if env.is_main:
        top = max(measured, key=lambda r: r["images_per_s"])
        doc = overlay(best, knobs)
        header = (f"# bt-fast tune --config {args.config}: best settings measured on "
                  f"{env.world_size} {env.device.type} rank(s); fastest probe "
                  f"{top['images_per_s']:.1f} images/s.\n"
                  f"# Use: bt-fast train --config {args.config} --overlay {out}\n")
        safeio.write_atomic(out, header + yaml.safe_dump(doc, sort_keys=False), inputs=[args.config])
        say("best: " + ", ".join(f"{s}.{k}={config.yaml_value(v)}" for s, items in doc.items()
                                 for k, v in items.items()))
        say(f"wrote {out}")
    return 0 if all(math.isfinite(r["images_per_s"]) for r in measured) else 1
