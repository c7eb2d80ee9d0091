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

from bt_fast.pipelines.errors import PipelineError

EXIT_USER = 2
"""Bad input: fix it and run again. Launchers should not retry (see scripts/train.sh)."""
EXIT_NONFINITE = 3
"""The loss stayed NaN/inf for a whole log window; the last checkpoint is intact."""
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


def one_line(command: str, error: Exception) -> str:
    """``bt-fast COMMAND: [kind: ]message`` folded onto one line: how every user error
    is printed, by the CLI and by checks that run before it (``bt_fast.preflight``)."""
    message = " ".join(str(error).split()) or type(error).__name__
    kind = getattr(error, "kind", "")
    return f"bt-fast {command}: {kind + ': ' if kind else ''}{message}"


USER_ERRORS = (UserError, PipelineError)
"""What the CLI reports in one line: the family above, and the pipeline library's own
bad-input errors (bt_fast.pipelines.errors), which cannot derive from it."""
