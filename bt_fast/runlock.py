"""One trainer per run folder: ``RUN_DIR/train.lock``, an fcntl lock with its holder inside.

Two ``bt-fast train`` on one run folder would interleave metrics and checkpoints, and the
second would resume from the first's half-written state. So the process that writes the
checkpoints (global rank 0; a world of one is its own rank 0) takes an exclusive
``flock`` on ``RUN_DIR/train.lock`` before it touches anything there, and writes its
host, PID, start time and torchrun job id (TORCHELASTIC_RUN_ID) into the file.

- Another live holder: refused in one line naming its host and PID (RunLockedError,
  exit 2), before a byte is written.
- A dead holder: the kernel released its lock when it died (kill -9 included), so the
  next start simply takes it over and says whose it was.
- torchrun: only global rank 0 locks; the other ranks learn the outcome from it
  (``train.setup``) and are never refused by their own job. After an elastic restart
  the new rank 0 (maybe on another node: RANK can move) waits up to ``RESTART_WAIT_S``
  for a holder of the same job id, the old rank 0 still exiting.
- The file is never deleted: unlinking a lock file lets a third process lock a new
  inode while the second still holds the old one.

flock over NFS is emulated with POSIX byte-range locks on Linux (2.6.12+), which NFSv4
servers honour; on a filesystem without locks the start is refused (one line) rather
than left unguarded.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bt_fast import safeio
from bt_fast.errors import RunDirError, RunLockedError

LOCK_NAME = "train.lock"
RESTART_WAIT_S = 60.0  # an elastic restart's old rank 0 may still be flushing a checkpoint


@dataclass
class Holder:
    """What a lock file says about the process holding (or last holding) it."""

    host: str = "?"
    pid: int = 0
    started: str = "?"
    job: str = ""

    @classmethod
    def parse(cls, text: str) -> "Holder":
        fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        pid = fields.get("pid", "0")
        return cls(fields.get("host", "?"), int(pid) if pid.isdigit() else 0,
                   fields.get("started", "?"), fields.get("job", ""))

    def text(self) -> str:
        return f"host={self.host}\npid={self.pid}\nstarted={self.started}\njob={self.job}\n"

    def __str__(self) -> str:
        return f"PID {self.pid} on host {self.host} (since {self.started})"


def me() -> Holder:
    return Holder(safeio.host(), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  os.environ.get("TORCHELASTIC_RUN_ID", ""))


def check_run_dir(run_dir) -> Path:
    """``train.run_dir`` as a Path; an empty one is refused (it would write into the cwd)."""
    if run_dir is None or not str(run_dir).strip():
        raise RunDirError("train.run_dir is empty: set it to the folder this run writes "
                          "(e.g. --set train.run_dir=runs/NAME); an empty one would write into "
                          "the current folder")
    return Path(run_dir)


def _read(fd: int) -> Holder:
    try:
        return Holder.parse(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
    except OSError:
        return Holder()


def _open(path: Path, create: bool) -> int | None:
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        return os.open(path, flags, 0o644)
    except FileNotFoundError:
        if create:
            raise
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RunDirError(f"{path} is a symbolic link: remove it (bt-fast never follows a "
                              "link at its lock file)") from None
        raise RunDirError(f"cannot open the run folder's lock {path}: {e.strerror}") from None


def _try_lock(fd: int, path: Path) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:  # ENOLCK: a filesystem without locks
        raise RunDirError(f"cannot lock {path} ({e.strerror}): the run folder's filesystem has "
                          "no file locks; put train.run_dir on one that has") from None


_HELD: dict[str, "RunLock"] = {}  # this process's locks: a second setup() in it reuses one


class RunLock:
    """The held lock; ``release()`` (or process exit, even kill -9) lets it go."""

    def __init__(self, fd: int, path: Path, previous: Holder):
        self.fd, self.path, self.previous = fd, path, previous

    def release(self) -> None:
        if self.fd < 0:
            return
        _HELD.pop(os.path.realpath(self.path), None)
        try:
            os.ftruncate(self.fd, 0)  # an empty file: the last holder ended cleanly
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(run_dir, *, wait_s: float | None = None) -> RunLock:
    """Lock ``run_dir`` for this process, or raise RunLockedError naming the live holder.

    ``wait_s``: how long to wait for a holder; default 0, or RESTART_WAIT_S when the
    holder belongs to this torchrun job (an elastic restart's previous rank 0).
    """
    run_dir = check_run_dir(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"run folder {run_dir} is not writable ({e.strerror or e}): set "
                          "train.run_dir to a folder you can write") from None
    path = run_dir / LOCK_NAME
    held = _HELD.get(os.path.realpath(path))
    if held is not None and held.fd >= 0:  # this process holds it already (tests, tune probes)
        return held
    fd = _open(path, create=True)
    mine = me()
    deadline = None
    while not _try_lock(fd, path):
        holder = _read(fd)
        if deadline is None:
            same_job = bool(mine.job) and holder.job == mine.job
            deadline = time.monotonic() + (wait_s if wait_s is not None else RESTART_WAIT_S if same_job else 0.0)
        if time.monotonic() >= deadline:
            os.close(fd)
            raise RunLockedError(f"run folder {run_dir} is in use by another bt-fast train, {holder}: "
                                 "wait for it to finish, stop it, or set another train.run_dir")
        time.sleep(0.2)
    previous = _read(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, mine.text().encode(), 0)
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        raise safeio.as_write_error(e, path) from None
    if previous.pid and (previous.host, previous.pid) != (mine.host, mine.pid):
        print(f"took over {run_dir} from a bt-fast train that is no longer running ({previous})",
              file=sys.stderr)
    lock = _HELD[os.path.realpath(path)] = RunLock(fd, path, previous)
    return lock


def holder(run_dir) -> Holder | None:
    """The live holder of ``run_dir``'s lock, or None when it is free (or has no lock
    file); takes the lock for an instant to find out, writes nothing."""
    path = check_run_dir(run_dir) / LOCK_NAME
    fd = _open(path, create=False)
    if fd is None:
        return None
    try:
        if _try_lock(fd, path):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        return _read(fd)
    finally:
        os.close(fd)
