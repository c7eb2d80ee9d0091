"""Everything about ranks. torchrun's environment (``env://``) is the only launch path.

Without torchrun (no WORLD_SIZE in the environment) this is a world of one and no
process group is created, so single-process runs need no launcher.

What lives here, in the order a training run meets it:

- ``init`` / ``close``: join and leave torchrun's process group (nccl on GPUs, gloo on
  CPUs) and pick the device.
- ``convert_sync_bn``: BatchNorm -> SyncBatchNorm so every BN layer normalizes with
  the statistics of the GLOBAL batch (the official recipe). PyTorch's SyncBatchNorm is
  GPU-only; on the CPU the same math runs in ``CpuSyncBatchNorm`` (gloo), which is what
  the two-process tests exercise.
- ``wrap_ddp``: DistributedDataParallel with the knobs that decide step time on a
  cluster: bucket size, ``gradient_as_bucket_view``, ``static_graph``, and the gradient
  compression hook (bt_fast/gradcomm.py: the 8192-8192-8192 projector alone is ~151 M
  parameters, ~0.6 GB of fp32 gradients per step; bf16 halves that, PowerSGD sends
  low-rank factors).
- ``StopFlag``: SIGTERM on any rank -> every rank stops after the same step.
- ``settle``: before a rank exits, wait until gloo's worker thread has let go of the
  last collective's tensor (otherwise the rank can abort during interpreter shutdown).
"""

from __future__ import annotations

import inspect
import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from bt_fast import gradcomm
from bt_fast.errors import ResumeError
from bt_fast.kernels.collectives import AllReduceSum as _AllReduceSum  # forward and backward sum


