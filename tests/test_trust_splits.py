"""The read gate for evaluation: every probe refuses a val split that shares images with
train (the same files, links or byte-identical copies), eval's numeric flags are checked
in one line, and a val image deleted after ``data check`` is one line naming it.
"""

import os

import pytest
import torch

from bt_fast.cli import main
from bt_fast.config import Config, ModelConfig, to_dict
from bt_fast.data import make_synthetic, write_file_list
from bt_fast.errors import EvalError
from bt_fast.eval.splits import check_splits
from bt_fast.methods import build
from bt_fast.pipelines import filelist



def tiny_checkpoint(tmp_path, data) -> str:
    cfg = Config()
    cfg.data.train_dir, cfg.data.val_dir, cfg.data.image_size = str(data / "train"), str(data / "val"), 16
    cfg.model = ModelConfig(backbone="resnet18", width=4, small_stem=True)
    cfg.method.barlow_twins.projector = "16-16"
    path = tmp_path / "last.pt"
    torch.save({"model": build(cfg).state_dict(), "step": 1, "config": to_dict(cfg)}, path)
    return str(path)


def linked_val(data, how):
    """data/val2: val's list over files that are train's images (by how), or copies."""
    val2 = data / "val2"
    listing = filelist.read(data / "train")
    for rel in listing.paths[:3]:
        (val2 / rel).parent.mkdir(parents=True, exist_ok=True)
        how(data / "train" / rel, val2 / rel)
    write_file_list(val2, [(p, y) for p, y in zip(listing.paths[:3], listing.labels[:3])], listing.classes)
    return val2


def copy(a, b):
    b.write_bytes(a.read_bytes())


@pytest.mark.parametrize("how, needle", [(os.symlink, "the same file, or a link"), (os.link, "the same file, or a link"),
                                         (copy, "identical copies")])
def test_splits_sharing_a_file_a_link_or_a_copy_are_refused(tmp_path, how, needle):
    data = make_synthetic(tmp_path / "d", classes=2, train_per_class=6, val_per_class=2, size=(16, 16))
    with pytest.raises(EvalError, match=needle):
        check_splits(data / "train", linked_val(data, how))
    check_splits(data / "train", data / "val")  # the real val: held out, no error


@pytest.mark.slow  # five evaluations and a trainer start
def test_every_probe_refuses_val_that_shares_train_images(tmp_path, capsys):
    data = make_synthetic(tmp_path / "d", classes=2, train_per_class=6, val_per_class=2, size=(16, 16))
    val2, needle = linked_val(data, os.symlink), "the same file, or a link"
    ckpt = tiny_checkpoint(tmp_path, data)
    common = ["--train-dir", str(data / "train"), "--val-dir", str(val2), "--workers", "0", "--no-cache"]
    for argv in (["knn", "--checkpoint", ckpt], ["linear", "--checkpoint", ckpt],
                 ["semi", "--percent", "10", "--checkpoint", ckpt], ["knn", "--pixels", "--checkpoint", ckpt],
                 ["linear", "--pixels", "--checkpoint", ckpt]):
        assert main(["eval", *argv, *common]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, (argv, err)
    # The trainer's kNN monitor too, before the first step.
    from conftest import CONFIGS
    sets = [f"data.train_dir={data / 'train'}", f"data.val_dir={val2}", f"train.run_dir={tmp_path / 'run'}",
            "eval.every=5", "data.batch_size=4"]
    assert main(["train", "--config", str(CONFIGS / "smoke.yaml"), *[a for x in sets for a in ("--set", x)]]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].count(needle) == 1, err
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or '"loss"' not in metrics.read_text()


@pytest.mark.parametrize("flags, needle", [
    (["knn", "--k", "0"], "--k 0: must be >= 1"), (["linear", "--epochs", "-1"], "--epochs -1: must be >= 1"),
    (["linear", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["semi", "--percent", "0"], "--percent 0: choose 1 or 10"),
    (["knn", "--temperature", "nan"], "--temperature nan: must be finite"),
    (["knn", "--extract-batch", "0"], "--extract-batch 0: must be >= 1"),
    (["linear", "--lr", "-0.1"], "--lr -0.1: must be >= 0"),
])
def test_eval_sizes_are_checked_in_one_line(tmp_path, capsys, flags, needle):
    assert main(["eval", *flags, "--checkpoint", str(tmp_path / "never-read.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


def test_val_image_deleted_after_check_is_one_line_naming_it(tmp_path, capsys):
    data = make_synthetic(tmp_path / "d", classes=2, train_per_class=6, val_per_class=2, size=(16, 16))
    ckpt = tiny_checkpoint(tmp_path, data)
    gone = data / "val" / filelist.read(data / "val").paths[1]
    gone.unlink()
    for workers in ("0", "1"):  # in-process, and re-raised from a DataLoader worker
        assert main(["eval", "knn", "--checkpoint", ckpt, "--workers", workers, "--no-cache",
                     "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{gone}: No such file or directory" in err, err
        assert "Traceback" not in err
