"""The pipeline library's own errors: bad input a caller can fix, each naming the file,
list or state that was wrong. A library of its own, so they derive from nothing of the
trainer's; ``bt_fast.errors.USER_ERRORS`` counts them as user errors (one line, exit 2).
"""


class PipelineError(ValueError):
    """Bad pipeline input: data, file list or saved state; the message says what and where."""


class SourceError(PipelineError):
    """Data that cannot be read as listed: a missing or malformed file list, a missing
    shard, a listed file gone, an image that no longer decodes. Names the file."""


class StateMismatch(PipelineError):
    """A saved loader state this loader cannot continue from; names what differs."""