@dataclass(frozen=True)
class Env:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(want_cuda: bool) -> Env:
    """Join torchrun's process group (nccl on GPUs, gloo on CPUs) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = want_cuda and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Env(rank, local, world, device)


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def settle(tensor: torch.Tensor, timeout_s: float = 1.0) -> None:
    """Wait, GIL released, until no collective still holds ``tensor`` (after ``wait()``).

    Why: a gloo worker thread drops its reference to a finished collective's tensors a
    moment after ``wait()`` has returned, and dropping a tensor that Python also holds
    takes the GIL. If the interpreter has begun finalizing by then (a rank that exits
    right after its last collective), that thread cannot take the GIL and the process
    aborts with "terminate called without an active exception". DDP keeps the process
    group, and so its worker threads, alive until exit, so ``destroy_process_group``
    does not prevent it. Measured with the two-rank test (fault handler on): 17 aborts
    in 60 runs before, 0 in 60 after. ``_use_count`` is the C++ reference count: 1 means
    only Python's.
    Cost: nothing when the worker has let go already; else about a millisecond.
    """
    deadline = time.monotonic() + timeout_s
    while tensor._use_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.001)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------ SyncBatchNorm


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch, for CPU tensors (torch's SyncBatchNorm is GPU-only).

    Per channel, each rank contributes [sum x, sum x^2, count]; one autograd-aware
    all-reduce (its backward all-reduces the gradient, as torch's SyncBatchNorm does)
    gives the global mean and biased variance. Running stats use the unbiased variance,
    like ``F.batch_norm``. Cost: one all-reduce of 2C+1 floats per layer per forward.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))  # every dim but channels
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.tensor([x.numel() / x.size(1)], dtype=torch.float32, device=x.device)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])  # [2C + 1]
        stats = _AllReduceSum.apply(stats)
        c = x.size(1)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)  # biased, as BN normalizes
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * n / (n - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def _convert_cpu(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        new = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum,
                               module.affine, module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.requires_grad_(any(q.requires_grad for q in module.parameters()))  # BYOL's target stays frozen
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, _convert_cpu(child))
    return module


def convert_sync_bn(model: nn.Module, env: Env, enabled: bool = True) -> nn.Module:
    """BatchNorm -> global-batch BatchNorm when distributed (model.sync_bn); else unchanged.

    Call before ``wrap_ddp`` and before building the optimizer (modules are replaced).
    """
    if not (enabled and env.distributed):
        return model
    if env.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_cpu(model)


# ------------------------------------------------------------------ DDP


def wrap_ddp(model: nn.Module, cfg, env: Env, *, powersgd_start: int = 2, group=None) -> nn.Module:
    """DistributedDataParallel tuned by ``cfg`` (a ``DistConfig``); the model itself alone.

    - ``bucket_cap_mb``: gradients are all-reduced in buckets of this size while
      backward still runs; bigger buckets mean fewer, larger messages (better on
      slow inter-node links), smaller ones start communicating earlier.
    - ``gradient_as_bucket_view=True``: ``.grad`` tensors are views into the buckets,
      which saves one gradient-sized copy and that much memory (~0.6 GB for the
      ResNet-50 + projector).
    - ``static_graph``: the same parameters are used every step, so DDP may skip
      the unused-parameter search and overlap more.
    - ``grad_compression``: none | bf16 | powersgd, a DDP communication hook
      (bt_fast/gradcomm.py); PowerSGD's state object is ``ddp.grad_comm`` (else None).
    """
    if not env.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    cuda = env.device.type == "cuda"
    # BN buffers: synced BN keeps them equal, so no per-forward broadcast (they are still
    # synced once at construction). Newer torch renamed the flag; containers may be older.
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                      else {"broadcast_buffers": False})
    ddp = DDP(
        model,
        device_ids=[env.device.index] if cuda else None,
        bucket_cap_mb=cfg.bucket_cap_mb,
        gradient_as_bucket_view=True,
        static_graph=cfg.static_graph,
        process_group=group,
        **no_buffer_sync,
    )
    ddp.grad_comm = gradcomm.register(ddp, cfg, start=powersgd_start, group=group)
    return ddp


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP (and torch.compile), e.g. for state_dict."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


# ------------------------------------------------------------------ graceful stop


class StopFlag:
    """SIGTERM (or SIGINT) on any rank -> every rank stops after the same step.

    The handler only sets a local flag. ``should_stop()`` is called once per step by
    every rank; it all-reduces (MAX) a one-int CPU tensor over a gloo group, so no rank
    can leave the loop before the others. On GPU clusters the side group keeps this off
    the CUDA stream (no device sync). The reduce is started asynchronously at step k and
    read at step k+1, so its round trip overlaps the step; all ranks therefore stop at
    the end of the same step k+1, and then write one checkpoint together.

    torchrun forwards SIGTERM to its workers and waits (30 s by default) before SIGKILL;
    one checkpoint must fit in that window. Ctrl-C (SIGINT) stops the same way; a second
    Ctrl-C raises KeyboardInterrupt at once (no checkpoint).
    """

    def __init__(self, env: Env, signals=(signal.SIGTERM, signal.SIGINT)):
        self.env = env
        self.local = False
        self.group = None
        self.pending = None  # (work, tensor) of the reduce started at the previous step
        if env.distributed:
            self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        self._previous = {}
        for s in signals:
            self._previous[s] = signal.signal(s, self._handler)

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.local:
            # A second Ctrl-C: the user will not wait for the step and the checkpoint.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.local = True

    def should_stop(self) -> bool:
        """Collective: call on every rank once per step. True means stop now, everywhere."""
        if not self.env.distributed:
            return self.local
        result = False
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            result = bool(flag.item())  # CPU tensor: no device sync
        flag = torch.tensor([int(self.local)], dtype=torch.int32)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self.pending = (work, flag)
        return result

    def restore(self) -> None:
        """Drain the last reduce and put the previous signal handlers back.

        Safe on error paths too: every rank started that reduce, so it completes unless a
        peer died, and then its error is not the one worth reporting.
        """
        if self.pending is not None:
            work, flag = self.pending
            self.pending = None
            try:
                work.wait()
            except Exception:  # noqa: BLE001 - a dead peer; the caller's error matters
                pass
            else:
                del work  # our handle; then the worker's reference is the only other one
                settle(flag)  # the run's last collective: the rank may exit right after
        for s, h in self._previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------- per-rank state


def gather_per_rank(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (a world of one: [obj])."""
    if not torch.distributed.is_initialized():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def rank_state(ckpt: dict, key: str, path, env: Env):
    """This rank's entry of a per-rank list (data position, RNG). Shard r belongs to
    rank r, so the world size must match."""
    states = ckpt[key]
    if len(states) != env.world_size:
        raise ResumeError(f"{path}: written by {len(states)} rank(s), now {env.world_size}; "
                          "resuming with another world size would read other images")
    return states[env.rank]
