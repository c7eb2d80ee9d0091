"""``bt-fast bench comm``: bytes counted on real training steps equal the cost model's,
for every option of dist.grad_compression, at W = 2 and 4; bad invocations are one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bt_fast import config, gradcomm, methods
from bt_fast.bench import comm
from conftest import CONFIGS

SMOKE = str(CONFIGS / "smoke.yaml")


@pytest.mark.slow
def test_counted_bytes_are_the_models_at_two_and_four_ranks():
    rows = comm.bench(SMOKE, [], [2, 4], list(gradcomm.OPTIONS), fresh=False)  # one process set per W
    assert [r["world_size"] for r in rows] == [2, 4]
    shapes = gradcomm.grad_shapes(methods.build(config.load(SMOKE)))
    for row in rows:
        opts = row["options"]
        assert list(opts) == ["none", "bf16", "powersgd"]
        for name, r in opts.items():
            assert r["sent_bytes"] == r["model_bytes"] > 0, (row["world_size"], name)
            # the buffers themselves, exactly: what each rank handed to the all-reduces
            assert r["tensor_bytes"] == gradcomm.buffer_elements(shapes, name, 4) * gradcomm.itemsize(name)
            assert r["other_sent_bytes"] > 0  # the loss and SyncBatchNorm, on their own group
        assert opts["none"]["ratio_vs_none"] == 1.0 and opts["bf16"]["ratio_vs_none"] == 2.0
        assert opts["powersgd"]["ratio_vs_none"] > 4
        assert opts["powersgd"]["collectives"] == 3 * opts["none"]["collectives"]  # uncompressed, P, Q
    # ring all-reduce: each rank sends 2 (W-1)/W of the buffer
    assert rows[1]["options"]["none"]["sent_bytes"] == 1.5 * rows[0]["options"]["none"]["sent_bytes"]


@pytest.mark.parametrize("argv,message", [
    (["--world-size", "1"], "world sizes must be >= 2"),
    (["--options", "none,topk"], "(got topk)"),
    (["--world-size", "two"], "--world-size 'two'"),
    (["--set", "dist.powersgd_rank=0"], "dist.powersgd_rank=0"),
])
def test_bad_invocations_are_one_line(argv, message):
    proc = subprocess.run([sys.executable, "-m", "bt_fast", "bench", "comm", "--config", SMOKE, *argv],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_json_shape(monkeypatch, capsys):
    fake = [{"world_size": 2, "options": {"none": {"sent_bytes": 8.0, "model_bytes": 8.0, "ratio_vs_none": 1.0}}}]
    monkeypatch.setattr(comm, "bench", lambda *a, **k: fake)
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    comm.add_arguments(parser)
    assert comm.run(parser.parse_args(["--config", SMOKE, "--json", "--world-size", "2"])) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line) == fake[0]
