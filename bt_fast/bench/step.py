"""``bt-fast bench step [--json]``: bt_fast's train step vs the plain training loop.

Both run in this process on the same cores, on the same random views (data loading is
benchmarked by ``bench pipeline``), with the same model, LARS and learning rate:

- contender: ``bt_fast.train.train_step`` as configured (channels-last, autocast per
  ``train.precision``, ``loss.impl``, device-side finite guard);
- baseline: the official loop's step (NCHW memory, fp32, the official dense loss
  formulation with the D x D matrix and its off-diagonal copy).

Steps alternate between the two so drift in machine load hits both alike; the median
step time of each is reported with the ratio.
"""

from __future__ import annotations

import copy
import json
import statistics
import time

import torch

from bt_fast import config, metrics, optim
from bt_fast.kernels import official_loss
from bt_fast.model import BarlowTwins


def add_arguments(parser) -> None:
    parser.add_argument("--config", default="configs/fmnist.yaml", help="recipe whose model/loss/precision to time")
    parser.add_argument("--batch", type=int, default=64, help="per-step batch (default 64 on CPU)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per contender")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")


def baseline_step(model, views, opt) -> torch.Tensor:
    """The official loop: fp32 NCHW forward, official loss, backward, LARS step."""
    z1, z2 = model(views)
    loss = official_loss(z1, z2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def contender_step(run, views) -> torch.Tensor:
    from bt_fast.train import train_step

    timer = metrics.StepTimer(run.env.device)
    timer.start()
    return train_step(run, views, timer)["loss"]


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn().item()  # the sync point: the step is done when its loss is on the host
    return time.perf_counter() - t0


def run(args) -> int:
    from bt_fast.train import Run
    from bt_fast import dist

    cfg = config.load(args.config, args.set)
    torch.manual_seed(cfg.train.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = BarlowTwins(cfg.model).to(device)
    plain = copy.deepcopy(model)
    fast = model.to(memory_format=torch.channels_last) if cfg.train.channels_last else model
    size = config.resolved_views(cfg)[0].size
    views_nchw = [torch.randn(args.batch, 3, size, size, device=device) for _ in range(2)]
    views_cl = [v.contiguous(memory_format=torch.channels_last) for v in views_nchw]
    opt_plain, opt_fast = optim.build(plain, cfg.optim), optim.build(fast, cfg.optim)
    for o in (opt_plain, opt_fast):
        for g, lr in zip(o.param_groups, (cfg.optim.lr_weights, cfg.optim.lr_biases)):
            g["lr"] = lr
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    run_ = Run(cfg, dist.Env(device=device), None, fast, fast, opt_fast, scaler, None, 0, 1, 1, 0)
    fast_views = views_cl if cfg.train.channels_last else views_nchw
    for _ in range(2):  # warm-up: allocator, autotuning, lazy imports
        contender_step(run_, fast_views).item()
        baseline_step(plain, views_nchw, opt_plain).item()
    t_fast, t_plain = [], []
    for _ in range(args.steps):
        t_fast.append(_time(lambda: contender_step(run_, fast_views)))
        t_plain.append(_time(lambda: baseline_step(plain, views_nchw, opt_plain)))
    fast_s, plain_s = statistics.median(t_fast), statistics.median(t_plain)
    result = {
        "bench": "step", "config": args.config, "batch": args.batch, "image_size": size,
        "backbone": cfg.model.backbone, "projector": cfg.model.projector,
        "precision": cfg.train.precision, "channels_last": cfg.train.channels_last,
        "loss_impl": cfg.loss.impl, "device": device.type, "threads": torch.get_num_threads(),
        "bt_fast_images_per_s": args.batch / fast_s, "plain_images_per_s": args.batch / plain_s,
        "speedup": plain_s / fast_s,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>22}: {value:.3f}" if isinstance(value, float) else f"{key:>22}: {value}")
    return 0
