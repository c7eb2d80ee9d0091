"""``bt-fast bench loss [--method barlow_twins|vicreg] [--json]``: each loss implementation
against the official formulation of its method.

Three measurements, side by side in one run on the same cores:

1. time of forward+backward and peak extra memory (torch's profiler, every allocation
   during the step) of each impl and of the official formulation, for N x D in
   ``--sizes``;
2. bytes communicated per step for world sizes ``--worlds``, counted by wrapping the
   torch.distributed collectives that the loss actually issues under gloo (W spawned
   processes, one fwd+bwd each), next to the cost model's prediction;
3. the choice ``impl="auto"`` makes for each size, with the model's numbers.

On a CPU the Triton kernels only run in the interpreter (a correctness twin), so
``dense`` is timed only on a GPU or when asked for with ``--impls``. The collectives
each impl issues per step (W > 1); part 2 counts official and gram (fp32 and bf16).
Barlow Twins (``--method barlow_twins``, the default; official = main.py's dense c):

    gram      forward: all-gather of the raw [n, 2D] pair (input dtype), all-reduce of
              [2D] fp32 (row and column norms of c); backward: none
    dense     forward: two all-reduces of [2D] fp32 (normalize.py: sums, centred
              squares), all-gather of the normalized [n, 2D] pair (fp32, or the input
              dtype for fp16/bf16); backward: all-reduce of [4D] fp32 (normalize.py)
    official  forward: two all-reduces of [2D] fp32 through autograd (SyncBatchNorm-
              style statistics of z1, then of z2), raw all-reduce of c [D, D] fp32;
              backward: the two [2D] all-reduces again

VICReg (``--method vicreg``; official = main_vicreg.py, two [D, D] covariances):

    gram      forward: all-gather of the raw [n, 2D] pair (input dtype), all-reduce of
              3 fp64 scalars; backward: none
    official  forward: all-gathers of [n, D], one per view; backward: all-reduce of each
              gathered [N, D] gradient (its FullGatherLayer)
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from bt_fast.kernels import (
    barlow_twins_loss,
    choose_impl,
    choose_vicreg_impl,
    loss_costs,
    official_loss,
    vicreg_costs,
    vicreg_loss,
    vicreg_official_loss,
)
from bt_fast import safeio
from bt_fast.procs import run_workers


@dataclass(frozen=True)
class Method:
    """A loss family as the benchmark sees it: contender, baseline, cost model, defaults."""

    loss: Callable  # loss(z1, z2, impl=...) -> scalar
    official: Callable  # the official formulation, the baseline: official(z1, z2) -> scalar
    costs: Callable  # costs(n_global, d, world, dtype) -> {impl: ImplCost}
    choose: Callable  # choose(n_global, d, world, dtype, device) -> (impl, costs)
    impls: tuple  # timed by default (on CUDA, gpu_impls too)
    gpu_impls: tuple
    sizes: str  # default --sizes
    comm_sizes: str  # default --comm-sizes


METHODS = {
    "barlow_twins": Method(barlow_twins_loss, official_loss, loss_costs, choose_impl, ("reference", "gram"),
                           ("dense",), "256x2048,256x8192,2048x2048,2048x8192", "2048x8192"),
    # one process: the reference IS the official formulation, so only gram is timed against it;
    # bytes at N = 256, where the official step (8 N D^2 flops on every rank) fits these CPUs
    "vicreg": Method(vicreg_loss, vicreg_official_loss, vicreg_costs, choose_vicreg_impl, ("gram",), (),
                     "256x8192", "256x8192"),
}


def add_arguments(parser) -> None:
    parser.add_argument("--method", choices=sorted(METHODS), default="barlow_twins",
                        help="which loss: barlow_twins (default) or vicreg (Gram-form covariance)")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated NxD global batch x embedding width to time "
                             f"(default: barlow_twins {METHODS['barlow_twins'].sizes}; vicreg {METHODS['vicreg'].sizes})")
    parser.add_argument("--impls", default=None,
                        help="comma-separated impls to time (default: barlow_twins reference,gram, plus dense on "
                             "GPU; vicreg gram)")
    parser.add_argument("--comm-sizes", default=None,
                        help="NxD (global batch) at which to count communicated bytes; '' to skip "
                             f"(default: barlow_twins {METHODS['barlow_twins'].comm_sizes}; "
                             f"vicreg {METHODS['vicreg'].comm_sizes})")
    parser.add_argument("--worlds", default="2,4", help="world sizes for the byte count")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="repeat each timing at least this long")


# ---------------------------------------------------------------- collectives tally

_RING = {  # bytes one rank sends, for ring algorithms (gloo/NCCL on large messages)
    "all_reduce": lambda t, w: 2 * (w - 1) / w * _nbytes(t),
    "all_gather_into_tensor": lambda t, w: (w - 1) * _nbytes(t),
    "all_gather_single": lambda t, w: (w - 1) * _nbytes(t),
    "all_gather": lambda t, w: (w - 1) * _nbytes(t),
    "broadcast": lambda t, w: _nbytes(t),
    "reduce_scatter_tensor": lambda t, w: (w - 1) / w * _nbytes(t),
}


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


class CollectiveTally:
    """Context manager that counts every collective torch.distributed issues inside it.

    ``calls`` holds (phase, name, tensor bytes, bytes sent per rank); set ``phase`` to
    label calls (e.g. "forward", "backward"). The tensor counted is the one each rank
    contributes (the input of an all-gather, the buffer of an all-reduce).
    """

    def __init__(self, group=None):
        self.calls, self.phase, self._saved = [], "", {}
        self.group = group  # count only this group's calls (None: every call)

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            group = kwargs.get("group")
            if self.group is None or group is self.group:
                w = dist.get_world_size(group)
                t = args[1] if name.startswith(("all_gather", "reduce_scatter")) else args[0]
                # list.append is atomic: hooks' chained collectives may call from gloo's threads
                self.calls.append((self.phase, name, _nbytes(t), _RING[name](t, w)))
            return fn(*args, **kwargs)

        return counted

    def __enter__(self):
        for name in _RING:
            if not hasattr(dist, name):
                continue
            self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name, self._saved[name]))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    def total(self, field: int = 3, phase: str | None = None) -> float:
        return sum(c[field] for c in self.calls if phase is None or c[0] == phase)


# ---------------------------------------------------------------- time and memory

def _loss_fn(method: str, impl: str):
    m = METHODS[method]
    if impl == "official":
        return lambda z1, z2: m.official(z1, z2)
    return lambda z1, z2: m.loss(z1, z2, impl=impl)


def _step(fn, z1, z2) -> None:
    z1.grad = z2.grad = None
    fn(z1, z2).backward()


def _peak_bytes(fn, z1, z2) -> int:
    """Peak of live bytes allocated during one fwd+bwd (inputs excluded, their grads included)."""
    z1.grad = z2.grad = None  # freed before profiling starts
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(fn, z1, z2)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _peak_bytes_cuda(fn, z1, z2) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _step(fn, z1, z2)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _time_interleaved(fns: dict, z1, z2, min_seconds: float) -> dict:
    """Median seconds per fwd+bwd of each fn; runs alternate between fns (round robin) so
    that load from other processes on these shared cores hits all of them alike. Each fn
    runs at least once and is repeated until it has min_seconds or 20 runs."""
    sync = torch.cuda.synchronize if z1.is_cuda else (lambda: None)
    times = {name: [] for name in fns}
    while any(not t or (sum(t) < min_seconds and len(t) < 20) for t in times.values()):
        for name, fn in fns.items():
            t = times[name]
            if t and (sum(t) >= min_seconds or len(t) >= 20):
                continue
            sync()
            t0 = time.perf_counter()
            _step(fn, z1, z2)
            sync()
            t.append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_size(n: int, d: int, impls: list[str], device: str, min_seconds: float,
               method: str = "barlow_twins") -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    z1 = torch.randn(n, d, device=device, generator=g).requires_grad_(True)
    z2 = torch.randn(n, d, device=device, generator=g).requires_grad_(True)
    fns = {impl: _loss_fn(method, impl) for impl in ["official"] + impls}
    peak_fn = _peak_bytes_cuda if device == "cuda" else _peak_bytes
    peaks = {impl: peak_fn(fn, z1, z2) for impl, fn in fns.items()}  # doubles as the warm-up
    seconds = _time_interleaved(fns, z1, z2, min_seconds)
    rows = {impl: {"seconds": seconds[impl], "peak_bytes": peaks[impl]} for impl in fns}
    base = rows["official"]
    for row in rows.values():
        row["speedup_vs_official"] = base["seconds"] / row["seconds"]
        row["memory_ratio_vs_official"] = base["peak_bytes"] / max(row["peak_bytes"], 1)
    auto, costs = METHODS[method].choose(n, d, 1, torch.float32, device)
    return {"n": n, "d": d, "auto": auto, "model_seconds": {k: v.seconds for k, v in costs.items()}, "impls": rows}


# ---------------------------------------------------------------- bytes communicated

COMM_CASES = [  # (label, impl, input dtype), for either method
    ("official", "official", torch.float32),
    ("gram_fp32", "gram", torch.float32),
    ("gram_bf16", "gram", torch.bfloat16),
]


def _comm_worker(rank: int, world: int, port: int, sizes, out_dir: str, method: str = "barlow_twins") -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = []
        for n_global, d in sizes:
            n = n_global // world
            for label, impl, dtype in COMM_CASES:
                g = torch.Generator().manual_seed(rank)
                z1 = torch.randn(n, d, generator=g).to(dtype).requires_grad_(True)
                z2 = torch.randn(n, d, generator=g).to(dtype).requires_grad_(True)
                with CollectiveTally() as tally:
                    tally.phase = "forward"
                    loss = _loss_fn(method, impl)(z1, z2)
                    tally.phase = "backward"
                    loss.backward()
                model = METHODS[method].costs(n_global, d, world, dtype)[impl].sent_bytes
                results.append({"world_size": world, "n_global": n_global, "d": d, "case": label,
                                "collectives": [c[:3] for c in tally.calls], "tensor_bytes": tally.total(2),
                                "sent_bytes": tally.total(3), "sent_bytes_backward": tally.total(3, "backward"),
                                "model_sent_bytes": model})
                del z1, z2, loss
        if rank == 0:
            safeio.write_atomic(os.path.join(out_dir, f"w{world}.json"), json.dumps(results), durable=False)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def bench_comm(sizes, worlds, method: str = "barlow_twins") -> list[dict]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            run_workers("bt_fast.bench.loss:_comm_worker", world, sizes, tmp, method)
            with open(os.path.join(tmp, f"w{world}.json")) as f:
                out.extend(json.load(f))
    for row in out:
        base = next(r for r in out if r["case"] == "official" and r["world_size"] == row["world_size"]
                    and (r["n_global"], r["d"]) == (row["n_global"], row["d"]))
        row["fewer_bytes_vs_official"] = base["sent_bytes"] / max(row["sent_bytes"], 1)
    return out


# ---------------------------------------------------------------- entry point

def _parse_sizes(text: str):
    return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item.strip()]


def run(args) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    method = METHODS[args.method]
    try:
        sizes = _parse_sizes(method.sizes if args.sizes is None else args.sizes)
        comm_sizes = _parse_sizes(method.comm_sizes if args.comm_sizes is None else args.comm_sizes)
        worlds = [int(w) for w in args.worlds.split(",") if w.strip()]
    except ValueError:
        print("bench loss: --sizes/--comm-sizes take NxD,NxD... and --worlds W,W...")
        return 2
    impls = args.impls.split(",") if args.impls else list(method.impls + (method.gpu_impls if device == "cuda" else ()))
    report = {
        "method": args.method,
        "device": device,
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "note": ("cpu: torch paths timed; Triton kernels run only in the interpreter here and are not timed"
                 if device == "cpu" else "cuda: Triton kernels timed"),
        "timing": [bench_size(n, d, impls, device, args.min_seconds, args.method) for n, d in sizes],
        "comm": bench_comm(comm_sizes, worlds, args.method) if comm_sizes and worlds else [],
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_table(report)
    return 0


def _print_table(report: dict) -> None:
    print(f"{report['method']} device={report['device']} threads={report['threads']}  ({report['note']})")
    for row in report["timing"]:
        print(f"N={row['n']} D={row['d']}  auto -> {row['auto']}")
        for impl, r in row["impls"].items():
            print(f"  {impl:10s} {r['seconds'] * 1e3:10.1f} ms  {r['peak_bytes'] / 2**20:9.1f} MiB"
                  f"  x{r['speedup_vs_official']:.1f} faster  x{r['memory_ratio_vs_official']:.1f} less memory")
    for row in report["comm"]:
        print(f"W={row['world_size']} N={row['n_global']} D={row['d']} {row['case']:10s}"
              f" sent {row['sent_bytes'] / 2**20:9.2f} MiB/rank (model {row['model_sent_bytes'] / 2**20:.2f})"
              f"  x{row['fewer_bytes_vs_official']:.1f} fewer")
