"""The loss over 2 and 3 gloo processes equals the loss on the concatenated batch.

Each rank must get exactly the rows of the single-process gradient that belong to it
(README, "Gradient scale and world size"): DDP's mean then gives the official convention.
"""

import os

import pytest
import torch
import torch.distributed as dist

from bt_fast.bench.loss import CollectiveTally
from bt_fast.procs import run_workers
from bt_fast.kernels import barlow_twins_loss

N_LOCAL, D, UPSTREAM = 13, 50, 1.7
CASES = [("reference", torch.float32), ("gram", torch.float32), ("dense", torch.float32), ("gram", torch.bfloat16)]
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 1e-2)}


def _worker(rank, world, port, data_path, out_dir):
    """One rank: its rows of the global batch through every impl; results to out_dir."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    z1_all, z2_all = torch.load(data_path)
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    results = {}
    for impl, dtype in CASES:
        z1 = z1_all[rows].to(dtype).requires_grad_(True)
        z2 = z2_all[rows].to(dtype).requires_grad_(True)
        with CollectiveTally() as tally:
            tally.phase = "forward"
            loss = barlow_twins_loss(z1, z2, impl=impl)
            tally.phase = "backward"
            (loss * UPSTREAM).backward()
        results[(impl, dtype)] = (loss.detach(), z1.grad, z2.grad, tally.calls)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_reproduce_the_single_process_loss_and_gradient_rows(world, tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(world)
    z1 = torch.randn(world * N_LOCAL, D, generator=g, dtype=torch.float64) * 3 + 1
    z2 = 0.5 * z1 + torch.randn(world * N_LOCAL, D, generator=g, dtype=torch.float64)
    torch.save((z1.float(), z2.float()), tmp_path / "z.pt")
    monkeypatch.setenv("PYTHONPATH", os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run_workers("test_loss_distributed:_worker", world, str(tmp_path / "z.pt"), str(tmp_path), timeout=600)

    x1, x2 = z1.float().double().requires_grad_(True), z2.float().double().requires_grad_(True)
    want = barlow_twins_loss(x1, x2, impl="reference")  # one process, global batch, float64
    (want * UPSTREAM).backward()
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        for (impl, dtype), (loss, g1, g2, calls) in got.items():
            loss_tol, grad_tol = TOL[dtype]
            assert abs(loss.double() - want.detach()) / want.detach() <= loss_tol, (impl, dtype, rank)
            for grad, full in ((g1, x1.grad), (g2, x2.grad)):
                err = (grad.double() - full[rows]).norm() / full[rows].norm()
                assert err <= grad_tol, (impl, dtype, rank, err.item())
            if impl == "gram":
                # forward: one all-gather of the raw [n, 2D] pair, one all-reduce of the
                # [2D] fp32 row/column norms of c; backward: nothing at all
                fwd = [(name, nbytes) for phase, name, nbytes, _ in calls if phase == "forward"]
                bwd = [c for c in calls if c[0] == "backward"]
                size = torch.empty((), dtype=dtype).element_size()
                assert fwd == [(fwd[0][0], N_LOCAL * 2 * D * size), ("all_reduce", 8 * D)]
                assert fwd[0][0].startswith("all_gather")
                assert bwd == []
            if impl == "dense":  # same gather; normalization's backward all-reduces [4D]
                assert [c[1:3] for c in calls if c[0] == "backward"] == [("all_reduce", 16 * D)]
