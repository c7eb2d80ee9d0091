"""`bt-fast report RUN_DIR` writes valid PNGs from metrics.jsonl and a checkpoint."""

import json

import pytest
import torch
from PIL import Image

from bt_fast import checkpoint, cli, config, data, methods, metrics, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_metrics(run_dir, steps=range(10, 110, 10)):
    sink = metrics.JsonlSink(run_dir / "metrics.jsonl")
    for step in steps:
        d = {"data_wait": [0.01 * step / 100] * 4, "forward": [0.05] * 4,
             "backward": [0.08] * 4, "optimizer": [0.01] * 4}
        d["step"] = [sum(v[0] for v in d.values())] * 4
        sink.log({"loss": 1000 / step, "loss_on_diag": 500 / step, "loss_off_diag": 5e4 / step,
                  "lr": 0.2 * step / 100, "lr_biases": 0.005 * step / 100, "images": 512.0,
                  "images_per_s": 300.0 + step, "epoch": step / 50, "nonfinite_steps": 0.0,
                  "durations": d}, step)
        if step == 50:
            sink.log_checkpoint(0.2, step)
    sink.close()
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 11')  # a torn last line, as a killed run leaves


def _assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 300 and im.size[1] > 200


def test_report_writes_metric_plots(tmp_path, capsys):
    _write_metrics(tmp_path)
    assert cli.main(["report", str(tmp_path), "--no-crosscorr"]) == 0
    names = {"throughput.png", "step_time.png", "loss.png", "dashboard.png"}
    assert {p.name for p in (tmp_path / "report").iterdir()} == names
    for name in names:
        _assert_png(tmp_path / "report" / name)


def test_report_crosscorr_heatmap_from_checkpoint(tmp_path):
    root = data.make_synthetic(tmp_path / "data", classes=2, train_per_class=2, val_per_class=8)
    cfg = config.load(None, ["model.backbone=resnet18", "model.width=8", "method.barlow_twins.projector=16-16",
                             "model.small_stem=true", "data.image_size=32",
                             f"data.val_dir={root / 'val'}", "views.0.size=32", "views.1.size=32"])
    torch.manual_seed(1)
    model = methods.build(cfg)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _write_metrics(run_dir)
    checkpoint.save_atomic({"model": model.state_dict(), "step": 100,
                            "config": config.to_dict(cfg)},
                           checkpoint.checkpoint_dir(run_dir) / checkpoint.LAST)
    assert cli.main(["report", str(run_dir), "--batch", "16"]) == 0
    _assert_png(run_dir / "report" / "crosscorr.png")


def test_report_missing_run_is_a_usage_error(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


def test_loss_plot_shows_the_terms_the_run_logged():
    bt = [{"step": 1, "loss": 3.0, "loss_on_diag": 1.0, "loss_off_diag": 2.0}]
    assert [k for k, _ in report.loss_labels(bt)] == ["loss", "loss_on_diag", "loss_off_diag"]
    assert dict(report.loss_labels(bt))["loss_on_diag"].startswith("on-diagonal")
    other = [{"step": 1, "loss": 3.0, "loss_invariance": 1.0, "loss_variance": 0.5, "loss_new_term": 1.5}]
    labels = dict(report.loss_labels(other))
    assert set(labels) == {"loss", "loss_invariance", "loss_variance", "loss_new_term"}
    assert labels["loss_new_term"] == "new_term"  # a term no method declares keeps its name


def test_report_draws_accuracy_against_time_and_images(tmp_path, capsys, monkeypatch):
    """Monitor records (bt_fast/monitor.py) give accuracy.png: both x axes, both
    baselines as lines; a run without them has no such plot (the test above)."""
    _write_metrics(tmp_path)
    sink = metrics.JsonlSink(tmp_path / "metrics.jsonl")
    for step in (20, 40, 60):
        sink.log_eval({"images_seen": step * 128, "eval_knn_top1": 80.0 + step / 10,
                       "eval_knn_top1_layer4:1": 70.0 + step / 20, "eval_online_linear_top1": 75.0,
                       "baseline_knn_top1_random_init": 84.0, "baseline_knn_top1_pixels": 85.0,
                       "monitor_s": step / 100}, step)
    sink.close()
    drawn = {}
    real = report.plot_accuracy

    def spy(evals, out):
        drawn["steps"] = [r["step"] for r in evals]
        return real(evals, out)

    monkeypatch.setattr(report, "plot_accuracy", spy)
    assert cli.main(["report", str(tmp_path), "--no-crosscorr"]) == 0
    assert drawn["steps"] == [20, 40, 60]
    _assert_png(tmp_path / "report" / "accuracy.png")
    assert [r["step"] for r in report.read_jsonl(tmp_path / "metrics.jsonl")] == list(range(10, 110, 10))
