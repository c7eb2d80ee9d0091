"""Faults a user meets, driven through the CLI: each is one line naming what and where,
exit 2, no traceback, and the documented recovery works (issue 11)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from bt_fast import checkpoint, data
from bt_fast.cli import main
from bt_fast.dist import Env, StopFlag


def train_args(repo_root, train_dir, run_dir, *extra):
    sets = [f"data.train_dir={train_dir}", f"train.run_dir={run_dir}", *extra]
    return ["train", "--config", str(repo_root / "configs" / "smoke.yaml")] + [a for s in sets for a in ("--set", s)]


def one_line_exit_2(argv, capsys) -> str:
    """Run the CLI; assert exit 2 and exactly one stderr line, no traceback; return it."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("bt-fast ")
    return lines[0]


@pytest.fixture()
def images(tmp_path):
    """A private copy (tests here break files): 2 classes x 8 images + val."""
    return data.make_synthetic(tmp_path / "data", classes=2, train_per_class=8, val_per_class=2, size=(32, 32))


def test_folder_without_filelist(repo_root, images, tmp_path, capsys):
    (images / "train" / "filelist.txt").unlink()
    line = one_line_exit_2(train_args(repo_root, images / "train", tmp_path / "run"), capsys)
    assert f"{images / 'train'}: no filelist.txt; run `bt-fast data check" in line


def test_listed_image_deleted_after_check(repo_root, images, tmp_path, capsys):
    (images / "train" / "class1" / "0003.jpg").unlink()
    line = one_line_exit_2(train_args(repo_root, images / "train", tmp_path / "run"), capsys)
    assert "class1/0003.jpg: listed in filelist.txt but unreadable" in line


@pytest.mark.parametrize("count", [1, 5])
def test_fewer_images_than_one_batch(repo_root, tmp_path, capsys, count):
    root = data.make_synthetic(tmp_path / "d", classes=1, train_per_class=count, val_per_class=1)
    line = one_line_exit_2(train_args(repo_root, root / "train", tmp_path / "run", "data.batch_size=8"), capsys)
    assert f"{count} images over 1 shard(s) give no full batch of 8" in line


def test_unwritable_run_folder(repo_root, images, tmp_path, capsys):
    # Tests run as root, where chmod does not stop writes; a path under a regular file
    # cannot be created by anyone.
    (tmp_path / "blocker").write_text("a file, not a folder")
    line = one_line_exit_2(train_args(repo_root, images / "train", tmp_path / "blocker" / "run"), capsys)
    assert f"run folder {tmp_path / 'blocker' / 'run'} is not writable" in line


def test_taken_metrics_port(repo_root, images, tmp_path, capsys, free_port):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port))
        taken.listen()
        line = one_line_exit_2(train_args(repo_root, images / "train", tmp_path / "run", "metrics.prometheus=true",
                                          f"metrics.port={free_port}"), capsys)
    assert f"cannot listen on 127.0.0.1:{free_port}" in line


