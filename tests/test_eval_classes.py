"""Eval refuses train/val splits whose class lists differ (labels would not match)."""

import shutil

import torch

from bt_fast.cli import main
from bt_fast.config import Config, ModelConfig, to_dict
from bt_fast.data import make_synthetic
from bt_fast.methods import build


def test_eval_refuses_splits_with_different_classes(tmp_path, capsys):
    data = make_synthetic(tmp_path / "d", classes=3, train_per_class=2, val_per_class=1, size=(32, 32))
    # A train split with one more (non-empty) class folder sorted first: every label
    # of train is then one higher than the same class in val.
    shutil.copytree(data / "train" / "class0", data / "train" / "aaa-extra")
    assert main(["data", "check", str(data / "train")]) == 0
    cfg = Config()
    cfg.data.train_dir, cfg.data.val_dir, cfg.data.image_size = str(data / "train"), str(data / "val"), 32
    cfg.model = ModelConfig(backbone="resnet18", width=8, small_stem=True)
    cfg.method.barlow_twins.projector = "16-16"
    ckpt = tmp_path / "last.pt"
    torch.save({"model": build(cfg).state_dict(), "step": 1, "config": to_dict(cfg)}, ckpt)
    capsys.readouterr()
    assert main(["eval", "knn", "--checkpoint", str(ckpt), "--no-cache", "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "different classes (only in train: aaa-extra; only in val: -)" in err
