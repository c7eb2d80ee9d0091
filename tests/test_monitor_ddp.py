"""The online probe and the kNN monitor under DDP (2 gloo ranks, one machine).

Pinned here: the probe's gradient all-reduce makes two ranks' probes equal, step for
step, to one process's probe trained on both shards at once (the reference); a failure
inside the kNN monitor on ONE rank switches the monitor off on EVERY rank, and the
ranks stay in step (a collective after it completes instead of hanging).
"""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bt_fast.probe import OnlineProbe
from conftest import CONFIGS

D, C, B, STEPS = 12, 5, 8, 3  # feature dim, classes, rows per rank, SGD steps


def _shard(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s features [B, D] and labels [B] at ``step`` (seeded, distinct)."""
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(B, D, generator=g), torch.randint(0, C, (B,), generator=g)


def _probe() -> OnlineProbe:
    model = SimpleNamespace(feature_dim=D, backbone=nn.Identity())
    return OnlineProbe(model, C, lr=0.3, device=torch.device("cpu"), seed=7)


def _probe_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from bt_fast import dist

    env = dist.init(want_cuda=False)
    probe = _probe()
    for step in range(STEPS):
        x, y = _shard(env.rank, step)
        probe.feats = [x]  # what the forward hook would have read: one view of this shard
        probe.step(y)
    torch.save(probe.linear.state_dict(), f"{out}.{env.rank}")
    dist.close()


@pytest.mark.slow
def test_the_probe_under_two_ranks_is_the_probe_of_one_process_on_both_shards(tmp_path, monkeypatch):
    from bt_fast.procs import run_workers

    monkeypatch.setenv("PYTHONPATH", os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    run_workers("test_monitor_ddp:_probe_worker", 2, str(tmp_path / "probe"), timeout=300)
    ranks = [torch.load(tmp_path / f"probe.{r}") for r in range(2)]
    reference = _probe()  # one process, both shards in one batch: the mean over 2B rows
    for step in range(STEPS):
        (x0, y0), (x1, y1) = _shard(0, step), _shard(1, step)
        reference.feats = [torch.cat([x0, x1])]
        reference.step(torch.cat([y0, y1]))
    untrained = _probe().linear.state_dict()
    for name, want in reference.linear.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # every rank holds the same probe
        torch.testing.assert_close(ranks[0][name], want, rtol=1e-5, atol=1e-6)
        assert not torch.equal(want, untrained[name])  # the reference did move


def _failing_monitor_worker(rank, world, port, train, val, out, where):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from bt_fast import config, dist, methods
    from bt_fast.eval import bank
    from bt_fast.monitor import Monitor

    env = dist.init(want_cuda=False)
    if env.rank == 1:  # only this rank breaks: featurising the live net, the baselines, or scoring
        name, works = {"live": ("featurize", 0), "baselines": ("featurize", 2), "score": ("knn_top1", 0)}[where]
        real, calls = getattr(bank, name), []

        def broken(*args, **kwargs):
            calls.append(1)
            if len(calls) > works:
                raise OSError("bank shard unreadable")
            return real(*args, **kwargs)
        setattr(bank, name, broken)
    cfg = config.load(CONFIGS / "smoke.yaml", [f"data.train_dir={train}", f"data.val_dir={val}",
                                               "eval.bank=20", "eval.query=8", "eval.every=2"])
    torch.manual_seed(3)
    mon = Monitor(cfg, env, methods.build(cfg))
    record = mon._measure(step=2, global_batch=16)
    flag = torch.tensor([env.rank + 1.0])
    torch.distributed.all_reduce(flag)  # the ranks are still in step after the failure
    with open(f"{out}.{env.rank}", "w") as f:
        json.dump({"record": record, "every": mon.every, "sum": flag.item()}, f)
    dist.close()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["live", "baselines", "score"])
def test_a_monitor_failure_on_one_rank_switches_it_off_on_every_rank(where, tiny_imagefolder, tmp_path,
                                                                     monkeypatch):
    from bt_fast.procs import run_workers

    monkeypatch.setenv("PYTHONPATH", os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run_workers("test_monitor_ddp:_failing_monitor_worker", 2, str(tiny_imagefolder / "train"),
                str(tiny_imagefolder / "val"), str(tmp_path / "mon"), where, timeout=300)
    for rank in range(2):
        got = json.loads((tmp_path / f"mon.{rank}").read_text())
        assert got == {"record": None, "every": 0, "sum": 3.0}, (rank, got)
