"""The one gate for every file bt-fast writes: ``write_atomic``, ``append_line``/``open_append``.

Every file the tool produces (checkpoints, config.yaml, metrics.jsonl, eval caches,
reports, exports, prepared data, tune overlays, bench outputs, compose files) goes
through here, and tests/test_write_enforcement.py fails if a module writes another way.
What every write guarantees:

- **Atomic.** The bytes go to a temp file in the target's own folder, are fsynced, then
  renamed over the target (and the folder fsynced): a reader, a crash or kill -9 sees
  the old file or the new one, never half of one.
- **Never through a symlink.** A symlink at the target is refused (a link left at
  RUN/config.yaml must not overwrite what it points at). Appends open with O_NOFOLLOW.
  Links among the *parent* folders are followed: pointing a run folder at scratch
  space is normal.
- **Never over an input.** ``inputs=`` names the files the command read (its
  checkpoint, its config); a target that is one of them, by resolved path or inode
  (a hard link), is refused: ``bt-fast export last.pt --out last.pt`` stops in one line.
- **One line when it cannot.** A read-only folder or file, a full disk, a missing
  parent that cannot be made: :class:`WriteError` / :class:`DiskFullError` naming the
  path (the CLI prints one line, exit 2).
- **Temp files carry their writer** (``.NAME.tmp.HOST.PID``) and ``remove_stale_temps``
  removes only those whose writer is gone (no such PID on this host): a run starting in a
  folder never deletes a live writer's temp file. Temp files of other hosts are kept.

This module imports nothing from bt_fast but ``bt_fast.errors``, so every floor of the
trainer can use it (``pipelines/`` and ``kernels/`` write nothing).
"""

from __future__ import annotations

import errno
import glob
import os
import re
import socket
import stat
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, TextIO, Union

from bt_fast.errors import DiskFullError, UserError, WriteError

Data = Union[bytes, str, Callable[[BinaryIO], object]]
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp\.(?:(?P<host>.+)\.)?(?P<pid>\d+)$")
_FULL = (errno.ENOSPC, errno.EDQUOT)


def host() -> str:
    """This machine's name as temp files and lock files record it (no dots' worth of FQDN)."""
    return socket.gethostname().split(".")[0] or "localhost"


def temp_path(path: str | os.PathLike) -> Path:
    """``DIR/.NAME.tmp.HOST.PID``: where ``write_atomic`` stages ``DIR/NAME``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp.{host()}.{os.getpid()}")


def pid_alive(pid: int) -> bool:
    """True if a process with this PID exists on this host (ours or another user's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to someone else
        return True
    return True


def writer_gone(temp: str | os.PathLike) -> bool:
    """True if ``temp`` is a gate temp file whose writer no longer runs on this host.

    Old names without a host (``.NAME.tmp.PID``) count as this host's. A temp file from
    another host is never judged gone: its writer's PIDs are not ours to look up.
    """
    m = _TEMP.match(Path(temp).name)
    if m is None:
        return False
    if m["host"] is not None and m["host"] != host():
        return False
    return not pid_alive(int(m["pid"]))


def remove_stale_temps(folder: str | os.PathLike, name: str = "*") -> list[Path]:
    """Remove the temp files in ``folder`` (of target ``name``, default all) whose writer is
    gone; returns what was removed. Live writers' and other hosts' temp files stay."""
    removed = []
    try:
        pattern = "*" if name == "*" else glob.escape(name)
        candidates = sorted(Path(folder).glob(f".{pattern}.tmp.*"))
    except OSError:
        return removed
    for temp in candidates:
        if temp.is_file() and not temp.is_symlink() and writer_gone(temp):
            try:
                temp.unlink()
                removed.append(temp)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise as_write_error(e, temp) from None
    return removed


# ------------------------------------------------------------------ checks


def _same_file(a: Path, b: Path) -> bool:
    try:
        if os.path.realpath(a) == os.path.realpath(b):
            return True
        return os.path.samefile(a, b)  # a hard link: another name for the same inode
    except OSError:
        return False


def check_target(path: str | os.PathLike, inputs: Iterable = ()) -> Path:
    """Refuse a target the gate must not write (WriteError, one line); returns it as a Path.

    Commands may call it before long work (export, eval) so a bad ``--out`` fails at once.
    """
    path = Path(path)
    for source in inputs:
        if source is not None and _same_file(path, Path(source)):
            raise WriteError(f"{path} is one of this command's own inputs ({source}): "
                             "refusing to write over it; choose another output path")
    if path.is_symlink():
        raise WriteError(f"{path} is a symbolic link (to {os.readlink(path)}): bt-fast never writes "
                         "through a link; remove it or choose another path")
    if path.is_dir():
        raise WriteError(f"{path} is a folder: name a file to write")
    if path.exists() and not os.access(path, os.W_OK):
        raise WriteError(f"{path} is read-only: bt-fast does not replace a file you protected; "
                         "make it writable or choose another path")
    return path


def _no_space(error: BaseException | None) -> bool:
    """True if ENOSPC/EDQUOT is anywhere in the chain (torch.save wraps the OSError)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _FULL:
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def as_write_error(error: BaseException, path: Path) -> Exception:
    """The one-line error for an OS failure while writing ``path``."""
    if _no_space(error):
        return DiskFullError(f"disk full while writing {path}")
    reason = getattr(error, "strerror", None) or str(error)
    where = getattr(error, "filename", None) or path
    return WriteError(f"cannot write {path}: {reason} ({where})" if str(where) != str(path)
                      else f"cannot write {path}: {reason}")


def _keep_mode(path: Path, fd: int) -> None:
    """A replaced file keeps its permission bits (a config the user made private stays so)."""
    try:
        os.fchmod(fd, stat.S_IMODE(os.stat(path, follow_symlinks=False).st_mode))
    except OSError:
        pass  # a new file: the umask's default


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not open folders; the rename itself happened
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. EINVAL on filesystems without directory fsync
    finally:
        os.close(fd)


def make_dir(folder: str | os.PathLike) -> Path:
    """``mkdir -p`` with a one-line WriteError naming the folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file (or a link to one) where the folder should be
        raise WriteError(f"{folder} is a file, not a folder: choose another path") from None
    except OSError as e:
        raise as_write_error(e, folder) from None
    return folder


# ------------------------------------------------------------------ writing


def write_atomic(path: str | os.PathLike, data: Data, *, inputs: Iterable = (), durable: bool = True,
                 sweep: bool = True, before_replace: Callable[[Path], None] | None = None) -> Path:
    """Write ``path`` atomically: temp file beside it, fsync, rename, fsync the folder.

    ``data``: bytes, str (UTF-8), or a callable given the open binary temp file
    (``lambda f: torch.save(obj, f)``, ``lambda f: fig.savefig(f, format="png")``).
    ``inputs``: the command's own input files; writing over one is refused.
    ``durable=False`` skips both fsyncs (bulk prepared data, where the last file written
    durably, e.g. filelist.txt, commits the set). ``sweep`` first removes this target's
    temp files left by dead writers (it lists the folder: pass False in bulk loops).
    ``before_replace(path)`` runs just before the rename (checkpoints keep prev.pt there).

    Raises WriteError / DiskFullError (one line); the temp file never outlives a failure.
    Errors raised by a ``data`` callable that are not OS errors propagate unchanged.
    """
    path = check_target(path, inputs)
    make_dir(path.parent)
    if sweep:
        remove_stale_temps(path.parent, path.name)
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
        with os.fdopen(fd, "wb") as f:
            _keep_mode(path, f.fileno())
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        check_target(path, inputs)  # the target may have changed while we wrote
        if before_replace is not None:
            before_replace(path)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, UserError):
            raise
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and _no_space(e)):
            raise as_write_error(e, path) from None
        raise
    if durable:
        _fsync_dir(path.parent)
    return path


