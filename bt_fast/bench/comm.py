"""``bt-fast bench comm --config C --world-size 2,4 [--json]``: gradient bytes per step.

For each world size W, W gloo processes on this machine build the config's model
(SyncBatchNorm, LARS, DDP as the trainer does) and run ``--steps`` real training steps
(``bt_fast.train.train_step``) on random views at ``--image-size`` px, once per option of
``dist.grad_compression``. During the last step every torch.distributed collective on
DDP's gradient process group is counted (``bench.loss.CollectiveTally``: the tensor each
rank contributes, and the bytes a ring algorithm makes each rank send: 2 (W-1)/W x it
for an all-reduce). The count sits next to the cost model's prediction from the
parameter shapes alone (``bt_fast.gradcomm.sent_bytes``) and the ratio to ``none``.
Gradient bytes depend on the parameters, not the batch or image size, so a tiny image
runs ResNet-50 + the 8192-8192-8192 projector on a CPU.

How each option is counted:

- ``none``: DDP's built-in all-reduce runs in C++, out of Python's sight, so the bench
  registers torch's ``allreduce_hook`` (documented as the built-in's equivalent: the
  same fp32 buckets, averaged); the trainer itself keeps the built-in.
- ``bf16``, ``powersgd``: the trainer's own hooks (bt_fast.gradcomm). PowerSGD starts
  at step 2 here (the earliest DDP allows), so the last of 3 steps compresses.

The loss's and SyncBatchNorm's collectives run on another group and are reported apart
(``other_sent_bytes``; they do depend on the batch). Prints one JSON object per world
size with ``--json``: ``{"world_size": W, "options": {"none": {"sent_bytes", "model_bytes",
"ratio_vs_none", ...}, "bf16": {...}, "powersgd": {...}}}`` (bytes per rank per step).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import tempfile

import torch
import torch.distributed as tdist

from bt_fast import config, gradcomm, safeio
from bt_fast.pipelines.spec import expand
from bt_fast.procs import run_workers


def add_arguments(parser) -> None:
    parser.add_argument("--config", default="configs/imagenet.yaml", help="recipe whose model to measure")
    parser.add_argument("--world-size", default="2,4", help="comma-separated world sizes (gloo processes)")
    parser.add_argument("--options", default=",".join(gradcomm.OPTIONS), help="which dist.grad_compression values")
    parser.add_argument("--steps", type=int, default=3, help="training steps per option (the last is counted)")
    parser.add_argument("--image-size", type=int, default=32, help="view side in px (bytes do not depend on it)")
    parser.add_argument("--batch", type=int, default=2, help="images per rank per step")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")


def _views(cfg, batch: int, image_size: int, rank: int) -> list[torch.Tensor]:
    """Random views of the config's method, scaled so the largest is ``image_size`` px."""
    sizes = [v.size for v in expand(config.resolved_views(cfg))]
    g = torch.Generator().manual_seed(rank)
    views = [torch.randn(batch, 3, s, s, generator=g)
             for s in (max(8, round(size * image_size / max(sizes))) for size in sizes)]
    return [v.contiguous(memory_format=torch.channels_last) for v in views] if cfg.train.channels_last else views


