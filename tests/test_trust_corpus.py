"""A corpus of hostile image files, generated here, through ``bt-fast data check``, the
DALI loader and evaluation: each case ends in a listed good image or one line naming
the file, and nothing outside the data root (or run folder) changes.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bt_fast.cli import main
from bt_fast.pipelines import filelist
from test_trust_data import png_header_only, rgb

GOOD = 8


def tree_state(top):
    """{path: (size, mtime, mode)} of everything under ``top`` (links not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[p] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def make_corpus(base):
    """base/data/train/c{0,1}: GOOD good JPEGs, DALI-readable formats under .jpg names and
    the hostile cases; base/data/val: good JPEGs; base/elsewhere: what links point at."""
    train, val, elsewhere = base / "data" / "train", base / "data" / "val", base / "elsewhere"
    for d in (train / "c0", train / "c1", val / "c0", val / "c1", elsewhere):
        d.mkdir(parents=True)
    for i in range(GOOD):
        rgb(24, 20, seed=i).save(train / f"c{i % 2}" / f"good{i}.jpg", "JPEG")
    for i in range(4):
        rgb(24, 20, seed=100 + i).save(val / f"c{i % 2}" / f"v{i}.jpg", "JPEG")
    rgb(24, 20, seed=50).save(elsewhere / "secret.jpg", "JPEG")
    readable = {"png.jpg": "PNG", "bmp.jpg": "BMP", "webp.jpg": "WEBP"}  # DALI decodes these
    for name, fmt in readable.items():
        rgb(24, 20, seed=7).save(train / "c0" / name, fmt)
    full = (train / "c0" / "good0.jpg").read_bytes()
    hostile = {
        "empty.jpg": lambda p: p.write_bytes(b""),
        "truncated.jpg": lambda p: p.write_bytes(full[: len(full) // 2]),
        "gif.jpg": lambda p: rgb(24, 20).save(p, "GIF"),
        "text.jpg": lambda p: p.write_text("not an image\n"),
        "huge.jpg": lambda p: p.write_bytes(png_header_only(20000, 20000)),
        "outside.jpg": lambda p: os.symlink(elsewhere / "secret.jpg", p),
        "dangling.jpg": lambda p: os.symlink(elsewhere / "missing.jpg", p),
    }
    for name, make in hostile.items():
        make(train / "c1" / name)
    (train / "c1" / "folder.jpg").mkdir()  # a directory named .jpg: not an image, not listed
    return train, val, elsewhere, sorted(readable), sorted(hostile)


@pytest.mark.slow  # a fresh interpreter for data check, one DALI epoch, eval per case
def test_hostile_corpus_through_data_check_loader_and_eval(tmp_path, capsys):
    pytest.importorskip("nvidia.dali")
    from bt_fast.pipelines import FolderSource, MultiViewLoader, ViewSpec
    from bt_fast.pipelines.errors import SourceError

    train, val, elsewhere, readable, hostile = make_corpus(tmp_path)
    outside_before = tree_state(elsewhere)
    subprocess.run([sys.executable, "-m", "bt_fast", "data", "check", str(val)], check=True,
                   capture_output=True)
    before = tree_state(tmp_path)

    proc = subprocess.run([sys.executable, "-m", "bt_fast", "data", "check", str(train)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and not proc.stderr.strip(), proc.stderr
    bad_lines = [line for line in proc.stdout.splitlines() if line.startswith("bad image: ")]
    for name in hostile:  # each named exactly once, with a reason
        assert sum(f"/c1/{name}: " in line for line in bad_lines) == 1, (name, proc.stdout)
    assert "huge.jpg: 20000x20000 = 400000000 pixels is over the limit" in proc.stdout
    assert "gif.jpg: a GIF image, which the pipeline's decoder (DALI) cannot read" in proc.stdout
    assert "outside.jpg: a symlink that leads out of the data root" in proc.stdout
    listed = filelist.read(train)
    assert sorted(os.path.basename(p) for p in listed.paths) == sorted(
        [f"good{i}.jpg" for i in range(GOOD)] + readable)
    # Nothing but the list files changed, and nothing at all outside the root.
    after = tree_state(tmp_path)
    written = {str(train)} | {str(train / n) for n in (filelist.FILELIST, filelist.CLASSES, filelist.STAMP)}
    assert {p for p in set(before) | set(after) if before.get(p) != after.get(p)} <= written
    assert tree_state(elsewhere) == outside_before

    # What data check passed, the DALI loader reads: one whole epoch, every image.
    views = [ViewSpec(size=16, blur_p=0.0), ViewSpec(size=16, blur_p=0.0)]
    loader = MultiViewLoader(FolderSource(train), views, 1, device="cpu", num_threads=1)
    assert sum(len(labels) for _, labels in loader) == GOOD + len(readable)

    # Each hostile file listed by hand: the DALI reader and eval each stop in one line
    # naming it (eval via the pixels baseline: no checkpoint needed).
    good_text = (train / filelist.FILELIST).read_text()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data: {{train_dir: {train}, val_dir: {val}, image_size: 16}}\n")
    for name in hostile + ["folder.jpg"]:
        (train / filelist.FILELIST).write_text(good_text + f"c1/{name} 1\n")
        with pytest.raises(SourceError) as e:
            FolderSource(train)
        assert f"c1/{name}" in str(e.value), str(e.value)
        capsys.readouterr()  # the header scan's note, when the list itself parsed
        rc = main(["eval", "knn", "--pixels", "--config", str(cfg), "--workers", "0", "--quiet", "--k", "1"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and f"c1/{name}" in err and "Traceback" not in err, (name, err)
    assert tree_state(elsewhere) == outside_before


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_named_by_data_check(tmp_path):
    root = tmp_path / "d"
    (root / "c0").mkdir(parents=True)
    for i in range(2):
        rgb(seed=i).save(root / "c0" / f"{i}.jpg")
    os.chmod(root / "c0" / "1.jpg", 0)
    from bt_fast.data import check_folder
    import io
    out = io.StringIO()
    assert check_folder(root, out) == 1
    assert "c0/1.jpg: Permission denied" in out.getvalue()
    assert filelist.read(root).paths == ["c0/0.jpg"]
    assert np.asarray(Image.open(root / "c0" / "0.jpg")).shape == (40, 48, 3)