def keep_previous(path: str | os.PathLike, previous: str | os.PathLike) -> None:
    """``previous`` := the current ``path`` (if any), without a moment where ``path`` is
    missing: a hard link renamed into place (no copy). On filesystems without hard links
    ``path`` itself is renamed, so it is absent until the caller's rename lands."""
    path, previous = Path(path), Path(previous)
    if not path.is_file() or path.is_symlink():
        return
    check_target(previous)
    tmp = temp_path(previous)
    try:
        try:
            os.link(path, tmp, follow_symlinks=False)
            os.replace(tmp, previous)
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass
            os.replace(path, previous)
    except OSError as e:
        raise as_write_error(e, previous) from None


def link_or_copy(source: str | os.PathLike, path: str | os.PathLike, *, durable: bool = False) -> Path:
    """``path`` := the bytes of ``source``, as a hard link when the filesystem allows
    (no copy), else an atomic copy. Replaces ``path`` atomically either way; a ``path``
    that already is a hard link of ``source`` is left as it is (a re-run)."""
    path = Path(path)
    if os.path.realpath(path) != os.path.realpath(source) and path.exists() and not path.is_symlink():
        try:
            if os.path.samefile(path, source):
                return path
        except OSError:
            pass
    path = check_target(path, (source,))
    make_dir(path.parent)
    tmp = temp_path(path)
    try:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        os.link(source, tmp, follow_symlinks=False)
        os.replace(tmp, path)
        return path
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
    with open(source, "rb") as src:
        return write_atomic(path, lambda f: _copy(src, f), durable=durable, sweep=False)


def _copy(src: BinaryIO, dst: BinaryIO) -> None:
    while chunk := src.read(1 << 20):
        dst.write(chunk)


def open_append(path: str | os.PathLike) -> TextIO:
    """A line-buffered text file opened for appending, never through a symlink.

    O_NOFOLLOW refuses a link at ``path``; anything but a regular file (a FIFO, a device)
    is refused too. For logs kept open while running (metrics.jsonl).
    """
    path = Path(path)
    make_dir(path.parent)
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        mode = None  # absent: created below
    if mode is not None and not stat.S_ISLNK(mode) and not stat.S_ISREG(mode):
        raise WriteError(f"{path} is not a regular file: bt-fast appends only to plain files; remove it")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise WriteError(f"{path} is a symbolic link: bt-fast never appends through a link; "
                             "remove it") from None
        raise as_write_error(e, path) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise WriteError(f"{path} is not a regular file: bt-fast appends only to plain files; remove it")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a", buffering=1, encoding="utf-8")


def append_line(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` plus a newline to ``path`` (see ``open_append``); one-line errors."""
    f = open_append(path)
    try:
        f.write(text.rstrip("\n") + "\n")
    except OSError as e:
        raise as_write_error(e, Path(path)) from None
    finally:
        try:
            f.close()
        except OSError:
            pass


def cache_home() -> Path:
    """The user's cache folder for bt_fast: $XDG_CACHE_HOME/bt_fast, else ~/.cache/bt_fast.

    Where eval caches go when the run folder is read-only (another user's run, a
    read-only mount)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bt_fast"


def writable_dir(folder: str | os.PathLike) -> bool:
    """True if ``folder`` exists or can be made, and a file can be created in it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)
