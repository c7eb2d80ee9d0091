"""swav_loss and dino_loss (and their references) over 2 and 3 gloo processes against one
process on the concatenated batch, in float64 and float32.

The official multi-crop convention (kernels/multicrop.py): every rank returns the loss of
the global batch and its rows get W times the exact gradient. Each rank back-propagates
its OWN upstream (1.7 + rank), so a backward that mixed ranks' upstreams would show. The
collectives are counted: SwAV sends only the Sinkhorn totals ([1]) and prototype sums
([K], ``iters`` of them) per global crop, and the loss scalar; nothing in backward. With a
queue (``swav_queue``) every rank brings its own L_LOCAL past rows per global crop into
Sinkhorn-Knopp, and the reference is one process whose queue is every rank's rows.
"""

import os

import pytest
import torch
import torch.distributed as dist

from bt_fast.bench.loss import CollectiveTally
from bt_fast.kernels import dino_batch_center, dino_loss, dino_loss_reference, swav_loss, swav_loss_reference
from bt_fast.procs import run_workers

pytestmark = pytest.mark.slow  # spawns processes

N_LOCAL, K, CROPS, ITERS, L_LOCAL = 5, 12, 4, 3, 7
CASES = [(name, dtype) for name in ("swav", "swav_reference", "swav_queue", "swav_queue_reference",
                                    "dino", "dino_reference")
         for dtype in (torch.float64, torch.float32)]
TOL = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 1e-4)}  # (loss, gradient) relative


def _loss(name, crops, center, queue):
    """The loss of a case on per-crop tensors (SwAV: scores (and the queue's [L, K] per global
    crop); DINO: 4 student + 2 teacher)."""
    if name.startswith("swav"):
        fn = swav_loss_reference if name.endswith("_reference") else swav_loss
        return fn(crops[:CROPS], n_global=2, temperature=0.1, epsilon=0.05, iters=ITERS,
                  queue_scores=queue if "queue" in name else None)
    fn = dino_loss if name == "dino" else dino_loss_reference
    return fn(crops[:CROPS], crops[CROPS:], center, student_temp=0.1, teacher_temp=0.04)


def _worker(rank, world, port, data_path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    data, center, queue = torch.load(data_path)
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    mine = [q[rank * L_LOCAL:(rank + 1) * L_LOCAL] for q in queue]  # this rank's own queue
    results = {}
    for name, dtype in CASES:
        crops = [t[rows].to(dtype).requires_grad_(True) for t in data]
        with CollectiveTally() as tally:
            tally.phase = "forward"
            loss = _loss(name, crops, center.to(dtype), [q.to(dtype) for q in mine])
            tally.phase = "backward"
            (loss * (1.7 + rank)).backward()
        results[(name, dtype)] = (loss.detach(), [x.grad for x in crops[:CROPS]], tally.calls)
    results["center"] = dino_batch_center([t[rows] for t in data[CROPS:]])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _expected_collectives(name, dtype):
    s = torch.empty((), dtype=dtype).element_size()
    if name in ("swav", "swav_queue"):  # per global crop: the total, then ITERS prototype sums; then the loss
        return ([("forward", "all_reduce", s)] + [("forward", "all_reduce", K * s)] * ITERS) * 2 \
            + [("forward", "all_reduce", s)]
    if name == "dino":
        return [("forward", "all_reduce", s)]
    if name == "swav_queue_reference":  # every crop's rows, then each global crop's queue
        return [("forward", "gather", N_LOCAL * K * s)] * CROPS + [("forward", "gather", L_LOCAL * K * s)] * 2
    return [("forward", "gather", N_LOCAL * K * s)] * (CROPS if name == "swav_reference" else CROPS + 2)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_return_the_global_loss_and_w_times_its_gradient(world, tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(world)
    n = world * N_LOCAL
    protos = torch.nn.functional.normalize(torch.randn(K, 16, generator=g, dtype=torch.float64), dim=1)
    base = torch.randn(n, 16, generator=g, dtype=torch.float64)
    unit = [torch.nn.functional.normalize(base + torch.randn(n, 16, generator=g, dtype=torch.float64), dim=1)
            for _ in range(CROPS)]
    scores = [u @ protos.T for u in unit]  # SwAV inputs: cosines in [-1, 1]
    teacher = [3 * s[:, :K] + 0.2 * torch.randn(n, K, generator=g, dtype=torch.float64) for s in scores[:2]]
    center = 0.1 * torch.randn(K, generator=g, dtype=torch.float64)
    data = scores + teacher  # crops 0..3: SwAV scores / DINO student; 4, 5: DINO teacher
    past = [torch.nn.functional.normalize(torch.randn(world * L_LOCAL, 16, generator=g, dtype=torch.float64), dim=1)
            for _ in range(2)]
    queue = [u @ protos.T for u in past]  # [W L, K] per global crop, rank r's rows r L .. (r + 1) L
    torch.save((data, center, queue), tmp_path / "data.pt")
    monkeypatch.setenv("PYTHONPATH", os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run_workers("test_loss_multicrop_distributed:_worker", world, str(tmp_path / "data.pt"), str(tmp_path),
                timeout=600)

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name, dtype in CASES:
        crops = [t.to(dtype).double().requires_grad_(True) for t in data]
        # one process, global batch (and every rank's queue rows), float64
        want = _loss(name.replace("_reference", ""), crops, center, [q.to(dtype).double() for q in queue])
        full = torch.autograd.grad(want, crops[:CROPS], allow_unused=True)
        loss_tol, grad_tol = TOL[dtype]
        for rank in range(world):
            loss, grads, calls = results[rank][(name, dtype)]
            rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
            assert abs(loss.double() - want.detach()) <= loss_tol * abs(want.detach()), (name, dtype, rank)
            for grad, ref in zip(grads, full):
                ref = world * (1.7 + rank) * ref[rows]  # W x the exact gradient, this rank's upstream
                err = ((grad.double() - ref).norm() / ref.norm()).item()
                assert err <= grad_tol, (name, dtype, rank, err)
            got = [(phase, "gather" if op.startswith("all_gather") else op, nbytes) for phase, op, nbytes, _ in calls]
            assert got == _expected_collectives(name, dtype), (name, dtype, got)
    for rank in range(world):  # the centre's batch term: the mean of every teacher row of every rank
        torch.testing.assert_close(results[rank]["center"], torch.cat(teacher).mean(0))
