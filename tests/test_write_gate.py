"""The write gate (bt_fast.safeio): atomic, never through a link, never over an input,
one line when it cannot write, temp files removed only when their writer is gone."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from bt_fast import safeio
from bt_fast.errors import MAX_LINE, DiskFullError, UserError, WriteError, one_line

ROOT = os.geteuid() == 0  # root ignores permission bits: those cases are simulated


def temps(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp." in p.name)


@pytest.mark.parametrize("data", [b"\x00bytes", "text é", lambda f: f.write(b"from a callable")])
def test_writes_the_bytes_and_leaves_no_temp_file(tmp_path, data):
    out = safeio.write_atomic(tmp_path / "sub" / "x.bin", data)
    want = data if isinstance(data, bytes) else data.encode() if isinstance(data, str) else b"from a callable"
    assert out.read_bytes() == want
    assert temps(out.parent) == []


def test_torch_save_through_the_gate_round_trips(tmp_path):
    obj = {"w": torch.arange(6.0).reshape(2, 3), "step": 3}
    path = safeio.write_atomic(tmp_path / "c.pt", lambda f: torch.save(obj, f))
    back = torch.load(path, weights_only=True)
    assert back["step"] == 3 and torch.equal(back["w"], obj["w"])


def test_a_symlink_at_the_target_is_refused_and_what_it_points_at_is_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = tmp_path / "run" / "config.yaml"
    link.parent.mkdir()
    link.symlink_to(victim)
    with pytest.raises(WriteError, match="symbolic link"):
        safeio.write_atomic(link, "overwritten")
    assert victim.read_text() == "precious" and link.is_symlink()


def test_appending_through_a_symlink_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    link = tmp_path / "metrics.jsonl"
    link.symlink_to(victim)
    with pytest.raises(WriteError, match="symbolic link"):
        safeio.append_line(link, "{}")
    assert victim.read_text() == "precious\n"


def test_appending_to_a_fifo_is_refused_not_blocking(tmp_path):
    fifo = tmp_path / "metrics.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(WriteError, match="not a regular file"):
        safeio.open_append(fifo)


def test_append_line_appends(tmp_path):
    path = tmp_path / "m.jsonl"
    safeio.append_line(path, "a")
    safeio.append_line(path, "b\n")
    assert path.read_text() == "a\nb\n"


def test_writing_over_an_input_is_refused_by_path_by_link_and_by_inode(tmp_path):
    ck = tmp_path / "checkpoints" / "last.pt"
    ck.parent.mkdir()
    ck.write_bytes(b"the checkpoint")
    alias = tmp_path / "alias"
    alias.symlink_to(tmp_path / "checkpoints")  # the same file through a linked folder
    hard = tmp_path / "hard.pt"
    os.link(ck, hard)  # another name for the same inode
    for target in (ck, alias / "last.pt", hard, tmp_path / "checkpoints" / ".." / "checkpoints" / "last.pt"):
        with pytest.raises(WriteError, match="own inputs"):
            safeio.write_atomic(target, b"a bare backbone", inputs=[ck])
    assert ck.read_bytes() == b"the checkpoint"
    safeio.write_atomic(tmp_path / "other.pt", b"ok", inputs=[ck])  # a different file is fine


def test_a_folder_at_the_target_is_one_line(tmp_path):
    (tmp_path / "out.pt").mkdir()
    with pytest.raises(WriteError, match="is a folder"):
        safeio.write_atomic(tmp_path / "out.pt", b"x")


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_an_unwritable_folder_is_one_line_naming_the_target(tmp_path, monkeypatch, code):
    real_open = os.open

    def refuse(path, flags, *a, **k):
        if str(path).startswith(str(tmp_path / "ro")) and flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *a, **k)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(WriteError) as e:
        safeio.write_atomic(tmp_path / "ro" / "report.png", b"x")
    line = one_line("report", e.value)
    assert "\n" not in line and str(tmp_path / "ro" / "report.png") in line and os.strerror(code) in line
    assert list((tmp_path / "ro").iterdir()) == []


@pytest.mark.skipif(ROOT, reason="root writes into read-only folders (simulated above)")
def test_a_read_only_folder_for_real_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(WriteError, match="ro/x.txt"):
            safeio.write_atomic(ro / "x.txt", "x")
    finally:
        ro.chmod(0o755)


@pytest.mark.skipif(ROOT, reason="root may replace read-only files")
def test_a_read_only_file_is_not_replaced(tmp_path):
    f = tmp_path / "keep.pt"
    f.write_bytes(b"mine")
    f.chmod(0o444)
    with pytest.raises(WriteError, match="read-only"):
        safeio.write_atomic(f, b"other")
    assert f.read_bytes() == b"mine"


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_full_disk_is_one_line_keeps_the_old_file_and_no_temp(tmp_path, wrapped):
    path = tmp_path / "x.bin"
    safeio.write_atomic(path, b"old")

    def full(f):
        f.write(b"partial")
        err = OSError(errno.ENOSPC, "No space left on device")
        if wrapped:  # torch.save reports it as a RuntimeError from its stream writer
            raise RuntimeError("PytorchStreamWriter failed writing file") from err
        raise err

    with pytest.raises(DiskFullError, match="disk full while writing .*x.bin"):
        safeio.write_atomic(path, full)
    assert path.read_bytes() == b"old" and temps(tmp_path) == []


def test_a_bug_in_the_writer_keeps_its_traceback_and_removes_the_temp(tmp_path):
    def buggy(f):
        f.write(b"half")
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        safeio.write_atomic(tmp_path / "x", buggy)
    assert temps(tmp_path) == [] and not (tmp_path / "x").exists()


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temp_files_of_live_writers_stay_and_of_dead_ones_go(tmp_path):
    host = safeio.host()
    live = tmp_path / f".last.pt.tmp.{host}.{os.getpid()}"
    dead = tmp_path / f".last.pt.tmp.{host}.{dead_pid()}"
    legacy_dead = tmp_path / f".prev.pt.tmp.{dead_pid()}"  # older names had no host
    other_host = tmp_path / f".last.pt.tmp.{host}x-elsewhere.{dead_pid()}"
    not_ours = tmp_path / ".notes.txt"
    for p in (live, dead, legacy_dead, other_host, not_ours):
        p.write_bytes(b"x")
    removed = safeio.remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted([dead.name, legacy_dead.name])
    assert live.exists() and other_host.exists() and not_ours.exists()


def test_a_write_sweeps_its_own_targets_dead_temps_only(tmp_path):
    dead = tmp_path / f".x.bin.tmp.{safeio.host()}.{dead_pid()}"
    dead_other_target = tmp_path / f".y.bin.tmp.{safeio.host()}.{dead_pid()}"
    dead.write_bytes(b"torn")
    dead_other_target.write_bytes(b"torn")
    safeio.write_atomic(tmp_path / "x.bin", b"new")
    assert not dead.exists() and dead_other_target.exists()


def test_a_planted_link_at_the_temp_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    safeio.temp_path(tmp_path / "x.bin").symlink_to(victim)
    with pytest.raises(WriteError):
        safeio.write_atomic(tmp_path / "x.bin", b"new", sweep=False)
    assert victim.read_text() == "precious"


def test_link_or_copy_links_and_refuses_its_own_source(tmp_path):
    src = tmp_path / "a.jpg"
    src.write_bytes(b"jpeg")
    dst = safeio.link_or_copy(src, tmp_path / "semi" / "a.jpg")
    assert dst.read_bytes() == b"jpeg" and os.path.samefile(src, dst)
    with pytest.raises(WriteError, match="own inputs"):
        safeio.link_or_copy(src, src)


def test_cache_home_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert safeio.cache_home() == tmp_path / "bt_fast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert safeio.cache_home() == tmp_path / "home" / ".cache" / "bt_fast"


def test_one_line_cuts_long_messages():
    line = one_line("train", UserError("x" * 100_000 + "\n" * 5))
    assert len(line) <= len("bt-fast train: ") + MAX_LINE and line.endswith("\u2026") and "\n" not in line
    assert one_line("train", UserError("short\nmessage")) == "bt-fast train: short message"


WRITER = """
import sys, time
from bt_fast import safeio
def slow(f):
    f.write(b"new" * 1000); f.flush()
    print("writing", flush=True)
    time.sleep(60)
safeio.write_atomic(sys.argv[1], slow)
"""


@pytest.mark.slow  # a second interpreter
def test_kill_9_mid_write_leaves_the_old_file_and_a_temp_the_next_writer_removes(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"old")
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    assert safeio.remove_stale_temps(tmp_path) == []  # its writer lives: kept
    assert len(temps(tmp_path)) == 1
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    time.sleep(0.05)
    assert path.read_bytes() == b"old"
    assert len(safeio.remove_stale_temps(tmp_path)) == 1 and temps(tmp_path) == []


def test_a_file_where_the_folder_goes_is_one_line(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(WriteError, match="out is a file, not a folder"):
        safeio.write_atomic(tmp_path / "out" / "compose.yaml", "x")