def measure(cfg, option: str, env, group, steps: int, image_size: int, batch: int) -> dict:
    """One option on this rank: counted bytes of the last of ``steps`` real steps."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from bt_fast import dist, methods, metrics, optim
    from bt_fast.bench.loss import CollectiveTally
    from bt_fast.train import Run, train_step

    torch.manual_seed(cfg.train.seed)
    model = dist.convert_sync_bn(methods.build(cfg), env, cfg.model.sync_bn)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = optim.build(model, cfg.optim)
    ddp = dist.wrap_ddp(model, dataclasses.replace(cfg.dist, grad_compression=option), env,
                        powersgd_start=2, group=group)
    if option == "none":  # the built-in all-reduce, made visible (see the module docstring)
        ddp.register_comm_hook(group, default_hooks.allreduce_hook)
    run = Run(cfg=cfg, env=env, run_dir=None, model=model, ddp=ddp, optimizer=optimizer,
              scaler=torch.amp.GradScaler("cpu", enabled=False), loader=None, step=0, total_steps=1000,
              last_step=1000, warmup_steps=0, comm=ddp.grad_comm)
    views = _views(cfg, batch, image_size, env.rank)
    grads, every = CollectiveTally(group=group), CollectiveTally()
    for k in range(steps):
        timer = metrics.StepTimer(env.device)
        timer.start()
        if k < steps - 1:
            train_step(run, views, timer)
            continue
        with every, grads:  # nested: both see each call; grads only the gradient group's
            train_step(run, views, timer)
    shapes = gradcomm.grad_shapes(model)
    result = {"sent_bytes": grads.total(3),
              "model_bytes": gradcomm.sent_bytes(shapes, option, env.world_size, cfg.dist.powersgd_rank),
              "tensor_bytes": grads.total(2), "collectives": len(grads.calls),
              "other_sent_bytes": every.total(3) - grads.total(3)}
    del run, ddp, model, optimizer
    gc.collect()
    return result


def _worker(rank: int, world: int, port: int, config_path: str, sets: list, options: list, steps: int,
            image_size: int, batch: int, out_dir: str) -> None:
    from bt_fast import dist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        group = tdist.new_group(list(range(world)))  # DDP's own: its collectives are told apart
        cfg = config.load(config_path, sets)
        env = dist.Env(rank=rank, local_rank=rank, world_size=world)
        results = {option: measure(cfg, option, env, group, steps, image_size, batch) for option in options}
        if rank == 0:
            safeio.write_atomic(os.path.join(out_dir, f"w{world}.{'.'.join(options)}.json"),
                                json.dumps(results), durable=False)  # scratch: read back at once
        tdist.barrier()
    finally:
        tdist.destroy_process_group()


def bench(config_path: str, sets: list, worlds: list[int], options: list[str], *, steps: int = 3,
          image_size: int = 32, batch: int = 2, fresh: bool = True) -> list[dict]:
    """One dict per world size: {"world_size", "options": {option: counts}}. ``fresh``: new
    processes per option (the peak memory is one model's); else one set per world size."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            # OMP_NUM_THREADS=1: hooks' chained matmuls run on gloo's threads (see gradcomm)
            rows = {}
            for group in ([[o] for o in options] if fresh else [options]):
                run_workers("bt_fast.bench.comm:_worker", world, config_path, sets, group, steps, image_size,
                            batch, tmp, env={**os.environ, "OMP_NUM_THREADS": "1"})
                with open(os.path.join(tmp, f"w{world}.{'.'.join(group)}.json")) as f:
                    rows.update(json.load(f))
            base = rows.get("none", {}).get("sent_bytes")
            for row in rows.values():
                row["ratio_vs_none"] = base / row["sent_bytes"] if base and row["sent_bytes"] else None
            out.append({"world_size": world, "options": rows})
    return out


def run(args) -> int:
    from bt_fast.errors import UsageError

    try:
        worlds = [int(w) for w in args.world_size.split(",") if w.strip()]
    except ValueError:
        raise UsageError(f"--world-size {args.world_size!r}: give sizes like 2,4") from None
    options = [o.strip() for o in args.options.split(",") if o.strip()]
    bad = [o for o in options if o not in gradcomm.OPTIONS]
    if bad or not options or not worlds or min(worlds) < 2 or args.steps < 3:
        raise UsageError(f"bench comm: world sizes must be >= 2, --steps >= 3 (PowerSGD starts at step 2) "
                         f"and --options from {', '.join(gradcomm.OPTIONS)}" + (f" (got {', '.join(bad)})" if bad else ""))
    config.validate(config.load(args.config, args.set))  # a bad config: one line, before any process starts
    for row in bench(args.config, args.set, worlds, options, steps=args.steps, image_size=args.image_size,
                     batch=args.batch):
        if args.json:
            print(json.dumps(row))
            continue
        print(f"W={row['world_size']}  (bytes per rank per step; model = bt_fast.gradcomm.sent_bytes)")
        for name, r in row["options"].items():
            ratio = f"x{r['ratio_vs_none']:.1f} fewer" if r["ratio_vs_none"] else ""
            print(f"  {name:9s} sent {r['sent_bytes'] / 2**20:10.3f} MiB  model {r['model_bytes'] / 2**20:10.3f} MiB"
                  f"  {r['collectives']:4d} all-reduces  {ratio}")
    return 0
