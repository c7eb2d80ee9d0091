"""Every user error reaches the CLI as one line and exit 2, never a traceback."""

import subprocess
import sys

import pytest

from bt_fast import cli, errors
from bt_fast.pipelines.errors import SourceError, StateMismatch
from conftest import CONFIGS

FAMILY = [errors.ConfigError, errors.UsageError, errors.DataError, errors.EvalError,
          errors.CheckpointError, errors.ResumeError, errors.MetricsPortError, errors.DiskFullError,
          errors.RunDirError, errors.WriteError, errors.RunLockedError, SourceError, StateMismatch]


@pytest.mark.parametrize("cls", FAMILY, ids=lambda c: c.__name__)
def test_each_user_error_is_one_line_and_exit_2(cls, monkeypatch, capsys):
    import bt_fast.report as report

    def fail(args):
        raise cls("runs/x/metrics.jsonl: something the user can fix\n(second line of detail)")

    monkeypatch.setattr(report, "run", fail)
    assert cli.main(["report", "runs/x"]) == errors.EXIT_USER
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bt-fast report: "), err
    assert "runs/x/metrics.jsonl: something the user can fix (second line of detail)" in err
    assert ("config error: " in err) == (cls is errors.ConfigError)


def test_a_bug_is_not_a_user_error(monkeypatch):
    """Anything outside the family keeps its traceback (it is ours to fix)."""
    import bt_fast.report as report

    monkeypatch.setattr(report, "run", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["report", "runs/x"])


def bt_fast(*argv, cwd=None):
    return subprocess.run([sys.executable, "-m", "bt_fast", *argv], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.slow  # one fresh interpreter per case
@pytest.mark.parametrize("argv, needle", [
    (["train", "--config", "no/such.yaml"], "config error: no/such.yaml: config file not found"),
    (["train", "--config", str(CONFIGS / "smoke.yaml"), "--set", "train.seeed=1"], "did you mean 'train.seed'"),
    (["data", "check", "no/such/folder"], "no/such/folder"),
    (["eval", "knn", "--checkpoint", "no/such.pt"], "no/such.pt"),
    (["report", "no/such/run"], "no/such/run"),
    (["tune", "--config", str(CONFIGS / "smoke.yaml"), "--knobs", "warp"], "--knobs: unknown warp"),
])
def test_user_errors_through_the_real_cli(argv, needle, tmp_path):
    """A fresh process, as a user runs it: exit 2, one stderr line, no traceback."""
    proc = bt_fast(*argv, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bt-fast {argv[0]}: ") and needle in lines[0], proc.stderr


@pytest.mark.slow
def test_resume_with_another_world_size_is_a_resume_error(tiny_imagefolder, tmp_path):
    """A checkpoint from 2 ranks resumed by 1: a resume error, not a config error."""
    import torch

    sets = [f"data.train_dir={tiny_imagefolder / 'train'}", f"data.val_dir={tiny_imagefolder / 'val'}",
            f"train.run_dir={tmp_path}", "train.max_steps=1"]
    args = ["train", "--config", str(CONFIGS / "smoke.yaml")] + [a for s in sets for a in ("--set", s)]
    assert cli.main(args) == 0
    path = tmp_path / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["pipeline"], ckpt["rng"] = ckpt["pipeline"] * 2, ckpt["rng"] * 2  # as if 2 ranks wrote it
    torch.save(ckpt, path)
    proc = bt_fast(*args[:-2], "--set", "train.max_steps=2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "written by 2 rank(s), now 1" in last and "config error" not in last, last


@pytest.mark.parametrize("argv", [
    ["eval", "knn", "--k", "abc"],  # a value argparse cannot convert
    ["eval", "nope"],  # an unknown sub-command of a command
    ["eval", "knn", "--checkpoint", "x", "--bogus"],  # an unknown flag
    ["bench", "tta", "--target"],  # a flag without its value
    ["nope"],  # an unknown command
])
def test_bad_invocation_is_one_line_and_exit_2(argv, capsys):
    """argparse's own errors follow the family's contract: one line, exit 2, no usage block."""
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == errors.EXIT_USER
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bt-fast") and "usage error" in lines[0], lines
