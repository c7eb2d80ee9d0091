"""Part 2, Correctness on this device: kernels vs the oracle, a few training steps, NCCL.

On a GPU the compiled Triton kernels run; without one the same calls run under Triton's
interpreter at small sizes (the CPU twins). The oracle is kernels/reference.py in
float64 on the same (dtype-rounded) inputs, so only the kernel's own error is measured.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch

from bt_fast import safeio
from bt_fast.doctor.environment import Host
from bt_fast.doctor.report import FAIL, PASS, Check, skip

UPSTREAM = 1.7  # an upstream gradient that is not 1 catches a dropped grad_output
LAMBD = 0.0051  # the oracle's default weight of the off-diagonal term
# (loss rel, grad rel) per dtype: tests/test_loss_kernels.py's bf16 loss bound; fp32 and
# bf16 gradients looser than the tests' for GPU reduction orders at D = 8192
TOL = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (1e-2, 2e-2)}


def sizes(host: Host, quick: bool) -> list[tuple[int, int]]:
    """N x D cases: whole 64-wide blocks and ragged ones (masked edges in N and D)."""
    if not host.cuda:  # interpreter: seconds per case
        return [(37, 50)] if quick else [(37, 50), (64, 129)]
    return [(256, 512), (1000, 1030)] if quick else [(256, 512), (1000, 1030), (2048, 2051), (2048, 8192)]


def _pair(n: int, d: int, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + 0.5
    z2 = 0.5 * z1 + torch.randn(n, d, generator=g, dtype=torch.float64)  # correlated views
    return z1.to(device), z2.to(device)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _loss_and_grads(fn, z1, z2, dtype):
    a = z1.detach().to(dtype).requires_grad_(True)
    b = z2.detach().to(dtype).requires_grad_(True)
    loss = fn(a, b)
    (loss * UPSTREAM).backward()
    return loss.detach(), a.grad, b.grad


def loss_impl(impl: str, host: Host, quick: bool) -> Check:
    """``impl`` (dense / gram) vs the float64 oracle: loss and both input gradients."""
    from bt_fast.kernels import barlow_twins_loss, barlow_twins_loss_reference
    from bt_fast.kernels.gram import gram_terms

    device = "cuda" if host.cuda else "cpu"
    if impl == "gram":  # fused=True: the Triton column norm, as on CUDA (interpreter here)
        def fn(a, b):
            on, off = gram_terms(a, b, fused=True)
            return on + LAMBD * off
    else:
        def fn(a, b):
            return barlow_twins_loss(a, b, impl=impl)
    worst, cases = {"loss": 0.0, "grad": 0.0}, []
    failed = []
    for n, d in sizes(host, quick):
        for dtype in (torch.float32, torch.bfloat16):
            z1, z2 = _pair(n, d, device, seed=n + d)
            want = _loss_and_grads(barlow_twins_loss_reference, z1.to(dtype).double(), z2.to(dtype).double(),
                                   torch.float64)
            got = _loss_and_grads(fn, z1, z2, dtype)
            err = {"loss": _rel(got[0], want[0]), "grad": max(_rel(got[1], want[1]), _rel(got[2], want[2]))}
            cases.append({"n": n, "d": d, "dtype": str(dtype).split(".")[-1], **err})
            for k in err:
                worst[k] = max(worst[k], err[k])
            tol = TOL[dtype]
            if not (err["loss"] <= tol[0] and err["grad"] <= tol[1]) or not math.isfinite(err["loss"]):
                failed.append(f"{n}x{d} {cases[-1]['dtype']}: loss {err['loss']:.1e}, grad {err['grad']:.1e}")
    shapes = ", ".join(f"{n}x{d}" for n, d in sizes(host, quick))
    detail = (f"{len(cases)} cases ({shapes}; fp32, bf16): worst rel error loss {worst['loss']:.1e}, "
              f"grad {worst['grad']:.1e}")
    twin = "" if host.cuda else " [interpreter]"
    if failed:
        return Check(f"loss.{impl}{twin}", FAIL, "over tolerance: " + "; ".join(failed), {"cases": cases})
    return Check(f"loss.{impl}{twin}", PASS, detail, {"cases": cases})


def colnorm(host: Host, quick: bool) -> Check:
    """The fused column-norm kernel vs plain float64 statistics (its forward outputs; the
    gradients through it are loss.gram's, which runs it with fused=True)."""
    from bt_fast.kernels.colnorm import colnorm_pair
    from bt_fast.kernels.reference import batch_normalize

    device, eps, worst, cases = ("cuda" if host.cuda else "cpu"), 1e-5, 0.0, 0
    for n, d in sizes(host, quick):
        for dtype in (torch.float32, torch.bfloat16):
            z1, z2 = _pair(n, d, device, seed=3 * n + d)
            z1, z2 = z1.to(dtype), z2.to(dtype)
            a1, a2, inv, diag = colnorm_pair(z1, z2, eps)
            x1, x2 = z1.double(), z2.double()
            r1, r2 = batch_normalize(x1, eps), batch_normalize(x2, eps)
            r_inv = torch.cat([1 / torch.sqrt(x.var(0, unbiased=False) + eps) for x in (x1, x2)])
            errs = [_rel(a1, r1), _rel(a2, r2), _rel(inv, r_inv), _rel(diag, (r1 * r2).mean(0))]
            worst, cases = max(worst, *errs), cases + 1
    name = "colnorm" + ("" if host.cuda else " [interpreter]")
    status = PASS if worst <= 1e-4 else FAIL  # fp32 sums over N rows: ~sqrt(N) ulp typical
    return Check(name, status, f"{cases} cases (a1, a2, 1/sigma, diag c): worst rel error {worst:.1e}",
                 {"worst": worst})


def train_steps(host: Host, cfg, quick: bool) -> Check:
    """A few steps of the recipe on one fixed batch: every loss finite, the last below the first.

    GPU: the recipe itself (e.g. ResNet-50, 224 px, bf16) at a small batch. CPU twin: the
    same code with a tiny ResNet at 32 px. Learning rates: the recipe's peaks at its batch.
    """
    from bt_fast.bench.step import contender, contender_step

    device = torch.device("cuda" if host.cuda else "cpu")
    lr_scale = cfg.data.batch_size / 256
    batch, steps = (16, 4) if quick else (32, 6)
    if not host.cuda:
        cfg = tiny_twin(cfg)
        batch = 16
    run, views = contender(cfg, batch, device, lr_scale=lr_scale)
    losses = [float(contender_step(run, views).item()) for _ in range(steps)]  # one sync per step: fine here
    what = (f"{cfg.model.backbone} {config_view_size(cfg)}px {cfg.train.precision} batch {batch}, "
            f"{steps} steps")
    data = {"losses": losses, "batch": batch, "backbone": cfg.model.backbone}
    name = "train_steps" + ("" if host.cuda else " [cpu twin]")
    if not all(math.isfinite(x) for x in losses):
        return Check(name, FAIL, f"{what}: non-finite loss {losses}", data)
    if not losses[-1] < losses[0]:
        return Check(name, FAIL, f"{what}: loss did not decrease ({losses[0]:.4g} -> {losses[-1]:.4g})", data)
    return Check(name, PASS, f"{what}: loss {losses[0]:.4g} -> {losses[-1]:.4g}", data)


def config_view_size(cfg) -> int:
    from bt_fast import config

    return config.resolved_views(cfg)[0].size


def tiny_twin(cfg):
    """The recipe with a model and images small enough for seconds per step on a CPU."""
    def edit(d: dict) -> None:
        d["model"].update(backbone="resnet18", width=8, small_stem=True, sync_bn=False)
        # the projector lives in model (older trees) or in the active method's section
        method = d.get("method", {})
        for section in (d["model"], method.get(method.get("name"), {})):
            if "projector" in section:
                section["projector"] = "64-64"
        d["data"]["image_size"] = 32
        d["train"].update(precision="fp32", compile=False)
        for view in d.get("views") or []:
            view["size"] = 32

    return reload_with(cfg, edit)


def reload_with(cfg, edit):
    """``cfg`` with ``edit(dict)`` applied, re-read through config.load (validation included):
    to_dict/load are the config module's stable names."""
    import yaml

    from bt_fast import config

    values = config.to_dict(cfg)
    edit(values)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "doctor.yaml"
        safeio.write_atomic(path, yaml.safe_dump(values), durable=False)
        return config.load(path)


# ---------------------------------------------------------------- distributed loss

def distributed_loss(host: Host, quick: bool, backend: str | None = None) -> Check:
    """2 ranks (NCCL on 2 GPUs) vs one process on the global batch: the loss, and each
    rank's gradient rows (README, "Gradient scale and world size"). ``backend="gloo"`` is the CPU twin."""
    from bt_fast.procs import run_workers

    if backend is None:
        if host.gpus < 2:
            return skip("nccl.distributed_loss", f"{host.gpus} GPU(s): needs 2 (gloo twin is in the tests)")
        backend = "nccl"
    n_local, d = (16, 50) if backend == "gloo" else ((256, 1030) if quick else (1024, 8192))
    with tempfile.TemporaryDirectory(prefix="bt-doctor-") as tmp:
        run_workers("bt_fast.doctor.correctness:dist_worker", 2, backend, n_local, d, tmp, timeout=300)
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(2)]
    worst = {impl: max(max(r[impl].values()) for r in ranks) for impl in ranks[0]}
    bad = {impl: w for impl, w in worst.items() if not w <= TOL[torch.float32][1]}
    detail = f"2 ranks over {backend}, N={2 * n_local}, D={d}: worst rel error " + ", ".join(
        f"{impl} {w:.1e}" for impl, w in worst.items())
    return Check(f"{backend}.distributed_loss", FAIL if bad else PASS, detail, {"ranks": ranks})


