"""``bt-fast eval {knn,linear,semi}`` end to end on a tiny generated dataset and a
checkpoint in the trainer's format (BarlowTwins state_dict + plain config dict)."""

import json

import pytest
import torch

from bt_fast.cli import main
from bt_fast.config import Config, ModelConfig, to_dict
from bt_fast.eval.features import load_backbone
from bt_fast.methods import build


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_imagefolder):
    tmp, data = tmp_path_factory.mktemp("eval"), tiny_imagefolder
    cfg = Config()
    cfg.data.train_dir, cfg.data.val_dir = str(data / "train"), str(data / "val")
    cfg.data.image_size = 32
    cfg.model = ModelConfig(backbone="resnet18", width=8, small_stem=True)
    cfg.method.barlow_twins.projector = "64-64"
    torch.manual_seed(123)
    model = build(cfg)
    (tmp / "run" / "checkpoints").mkdir(parents=True)
    ckpt = tmp / "run" / "checkpoints" / "last.pt"
    torch.save({"model": model.state_dict(), "step": 42, "config": to_dict(cfg)}, ckpt)
    return {"tmp": tmp, "data": data, "ckpt": str(ckpt), "model": model}


def _json(capsys, argv):
    assert main(["eval", *argv, "--json", "--workers", "0"]) == 0
    return json.loads(capsys.readouterr().out)


def test_backbone_weights_come_from_the_checkpoint(run):
    loaded = load_backbone(run["ckpt"])
    for k, v in loaded.backbone.state_dict().items():
        torch.testing.assert_close(v, run["model"].backbone.state_dict()[k])
    a, b = load_backbone(run["ckpt"], random_init=True), load_backbone(run["ckpt"], random_init=True)
    w = "conv1.weight"
    torch.testing.assert_close(a.backbone.state_dict()[w], b.backbone.state_dict()[w])  # seeded
    assert not torch.equal(a.backbone.state_dict()[w], loaded.backbone.state_dict()[w])


@pytest.mark.parametrize("init", [[], ["--random-init"]])
def test_knn_end_to_end(run, capsys, init):
    r = _json(capsys, ["knn", "--checkpoint", run["ckpt"], *init])
    assert r["protocol"] == "knn" and r["checkpoint"] == run["ckpt"] and r["step"] == 42
    assert r["init"] == ("random" if init else "pretrained")
    assert (r["n_train"], r["n_val"], r["feature_dim"]) == (64, 16, 64)
    assert set(r["by_k"]) == {"20", "200"} and r["top1"] == r["by_k"]["20"]["top1"]
    assert 0 <= r["top1"] <= r["top5"] <= 100
    assert r["top1"] > 50  # the synthetic classes differ in colour: even raw features work


def test_knn_features_are_cached_and_table_is_short(run, capsys):
    assert main(["eval", "knn", "--checkpoint", run["ckpt"], "--workers", "0"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 3 and out[0].startswith("knn | pretrained") and "k=200" in out[2]
    cached = sorted(p.name for p in (run["tmp"] / "run" / "eval-cache").iterdir())
    assert any(n.startswith("train-ckpt-") for n in cached) and any(n.startswith("val-ckpt-") for n in cached)


def test_linear_end_to_end(run, capsys):
    r = _json(capsys, ["linear", "--checkpoint", run["ckpt"], "--epochs", "20"])
    assert r["protocol"] == "linear" and r["epochs"] == 20
    assert r["top1"] > 50 and 0 <= r["top1"] <= r["top5"] <= 100


@pytest.mark.parametrize("percent", ["1", "10"])
def test_semi_end_to_end(run, capsys, percent):
    r = _json(capsys, ["semi", "--percent", percent, "--checkpoint", run["ckpt"], "--epochs", "3",
                       "--train-dir", str(run["data"] / "train"), "--val-dir", str(run["data"] / "val")])
    assert r["protocol"] == f"semi{percent}" and r["n_val"] == 16
    assert r["n_subset"] % 4 == 0 and r["per_class"] == r["n_subset"] // 4
    assert 0 <= r["top1"] <= r["top5"] <= 100


def test_user_errors_exit_2(run, tmp_path, capsys):
    assert main(["eval", "knn", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["eval", "knn", "--checkpoint", run["ckpt"], "--val-dir", str(tmp_path)]) == 2
    assert "no filelist.txt" in capsys.readouterr().err
    assert main(["eval", "knn", "--checkpoint", run["ckpt"], "--val-dir", str(run["data"] / "train")]) == 2
    assert "same folder" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    torch.save({"step": 1}, bad)
    assert main(["eval", "linear", "--checkpoint", str(bad)]) == 2
    assert "not a bt_fast checkpoint" in capsys.readouterr().err


def test_knn_eval_of_a_live_backbone_matches_the_cli(run, capsys):
    from bt_fast.config import from_dict
    from bt_fast.eval import knn_eval

    ckpt = torch.load(run["ckpt"], weights_only=True)
    backbone = run["model"].backbone.train()
    acc = knn_eval(backbone, from_dict(ckpt["config"]), workers=0)
    assert backbone.training  # mode restored
    r = _json(capsys, ["knn", "--checkpoint", run["ckpt"], "--no-cache"])
    assert abs(acc[20]["top1"] - r["by_k"]["20"]["top1"]) < 1e-6
