"""One way out: every failure a user can cause is one line and a documented exit code;
BT_FAST_DEBUG=1 adds the traceback; bugs (assertions and the rest) keep theirs."""

import errno

import pytest
import torch

from bt_fast import cli, errors
from conftest import CONFIGS


def raised_by_report(monkeypatch, error):
    import bt_fast.report as report

    def fail(args):
        raise error

    monkeypatch.setattr(report, "run", fail)


CASES = [
    (MemoryError(), errors.EXIT_MEMORY, "out of memory (MemoryError"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has 79 GiB"),
     errors.EXIT_MEMORY, "out of memory (OutOfMemoryError: CUDA out of memory)"),
    (RuntimeError("[/opt/dali/dali/core/mm/default_resources.cc:123] CUDA allocation failed"),
     errors.EXIT_MEMORY, "CUDA allocation failed"),
    (RuntimeError("Critical error in pipeline: Can't allocate 1073741824 bytes on device 0."),
     errors.EXIT_MEMORY, "Can't allocate 1073741824 bytes on device 0"),
    (OSError(12, "Cannot allocate memory"), errors.EXIT_MEMORY, "out of memory (OSError"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9e12 bytes"),
     errors.EXIT_MEMORY, "can't allocate memory"),
    (RecursionError("maximum recursion depth exceeded"), errors.EXIT_USER, "nested too deeply"),
    (UnicodeDecodeError("utf-8", b"ab\xff\xfecd", 2, 3, "invalid start byte"), errors.EXIT_USER,
     "not UTF-8 text (invalid start byte at byte 2"),
    (PermissionError(errno.EACCES, "Permission denied", "runs/x/plots"), errors.EXIT_OS,
     "runs/x/plots: Permission denied"),
    (OSError(errno.EIO, "Input/output error", "data/train/0/1.jpg"), errors.EXIT_OS,
     "data/train/0/1.jpg: Input/output error"),
    (errors.WriteError("runs/x/config.yaml is a symbolic link"), errors.EXIT_USER, "symbolic link"),
    (errors.ConfigError("x" * 10_000), errors.EXIT_USER, "config error: xxx"),
]


@pytest.mark.parametrize("error, code, needle", CASES, ids=lambda c: type(c).__name__ if isinstance(c, BaseException) else None)
def test_user_caused_failures_are_one_line_and_their_code(error, code, needle, monkeypatch, capsys):
    monkeypatch.delenv("BT_FAST_DEBUG", raising=False)
    raised_by_report(monkeypatch, error)
    assert cli.main(["report", "runs/x"]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bt-fast report: ") and needle in err, err
    assert "Traceback" not in err and len(err) <= len("bt-fast report: config error: ") + errors.MAX_LINE + 1


def test_debug_shows_the_traceback_and_still_the_line(monkeypatch, capsys):
    monkeypatch.setenv("BT_FAST_DEBUG", "1")
    raised_by_report(monkeypatch, MemoryError())
    assert cli.main(["report", "runs/x"]) == errors.EXIT_MEMORY
    err = capsys.readouterr().err
    assert "Traceback" in err and "in fail" in err and err.strip().splitlines()[-1].startswith("bt-fast report: out of memory")


@pytest.mark.parametrize("bug", [AssertionError("invariant"), RuntimeError("shape mismatch in einsum"),
                                 KeyError("backbone.w"), TypeError("bad operand")])
def test_bugs_keep_their_traceback(bug, monkeypatch):
    raised_by_report(monkeypatch, bug)
    with pytest.raises(type(bug)):
        cli.main(["report", "runs/x"])


def test_ctrl_c_is_one_line_and_130(monkeypatch, capsys):
    raised_by_report(monkeypatch, KeyboardInterrupt())
    assert cli.main(["report", "runs/x"]) == errors.EXIT_INTERRUPTED
    assert capsys.readouterr().err == "bt-fast report: interrupted\n"


def test_the_preflight_takes_the_same_way_out(monkeypatch, capsys):
    from bt_fast import preflight

    def oom(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(preflight, "check", oom)
    code = preflight.main(["--world-sizes", "1", "--", "--config", str(CONFIGS / "smoke.yaml")])
    assert code == errors.EXIT_MEMORY and "bt-fast train: out of memory" in capsys.readouterr().err
