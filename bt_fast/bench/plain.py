"""The plain-PyTorch trainer ``bt-fast bench tta`` races bt_fast against.

``python -m bt_fast.bench.plain --config C [--set k=v ...] --out RUN_DIR --budget S``

What a user writes from the papers' code, with everything the recipe fixes kept equal:
the configured method and model (NCHW memory, fp32), the torchvision augmentation
recipe of the same ``views`` (bt_fast.pipelines.torchvision_recipe) in a
``DataLoader`` with ``data.num_threads`` worker processes, the method's official loss
formulation (``bench step``'s ``baseline_step``: Barlow Twins' dense c with its
off-diagonal copy), the same LARS and learning-rate schedule, torch's default thread
count. The monitor is bt_fast's own (bt_fast/monitor.py: same bank, query, readouts,
schedule, precision rule), so both curves are measured alike. It writes
``RUN_DIR/metrics.jsonl`` eval records as the trainer does and stops at
``train.stop_at``, at the end of the schedule, or when ``--budget`` wall seconds pass.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from bt_fast import config, dist, methods, metrics, optim
from bt_fast.bench.step import baseline_step
from bt_fast.monitor import Monitor
from bt_fast.pipelines.torchvision_recipe import FileListDataset, MultiViewTransform


def train_plain(cfg, out: Path, budget_s: float) -> int:
    """The plain loop; returns the steps it ran."""
    torch.manual_seed(cfg.train.seed)
    model = methods.build(cfg)  # contiguous (NCHW) fp32, as the official loop runs it
    opt = optim.build(model, cfg.optim)
    data = FileListDataset(cfg.data.train_dir, MultiViewTransform(config.resolved_views(cfg)))
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.data.batch_size, shuffle=True,
                                         drop_last=True, num_workers=cfg.data.num_threads,
                                         persistent_workers=cfg.data.num_threads > 0)
    total = max(1, round(cfg.optim.epochs * len(loader)))
    last = min(total, cfg.train.max_steps) if cfg.train.max_steps > 0 else total
    warmup = round(cfg.optim.warmup_epochs * len(loader))
    out.mkdir(parents=True, exist_ok=True)
    logger = metrics.Sinks([metrics.ConsoleSink(last, stream=sys.stderr),
                            metrics.JsonlSink(out / "metrics.jsonl")])
    mon = Monitor(cfg, dist.Env(), model)
    mon.start()
    t0, step, done = time.perf_counter(), 0, False
    while not done:
        for views, labels in loader:
            optim.set_lr(opt, step, cfg.optim, global_batch=cfg.data.batch_size,
                         warmup_steps=warmup, total_steps=total)
            loss = baseline_step(model, views, opt)
            mon.after_step(labels)  # the online probe (when on), as the trainer runs it
            step += 1
            if step % cfg.train.log_every == 0:
                logger.log({"loss": loss.item()}, step)
            reached = mon.due(step, last) and mon.evaluate(SimpleNamespace(step=step, cfg=cfg), logger)
            if reached or step >= last or time.perf_counter() - t0 > budget_s:
                done = True
                break
    mon.close()
    logger.close()
    print(f"bench plain: {step} steps in {time.perf_counter() - t0:.0f} s"
          f"{mon.summary(time.perf_counter() - t0)}", file=sys.stderr)
    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bt_fast.bench.plain", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out", type=Path, required=True, help="run folder (metrics.jsonl)")
    p.add_argument("--budget", type=float, default=float("inf"), help="wall seconds at most")
    a = p.parse_args(argv)
    cfg = config.load(a.config, a.set)
    config.validate(cfg)
    train_plain(cfg, a.out, a.budget)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
