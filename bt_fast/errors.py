"""One family of errors a user can fix, and the exit codes the CLI maps them to.

Every problem with the user's input (a config key, a missing folder, a corrupt image,
a taken port, a checkpoint that does not load) raises a subclass of :class:`UserError`
whose message names what was wrong and where. ``bt_fast.cli`` catches the family once
and prints ``bt-fast COMMAND: MESSAGE`` on one line, exit :data:`EXIT_USER`. Everything
else is a bug and keeps its traceback.

This module imports nothing from bt_fast but the pipeline library's error types, so
every floor of the package can use it.
"""

from __future__ import annotations

import os
import re
import sys
import traceback

from bt_fast.pipelines.errors import PipelineError

EXIT_USER = 2
"""Bad input: fix it and run again. Launchers should not retry (see scripts/train.sh)."""
EXIT_NONFINITE = 3
"""The loss stayed NaN/inf for a whole log window; the last checkpoint is intact."""
EXIT_MEMORY = 4
"""Out of memory, host or device (MemoryError, torch.OutOfMemoryError, DALI's allocation
failures): the same command fails again; lower the batch size."""
EXIT_OS = 5
"""The operating system refused (an I/O error, a permission, a file gone) outside what the
tool names itself; the message names the path. May succeed when retried."""
EXIT_INTERRUPTED = 130
"""A second Ctrl-C: stopped at once, without a checkpoint (128 + SIGINT, the shell's code)."""


class UserError(Exception):
    """Bad input the user can fix; the message names what and where."""

    kind = ""
    """A word the CLI puts before the message ("config error: ..."); empty for none."""


class ConfigError(UserError, ValueError):
    """A config file, ``--set`` or overlay problem, naming the file and the key."""

    kind = "config error"


class UsageError(UserError):
    """A bad flag combination or a missing path given on the command line."""


class DataError(UserError):
    """A dataset problem (missing folder or file list, unreadable image); names the path."""


class EvalError(UserError):
    """An evaluation input problem (checkpoint, splits, classes)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read, or cannot be resumed in this run."""


class ResumeError(CheckpointError):
    """A checkpoint that loads but cannot continue here (another world size, data device)."""


class MetricsPortError(UserError, OSError):
    """The Prometheus exporter could not bind its port (usually: already in use)."""


class DiskFullError(UserError, OSError):
    """No space left while writing (a checkpoint, a file list); the message says what survived."""


class RunDirError(UserError, OSError):
    """The run folder (train.run_dir) cannot be created or written."""


class WriteError(UserError, OSError):
    """A file the tool writes cannot be written safely: a read-only folder or file, a
    symbolic link at the target, a target that is one of the command's own inputs
    (bt_fast.safeio). Names the path."""


class RunLockedError(UserError):
    """Another live ``bt-fast train`` holds the run folder's lock; names its host and PID."""


MAX_LINE = 500
"""The longest message ``one_line`` prints: a YAML alias bomb or a megabyte of repr must
not become a megabyte of terminal (the head names the problem; BT_FAST_DEBUG=1 has all)."""


def shorten(text: str, limit: int = MAX_LINE) -> str:
    """``text`` folded onto one line and cut to ``limit`` characters with an ellipsis."""
    text = " ".join(str(text)[: limit * 4].split())  # bound the work for huge texts
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "\u2026"


def one_line(command: str, error: BaseException) -> str:
    """``bt-fast COMMAND: [kind: ]message`` folded onto one line and cut to MAX_LINE
    characters: how every user error is printed, by the CLI and by checks that run
    before it (``bt_fast.preflight``)."""
    message = shorten(str(error)) or type(error).__name__
    kind = getattr(error, "kind", "")
    return f"bt-fast {command}: {kind + ': ' if kind else ''}{message}"


USER_ERRORS = (UserError, PipelineError)
"""What the CLI reports in one line: the family above, and the pipeline library's own
bad-input errors (bt_fast.pipelines.errors), which cannot derive from it."""

# RuntimeError texts that are allocation failures: DALI's ("CUDA allocation failed",
# "Can't allocate %zu bytes on device %d." / "on host.", strings of libdali 2.4), torch's CPU allocator ("DefaultCPUAllocator: can't
# allocate memory"), std::bad_alloc through pybind, and DataLoader workers the kernel's
# OOM killer took.
_ALLOCATION = re.compile(r"out of memory|can'?t allocate|cannot allocate|bad_alloc|allocation failed|"
                         r"failed to allocate|cudaErrorMemoryAllocation|killed by signal: Killed", re.I)


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError) or (isinstance(error, OSError) and error.errno == 12):  # ENOMEM
        return True
    # torch.OutOfMemoryError (also torch.cuda.OutOfMemoryError), by name: this module
    # must not import torch.
    if any(c.__name__ == "OutOfMemoryError" for c in type(error).__mro__):
        return True
    return isinstance(error, RuntimeError) and bool(_ALLOCATION.search(str(error)[:2000]))


def classify(error: BaseException) -> tuple[int, str] | None:
    """(exit code, message) for a failure a user can cause, or None for a bug.

    The one way out: the CLI prints ``bt-fast COMMAND: message`` and exits with the code.
    Assertions and every other exception are bugs: None, so they keep their traceback.
    """
    if isinstance(error, USER_ERRORS):
        return EXIT_USER, str(error)
    if isinstance(error, AssertionError):
        return None
    if _is_out_of_memory(error):
        first = str(error).strip().split(". ")[0] or type(error).__name__
        return EXIT_MEMORY, (f"out of memory ({type(error).__name__}: {first}): lower data.batch_size "
                             "(eval: --batch-size) or free memory")
    if isinstance(error, RecursionError):
        return EXIT_USER, ("input nested too deeply to read (RecursionError): a config or YAML file "
                           "with deep nesting or self-referencing aliases?")
    if isinstance(error, UnicodeDecodeError):
        return EXIT_USER, (f"a file is not UTF-8 text ({error.reason} at byte {error.start}: "
                           f"{error.object[error.start:error.start + 8]!r}); save it as UTF-8")
    if isinstance(error, OSError):
        where = " -> ".join(str(f) for f in (error.filename, error.filename2) if f is not None)
        reason = error.strerror or str(error) or type(error).__name__
        return EXIT_OS, f"{where}: {reason}" if where else reason
    return None


def way_out(command: str, error: Exception) -> int:
    """The one way out, used by the CLI and the preflight: a failure a user can cause
    becomes one line on stderr and its exit code (``classify``); a bug is re-raised
    with its traceback. ``BT_FAST_DEBUG=1`` prints the traceback before the line too."""
    verdict = classify(error)
    if verdict is None:
        raise error
    code, message = verdict
    if os.environ.get("BT_FAST_DEBUG", "") not in ("", "0"):
        traceback.print_exception(error)
    kind = getattr(error, "kind", "")
    print(f"bt-fast {command}: {kind + ': ' if kind else ''}{shorten(message)}", file=sys.stderr)
    return code
