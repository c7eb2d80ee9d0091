"""`bt-fast eval knn|linear --pixels` against an independent numpy reference, and the
dev split `bt-fast data fashion-mnist --dev N` carves (via its function, carve_dev)."""

import json
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from bt_fast.cli import main
from bt_fast.data import carve_dev, read_file_list
from bt_fast.errors import DataError
from bt_fast.eval.features import split_features
from bt_fast.eval.linear import linear_probe
from bt_fast.eval.pixels import load_pixels

SIZE = 40  # tiny_imagefolder is 48x40: the eval transform only center-crops to 40x40
MEAN, STD = (0.2, 0.4, 0.6), (0.3, 0.25, 0.2)


@pytest.fixture()
def pixel_config(tmp_path, tiny_imagefolder):
    path = tmp_path / "pixels.yaml"
    view = {"size": SIZE, "mean": list(MEAN), "std": list(STD)}
    path.write_text(yaml.safe_dump({
        "data": {"train_dir": str(tiny_imagefolder / "train"), "val_dir": str(tiny_imagefolder / "val"),
                 "image_size": SIZE},
        "views": [view, view]}))
    return path


def reference_pixels(root):
    """Straight from the definition: decode, center-crop 48x40 -> 40x40, (x/255 - mean)/std,
    flatten in C, H, W order. float64."""
    paths, labels, _ = read_file_list(root)
    feats = []
    for rel in paths:
        with Image.open(root / rel) as im:
            x = np.asarray(im.convert("RGB"), dtype=np.float64)  # [H=40, W=48, 3]
        left = (x.shape[1] - SIZE) // 2
        x = x[:, left:left + SIZE]
        x = (x / 255 - np.array(MEAN)) / np.array(STD)
        feats.append(x.transpose(2, 0, 1).reshape(-1))
    return np.stack(feats), np.array(labels)


def reference_knn_top1(train, train_y, val, val_y, k, temperature=0.07):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    val = val / np.linalg.norm(val, axis=1, keepdims=True)
    hits = 0
    for q, y in zip(val, val_y):
        sims = train @ q
        nearest = np.argsort(-sims, kind="stable")[:k]
        scores = np.zeros(train_y.max() + 1)
        np.add.at(scores, train_y[nearest], np.exp(sims[nearest] / temperature))
        hits += int(scores.argmax() == y)
    return 100.0 * hits / len(val_y)


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_pixel_features_equal_numpy_reference(pixel_config, tiny_imagefolder):
    loaded = load_pixels(config=pixel_config)
    for split in ("train", "val"):
        got, labels = split_features(loaded, tiny_imagefolder / split, cache_dir=None, workers=0)
        want, want_y = reference_pixels(tiny_imagefolder / split)
        assert got.shape == (len(want_y), 3 * SIZE * SIZE) == (len(want_y), loaded.feature_dim)
        np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(labels.numpy(), want_y)


def test_knn_pixels_cli_matches_bruteforce(capsys, pixel_config, tiny_imagefolder):
    r = run_json(capsys, ["eval", "knn", "--pixels", "--config", str(pixel_config), "--k", "20", "3",
                          "--workers", "0", "--json", "--quiet"])
    assert r["init"] == "pixels" and r["backbone"] == "pixels" and r["feature_dim"] == 3 * SIZE * SIZE
    train, train_y = reference_pixels(tiny_imagefolder / "train")
    val, val_y = reference_pixels(tiny_imagefolder / "val")
    for k in (20, 3):
        assert r["by_k"][str(k)]["top1"] == pytest.approx(reference_knn_top1(train, train_y, val, val_y, k))


def test_linear_pixels_cli_is_the_probe_on_reference_pixels(capsys, pixel_config, tiny_imagefolder):
    r = run_json(capsys, ["eval", "linear", "--pixels", "--config", str(pixel_config), "--epochs", "3",
                          "--workers", "0", "--json", "--quiet"])
    train, train_y = reference_pixels(tiny_imagefolder / "train")
    val, val_y = reference_pixels(tiny_imagefolder / "val")
    want = linear_probe(torch.from_numpy(train).float(), torch.from_numpy(train_y),
                        torch.from_numpy(val).float(), torch.from_numpy(val_y), epochs=3)
    assert r["init"] == "pixels" and r["n_train"] == len(train_y)
    assert r["top1"] == pytest.approx(round(want["top1"], 2))
    assert r["train_top1"] == pytest.approx(want["train_top1"])


def test_pixels_usage_errors(capsys, pixel_config):
    assert main(["eval", "knn", "--pixels"]) == 2  # neither checkpoint nor config
    assert main(["eval", "knn", "--pixels", "--random-init", "--config", str(pixel_config)]) == 2
    assert main(["eval", "knn", "--config", str(pixel_config)]) == 2  # --config is for --pixels
    assert main(["eval", "linear"]) == 2  # a backbone needs its checkpoint
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--pixels" in err


def test_carve_dev_splits_off_the_last_images_by_name(tmp_path, tiny_imagefolder):
    train, dev = carve_dev(tiny_imagefolder / "train", tmp_path / "tune", 12)
    paths, labels, classes = read_file_list(tiny_imagefolder / "train")
    t_paths, t_labels, t_classes = read_file_list(train)
    d_paths, d_labels, d_classes = read_file_list(dev)
    assert t_classes == d_classes == classes
    assert len(d_paths) == 12 and len(t_paths) == len(paths) - 12
    assert not set(t_paths) & set(d_paths)
    assert sorted(zip(t_paths + d_paths, t_labels + d_labels)) == sorted(zip(paths, labels))
    # "last" by file name: every dev name sorts after every remaining train name
    key = lambda p: (os.path.basename(p), p)  # noqa: E731
    assert max(map(key, t_paths)) < min(map(key, d_paths))
    for rel in d_paths[:3]:
        assert (dev / rel).read_bytes() == (tiny_imagefolder / "train" / rel).read_bytes()


def test_carve_dev_refuses_a_split_that_leaves_nothing(tmp_path, tiny_imagefolder):
    n = len(read_file_list(tiny_imagefolder / "train")[0])
    for bad in (0, n):
        with pytest.raises(DataError, match="--dev"):
            carve_dev(tiny_imagefolder / "train", tmp_path / "tune", bad)