def test_truncated_checkpoint_without_a_previous_one(repo_root, images, tmp_path, capsys):
    ckdir = checkpoint.checkpoint_dir(tmp_path / "run")
    ckdir.mkdir(parents=True)
    torch.save({"model": {}, "step": 3, "config": {}, "padding": torch.zeros(1000)}, ckdir / "last.pt")
    raw = (ckdir / "last.pt").read_bytes()
    (ckdir / "last.pt").write_bytes(raw[: len(raw) // 2])
    line = one_line_exit_2(train_args(repo_root, images / "train", tmp_path / "run"), capsys)
    assert f"{ckdir / 'last.pt'}: not a readable bt_fast checkpoint" in line and "no prev.pt" in line


def test_config_naming_no_data(repo_root, tmp_path, capsys):
    yaml_text = (repo_root / "configs" / "smoke.yaml").read_text()
    no_data = "".join(line for line in yaml_text.splitlines(keepends=True) if "_dir: data/" not in line)
    (tmp_path / "no-data.yaml").write_text(no_data)
    capsys.readouterr()
    assert main(["train", "--config", str(tmp_path / "no-data.yaml"),
                 "--set", f"train.run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "data.train_dir is not set" in err and "Traceback" not in err


def test_second_ctrl_c_interrupts_at_once():
    stop = StopFlag(Env())
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.should_stop()  # the first: stop after this step, like SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs before this returns
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_image_gone_bad_mid_run_is_named_and_check_then_resume_recovers(repo_root, tmp_path, capsys):
    root = data.make_synthetic(tmp_path / "data", classes=4, train_per_class=16, val_per_class=1, size=(32, 32))
    run = tmp_path / "run"
    args = lambda steps: train_args(repo_root, root / "train", run, f"train.max_steps={steps}",  # noqa: E731
                                    "train.checkpoint_every=1")
    assert main(args(2)) == 0
    bad = root / "train" / "class2" / "0007.jpg"
    bad.write_bytes(os.urandom(bad.stat().st_size))  # same size: the list's fingerprint cannot tell
    capsys.readouterr()
    assert main(args(8)) == 2  # 64 images / batch 16: steps 3..8 read every image at least once
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("bt-fast train:")][-1]
    assert f"{bad}: " in line and "became unreadable after `bt-fast data check`" in line
    assert f"Recover: `bt-fast data check {root / 'train'}`" in line
    stopped_at = checkpoint.load(run / "checkpoints" / "last.pt")["step"]
    assert 2 <= stopped_at < 8
    assert main(["data", "check", str(root / "train")]) == 1  # names it, drops it
    assert main(args(8)) == 0
    err = capsys.readouterr().err
    assert f"at step {stopped_at}" in err and "the file list lost 1 image(s)" in err
    assert checkpoint.load(run / "checkpoints" / "last.pt")["step"] == 8


@pytest.mark.slow
def test_ctrl_c_stops_at_the_step_and_writes_one_checkpoint(repo_root, tmp_path):
    root = data.make_synthetic(tmp_path / "data", classes=2, train_per_class=8, val_per_class=1, size=(32, 32))
    run = tmp_path / "run"
    argv = train_args(repo_root, root / "train", run, "train.max_steps=100000", "train.checkpoint_every=0")
    proc = subprocess.Popen([sys.executable, "-m", "bt_fast", *argv], stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").is_file() or "loss" not in (run / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    step = checkpoint.load(run / "checkpoints" / "last.pt")["step"]
    assert f"stopped by signal at step {step}; checkpoint written" in err
    assert 1 <= step < 100000
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]  # exactly one
    shutil.rmtree(run)


@pytest.mark.slow
def test_train_sh_refuses_a_config_error_before_torchrun_starts(repo_root, tiny_imagefolder, tmp_path):
    """torchrun retries a failed worker group whatever its exit code; train.sh checks the
    batch against every world size NODES allows (here 1:2 nodes x 3) before starting it."""
    env = {**os.environ, "NODES": "1:2", "GPUS": "3", "TORCHRUN": "echo", "PYTHON": sys.executable,
           "CONFIG": str(repo_root / "configs" / "smoke.yaml")}
    argv = [str(repo_root / "scripts" / "train.sh"), "--set", f"data.train_dir={tiny_imagefolder / 'train'}",
            "--set", f"train.run_dir={tmp_path / 'run'}"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout == ""  # torchrun (echo here) never ran
    assert proc.stderr.strip() == ("bt-fast train: config error: data.batch_size=16 is not divisible by "
                                   "the world size 3, 6 (each rank reads batch_size / world size)")
    proc = subprocess.run(argv, env={**env, "GPUS": "2"}, capture_output=True, text=True)
    assert proc.returncode == 0 and "--max-restarts=3" in proc.stdout and "-m bt_fast train" in proc.stdout
