"""Commands around the trainer take the method from the config: tune and report."""

import json

import pytest

from bt_fast.cli import main
from conftest import CONFIGS

pytestmark = pytest.mark.slow  # trains


def sets(dataset, run_dir, *extra):
    items = [f"data.train_dir={dataset / 'train'}", f"data.val_dir={dataset / 'val'}",
             f"train.run_dir={run_dir}", *extra]
    return [a for s in items for a in ("--set", s)]


def test_tune_probes_the_configured_method(tiny_imagefolder, tmp_path, capsys):
    argv = ["tune", "--config", str(CONFIGS / "smoke.yaml"), "--knobs", "channels_last", "--steps", "1",
            "--warmup", "0", "--out", str(tmp_path / "tuned.yaml"),
            *sets(tiny_imagefolder, tmp_path, "method.name=byol")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "(byol)" in out and "failed" not in out
    assert (tmp_path / "tuned.yaml").read_text().count("channels_last") == 1


def test_report_of_a_vicreg_run_plots_its_terms_and_no_heatmap(tiny_imagefolder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", str(CONFIGS / "smoke.yaml"),
                 *sets(tiny_imagefolder, run, "method.name=vicreg", "train.max_steps=2")]) == 0
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss_invariance", "loss_variance", "loss_covariance"} <= set(record)
    assert "loss_on_diag" not in record
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    assert "no cross-correlation heatmap" in capsys.readouterr().out
    # smoke.yaml runs the monitor (online probe, kNN at the last step): accuracy.png too
    assert {p.name for p in (run / "report").iterdir()} == {"throughput.png", "step_time.png", "loss.png",
                                                            "dashboard.png", "accuracy.png"}
