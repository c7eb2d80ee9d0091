"""BYOL through the trainer on 2 gloo ranks: DDP (static graph) and CPU SyncBatchNorm with
a frozen target network that only the moving average changes."""

from __future__ import annotations

import os

import pytest
import torch

from bt_fast import checkpoint
from bt_fast.procs import run_workers
from conftest import CONFIGS

pytestmark = pytest.mark.slow  # two trainer processes


def _worker(rank: int, world: int, port: int, data: str, run_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      GLOO_SOCKET_IFNAME="lo")
    from bt_fast.cli import main

    sets = ["method.name=byol", "train.max_steps=2", f"data.train_dir={data}/train",
            f"data.val_dir={data}/val", f"train.run_dir={run_dir}"]
    code = main(["train", "--config", str(CONFIGS / "smoke.yaml"), *[a for s in sets for a in ("--set", s)]])
    assert code == 0, code


def test_byol_trains_on_two_ranks_with_a_frozen_target(tiny_imagefolder, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run_workers("test_methods_ddp:_worker", 2, str(tiny_imagefolder), str(tmp_path), timeout=600)
    ckpt = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    state = ckpt["model"]
    assert ckpt["step"] == 2 and all(torch.isfinite(v.float()).all() for v in state.values())
    online = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    target = {k.removeprefix("target.backbone."): v for k, v in state.items() if k.startswith("target.backbone.")}
    assert online.keys() == target.keys()
    moved = [k for k in online if online[k].is_floating_point() and not torch.equal(online[k], target[k])]
    assert moved  # the target lags the online network by the moving average
    n_trainable = sum(1 for k in state if not k.startswith("target.") and "running_" not in k
                      and "num_batches" not in k)
    in_optimizer = sum(len(g["params"]) for g in ckpt["optimizer"]["param_groups"])
    assert in_optimizer == len(ckpt["optimizer"]["state"]) == n_trainable  # the target is not in LARS


def _multicrop_worker(rank: int, world: int, port: int, data: str, run_dir: str, method: str, *extra) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      GLOO_SOCKET_IFNAME="lo")
    from bt_fast.cli import main

    sets = [f"method.name={method}", "train.max_steps=3", f"data.train_dir={data}/train",
            f"data.val_dir={data}/val", f"train.run_dir={run_dir}", *extra]
    code = main(["train", "--config", str(CONFIGS / "smoke.yaml"), *[a for s in sets for a in ("--set", s)]])
    assert code == 0, code


@pytest.mark.parametrize("method,extra", [("swav", ()), ("dino", ()), ("swav", ("method.swav.queue_length=32",))],
                         ids=["swav", "dino", "swav-queue"])
def test_multicrop_trains_on_two_ranks(tiny_imagefolder, tmp_path, monkeypatch, method, extra):
    """4 crops of 2 sizes (smoke.yaml's sections) under DDP's static graph and CPU
    SyncBatchNorm: SwAV's prototypes frozen for 2 steps then trained (with a queue: each
    rank's own, 16 rows = 2 local batches, full for step 3), DINO's teacher and centre
    moving, everything finite."""
    monkeypatch.setenv("PYTHONPATH", os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run_workers("test_methods_ddp:_multicrop_worker", 2, str(tiny_imagefolder), str(tmp_path), method, *extra,
                timeout=600)
    ckpt = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    state = ckpt["model"]
    assert ckpt["step"] == 3 and all(torch.isfinite(v.float()).all() for v in state.values())
    if extra:  # one queue per rank, of that rank's own crops (DDP broadcast none of them)
        queues = [s["queue"] for s in ckpt["method_state"]]
        assert [int(s["rows"]) for s in ckpt["method_state"]] == [16, 16]
        assert all(q.shape == (2, 16, 32) for q in queues) and not torch.equal(queues[0], queues[1])
        torch.testing.assert_close(queues[0].norm(dim=2), torch.ones(2, 16))
    if method == "swav":  # unit prototypes, updated once (step 3) after the 2 frozen steps
        torch.testing.assert_close(state["prototypes.weight"].norm(dim=1), torch.ones(16))
    else:
        assert state["center"].abs().sum() > 0
        assert any(not torch.equal(v, state[f"teacher.{k}"]) for k, v in state.items()
                   if k.startswith("backbone.") and v.is_floating_point())
