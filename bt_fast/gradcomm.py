"""Gradient communication: ``dist.grad_compression`` none | bf16 | powersgd.

DDP averages every gradient over the ranks once per step. For ResNet-50 + the
8192-8192-8192 projector that is 174.5 M fp32 values, ~0.7 GB per rank per step before
the ring's 2 (W-1)/W factor (docs/gpu.md, "Gradient traffic"). The options:

- ``none``: DDP's own all-reduce of fp32 buckets.
- ``bf16``: torch's ``bf16_compress_hook``: buckets travel as bf16 (half the bytes).
- ``powersgd``: torch's ``powerSGD_hook`` (Vogels et al., 2019). Each gradient viewed as
  an n x m matrix M (conv kernels as [out, in*kh*kw]) with (n + m) r * 2 < n m travels
  as two rank-r factors: P = M Q all-reduced and orthonormalized, then Q = M^T P
  all-reduced and averaged, M ~ P Q^T. What compression leaves out is added to the
  next step's gradient (error feedback); Q is reused (warm start). Every other tensor
  (BatchNorm weights and biases, small matrices) travels uncompressed in fp32. Before
  step ``dist.powersgd_start`` every bucket is a plain fp32 all-reduce.

The hook's math is torch's. What this module adds (``PowerSGD``):

- state keyed by parameter name, not by DDP bucket index: torch keys error feedback and
  Q by bucket index, and DDP's buckets change after its first step (the first step of a
  static graph is one bucket, then it rebuilds them in backward order). So a resumed
  run, whose first step is again one bucket, would give error buffers to the wrong
  tensors. Here each bucket's state is assembled from per-parameter state when the
  bucket first appears, and split back into it when DDP rebuilds or a checkpoint is
  written; Q's first value is drawn per parameter (seeded by its name), so neither
  depends on the bucket layout;
- ``hold()`` / ``keep_if(applied)``: a skipped step (non-finite loss or gradient, see
  bt_fast.train) must change nothing, and error feedback would otherwise carry its NaN
  into every later step;
- ``state_dict()``: (shared, local): Q and the step counter are equal on every rank
  (they are all-reduced) and go into last.pt; error feedback is each rank's own
  (its gradient minus what was sent) and goes into one file per rank.

The bytes each option sends are modelled by ``sent_bytes`` (ring all-reduce: 2 (W-1)/W
x the buffer per rank) and counted on real steps by ``bt-fast bench comm``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from bt_fast.errors import CheckpointError, ConfigError, ResumeError

OPTIONS = ("none", "bf16", "powersgd")
MIN_COMPRESSION_RATE = 2
"""torch's default: a matrix is compressed only if its factors are < half its size;
below that the two extra all-reduce rounds and the matmuls cost more than they save."""


# ---------------------------------------------------------------- the byte model


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """How powerSGD_hook views a gradient: [shape[0], everything else] ([C] -> [C, 1])."""
    return int(shape[0]), math.prod(int(s) for s in shape[1:])


def compressed(shape: Sequence[int], rank: int) -> int:
    """0 if PowerSGD sends this tensor as is, else its factors' rank (torch's test)."""
    n, m = matrix_shape(shape)
    r = min(n, m, rank)
    return r if (n + m) * r * MIN_COMPRESSION_RATE < n * m else 0


def buffer_elements(shapes: Sequence[Sequence[int]], option: str, rank: int = 4) -> int:
    """Elements one rank contributes to all-reduces per step (after PowerSGD's start)."""
    total = 0
    for shape in shapes:
        r = compressed(shape, rank) if option == "powersgd" else 0
        n, m = matrix_shape(shape)
        total += (n + m) * r if r else n * m
    return total


def itemsize(option: str) -> int:
    return 2 if option == "bf16" else 4  # fp32 gradients; bf16 halves them


def ring_all_reduce(nbytes: float, world: int) -> float:
    """Bytes one rank sends in a ring all-reduce of ``nbytes`` (gloo and NCCL, large messages)."""
    return 2 * (world - 1) / world * nbytes if world > 1 else 0.0


def sent_bytes(shapes: Sequence[Sequence[int]], option: str, world: int, rank: int = 4) -> float:
    """Modelled bytes each rank sends per step for the gradients of ``shapes``."""
    return ring_all_reduce(buffer_elements(shapes, option, rank) * itemsize(option), world)


def grad_shapes(model: nn.Module) -> list[tuple[int, ...]]:
    """Shapes of the parameters DDP reduces (those that require grad)."""
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------- settings


def validate(cfg) -> None:
    """Values no world size or run length can make right (``cfg`` a bt_fast Config)."""
    d = cfg.dist
    if d.grad_compression not in OPTIONS:
        raise ConfigError(f"dist.grad_compression={d.grad_compression!r}: choose one of {', '.join(OPTIONS)}")
    if d.powersgd_rank < 1:
        raise ConfigError(f"dist.powersgd_rank={d.powersgd_rank}: must be >= 1 (the rank of each "
                          "gradient's low-rank approximation; 1-4 is usual)")
    if d.powersgd_start != 0 and d.powersgd_start < 2:
        raise ConfigError(f"dist.powersgd_start={d.powersgd_start}: use 0 (= the end of the warm-up) "
                          "or a step >= 2 (DDP rebuilds its buckets after its first step)")
    if d.grad_compression == "powersgd" and cfg.train.precision == "fp16":
        raise ConfigError("dist.grad_compression=powersgd with train.precision=fp16: error feedback is "
                          "kept in scaled-gradient units and the GradScaler changes the scale; use bf16")


def start_step(cfg, warmup_steps: int) -> int:
    """The step PowerSGD starts at: ``dist.powersgd_start``, or 0 = the end of the warm-up."""
    return cfg.dist.powersgd_start or max(2, warmup_steps)


def check_run(cfg, world: int, warmup_steps: int, last_step: int) -> None:
    """Settings wrong for this world size and run length (preflight and setup)."""
    if cfg.dist.grad_compression != "powersgd":
        return
    if world == 1:
        raise ConfigError("dist.grad_compression=powersgd on a world of one rank: there is nothing to "
                          "communicate; use none, or launch more ranks")
    start = start_step(cfg, warmup_steps)
    if start >= last_step:
        raise ConfigError(f"dist.powersgd_start resolves to step {start}, past the run's end at step "
                          f"{last_step} ({world} rank(s)): PowerSGD would never run; lower it")


# ---------------------------------------------------------------- registering


def register(ddp, cfg, *, start: int = 2, group=None):
    """Register the hook ``cfg.grad_compression`` names (a DistConfig) on ``ddp``.

    Returns the PowerSGD state object for powersgd, else None (no state to keep).
    """
    if cfg.grad_compression == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(group, default_hooks.bf16_compress_hook)
        return None
    if cfg.grad_compression == "powersgd":
        return PowerSGD(ddp, cfg.powersgd_rank, start, group)
    if cfg.grad_compression != "none":
        raise ValueError(f"dist.grad_compression={cfg.grad_compression!r}: use {' | '.join(OPTIONS)}")
    return None


def layout(shapes: Sequence[Sequence[int]], rank: int) -> list[tuple[int, int, int, int]]:
    """[(position, n, m, r)] of a bucket's compressed tensors in the order powerSGD_hook lays
    out their P and Q factors: grouped by matrix shape, groups in order of first appearance."""
    groups: dict = {}
    for i, shape in enumerate(shapes):
        r = compressed(shape, rank)
        if r:
            n, m = matrix_shape(shape)
            groups.setdefault((n, m), []).append((i, n, m, r))
    return [item for group in groups.values() for item in group]


def initial_q(name: str, m: int, r: int, dtype, device) -> torch.Tensor:
    """Q's first value for one parameter: seeded by its name, so equal on every rank and
    independent of which bucket the parameter lands in."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(m, r, generator=g, dtype=torch.float32).to(dtype=dtype, device=device)


class PowerSGD:
    """torch's powerSGD_hook with per-parameter state (see the module docstring)."""

    def __init__(self, ddp, rank: int, start: int, group=None):
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

        self._hook_fn = psgd.powerSGD_hook
        self.state = psgd.PowerSGDState(group, matrix_approximation_rank=rank, start_powerSGD_iter=start,
                                        min_compression_rate=MIN_COMPRESSION_RATE, use_error_feedback=True,
                                        warm_start=True)
        self.rank, self.world = rank, (group or dist.group.WORLD).size()
        named = [(n, p) for n, p in ddp.module.named_parameters() if p.requires_grad]
        self.names = {id(p): n for n, p in named}
        self.shapes = {n: tuple(p.shape) for n, p in named}
        self.buckets: dict[int, tuple[str, ...]] = {}  # bucket index -> its parameters' names
        self.where: dict[str, int] = {}  # parameter name -> its bucket index
        self.error: dict[str, torch.Tensor] = {}  # per parameter, while not in a bucket
        self.q: dict[str, torch.Tensor] = {}
        self.held: dict | None = None
        ddp.register_comm_hook(self.state, self.hook)

    # The hook: DDP calls it once per bucket in backward. No annotations: DDP checks them.
    def hook(self, state, bucket):
        index = bucket.index()
        names = tuple(self.names[id(p)] for p in bucket.parameters())
        if self.buckets.get(index, names) != names or any(self.where.get(n, index) != index for n in names):
            self._unbucket()  # DDP rebuilt its buckets: back to per-parameter state first
        self.buckets[index] = names
        self.where.update((n, index) for n in names)
        if state.iter >= state.start_powerSGD_iter:
            if index not in state.q_memory_dict:
                self._install(index, names, bucket.buffer())
            if self.held is not None and index not in self.held:
                self.held[index] = (state.error_dict.get(index), state.q_memory_dict[index].clone())
        fut = self._hook_fn(state, bucket)
        if not bucket.buffer().is_cuda:
            # gloo completes futures on its worker threads, so the hook's chained P and Q
            # all-reduces would be issued from there, racing this thread's next collectives
            # (SyncBatchNorm's and the loss's backward all-reduces, the next bucket) into a
            # different order on each rank. Finish the bucket here (the CPU twin gives up
            # overlap). NCCL completes futures when the work is enqueued, so there the
            # chain runs in order on this thread and overlaps with backward. (On gloo the
            # chain's matmuls run on its worker threads at OpenMP's thread count:
            # OMP_NUM_THREADS=1, which scripts/train.sh sets, keeps them deterministic.)
            fut.wait()
        return fut

    def _install(self, index: int, names: tuple, buffer: torch.Tensor) -> None:
        """Bucket ``index``'s error feedback and Q from the per-parameter state."""
        st = self.state
        items = layout([self.shapes[n] for n in names], self.rank)
        qs = [self.q.pop(names[i], None) for i, _, _, _ in items]
        qs = [q if q is not None else initial_q(names[i], m, r, buffer.dtype, buffer.device)
              for q, (i, _, m, r) in zip(qs, items)]
        st.q_memory_dict[index] = torch.cat([q.reshape(-1).to(buffer) for q in qs]) if qs else buffer.new_empty(0)
        st.p_memory_dict[index] = buffer.new_empty(sum(n * r for _, n, _, r in items))
        errors = [self.error.pop(n, None) for n in names]
        if all(e is not None for e in errors):
            st.error_dict[index] = torch.cat(errors).to(buffer.device)

    def _split(self, index: int) -> tuple[dict, dict]:
        """Bucket ``index``'s state as ({name: error [numel]}, {name: Q [m, r]})."""
        names, st = self.buckets[index], self.state
        error, q = {}, {}
        if index in st.error_dict:
            sizes = [math.prod(self.shapes[n]) for n in names]
            error = dict(zip(names, st.error_dict[index].split(sizes)))
        if index in st.q_memory_dict:
            items = layout([self.shapes[n] for n in names], self.rank)
            pieces = st.q_memory_dict[index].split([m * r for _, _, m, r in items])
            q = {names[i]: piece.view(m, r) for piece, (i, _, m, r) in zip(pieces, items)}
        return error, q

    def _unbucket(self) -> None:
        for index in self.buckets:
            error, q = self._split(index)
            self.error.update({n: e.clone() for n, e in error.items()})
            self.q.update({n: v.clone() for n, v in q.items()})
        st = self.state
        st.error_dict.clear(), st.p_memory_dict.clear(), st.q_memory_dict.clear()
        self.buckets, self.where = {}, {}

    # ------------------------------------------------------------ skipped steps

    def hold(self) -> None:
        """Before a step: remember each bucket's state as the hook first meets it."""
        self.held = {}

    def keep_if(self, applied: torch.Tensor) -> None:
        """After backward: where ``applied`` (0-d bool, on the device) is False, put the
        state back. Device-side (no sync). Cost: one pass over the error buffers."""
        st = self.state
        for index, (error, q) in (self.held or {}).items():
            if index in st.error_dict:
                before = error if error is not None else torch.zeros_like(st.error_dict[index])
                st.error_dict[index] = torch.where(applied, st.error_dict[index], before)
            if index in st.q_memory_dict:
                st.q_memory_dict[index] = torch.where(applied, st.q_memory_dict[index], q)
        self.held = None

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> tuple[dict, dict]:
        """(shared, local): shared is equal on every rank (Q, step counter, settings);
        local is this rank's error feedback. Both keyed by parameter name, on the CPU."""
        error = {n: e.cpu() for n, e in self.error.items()}
        q = {n: v.cpu() for n, v in self.q.items()}
        for index in self.buckets:
            e, v = self._split(index)
            error.update({n: t.cpu().clone() for n, t in e.items()})
            q.update({n: t.cpu().clone() for n, t in v.items()})
        shared = {"kind": "powersgd", "world_size": self.world, "rank": self.rank,
                  "iter": self.state.iter, "start": self.state.start_powerSGD_iter, "q": q}
        return shared, {"error": error}

    def load_state_dict(self, shared: dict, local: dict) -> None:
        st = self.state
        st.error_dict.clear(), st.p_memory_dict.clear(), st.q_memory_dict.clear()
        self.buckets, self.where = {}, {}
        st.iter = int(shared["iter"])
        # Another rank: Q's shape no longer fits; error feedback still does.
        self.q = dict(shared["q"]) if shared["rank"] == self.rank else {}
        self.error = dict(local["error"])


def resume(comm, ckpt: dict | None, path, step: int, rank: int, run_dir) -> str | None:
    """Restore ``comm`` (a PowerSGD or None) from the checkpoint at ``path``; returns a
    warning to print, if any. Without saved state the hook counts from ``step``, so
    ``dist.powersgd_start`` is always a step of the run, not of this process."""
    from bt_fast import checkpoint

    saved = (ckpt or {}).get("grad_comm")
    if comm is None:
        return (f"{path} holds PowerSGD state (error feedback); dist.grad_compression is no longer "
                "powersgd, so it is dropped") if saved else None
    if saved is None:
        comm.state.iter = step
        return None
    if saved["world_size"] != comm.world:
        raise ResumeError(f"{path}: its PowerSGD state (error feedback) is from {saved['world_size']} "
                          f"rank(s), this run has {comm.world}; start a new run_dir or use that world size")
    try:
        local = checkpoint.load_rank_file(run_dir, "feedback", step, rank)
    except CheckpointError as e:
        raise ResumeError(f"{e} (rank {rank}'s PowerSGD error feedback for step {step}, written beside "
                          f"{path}: copy the whole checkpoints folder, or set dist.grad_compression to "
                          "none or bf16 to resume without it)") from None
    comm.load_state_dict(saved, local)
    if saved["rank"] != comm.rank:
        return f"dist.powersgd_rank changed {saved['rank']} -> {comm.rank}: Q starts afresh"
    return None
