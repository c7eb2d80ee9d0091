"""VICReg (both impls), NT-Xent and BYOL over 2 and 3 gloo processes against one
process on the concatenated batch.

Each rank back-propagates its OWN upstream gradient (1.7 + rank) and must get exactly
that times the rows of the single-process gradient that belong to it: the gradient
convention of README "Gradient scale and world size", and a stronger check than one shared
upstream (a gather whose backward sums over ranks would mix the ranks' upstreams, and
one that forgot other ranks' anchors would miss rows' contributions).
"""

import os

import pytest
import torch
import torch.distributed as dist

from bt_fast.bench.loss import CollectiveTally
from bt_fast.kernels import byol_loss, nt_xent_loss, vicreg_loss, vicreg_official_loss
from bt_fast.procs import run_workers

pytestmark = pytest.mark.slow  # spawns processes

N_LOCAL, D = 13, 50
CASES = [  # (name, dtype)
    ("vicreg_reference", torch.float32),
    ("vicreg_official", torch.float32),  # the baseline: W times the exact gradient, by design
    ("vicreg_gram", torch.float32),
    ("vicreg_gram", torch.bfloat16),
    ("nt_xent", torch.float32),
    ("byol", torch.float32),
]
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 1e-2)}  # (loss, gradient) relative


def _loss(name, z1, z2, p1, p2):
    """The loss of a case and the tensors whose gradients it checks."""
    if name == "vicreg_official":
        return vicreg_official_loss(z1, z2), (z1, z2)
    if name.startswith("vicreg"):
        return vicreg_loss(z1, z2, impl=name.split("_")[1]), (z1, z2)
    if name == "nt_xent":
        return nt_xent_loss(z1, z2, temperature=0.2), (z1, z2)
    return byol_loss(p1, p2, z1, z2), (p1, p2)


def _upstream(name, rank):
    return 1.0 if name == "vicreg_official" else 1.7 + rank


def _gradient_factor(name, rank, world):
    """What multiplies rank's rows of the single-process gradient (upstream 1)."""
    # main_vicreg.py's gather sums gradients over ranks and its repr_loss is local: with
    # the same upstream everywhere that is W times the gradient (DDP's mean undoes it)
    return world if name == "vicreg_official" else _upstream(name, rank)


def _worker(rank, world, port, data_path, out_dir):
    """One rank: its rows of the global batch through every case; results to out_dir."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    results = {}
    for name, dtype in CASES:
        z1, z2, p1, p2 = (t[rows].to(dtype).requires_grad_(True) for t in torch.load(data_path))
        with CollectiveTally() as tally:
            tally.phase = "forward"
            loss, inputs = _loss(name, z1, z2, p1, p2)
            tally.phase = "backward"
            (loss * _upstream(name, rank)).backward()
        results[(name, dtype)] = (loss.detach(), [x.grad for x in inputs], tally.calls)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _expected_collectives(name, dtype, world):
    """(phase, name, bytes this rank contributes) of every collective, in order."""
    s = torch.empty((), dtype=dtype).element_size()
    if name == "vicreg_gram":  # the raw pair once; 3 fp64 sums (||G_r||^2 x 2, sum (z1 - z2)^2)
        return [("forward", "gather", N_LOCAL * 2 * D * s), ("forward", "all_reduce", 3 * 8)]
    if name == "vicreg_reference":  # the oracle gathers z1 and z2
        return [("forward", "gather", N_LOCAL * D * s)] * 2
    if name == "vicreg_official":  # and all-reduces both whole [N, D] gradients in backward
        return [("forward", "gather", N_LOCAL * D * s)] * 2 + [("backward", "all_reduce", world * N_LOCAL * D * s)] * 2
    if name == "nt_xent":  # unit rows in fp32, then (lse_i, l_i) of the 2n anchors
        return [("forward", "gather", N_LOCAL * 2 * D * 4), ("forward", "gather", 2 * N_LOCAL * 2 * 4)]
    return [("forward", "all_reduce", 4)]  # byol: the local sum


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_reproduce_the_single_process_loss_and_gradient_rows(world, tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(world)
    n = world * N_LOCAL
    scale = torch.linspace(0.3, 1.6, D, dtype=torch.float64)  # VICReg's variance hinge half active
    z1 = torch.randn(n, D, generator=g, dtype=torch.float64) * scale + 1
    z2 = 0.5 * z1 + torch.randn(n, D, generator=g, dtype=torch.float64) * scale
    p1, p2 = torch.randn(n, D, generator=g, dtype=torch.float64), torch.randn(n, D, generator=g, dtype=torch.float64)
    data = [t.float() for t in (z1, z2, p1, p2)]
    torch.save(data, tmp_path / "z.pt")
    monkeypatch.setenv("PYTHONPATH", os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run_workers("test_loss_methods_distributed:_worker", world, str(tmp_path / "z.pt"), str(tmp_path), timeout=600)

    for name, dtype in CASES:
        # one process, the global batch, float64, upstream 1
        x1, x2, q1, q2 = (t.to(dtype).double().requires_grad_(True) for t in data)
        want, inputs = _loss(name, x1, x2, q1, q2)
        full = torch.autograd.grad(want, inputs)
        loss_tol, grad_tol = TOL[dtype]
        for rank in range(world):
            loss, grads, calls = torch.load(tmp_path / f"rank{rank}.pt")[(name, dtype)]
            rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
            if name == "vicreg_official":  # repr_loss of the local rows: only the mean over ranks is global
                loss = sum(torch.load(tmp_path / f"rank{r}.pt")[(name, dtype)][0] for r in range(world)) / world
            assert abs(loss.double() - want.detach()) <= loss_tol * abs(want.detach()), (name, dtype, rank)
            for grad, ref in zip(grads, full):
                ref = _gradient_factor(name, rank, world) * ref[rows]
                err = ((grad.double() - ref).norm() / ref.norm()).item()
                assert err <= grad_tol, (name, dtype, rank, err)
            got = [(phase, "gather" if op.startswith("all_gather") else op, nbytes) for phase, op, nbytes, _ in calls]
            assert got == _expected_collectives(name, dtype, world), (name, dtype, got)  # ours: none in backward
