"""Checkpoint files: a full disk, a torn last.pt, temp files of killed runs, RNG state
of this rank's device only, and the one prefix-stripping rule."""

import errno
import os
import subprocess
import sys

import pytest
import torch

from bt_fast import checkpoint, safeio
from bt_fast.errors import CheckpointError, DiskFullError, RunDirError


def ckpt(step: int) -> dict:
    """The trainer's layout, small: what a resume needs."""
    return {"model": {"backbone.w": torch.full((4,), float(step))}, "step": step, "config": {},
            "optimizer": {"state": {}, "param_groups": [{"params": [0], "lr": 0.1}]}, "scaler": {},
            "rng": [checkpoint.rng_state()], "pipeline": [{"dali": ""}]}


def test_save_keeps_the_previous_checkpoint(tmp_path):
    checkpoint.save(ckpt(1), tmp_path)
    checkpoint.save(ckpt(2), tmp_path)
    ckdir = checkpoint.checkpoint_dir(tmp_path)
    assert checkpoint.load(ckdir / "last.pt")["step"] == 2
    assert checkpoint.load(ckdir / "prev.pt")["step"] == 1
    assert sorted(p.name for p in ckdir.iterdir()) == ["last.pt", "prev.pt"]


@pytest.mark.parametrize("wrapped", [False, True], ids=["oserror", "torch-wrapped"])
def test_full_disk_is_one_line_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch, wrapped):
    checkpoint.save(ckpt(7), tmp_path)
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        f.write(b"partial bytes")
        err = OSError(errno.ENOSPC, "No space left on device")
        if wrapped:  # torch.save reports a failed write as a RuntimeError with the OSError inside
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from err
        raise err

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(DiskFullError) as e:
        checkpoint.save(ckpt(8), tmp_path)
    monkeypatch.setattr(torch, "save", real_save)
    msg = str(e.value)
    assert "disk full while writing" in msg and "the previous checkpoint at step 7 is intact" in msg
    assert "\n" not in msg
    ckdir = checkpoint.checkpoint_dir(tmp_path)
    assert sorted(p.name for p in ckdir.iterdir()) == ["last.pt"]  # no temp file left
    assert checkpoint.load(ckdir / "last.pt")["step"] == 7


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_files_are_removed_at_start_and_a_live_writers_kept(tmp_path, capsys):
    ckdir = checkpoint.checkpoint_dir(tmp_path)
    ckdir.mkdir(parents=True)
    (ckdir / f".last.pt.tmp.{safeio.host()}.{dead_pid()}").write_bytes(b"torn")
    (ckdir / f".prev.pt.tmp.{dead_pid()}").write_bytes(b"torn")  # an older name, no host
    live = ckdir / f".last.pt.tmp.{safeio.host()}.{os.getpid()}"  # a live run's, being written
    live.write_bytes(b"being written")
    (ckdir / "notes.txt").write_text("mine")
    checkpoint.prepare(tmp_path)
    assert sorted(p.name for p in ckdir.iterdir()) == sorted(["notes.txt", live.name])
    assert "removed 2 temp file(s)" in capsys.readouterr().err


def test_empty_run_dir_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunDirError, match="train.run_dir is empty"):
        checkpoint.prepare("")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_run_folder_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # works as root too, unlike chmod
    with pytest.raises(RunDirError, match="run folder .* is not writable"):
        checkpoint.prepare(blocker / "run")


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_torn_last_falls_back_to_prev_with_a_warning(tmp_path, capsys):
    checkpoint.save(ckpt(1), tmp_path)
    checkpoint.save(ckpt(2), tmp_path)
    truncate(checkpoint.checkpoint_dir(tmp_path) / "last.pt")
    loaded, path = checkpoint.load_latest(tmp_path)
    assert loaded["step"] == 1 and path.name == "prev.pt"
    assert "resuming from the previous checkpoint" in capsys.readouterr().err


def test_neither_checkpoint_loads_is_one_error(tmp_path):
    checkpoint.save(ckpt(1), tmp_path)
    checkpoint.save(ckpt(2), tmp_path)
    for name in ("last.pt", "prev.pt"):
        truncate(checkpoint.checkpoint_dir(tmp_path) / name, keep=0.3)
    with pytest.raises(CheckpointError, match="neither checkpoint loads") as e:
        checkpoint.load_latest(tmp_path)
    assert "\n" not in str(e.value)
    assert checkpoint.load_latest(tmp_path / "fresh") is None


def test_rng_state_holds_this_ranks_device_only(monkeypatch):
    """Faked CUDA: saving must not touch other devices (get_rng_state_all), restoring
    must set the current device's state."""
    mine = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": mine.clone())
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("saved every device's RNG"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append(s))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("restored every device"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    state = checkpoint.rng_state()
    assert torch.equal(state["cuda"], mine)
    checkpoint.set_rng_state(state)
    assert torch.equal(restored[-1], mine)
    # A checkpoint of the old format (one state per visible device): this rank's entry.
    checkpoint.set_rng_state({**state, "cuda": [mine + 1, mine + 2]})
    assert torch.equal(restored[-1], mine + 2)


def test_strip_wrappers_removes_ddp_and_compile_prefixes():
    state = {"module._orig_mod.backbone.w": 1, "_orig_mod.module.head.b": 2, "backbone.x": 3}
    assert checkpoint.strip_wrappers(state) == {"backbone.w": 1, "head.b": 2, "backbone.x": 3}


def test_load_of_a_foreign_file_is_a_checkpoint_error(tmp_path):
    (tmp_path / "x.pt").write_bytes(os.urandom(64))
    with pytest.raises(CheckpointError, match="not a readable bt_fast checkpoint"):
        checkpoint.load(tmp_path / "x.pt")


def test_prepare_for_a_check_leaves_temp_files_alone(tmp_path):
    """The preflight may run beside a live elastic job: rank 0's temp file is not stale."""
    ckdir = checkpoint.checkpoint_dir(tmp_path)
    ckdir.mkdir(parents=True)
    (ckdir / ".last.pt.tmp.4242").write_bytes(b"being written")
    checkpoint.prepare(tmp_path, clean=False)
    assert (ckdir / ".last.pt.tmp.4242").is_file()
