"""``bt-fast bench step [--json]``: bt_fast's train step vs the plain training loop.

Both run in this process on the same cores, on the same random views (data loading is
benchmarked by ``bench pipeline``), with the same model, LARS and learning rate:

- contender: ``bt_fast.train.train_step`` as configured (channels-last, autocast per
  ``train.precision``, ``loss.impl``, ``train.compile``, device-side finite guard) at the
  trainer's torch thread count (``train.threads``; auto on a CPU run is the rank's share
  of the cores);
- baseline: the official loop's step (NCHW memory, fp32, the official dense loss
  formulation with the D x D matrix and its off-diagonal copy) at torch's default count;
- where the two counts differ, the contender again at torch's count: its ratio
  (``threads_speedup``) is the thread lever alone.

Steps alternate between the contenders so drift in machine load hits all alike; the
median step time of each is reported with the ratios. Each lever's switch is a config
key, so ``--set train.compile=true`` or ``--set train.precision=fp32`` times it.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from bt_fast import config, dist, methods, metrics, optim
from bt_fast.bench import emit
from bt_fast.device import threads_for
from bt_fast.errors import UsageError
from bt_fast.kernels import official_loss
from bt_fast.pipelines.bounds import Range, flag_problem
from bt_fast.pipelines.spec import expand


def add_arguments(parser) -> None:
    parser.add_argument("--config", default="configs/fmnist.yaml", help="recipe whose model/loss/precision to time")
    parser.add_argument("--batch", type=int, default=64, help="per-step batch (default 64 on CPU)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per contender")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")


def baseline_step(model, views, opt) -> torch.Tensor:
    """The official loop: fp32 NCHW forward, official loss, backward, LARS step."""
    outputs = model(views)
    # the method's official formulation (Barlow Twins: dense c and its off-diagonal copy)
    loss = model.baseline_loss(outputs) if hasattr(model, "baseline_loss") else official_loss(*outputs)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def contender_step(run, views, timer=None) -> torch.Tensor:
    """One bt_fast train step; ``timer``: a started metrics.StepTimer to mark phases on."""
    from bt_fast.train import train_step

    if timer is None:
        timer = metrics.StepTimer(run.env.device)
        timer.start()
    return train_step(run, views, timer)["loss"]


def _time(fn, threads: int) -> float:
    torch.set_num_threads(threads)  # process-wide: each contender runs at its own count
    t0 = time.perf_counter()
    fn().item()  # the sync point: the step is done when its loss is on the host
    return time.perf_counter() - t0


def interleaved(steps: int, contenders: dict) -> dict[str, float]:
    """Median seconds per step of each ``name: (fn, threads)``, their steps alternating
    (2 warm-up rounds first: allocator, autotuning, lazy imports)."""
    times, before = {name: [] for name in contenders}, torch.get_num_threads()
    try:
        for i in range(2 + steps):
            for name, (fn, threads) in contenders.items():
                t = _time(fn, threads)
                if i >= 2:
                    times[name].append(t)
    finally:
        torch.set_num_threads(before)
    return {name: statistics.median(ts) for name, ts in times.items()}


def contender(cfg, batch: int, device: torch.device, *, lr_scale: float = 1.0):
    """(run, views): bt_fast's train step ready to call as ``contender_step(run, views)``.

    ``views`` are random [batch, 3, S, S] tensors on ``device``, one per crop of the config (channels-last when
    configured); both groups' learning rates are their configured peaks times
    ``lr_scale``. Shared by this benchmark and ``bt-fast doctor``.
    """
    from bt_fast.train import Run  # the trainer's internals: imported here only

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # one random [batch, 3, S, S] view per crop of the config (multi-crop: every size)
    views = [torch.randn(batch, 3, v.size, v.size, device=device) for v in expand(config.resolved_views(cfg))]
    if cfg.train.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    opt = optim.build(model, cfg.optim)
    set_peak_lrs(opt, cfg, lr_scale)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    step_model = torch.compile(model) if cfg.train.compile else model  # as the trainer does
    run_ = Run(cfg=cfg, env=dist.Env(device=device), run_dir=None, model=model, ddp=step_model,
               optimizer=opt, scaler=scaler, loader=None, step=0, total_steps=1, last_step=1,
               warmup_steps=0)
    return run_, views


def build_model(cfg) -> torch.nn.Module:
    """The configured method (bt_fast.methods): a list of views to the loss's inputs."""
    return methods.build(cfg)


def method_fields(cfg) -> dict:
    """Method name, projector and loss impl, wherever this tree's config keeps them."""
    if not hasattr(cfg, "method"):
        return {"method": "barlow_twins", "projector": cfg.model.projector, "loss_impl": cfg.loss.impl}
    section = getattr(cfg.method, cfg.method.name)
    return {"method": cfg.method.name, "projector": getattr(section, "projector", None),
            "loss_impl": getattr(section, "impl", None)}


def set_peak_lrs(opt, cfg, scale: float = 1.0) -> None:
    for g, lr in zip(opt.param_groups, (cfg.optim.lr_weights, cfg.optim.lr_biases)):
        g["lr"] = lr * scale


FLAG_RANGES = {"batch": Range(lo=1, hi=2**20), "steps": Range(lo=1, hi=10**6)}


def run(args) -> int:
    problem = flag_problem(args, FLAG_RANGES)
    if problem:
        raise UsageError(problem)
    cfg = config.load(args.config, args.set)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default_threads = torch.get_num_threads()  # torch's choice: what the plain loop runs with
    threads = threads_for(cfg, dist.Env(device=device)) or default_threads  # the trainer's
    run_, fast_views = contender(cfg, args.batch, device)
    size = fast_views[0].shape[-1]
    sizes = [v.shape[-1] for v in fast_views]
    # the baseline: same initial weights, NCHW views with the same values
    plain = copy.deepcopy(run_.model).to(memory_format=torch.contiguous_format)
    views_nchw = [v.contiguous() for v in fast_views]
    opt_plain = optim.build(plain, cfg.optim)
    set_peak_lrs(opt_plain, cfg)
    def fast():
        return contender_step(run_, fast_views)

    contenders = {"bt_fast": (fast, threads),
                  "plain": (lambda: baseline_step(plain, views_nchw, opt_plain), default_threads)}
    if threads != default_threads:  # the thread lever alone: the same step at torch's count
        contenders["bt_fast_default_threads"] = (fast, default_threads)
    sec = interleaved(args.steps, contenders)  # median seconds per step
    result = {
        "bench": "step", "config": args.config, "batch": args.batch, "image_size": size, "view_sizes": sizes,
        "backbone": cfg.model.backbone, **method_fields(cfg),
        "precision": cfg.train.precision, "channels_last": cfg.train.channels_last,
        "compile": cfg.train.compile, "device": device.type,
        "threads": threads, "plain_threads": default_threads,
        "bt_fast_images_per_s": args.batch / sec["bt_fast"], "plain_images_per_s": args.batch / sec["plain"],
        "speedup": sec["plain"] / sec["bt_fast"],
    }
    if "bt_fast_default_threads" in sec:
        result["default_threads_images_per_s"] = args.batch / sec["bt_fast_default_threads"]
        result["threads_speedup"] = sec["bt_fast_default_threads"] / sec["bt_fast"]
    emit(result, args.json)
    return 0
