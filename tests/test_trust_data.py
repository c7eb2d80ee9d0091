"""The read gate for data: file lists stay inside their root, labels index classes.txt,
images open under a pixel limit in DALI's formats (DALI's own CPU decoder is the
reference), commands check their sizes in one line (splits: test_trust_splits.py).
"""

import io
import os
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bt_fast.cli import main
from bt_fast.data import make_synthetic, write_file_list
from bt_fast.pipelines import filelist, images
from bt_fast.pipelines.errors import SourceError
from test_trust_splits import tiny_checkpoint

# BT_FAST_FUZZ_EXAMPLES=2000 for a longer hunt; the suite keeps it small.
FUZZ = settings(max_examples=int(os.environ.get("BT_FAST_FUZZ_EXAMPLES", 80)), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def rgb(w=48, h=40, seed=0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels, followed by almost no data (~60 bytes)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))


# Formats a user may hand us under a .jpg name: how each is written with PIL.
FORMATS = {
    "jpeg": lambda p: rgb().save(p, "JPEG"), "jpeg_cmyk": lambda p: rgb().convert("CMYK").save(p, "JPEG"),
    "png": lambda p: rgb().save(p, "PNG"), "png_palette": lambda p: rgb().convert("P").save(p, "PNG"),
    "png_rgba": lambda p: rgb().convert("RGBA").save(p, "PNG"), "gif": lambda p: rgb().save(p, "GIF"),
    "bmp": lambda p: rgb().save(p, "BMP"), "webp": lambda p: rgb().save(p, "WEBP"),
    "tiff": lambda p: rgb().save(p, "TIFF"), "ppm": lambda p: rgb().save(p, "PPM"),
    "ico": lambda p: rgb().save(p, "ICO"), "tga": lambda p: rgb().save(p, "TGA"),
    "mpo": lambda p: rgb().save(p, "MPO", save_all=True, append_images=[rgb(seed=1)]),  # a camera's
    "jpeg2000": lambda p: rgb().save(p, "JPEG2000"), "pcx": lambda p: rgb().save(p, "PCX"),
}


