"""bench step runs both loops side by side and reports a ratio consistent with its times."""

import json

import pytest

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
