"""PowerSGD through the real trainer: a worker killed with SIGKILL mid-run, torchrun's
elastic restart of the group, and the run ends bit for bit where an uninterrupted run
ends (weights, LARS state, Q, every rank's error feedback).

Two ranks on gloo through scripts/train.sh (helpers from test_elastic_train), a model
big enough for several DDP buckets (bucket_cap_mb=1), so the resumed DDP's first step
(one bucket) and its rebuilt buckets lay the hook's state out differently.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from bt_fast import checkpoint
from bt_fast.data import make_synthetic
from test_elastic_train import _agents, _config, _logs, _wait, _wait_for_step, _workers

pytestmark = pytest.mark.slow

LAST, EVERY = 12, 3


def _powersgd_config(tmp: Path, data: Path) -> Path:
    path = _config(tmp, data, max_steps=LAST, checkpoint_every=EVERY)
    cfg = yaml.safe_load(path.read_text())
    cfg["model"]["width"] = 16  # ~2.9 MB of gradients: 3 buckets of 1 MB
    cfg["dist"] = {"bucket_cap_mb": 1, "grad_compression": "powersgd", "powersgd_rank": 2, "powersgd_start": 2}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _final(run_dir: Path) -> dict:
    ckpt = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    feedback = [checkpoint.load_rank_file(run_dir, "feedback", ckpt["step"], r)["error"] for r in (0, 1)]
    return {"step": ckpt["step"], "model": ckpt["model"], "momentum": ckpt["optimizer"]["state"],
            "q": ckpt["grad_comm"]["q"], "iter": ckpt["grad_comm"]["iter"], "feedback": feedback}


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_sigkill_and_elastic_restart_resume_bit_for_bit(tmp_path):
    data = tmp_path / "data"
    make_synthetic(data, classes=2, train_per_class=16, val_per_class=1, size=(32, 32))
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    rcs = _wait(_agents(whole, _powersgd_config(whole, data / "train"), nodes=1, gpus=2))
    assert rcs == [0], _logs(whole)[-4000:]

    procs = _agents(killed, _powersgd_config(killed, data / "train"), nodes=1, gpus=2, restarts=3)
    _wait_for_step(killed / "run", EVERY + 1, procs)  # a checkpoint exists, training goes on
    workers = _workers([p.pid for p in procs])
    os.kill(workers[0], signal.SIGKILL)
    rcs = _wait(procs)
    logs = _logs(killed)
    assert rcs == [0], logs[-4000:]
    assert "resuming from" in logs, logs[-4000:]

    a, b = _final(whole / "run"), _final(killed / "run")
    assert a["step"] == b["step"] == LAST and a["iter"] == b["iter"] == LAST
    assert len(a["q"]) > 10 and a["feedback"][0].keys() == a["model"].keys() - _buffers(a["model"])
    for part in ("model", "momentum", "q", "feedback"):
        assert _equal(a[part], b[part]), part


def _buffers(state: dict) -> set:
    return {k for k in state if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
