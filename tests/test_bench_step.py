"""bench step runs both loops side by side and reports a ratio consistent with its times."""

import json

import pytest
import torch

from bt_fast.cli import main
from conftest import CONFIGS

pytestmark = pytest.mark.slow  # trains a few steps of two loops


def test_bench_step_json(capsys):
    assert main(["bench", "step", "--json", "--config", str(CONFIGS / "smoke.yaml"), "--batch", "8", "--steps", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bench"] == "step" and result["batch"] == 8
    assert result["speedup"] > 0
    ratio = result["bt_fast_images_per_s"] / result["plain_images_per_s"]
    assert abs(ratio - result["speedup"]) < 1e-9 * max(1.0, ratio)


def test_bench_step_times_the_thread_lever_alone(capsys):
    """train.threads=1 vs torch's default count: a third contender, the same step at the
    default count, and its ratio; the process's thread count is restored afterwards."""
    before = torch.get_num_threads()
    assert main(["bench", "step", "--json", "--config", str(CONFIGS / "smoke.yaml"), "--batch", "8",
                 "--steps", "1", "--set", "train.threads=1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert torch.get_num_threads() == before
    assert (result["threads"], result["plain_threads"]) == (1, before)
    if before == 1:  # a one-core machine: nothing to compare
        assert "threads_speedup" not in result
    else:
        ratio = result["bt_fast_images_per_s"] / result["default_threads_images_per_s"]
        assert abs(ratio - result["threads_speedup"]) < 1e-9 * max(1.0, ratio)
