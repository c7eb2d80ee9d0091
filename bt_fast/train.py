"""SSL pretraining: ``bt-fast train --config PATH [--set section.key=value ...]``.

One process:      bt-fast train --config configs/fmnist.yaml
One node, 8 GPUs: torchrun --nproc-per-node 8 -m bt_fast train --config configs/imagenet.yaml
N nodes:          make train NODES=N GPUS=8 CONFIG=configs/imagenet.yaml  (see README)

The loop reads as the algorithm: augmented views -> the method's networks (backbone +
heads, bt_fast.methods; ``method.name`` picks Barlow Twins, VICReg, SimCLR, BYOL, SwAV or
DINO) ->
its loss over the global batch -> backward -> LARS step -> the method's after-step
update (BYOL's moving-average target). A step whose loss or gradients are not finite
changes nothing: no weight, no BatchNorm statistic, no target. A re-run
with the same ``train.run_dir`` resumes from ``checkpoints/last.pt``, data position
included. Host<->device syncs happen only on log steps (every ``train.log_every``),
except under fp16, whose GradScaler checks for inf on the host every step.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from bt_fast import checkpoint, config, dist, gradcomm, methods, metrics, monitor, optim, run_folder, runlock
from bt_fast.device import autocast, data_device, place_views, set_cudnn, set_threads
from bt_fast.errors import EXIT_INTERRUPTED, EXIT_NONFINITE, ConfigError, DataError
from bt_fast.pipelines import FolderSource, MultiViewLoader, WebDatasetSource
from bt_fast.pipelines.errors import SourceError


class NonFiniteLoss(RuntimeError):
    """The loss stayed NaN/inf for a whole log window: stop, keep the last checkpoint."""


@dataclass
class Run:
    """What the loop needs besides the model: built once by ``setup``."""

    cfg: config.Config
    env: dist.Env
    run_dir: Path
    model: methods.Method  # unwrapped: what checkpoints store, and whose loss the step calls
    ddp: torch.nn.Module  # what forward/backward run through (model itself in a world of one)
    optimizer: optim.LARS
    scaler: torch.amp.GradScaler
    loader: MultiViewLoader
    step: int
    total_steps: int  # length of the lr schedule
    last_step: int  # where this run stops (max_steps may cut the schedule short)
    warmup_steps: int
    guard: "BufferGuard | None" = None  # built by the first train_step (bench step builds Run by hand)
    steps_per_epoch: int = 1  # for the methods' epoch-based schedules (DINO's teacher temperature)
    comm: "gradcomm.PowerSGD | None" = None  # PowerSGD's hook state (error feedback, Q), else None
    monitor: "monitor.Monitor | None" = None  # online probe + kNN monitor (bt_fast/monitor.py)
    lock: "runlock.RunLock | None" = None  # rank 0's hold on run_dir (one trainer per folder)


class BufferGuard:
    """Undoes what a skipped step's forward wrote into buffers, on the device.

    BatchNorm updates running_mean/var and num_batches_tracked during forward, before
    the loss is known to be finite; a NaN batch would leave NaN statistics behind a
    step that "changed nothing". ``hold`` copies every buffer before forward and
    ``keep_if(applied)`` puts the copies back where ``applied`` is False, with
    torch.where (NaN-safe; no host sync). Cost per step: one fused copy of all buffers
    (BN statistics: ~0.2 MB for ResNet-50 + projector) and one in-place where per buffer
    (~165 small kernels for ResNet-50, twice that with BYOL's target).
    """

    def __init__(self, model: torch.nn.Module):
        self.buffers = list(model.buffers())
        self.saved = [b.clone() for b in self.buffers]

    def hold(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    def keep_if(self, applied: torch.Tensor) -> None:
        for b, saved in zip(self.buffers, self.saved):
            torch.where(applied, b, saved, out=b)  # out= is b itself: elementwise, safe


def train_step(run: Run, views: list[torch.Tensor], timer: metrics.StepTimer) -> dict:
    """Forward, loss, backward, LARS step, the method's after-step update.

    Returns device tensors (no sync here): loss, the method's named loss terms and
    whether the step was skipped for a non-finite loss.
    """
    if run.guard is None:
        run.guard = BufferGuard(run.model)
    run.guard.hold()
    run.model.start_step(run.step, run.steps_per_epoch)  # host-side schedules (SwAV, DINO)
    if run.comm is not None:
        run.comm.hold()  # a skipped step must not feed its NaN back through error feedback
    with autocast(run.cfg, run.env.device):
        # e.g. [z1, z2], each [B_local, D]; multi-crop methods run one backbone pass per size
        outputs = run.ddp(views)
    group = torch.distributed.group.WORLD if run.env.distributed else None
    # Outside autocast: every loss accumulates in fp32 itself (bt_fast.kernels).
    loss, terms = run.model.loss(outputs, group)
    timer.mark("forward")
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.model.drop_frozen_grads()  # SwAV's prototypes, DINO's last layer: frozen early on
    timer.mark("backward")
    # Device-side: a bad step is skipped, not synced. Under fp16 the GradScaler already
    # skips steps whose scaled gradients overflow (and lowers its scale: expected, not an
    # error), so only the loss counts there.
    finite = torch.isfinite(loss) if run.scaler.is_enabled() else all_finite(loss, run.optimizer)
    if run.model.clip_grad:
        clip_gradients(run)  # after the finite test: a clip must not hide an overflow
    run.scaler.step(run.optimizer, finite=finite)
    applied = finite
    if run.scaler.is_enabled():
        # fp16: the scaler skipped LARS if a scaled gradient overflowed; its found-inf
        # flags (device tensors, read before update() clears them) say so.
        found_inf = sum(run.scaler._found_inf_per_device(run.optimizer).values())
        applied = finite & (found_inf == 0)
    run.scaler.update()
    run.guard.keep_if(applied)
    if run.comm is not None:
        run.comm.keep_if(applied)
    run.model.after_step(run.step, run.total_steps, applied)
    timer.mark("optimizer")
    return {"loss": loss.detach(), "terms": {k: v.detach() for k, v in terms.items()},
            "nonfinite": (~finite).int()}


def clip_gradients(run: Run) -> None:
    """The method's per-parameter clipping (DINO's ``clip_grad``) of the gradients LARS
    will apply: under fp16 the scaler unscales them first (as main_dino.py does), so the
    threshold is in true units; its step then sees they are unscaled and records any inf
    it found (the step is skipped as before)."""
    if run.scaler.is_enabled():
        run.scaler.unscale_(run.optimizer)
    grads = [p.grad for g in run.optimizer.param_groups for p in g["params"] if p.grad is not None]
    optim.clip_per_parameter(grads, run.model.clip_grad)


def all_finite(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """0-d bool on the device: the loss AND every gradient are finite.

    A finite loss can still have an overflowing gradient (bf16/fp16 backward); LARS
    would then write NaN into weights and momentum. Cost: one norm per gradient.
    """
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    norms = torch.stack(torch._foreach_norm(grads)) if grads else loss.new_zeros(1)
    return torch.isfinite(loss) & torch.isfinite(norms).all()


def check_data(cfg: config.Config, world_sizes: list[int]) -> None:
    """What ``make_loader`` needs of the data config, for every world size torchrun
    may pick; ``bt_fast.preflight`` runs it before torchrun starts (no retries)."""
    if cfg.data.reader == "folder" and not cfg.data.train_dir:
        raise ConfigError("data.train_dir is not set: name the ImageFolder root to train on "
                          "(configs/fmnist.yaml has Fashion-MNIST's), e.g. --set data.train_dir=PATH")
    bad = [w for w in world_sizes if cfg.data.batch_size % w]
    if bad:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not divisible by the world "
                          f"size {', '.join(map(str, bad))} (each rank reads batch_size / world size)")
    queue = cfg.method.swav.queue_length if cfg.method.name == "swav" else 0
    bad = [w for w in world_sizes if queue % w]
    if bad:
        raise ConfigError(f"method.swav.queue_length={queue} is not divisible by the world size "
                          f"{', '.join(map(str, bad))} (each rank keeps queue_length / world size rows)")


def make_loader(cfg: config.Config, env: dist.Env, state: dict | None,
                entries: torch.Tensor | None = None) -> MultiViewLoader:
    """The sharded loader, resumed from ``state`` when given.

    ``entries`` (the checkpoint's file-list entry hashes) lets a resume continue after
    ``bt-fast data check`` dropped files that went bad: a list that only LOST entries
    resumes by position (MultiViewLoader ``position_only``: same step, fresh reader of
    the new list from the next epoch boundary); any other change is refused.
    """
    check_data(cfg, [env.world_size])
    if cfg.data.reader == "webdataset":
        source = WebDatasetSource(cfg.data.webdataset)
    else:
        source = FolderSource(cfg.data.train_dir)
    position_only = False
    if (state is not None and entries is not None and hasattr(source, "entry_hashes")
            and state.get("dataset") != source.fingerprint()):
        new = torch.from_numpy(source.entry_hashes())
        position_only = len(new) < len(entries) and bool(torch.isin(new, entries).all())
        if position_only and env.is_main:
            print(f"warning: {cfg.data.train_dir}: the file list lost {len(entries) - len(new)} "
                  "image(s) since the checkpoint; resuming at its step with a fresh pass over the "
                  "new list from the next epoch boundary", file=sys.stderr)
    return MultiViewLoader(
        source, config.resolved_views(cfg), cfg.data.batch_size // env.world_size, device=data_device(cfg),
        num_threads=cfg.data.num_threads, prefetch=cfg.data.prefetch, seed=cfg.train.seed,
        shard_id=env.rank, num_shards=env.world_size, state=state, position_only=position_only)


def setup(cfg: config.Config, inputs=()) -> Run:
    """Everything the loop needs; ``inputs``: the files the command read (its --config and
    overlays), which the run never writes over."""
    config.validate(cfg)
    env = dist.init(want_cuda=data_device(cfg) == "gpu" or torch.cuda.is_available())
    set_cudnn(cfg)
    set_threads(cfg, env)
    run_dir = runlock.check_run_dir(cfg.train.run_dir)
    lock = run_folder.claim(run_dir, env)  # before anything is built: a refusal is quick
    torch.manual_seed(cfg.train.seed)
    model = methods.build(cfg).to(env.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.model.sync_bn:
        model = dist.convert_sync_bn(model, env)
    optimizer = optim.build(model, cfg.optim)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.train.precision == "fp16")
    step, pipeline_state, entries, ckpt, last, probe_state = 0, None, None, None, None, None
    found = checkpoint.load_latest(run_dir)  # last.pt, else prev.pt with a warning
    if found is not None:
        ckpt, last = found
        step, pipeline_state, entries = run_folder.resume_run(ckpt, last, cfg, model, optimizer, scaler, env)
        probe_state = ckpt.get("online_probe")
    loader = make_loader(cfg, env, pipeline_state, entries)
    steps_per_epoch = len(loader)
    total = max(1, round(cfg.optim.epochs * steps_per_epoch))
    last_step = min(total, cfg.train.max_steps) if cfg.train.max_steps > 0 else total
    warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
    gradcomm.check_run(cfg, env.world_size, warmup, last_step)
    ddp = dist.wrap_ddp(model, cfg.dist, env, powersgd_start=gradcomm.start_step(cfg, warmup))
    comm = getattr(ddp, "grad_comm", None)
    warning = gradcomm.resume(comm, ckpt, last, step, env.rank, run_dir)
    if warning and env.is_main:
        print(f"warning: {warning}", file=sys.stderr)
    if cfg.train.compile:
        # Compile the DDP wrapper, not the module inside it: DDP's hooks (and the
        # SyncBatchNorm all-reduces) then stay visible to dynamo instead of breaking
        # the graph at every bucket. Checkpoints keep storing the plain ``model``.
        ddp = torch.compile(ddp)
    if env.is_main:
        run_folder.save_config(cfg, run_dir / "config.yaml", inputs)
    return Run(cfg, env, run_dir, model, ddp, optimizer, scaler, loader, step, total, last_step,
               warmup, steps_per_epoch=steps_per_epoch, comm=comm,
               monitor=monitor.Monitor(cfg, env, model, probe_state), lock=lock)


def save_checkpoint(run: Run, logger) -> None:
    """Every rank reaches this at the same step; rank 0 writes (weights are replicated;
    data positions and RNG states are per rank and gathered; PowerSGD's error feedback is
    per rank and each rank writes its own file, before last.pt names its step)."""
    comm = {}
    if run.comm is not None:
        comm["grad_comm"], local = run.comm.state_dict()
        checkpoint.save_rank_file(local, run.run_dir, "feedback", run.step, run.env.rank)
    pipelines = dist.gather_per_rank(run.loader.state_dict())
    rngs = dist.gather_per_rank(checkpoint.rng_state())
    own = run.model.rank_state()  # SwAV's queue; None (every rank alike) for the other methods
    method_state = {"method_state": dist.gather_per_rank(own)} if own is not None else {}
    if run.env.is_main:
        t0 = time.perf_counter()
        # The list's entry hashes (8 bytes per image, computed once) let a resume accept
        # a list that only lost files that went bad (see make_loader).
        entries = getattr(run.loader.source, "entry_hashes", None)
        checkpoint.save({
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(), "step": run.step, "rng": rngs,
            "pipeline": pipelines, "config": config.to_dict(run.cfg), **run.monitor.state(),
            **({"data_entries": torch.from_numpy(entries())} if entries else {}), **comm, **method_state,
        }, run.run_dir)
        logger.log_checkpoint(time.perf_counter() - t0, run.step)
    dist.barrier()


def log_window(run: Run, logger, out: dict, timer, lrs, window_steps: int, t_window: float) -> None:
    """One sync point per log window: turn device tensors into floats and fan out."""
    nonfinite = int(out["nonfinite_window"].item())
    if nonfinite == window_steps:
        raise NonFiniteLoss(f"loss was NaN/inf for all {window_steps} steps up to step {run.step}; "
                            f"those steps changed no weight or BatchNorm statistic; last checkpoint: "
                            f"{checkpoint.latest(run.run_dir) or 'none'}")
    images = window_steps * run.cfg.data.batch_size
    # Barlow Twins' terms keep their names (loss_on_diag, loss_off_diag); every method's
    # terms are loss_<term>.
    names = list(out["terms"])
    loss, *values = torch.stack([out["loss"], *out["terms"].values()]).tolist()
    logger.log({
        "loss": loss, **{f"loss_{k}": v for k, v in zip(names, values)}, "lr": lrs[0], "lr_biases": lrs[1],
        "images": images, "images_per_s": images / max(t_window, 1e-9),
        "epoch": run.step / max(1, len(run.loader)), "nonfinite_steps": nonfinite,
        "durations": timer.collect(), **run.monitor.window_record(),
    }, run.step)


def summary(steps: int, global_batch: int, seconds: float, last, monitor: str = "") -> str:
    """The run's last line: what it trained, in how long (the loop only: setup and the
    pipeline's start are not in it, so this is the figure to compare across runs), what
    the monitor cost and when it reached ``train.stop_at`` (``monitor``), the checkpoint."""
    images = steps * global_batch
    return (f"bt-fast train: {steps} steps ({images} images) in {metrics.fmt_duration(seconds)}: "
            f"{images / max(seconds, 1e-9):.0f} img/s{monitor}; last checkpoint {last or 'none'}")


def train(run: Run) -> None:
    cfg, env = run.cfg, run.env
    logger = metrics.open_sinks(cfg, run.run_dir, rank=env.rank, local_rank=env.local_rank,
                                world_size=env.world_size, total_steps=run.last_step)
    timer = metrics.StepTimer(env.device)
    nonfinite = torch.zeros((), dtype=torch.int32, device=env.device)
    t_window, window = time.perf_counter(), 0
    # SIGTERM on any rank (torchrun, SLURM or `docker stop` forwarding it): all ranks stop
    # after the same step, write one checkpoint together and exit 0.
    stop, stopping = dist.StopFlag(env), False
    t_start, first_step = time.perf_counter(), run.step
    mon = run.monitor
    mon.start()
    try:
        while run.step < run.last_step and not stopping:
            timer.start()
            for views, labels in run.loader:
                views = place_views(views, env.device, cfg.train.channels_last)
                timer.mark("data_wait")
                lrs = optim.set_lr(run.optimizer, run.step, cfg.optim, global_batch=cfg.data.batch_size,
                                   warmup_steps=run.warmup_steps, total_steps=run.total_steps)
                out = train_step(run, views, timer)
                mon.after_step(labels)  # the online probe, on this step's detached features
                nonfinite += out["nonfinite"]
                run.step += 1
                window += 1
                stopping = stop.should_stop()  # collective on every rank; one int, CPU
                if run.step % cfg.train.log_every == 0 or run.step == run.last_step:
                    out["nonfinite_window"] = nonfinite
                    log_window(run, logger, out, timer, lrs, window, time.perf_counter() - t_window)
                    nonfinite.zero_()
                    t_window, window = time.perf_counter(), 0
                if mon.due(run.step, run.last_step):  # same result on every rank: same stop
                    stopping = mon.evaluate(run, logger) or stopping
                every = cfg.train.checkpoint_every
                if (every and run.step % every == 0) or run.step == run.last_step or stopping:
                    save_checkpoint(run, logger)
                if run.step >= run.last_step or stopping:
                    break
                timer.start()
        if stopping and not mon.reached:
            print(f"bt-fast train: rank {env.rank} stopped by signal at step {run.step}; "
                  "checkpoint written", file=sys.stderr)
        if env.rank == 0 and run.step > first_step:
            seconds = time.perf_counter() - t_start
            print(summary(run.step - first_step, cfg.data.batch_size, seconds,
                          checkpoint.latest(run.run_dir), mon.summary(seconds)), file=sys.stderr)
    finally:
        mon.close()
        stop.restore()
        logger.close()


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML recipe (sections mirror bt_fast/config.py)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable); beats the YAML file")
    parser.add_argument("--overlay", action="append", default=[], metavar="PATH",
                        help="YAML overlay, e.g. from `bt-fast tune` (repeatable); beats "
                             "--config, loses to --set")


@record
def run(args) -> int:
    overlays = []
    if args.overlay:
        overlays = [s for path in args.overlay for s in config.read_overlay(path)]
    cfg = config.load(args.config, overlays + args.set)
    state = None
    try:
        state = setup(cfg, inputs=[args.config, *args.overlay])
        try:
            train(state)
        except SourceError as e:  # an image went bad mid-run: name it and the way back
            last = checkpoint.latest(cfg.train.run_dir)
            raise DataError(f"{e}. Recover: `bt-fast data check {cfg.data.train_dir}` drops it, then "
                            f"the same command resumes from {last or 'the start (no checkpoint yet)'}") from None
    except NonFiniteLoss as e:
        print(f"bt-fast train: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except KeyboardInterrupt:  # a second Ctrl-C: leave now, no checkpoint
        print("bt-fast train: interrupted twice; stopped without a checkpoint "
              f"(the last one: {checkpoint.latest(cfg.train.run_dir) or 'none'})", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if state is not None and state.lock is not None:
            state.lock.release()
        dist.close()
    return 0
