"""One trainer per run folder: a second trainer is refused while the first lives, the
folder is taken over once it is dead (kill -9 included), a torchrun restart of the same
job waits for its old rank 0, and an empty train.run_dir is refused."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from bt_fast import cli, runlock
from bt_fast.errors import EXIT_USER, RunDirError, RunLockedError
from conftest import CONFIGS

HOLD = """
import sys, time
from bt_fast import runlock
runlock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def holder_process(run_dir, **env):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, **env})
    assert p.stdout.readline().strip() == "locked"
    return p


def test_empty_run_dir_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for empty in ("", "  "):
        with pytest.raises(RunDirError, match="train.run_dir is empty"):
            runlock.acquire(empty)
    assert list(tmp_path.iterdir()) == []


def test_the_lock_file_names_its_holder_and_a_second_take_in_one_process_reuses_it(tmp_path):
    lock = runlock.acquire(tmp_path)
    try:
        text = (tmp_path / runlock.LOCK_NAME).read_text()
        assert f"pid={os.getpid()}" in text and "host=" in text
        assert runlock.acquire(tmp_path) is lock  # a second setup() in this process
        held = runlock.holder(tmp_path)  # another open file: sees the lock as taken
        assert held is not None and held.pid == os.getpid()
    finally:
        lock.release()
    assert runlock.holder(tmp_path) is None
    assert (tmp_path / runlock.LOCK_NAME).read_text() == ""  # ended cleanly: nobody to take over


def test_a_symlink_at_the_lock_is_refused(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / runlock.LOCK_NAME).symlink_to(victim)
    with pytest.raises(RunDirError, match="symbolic link"):
        runlock.acquire(tmp_path / "run")
    assert victim.read_text() == "precious"


@pytest.mark.slow  # a second interpreter
def test_a_second_trainer_is_refused_while_the_first_lives_and_takes_over_after_kill_9(tmp_path, capsys):
    run = tmp_path / "run"
    p = holder_process(run)
    try:
        with pytest.raises(RunLockedError, match=f"PID {p.pid} on host"):
            runlock.acquire(run)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        lock = runlock.acquire(run)
        assert f"pid={os.getpid()}" in (run / runlock.LOCK_NAME).read_text()
        assert f"no longer running (PID {p.pid}" in capsys.readouterr().err
        lock.release()
    finally:
        p.kill()


@pytest.mark.slow  # a second interpreter and a real `bt-fast train` start
def test_bt_fast_train_on_a_locked_folder_is_one_line_exit_2_and_writes_nothing(tmp_path, tiny_imagefolder, capsys):
    run = tmp_path / "run"
    p = holder_process(run)
    try:
        before = sorted(run.iterdir())
        code = cli.main(["train", "--config", str(CONFIGS / "smoke.yaml"),
                         "--set", f"data.train_dir={tiny_imagefolder / 'train'}", "--set", f"train.run_dir={run}"])
        err = capsys.readouterr().err
        assert code == EXIT_USER and err.count("\n") == 1, err
        assert f"in use by another bt-fast train, PID {p.pid}" in err
        assert sorted(run.iterdir()) == before  # no config.yaml, metrics or checkpoints
    finally:
        p.kill()
        p.wait()


@pytest.mark.slow  # a second interpreter
def test_an_elastic_restart_waits_for_its_own_jobs_old_rank_0(tmp_path, monkeypatch):
    run = tmp_path / "run"
    p = holder_process(run, TORCHELASTIC_RUN_ID="job-7")
    try:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "other-job")
        with pytest.raises(RunLockedError):  # another job: refused at once
            runlock.acquire(run)
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
        threading.Timer(0.5, p.kill).start()  # the old rank 0 exits a moment later
        t0 = time.monotonic()
        lock = runlock.acquire(run)
        assert time.monotonic() - t0 < runlock.RESTART_WAIT_S
        lock.release()
    finally:
        p.kill()
        p.wait()


@pytest.mark.slow  # a second interpreter
def test_the_preflight_refuses_a_folder_another_job_holds_and_lets_its_own_job_join(tmp_path, tiny_imagefolder, capsys):
    from bt_fast import preflight

    run = tmp_path / "run"
    p = holder_process(run, TORCHELASTIC_RUN_ID="job-7")
    argv = ["--world-sizes", "1", "--", "--config", str(CONFIGS / "smoke.yaml"),
            "--set", f"data.train_dir={tiny_imagefolder / 'train'}", "--set", f"train.run_dir={run}"]
    try:
        assert preflight.main(argv) == EXIT_USER
        assert f"PID {p.pid}" in capsys.readouterr().err
        assert preflight.main(["--run-id", "job-7", *argv]) == 0
    finally:
        p.kill()
        p.wait()
