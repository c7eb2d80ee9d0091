"""`bt-fast tune` on a tiny CPU config: a table of measured images/s per setting, and an
overlay that `bt-fast train --overlay` loads."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bt_fast import cli, config, tune
from bt_fast.data import make_synthetic
from conftest import CONFIGS

pytestmark = pytest.mark.slow  # each probe trains a few steps


@pytest.fixture()
def smoke(tmp_path) -> Path:
    make_synthetic(tmp_path / "data", classes=2, train_per_class=16, val_per_class=1, size=(32, 32))
    cfg = yaml.safe_load((CONFIGS / "smoke.yaml").read_text())
    cfg["data"]["train_dir"] = str(tmp_path / "data" / "train")
    cfg["train"]["run_dir"] = str(tmp_path / "run")
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_tune_prints_table_and_train_loads_overlay(smoke, tmp_path, capsys):
    out = tmp_path / "tuned.yaml"
    rc = cli.main(["tune", "--config", str(smoke), "--knobs", "threads,bucket,channels_last",
                   "--steps", "2", "--warmup", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert tune.HEADER in printed
    # one process: the on-paper model of docs/gpu.md names no compression, and says why
    assert "dist.grad_compression: none (one GPU: nothing to communicate" in printed
    rows = re.findall(r"^(data\.num_threads|train\.channels_last)\s+(\S+)\s+([\d.]+)\s",
                      printed, re.M)
    assert {r[0] for r in rows} == {"data.num_threads", "train.channels_last"}
    assert all(float(r[2]) > 0 for r in rows)  # measured images/s
    assert "dist.bucket_cap_mb" in printed and "skipped" in printed  # world of one
    overlay = yaml.safe_load(out.read_text())
    assert set(overlay) == {"data", "dist", "train"}
    assert set(overlay["data"]) == {"num_threads"}
    # The overlay is what `bt-fast train --overlay` applies; --set still wins over it.
    rc = cli.main(["train", "--config", str(smoke), "--overlay", str(out),
                   "--set", "train.max_steps=1", "--set", "data.prefetch=2"])
    assert rc == 0
    resolved = config.load(tmp_path / "run" / "config.yaml")
    assert resolved.data.num_threads == overlay["data"]["num_threads"]
    assert resolved.train.channels_last == overlay["train"]["channels_last"]
    assert resolved.data.prefetch == 2 and resolved.train.max_steps == 1


def test_overlay_with_unknown_key_is_a_config_error(smoke, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  num_thread: 2\n")
    assert cli.main(["train", "--config", str(smoke), "--overlay", str(bad)]) == 2
    assert "num_thread" in capsys.readouterr().err


def test_candidates():
    cfg = config.Config()
    assert tune.candidates("bucket", cfg, world=1, cuda=False) == []
    assert tune.candidates("bucket", cfg, world=2, cuda=True)[0] == cfg.dist.bucket_cap_mb
    assert tune.candidates("precision", cfg, world=1, cuda=False) == ["bf16", "fp32"]
    assert tune.candidates("batch", cfg, world=4, cuda=False) == [256, 128, 512]
    assert tune.candidates("compile", cfg, world=1, cuda=False) == [False, True]


def test_two_ranks_tune_the_bucket_and_exit_cleanly(smoke, tmp_path):
    """Under torchrun every rank probes and the slowest rank's time decides (one
    all-reduce per probe); the bucket knob, skipped in a world of one, is measured. Fault
    handler on: a rank that aborts at exit (see dist.settle) prints its stacks."""
    out = tmp_path / "tuned.yaml"
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "bt_fast", "tune", "--config", str(smoke), "--knobs", "bucket",
           "--steps", "1", "--warmup", "1", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^dist\.bucket_cap_mb\s+(\d+)\s+([\d.]+)\s", proc.stdout, re.M)
    assert sorted(int(v) for v, _ in rows) == [10, 25, 50, 100]  # rank 0 prints, once each
    assert yaml.safe_load(out.read_text())["dist"]["bucket_cap_mb"] in {10, 25, 50, 100}
