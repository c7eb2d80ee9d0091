"""bt-fast data: synthetic set, check naming corrupt files, file list, Fashion-MNIST idx reader."""

import gzip
import struct

import numpy as np
import pytest

from bt_fast import data, safeio
from bt_fast.cli import main


def test_check_names_every_bad_file_and_lists_good_ones(tmp_path, capsys):
    root = data.make_synthetic(tmp_path / "s", classes=2, train_per_class=3, val_per_class=1)
    good = root / "train" / "class0" / "0000.jpg"
    (root / "train" / "class0" / "junk.jpg").write_bytes(b"not a jpeg at all")
    (root / "train" / "class1" / "empty.jpg").write_bytes(b"")
    (root / "train" / "class1" / "cut.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    for name in ("junk.jpg", "empty.jpg", "cut.jpg"):
        assert f"bad image: {root / 'train'}" in out and name in out
    paths, labels, classes = data.read_file_list(root / "train")
    assert len(paths) == 6 and not any(p.endswith(("junk.jpg", "empty.jpg", "cut.jpg")) for p in paths)
    assert classes == ["class0", "class1"] and sorted(set(labels)) == [0, 1]


def test_check_clean_folder_exits_0(tmp_path):
    root = data.make_synthetic(tmp_path / "s", classes=2, train_per_class=2, val_per_class=1)
    assert main(["data", "check", str(root / "val")]) == 0


def test_missing_folder_is_one_clear_error(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nope")]) == 2
    assert "data folder not found" in capsys.readouterr().err


def test_read_file_list_without_check_says_what_to_run(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(data.DataError, match="bt-fast data check"):
        data.read_file_list(tmp_path)


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_idx_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    src = tmp_path / "idx"
    src.mkdir()
    x_train, y_train = rng.integers(0, 256, (12, 28, 28)), np.arange(12) % 10
    x_val, y_val = rng.integers(0, 256, (5, 28, 28)), np.arange(5)
    write_idx(src / "train-images-idx3-ubyte.gz", x_train)
    write_idx(src / "train-labels-idx1-ubyte.gz", y_train)
    write_idx(src / "t10k-images-idx3-ubyte.gz", x_val)
    write_idx(src / "t10k-labels-idx1-ubyte.gz", y_val)
    monkeypatch.setattr(data, "FMNIST_SYSTEM_DIR", src)
    out = data.prepare_fashion_mnist(tmp_path / "fm")
    paths, labels, classes = data.read_file_list(out / "train")
    assert len(paths) == 12 and sorted(labels) == sorted(y_train.tolist())
    assert classes == data.FMNIST_CLASSES
    from PIL import Image
    first = data.read_file_list(out / "val")[0][0]
    decoded = np.asarray(Image.open(out / "val" / first))
    assert decoded.shape == (28, 28, 3)  # RGB JPEGs
    decoded = decoded[..., 0].astype(int)
    assert np.abs(decoded - x_val[0]).mean() < 20  # JPEG q95 of noise: close, not exact


def test_empty_class_folder_is_not_a_class(tmp_path, capsys):
    """An empty folder sorted before the others used to become class 0 and shift every
    label by one (kNN then scored 0 % against a val split without it)."""
    root = data.make_synthetic(tmp_path / "s", classes=2, train_per_class=2, val_per_class=1)
    (root / "train" / "aaa-empty").mkdir()
    assert main(["data", "check", str(root)]) == 0
    assert "not classes (no good image): aaa-empty" in capsys.readouterr().out
    train, val = data.read_file_list(root / "train"), data.read_file_list(root / "val")
    assert train[2] == val[2] == ["class0", "class1"]
    assert sorted(set(train[1])) == [0, 1]


def test_non_utf8_file_name_is_reported_and_the_rest_listed(tmp_path, capsys):
    root = data.make_synthetic(tmp_path / "s", classes=2, train_per_class=2, val_per_class=1)
    good = (root / "train" / "class0" / "0000.jpg").read_bytes()
    folder = bytes(root / "train" / "class1")
    with open(folder + b"/caf\xe9.jpg", "wb") as f:  # Latin-1 name: invalid UTF-8
        f.write(good)
    assert main(["data", "check", str(root / "train")]) == 1
    out = capsys.readouterr().out
    assert "caf\\xe9.jpg: file name is not valid UTF-8" in out
    paths, _, _ = data.read_file_list(root / "train")
    assert len(paths) == 4
    assert not [p for p in (root / "train").iterdir() if ".tmp" in p.name]


def test_one_parser_skips_blank_lines_and_names_a_bad_line(tmp_path):
    from bt_fast.pipelines import filelist
    from bt_fast.pipelines.torchvision_recipe import FileListDataset

    root = data.make_synthetic(tmp_path / "s", classes=2, train_per_class=2, val_per_class=1) / "val"
    listing = root / "filelist.txt"
    listing.write_text("\n" + listing.read_text() + "\n  \n")
    assert len(FileListDataset(root, transform=None)) == 2 == len(filelist.read(root))
    listing.write_text(listing.read_text() + "class0/0000.jpg\n")
    with pytest.raises(data.DataError, match=r"filelist.txt:6: expected 'relative/path label'"):
        data.read_file_list(root)


def test_full_disk_while_writing_the_list_is_one_line_and_leaves_no_temp(tmp_path, monkeypatch, capsys):
    import errno

    root = data.make_synthetic(tmp_path / "s", classes=2, train_per_class=2, val_per_class=1) / "val"
    before = (root / "filelist.txt").read_text()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safeio.os, "fsync", full)  # the first durable write fails
    assert main(["data", "check", str(root)]) == 2
    assert "disk full while writing the file list" in capsys.readouterr().err
    monkeypatch.undo()
    assert (root / "filelist.txt").read_text() == before
    assert sorted(p.name for p in root.iterdir() if p.is_file()) == ["classes.txt", "filelist.checked", "filelist.txt"]