def test_data_check_accepts_exactly_what_dalis_cpu_decoder_decodes(tmp_path):
    """The reference is DALI's own CPU decoder, run on each format named .jpg."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def decode(path):
        data, _ = fn.readers.file(files=[path], labels=[0])
        return fn.decoders.image(data, device="cpu", output_type=types.RGB)

    verdicts = {}
    for name, write in FORMATS.items():
        path = tmp_path / f"{name}.jpg"
        write(path)
        pipe = decode(str(path), batch_size=1, num_threads=1, device_id=None)
        try:
            pipe.build()
            pipe.run()
            dali_ok = True
        except RuntimeError:
            dali_ok = False
        verdicts[name] = (dali_ok, filelist.image_problem(path) is None)
    assert all(dali == ours for dali, ours in verdicts.values()), verdicts
    assert not verdicts["gif"][0] and verdicts["png"][0]  # the case the issue found


def test_pixel_limit_refuses_a_huge_header_before_decoding(tmp_path, monkeypatch):
    p = tmp_path / "huge.jpg"
    p.write_bytes(png_header_only(20000, 20000))
    assert len(p.read_bytes()) < 100
    why = filelist.image_problem(p)
    assert "20000x20000 = 400000000 pixels is over the limit of 64000000" in why
    with pytest.raises(SourceError, match="over the limit"):
        images.load_rgb(p)
    small = tmp_path / "small.jpg"
    rgb().save(small, "JPEG")
    assert filelist.image_problem(small) is None
    monkeypatch.setenv(images.MAX_PIXELS_ENV, "1000")  # configurable: 48 x 40 is then too big
    assert "48x40 = 1920 pixels is over the limit of 1000" in filelist.image_problem(small)
    monkeypatch.setenv(images.MAX_PIXELS_ENV, "lots")
    with pytest.raises(SourceError, match="BT_FAST_MAX_IMAGE_PIXELS='lots'"):
        images.max_pixels()


# ------------------------------------------------------------------ file lists


@pytest.fixture()
def root(tmp_path):
    """data/root (4 classes x 2 checked images) beside data/elsewhere (one image outside it)."""
    base = make_synthetic(tmp_path / "data", classes=4, train_per_class=2, val_per_class=1, size=(16, 16))
    (tmp_path / "elsewhere").mkdir()
    rgb(16, 16).save(tmp_path / "elsewhere" / "x.jpg")
    return base / "train"


def relist(root, lines: str):
    (root / "filelist.txt").write_text(lines)
    return filelist.read(root)


@pytest.mark.parametrize("line, needle", [
    ("../../elsewhere/x.jpg 0", "'..' leads out of the data root"),
    ("/etc/passwd 0", "an absolute path"),
    ("class0/0000.jpg 4", "label 4 is out of range: classes.txt lists 4 classes (0-3)"),
    ("class0/0000.jpg \u0661", "expected 'relative/path label'"),  # an Arabic-Indic digit
    ("class0/0000.jpg -1", "expected 'relative/path label'"),
    ("class0/\x1b[2J.jpg 0", "control character"),
])
def test_a_bad_entry_is_refused_naming_file_and_line(root, line, needle):
    with pytest.raises(SourceError) as e:
        relist(root, f"class0/0000.jpg 0\n{line}\n")
    assert needle in str(e.value) and f"{root / 'filelist.txt'}:2:" in str(e.value)


def test_symlinks_leading_out_of_the_root_are_refused(root, tmp_path):
    os.symlink(tmp_path / "elsewhere" / "x.jpg", root / "class0" / "link.jpg")
    os.symlink(tmp_path / "elsewhere", root / "class0" / "dir")
    os.symlink(root / "class1" / "0000.jpg", root / "class0" / "inside.jpg")  # fine: stays in
    assert relist(root, "class0/inside.jpg 0\n").paths == ["class0/inside.jpg"]
    with pytest.raises(SourceError, match="filelist.txt:1: 'class0/link.jpg': a symlink that leads out"):
        relist(root, "class0/link.jpg 0\n")
    with pytest.raises(SourceError, match="filelist.txt:1: 'class0/dir/x.jpg': its folder is a link"):
        relist(root, "class0/dir/x.jpg 0\n")
    # data check applies the same rules: neither link is listed, both are named.
    out = io.StringIO()
    os.symlink(tmp_path / "elsewhere" / "x.jpg", root / "class2" / "z.jpg")
    from bt_fast.data import check_folder
    assert check_folder(root, out) == 2
    assert "class2/z.jpg: a symlink that leads out" in out.getvalue()
    assert "class0/link.jpg" in out.getvalue()
    assert all("elsewhere" not in p and "link" not in p for p in filelist.read(root).paths)


def test_crlf_and_a_byte_order_mark_are_read_as_the_same_list(root):
    expected = filelist.read(root).paths
    text = (root / "filelist.txt").read_text()
    (root / "filelist.txt").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    assert filelist.read(root).paths == expected


def test_stamp_tells_a_checked_list_from_a_hand_made_one(root):
    assert filelist.read(root).checked  # written by make_synthetic through write_file_list
    text = (root / "filelist.txt").read_text()
    assert not relist(root, text + "class0/0000.jpg 0\n").checked


def test_a_hand_listed_huge_image_stops_the_trainer_reader_naming_it(root):
    pytest.importorskip("nvidia.dali")
    from bt_fast.pipelines import FolderSource

    (root / "class0" / "huge.jpg").write_bytes(png_header_only(20000, 20000))
    text = (root / "filelist.txt").read_text()
    (root / "filelist.txt").write_text(text + "class0/huge.jpg 0\n")
    with pytest.raises(SourceError, match=r"huge.jpg: 20000x20000 = 400000000 pixels is over the limit"):
        FolderSource(root)


def test_non_utf8_classes_file_is_one_error(root):
    (root / "classes.txt").write_bytes(b"class0\n\xffclass1\n")
    with pytest.raises(SourceError, match="classes.txt: not UTF-8"):
        filelist.read(root)


names = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
entries = st.one_of(
    st.builds(lambda n, y: f"class0/{n} {y}", names, st.integers(0, 6)),
    st.builds(lambda n, y: f"{n} {y}", st.sampled_from(["../x.jpg", "/abs.jpg", "a/../../b.jpg", "class0//x.jpg",
                                                         "./class0/x.jpg", "class0/0000.jpg", "\\\\srv\\x.jpg"]),
              st.sampled_from(["0", "3", "4", "99999999999", "", "x", "0x1"])),
    st.text(max_size=30))


@FUZZ
@given(lines=st.lists(entries, max_size=6), sep=st.sampled_from(["\n", "\r\n"]))
def test_fuzzed_file_lists_are_inside_the_root_or_one_error_naming_the_line(root, lines, sep):
    (root / "filelist.txt").write_text(sep.join(lines) + sep, encoding="utf-8", errors="surrogatepass")
    try:
        listing = filelist.read(root)
    except SourceError as e:
        assert str(root / "filelist.txt") in str(e) and "\n" not in str(e).strip()
        return
    real = os.path.realpath(root)
    for p, y in zip(listing.paths, listing.labels):
        assert os.path.realpath(root / p).startswith(real + os.sep), p
        assert 0 <= y < len(listing.classes)


@pytest.mark.slow  # a DALI pipeline over the cut shard
def test_truncated_webdataset_shard_is_named(tmp_path):
    pytest.importorskip("nvidia.dali")
    from bt_fast.pipelines import WebDatasetSource

    buf = io.BytesIO()
    rgb(16, 16).save(buf, "JPEG")
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(4):
            for ext, data in (("jpg", buf.getvalue()), ("cls", b"1")):
                info = tarfile.TarInfo(f"{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    source = WebDatasetSource([shard])
    assert len(source) == 4
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 3])  # cut after the source was made: the loader names it
    from bt_fast.pipelines import MultiViewLoader, ViewSpec
    with pytest.raises(SourceError, match=f"{shard}: truncated tar shard .*changed since the run started"):
        list(MultiViewLoader(source, [ViewSpec(size=16), ViewSpec(size=16)], 2, device="cpu", num_threads=1))
    for cut in (700, 1800, 3000, len(raw) // 2 + 100):
        shard.write_bytes(raw[:cut])
        with pytest.raises(SourceError, match=f"{shard}: (truncated tar shard|not a readable tar shard)"):
            WebDatasetSource([shard])


def test_a_fifo_listed_by_hand_is_refused_not_waited_on(root):
    os.mkfifo(root / "class0" / "fifo.jpg")  # opening it for reading would block forever
    assert "not a regular file" in images.header_problem(root / "class0" / "fifo.jpg")
    assert "not a regular file" in filelist.image_problem(root / "class0" / "fifo.jpg")


@pytest.mark.parametrize("argv, needle", [
    (["synthetic", "--classes", "0"], "--classes 0: must be in [1, 10000]"),
    (["synthetic", "--per-class", "-1"], "--per-class -1: must be in [1, 1000000]"),
    (["synthetic", "--size", "0", "0"], "--size 0 0: must be in [1, 8192]"),
])
def test_data_sizes_are_checked_in_one_line(tmp_path, capsys, argv, needle):
    assert main(["data", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err
    assert not (tmp_path / "out").exists()


def test_a_bad_pixel_limit_stops_data_check_before_the_list_is_rewritten(root, capsys, monkeypatch):
    before = (root / "filelist.txt").read_bytes()
    monkeypatch.setenv(images.MAX_PIXELS_ENV, "0")
    assert main(["data", "check", str(root)]) == 2
    assert "BT_FAST_MAX_IMAGE_PIXELS='0'" in capsys.readouterr().err
    assert (root / "filelist.txt").read_bytes() == before


@pytest.mark.parametrize("argv, needle", [
    (["report", "no-such-run", "--batch", "0"], "--batch 0: must be in [2, 65536]"),  # was a ZeroDivisionError
    (["report", "no-such-run", "--dims", "-1"], "--dims -1: must be in [1, 65536]"),
    (["bench", "step", "--batch", "0"], "--batch 0: must be in [1, 1048576]"),
    (["bench", "pipeline", "--size", "0"], "--size 0: must be in [2, 8192]"),
    (["bench", "pipeline", "--images", "-5"], "--images -5: must be in [1, 1000000]"),
])
def test_other_commands_check_their_sizes_in_one_line(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


def test_report_reads_a_doctored_metrics_log_without_a_traceback(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(
        b'{"step": 1, "loss": 2.0, "lr": 0.1, "time_forward_s": 0.2}\n\xff\xfe torn\n[1, 2]\n'
        b'{"step": "x", "loss": 1}\n{"step": 2, "loss": 1.5, "lr": "x", "time_forward_s": "y", '
        b'"images_per_s": null, "data_wait_share": [1]}\n' + b"[" * 100000 + b"\n")
    assert main(["report", str(run), "--no-crosscorr"]) == 0, capsys.readouterr().err
    assert (run / "report" / "dashboard.png").is_file()


def test_a_doctored_checkpoint_config_is_refused_by_eval_naming_the_key(tmp_path, capsys):
    data = make_synthetic(tmp_path / "d", classes=2, train_per_class=4, val_per_class=2, size=(16, 16))
    ckpt = torch.load(tiny_checkpoint(tmp_path, data), weights_only=True)
    ckpt["config"]["data"]["image_size"] = 10**9  # eval would resize every image to it
    torch.save(ckpt, tmp_path / "doctored.pt")
    assert main(["eval", "knn", "--checkpoint", str(tmp_path / "doctored.pt"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.image_size=1000000000: must be in [2, 8192]" in err, err


def test_a_cut_or_foreign_feature_cache_is_ignored_not_trusted(tmp_path):
    from bt_fast.eval.features import _cached

    good = {"features": torch.zeros(3, 4), "labels": torch.zeros(3, dtype=torch.long)}
    torch.save(good, tmp_path / "good.pt")
    assert _cached(tmp_path / "good.pt") is not None
    raw = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    torch.save({"features": torch.zeros(3, 4), "labels": torch.zeros(2)}, tmp_path / "mismatch.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    for name in ("cut.pt", "mismatch.pt", "list.pt"):
        assert _cached(tmp_path / name) is None, name


@pytest.mark.slow  # a DALI pipeline that stops on the member
def test_a_webdataset_member_dali_cannot_decode_is_named(tmp_path):
    pytest.importorskip("nvidia.dali")
    from bt_fast.pipelines import MultiViewLoader, ViewSpec, WebDatasetSource

    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(4):
            buf = io.BytesIO()
            rgb(16, 16, seed=i).save(buf, "GIF" if i == 2 else "JPEG")  # a GIF named .jpg
            for ext, data in (("jpg", buf.getvalue()), ("cls", b"1")):
                info = tarfile.TarInfo(f"{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    loader = MultiViewLoader(WebDatasetSource([shard]), [ViewSpec(size=16), ViewSpec(size=16)], 2,
                             device="cpu", num_threads=1)
    with pytest.raises(SourceError, match=f"{shard}:002.jpg: a GIF image, which the pipeline's decoder"):
        list(loader)