def dist_worker(rank: int, world: int, port: int, backend: str, n_local: int, d: int, out_dir: str) -> None:
    """One rank: its rows through gram and dense over ``group``; errors to out_dir/rank{r}.json."""
    import torch.distributed as dist

    from bt_fast.kernels import barlow_twins_loss

    device = torch.device(f"cuda:{rank}" if backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    z1, z2 = _pair(n_local * world, d, device, seed=7)  # the same global batch on every rank
    rows = slice(rank * n_local, (rank + 1) * n_local)
    # the one-process oracle, before the group exists (group=None would then mean WORLD)
    want = _loss_and_grads(lambda a, b: barlow_twins_loss(a, b, impl="reference"), z1, z2, torch.float64)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = {}
        for impl in ("gram", "dense"):
            got = _loss_and_grads(lambda a, b: barlow_twins_loss(a, b, impl=impl, group=dist.group.WORLD),
                                  z1[rows], z2[rows], torch.float32)
            out[impl] = {"loss": _rel(got[0], want[0]),
                         "grad": max(_rel(got[1], want[1][rows]), _rel(got[2], want[2][rows]))}
        safeio.write_atomic(Path(out_dir) / f"rank{rank}.json", json.dumps(out), durable=False)
        dist.barrier()
    finally:
        dist.destroy_process_group()
