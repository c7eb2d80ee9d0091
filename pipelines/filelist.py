"""The one reader (and the text) of ``ROOT/filelist.txt``, the validated image list.

``bt-fast data check ROOT`` decodes every image under an ImageFolder root and writes
(through the trainer's write gate; :func:`render` gives the texts)
``filelist.txt`` ("relative/path label" per line, UTF-8, labels are indices into
``classes.txt``) and ``classes.txt`` (one class folder name per line). The DALI reader,
the torchvision reference recipe, evaluation and ``bt_fast.data`` all read the list
through :func:`read`, so a blank line, a bad label or a missing list means the same thing
everywhere. Plain Python and NumPy: no DALI, nothing of the trainer but its error family.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import SourceError

FILELIST, CLASSES = "filelist.txt", "classes.txt"


@dataclass
class FileList:
    """A parsed list: parallel ``paths`` (relative to ``root``) and ``labels``."""

    root: Path
    paths: list[str]
    labels: list[int]
    classes: list[str]
    raw: bytes = field(repr=False)
    """The list file's bytes, as hashed into fingerprints."""
    checked: bool = False
    """True if ``data check`` wrote this very list (its STAMP matches): its images were
    decoded under the read gate's rules then. False for a list made or edited by hand."""

    def __len__(self) -> int:
        return len(self.paths)

    def entry_hashes(self) -> np.ndarray:
        """Sorted int64 hash of each "path label" entry (8 bytes per image).

        Stored in checkpoints so that a resume can tell "the list only lost files"
        (a re-run of ``data check`` after an image went bad) from "another dataset".
        """
        digest = [hashlib.blake2b(f"{p} {y}".encode(), digest_size=8).digest()
                  for p, y in zip(self.paths, self.labels)]
        return np.sort(np.frombuffer(b"".join(digest), dtype=np.int64))


def read(root: str | os.PathLike) -> FileList:
    """Parse ``ROOT/filelist.txt`` (and ``ROOT/classes.txt`` when present): the read gate.

    Blank lines are skipped; every other line must be "relative/path label" with a path
    that stays inside ROOT (no absolute path, no ``..``, no folder or file symlink that
    leads out of it: see :func:`escapes`) and a label that indexes classes.txt. Anything
    else raises SourceError naming the file and line. Lines end at ``\n`` only, so a
    name holding another Unicode line break cannot split an entry.
    """
    root = Path(root)
    listing = root / FILELIST
    if not root.is_dir():
        raise SourceError(f"{root}: data folder not found")
    if not listing.is_file():
        raise SourceError(f"{root}: no {FILELIST}; run `bt-fast data check {root}` to validate "
                            "the images and write it")
    raw = _read_bytes(listing)
    text = _utf8(raw, listing, root).removeprefix("\ufeff")  # a Windows editor's byte-order mark
    classes = []
    if (root / CLASSES).is_file():
        classes = [c for c in _utf8(_read_bytes(root / CLASSES), root / CLASSES, root).split("\n") if c]
    checked = _stamp_matches(root, raw)
    inside = RootGuard(root, follow_files=not checked)
    paths, labels = [], []
    for n, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        path, _, label = line.rpartition(" ")
        if not path or not (label.isascii() and label.isdigit()):
            raise SourceError(f"{listing}:{n}: expected 'relative/path label', got {line[:120]!r}")
        why = name_problem(path) or inside.problem(path)
        if why:
            raise SourceError(f"{listing}:{n}: {path[:120]!r}: {why}")
        y = int(label)
        if y >= (len(classes) if classes else MAX_LABEL):
            raise SourceError(f"{listing}:{n}: label {label[:20]} is out of range: "
                              + (f"{CLASSES} lists {len(classes)} classes (0-{len(classes) - 1})"
                                 if classes else f"labels must be below {MAX_LABEL}"))
        paths.append(path)
        labels.append(y)
    return FileList(root, paths, labels, classes, raw, checked)


MAX_LABEL = 2**31 - 1  # labels travel as int32 through DALI
MAX_LIST_BYTES = 1 << 30  # 1 GiB: ~20 M entries; a larger "list" is something else


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_LIST_BYTES + 1)
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    if len(raw) > MAX_LIST_BYTES:
        raise SourceError(f"{path}: larger than {MAX_LIST_BYTES >> 30} GiB; not a file list")
    return raw


def _utf8(raw: bytes, path: Path, root: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: not UTF-8 (byte {e.start}); re-run `bt-fast data check {root}`") from None


class RootGuard:
    """Whether listed paths stay inside ``root`` once links are followed.

    Each folder's real path is computed once (a list has few folders). Files are
    lstat()ed for a symlink only when ``follow_files`` (a list ``data check`` did not
    write, see STAMP): one lstat per file, ~10 us, is the price of a hand-made list.
    """

    def __init__(self, root: Path, follow_files: bool):
        self.real = os.path.realpath(root)
        self.follow_files = follow_files
        self.dirs: dict[str, bool] = {}

    def _within(self, real: str) -> bool:
        return real == self.real or real.startswith(self.real.rstrip(os.sep) + os.sep)

    def problem(self, rel: str) -> str | None:
        # Plain string work first (one call per listed file: ~1 us, not os.path's ~10).
        if rel.startswith(("/", "\\")):
            return "an absolute path; entries are relative to the data root"
        if ".." in rel and ".." in rel.replace("\\", "/").split("/"):
            return "'..' leads out of the data root"
        folder = rel.rpartition("/")[0]
        inside = self.dirs.get(folder)
        if inside is None:
            inside = self.dirs[folder] = self._within(os.path.realpath(os.path.join(self.real, folder)))
        if not inside:
            return "its folder is a link that leads out of the data root"
        if self.follow_files:
            full = os.path.join(self.real, rel)
            try:
                is_link = stat.S_ISLNK(os.lstat(full).st_mode)
            except OSError:
                return None  # missing: reported where it is read, with its own reason
            if is_link and not self._within(os.path.realpath(full)):
                return "a symlink that leads out of the data root"
        return None


STAMP = "filelist.checked"
"""``ROOT/filelist.checked``: the SHA-256 of the filelist.txt that ``data check`` wrote. A
list it matches was made by ``data check`` (or bt-fast's own preparation), whose files
were decoded under the read gate's rules; any other list (made by hand, edited) is
checked header by header where it is read for training (see :func:`unchecked_problem`)."""


def _stamp_matches(root: Path, raw: bytes) -> bool:
    try:
        stamp = (root / STAMP).read_bytes()[:200].decode("ascii", "replace").strip()
    except OSError:
        return False
    return stamp == hashlib.sha256(raw).hexdigest()


def stamp_text(entries_text: str) -> str:
    """What ``ROOT/filelist.checked`` holds for a list whose text is ``entries_text``."""
    return hashlib.sha256(entries_text.encode("utf-8")).hexdigest() + "\n"


def render(entries: list[tuple[str, int]], classes: list[str]) -> list[tuple[str, str]]:
    """(file name, text) of ``ROOT/filelist.txt``, ``classes.txt`` and the STAMP, in the
    order to write them. The pipeline library writes nothing itself: the trainer writes
    these through its one write gate (bt_fast.data.write_file_list -> bt_fast.safeio)."""
    listing = "".join(f"{p} {y}\n" for p, y in entries)
    return [(FILELIST, listing), (CLASSES, "".join(f"{c}\n" for c in classes)), (STAMP, stamp_text(listing))]


def image_problem(path: str | os.PathLike) -> str | None:
    """None if the file is an image the pipeline can read and fully decodes, else why.

    The rules of pipelines/images.py (DALI's formats, the pixel limit) and a full decode
    (catches truncated files that verify() misses). ``data check`` runs it on every file;
    the DALI reader runs it to name the file that stopped a pipeline (DALI names none).
    """
    from .images import decode_problem

    try:
        if not os.path.isfile(path):
            return "file not found" if not os.path.lexists(path) else "not a regular file"
        if os.stat(path).st_size == 0:
            return "empty file"
    except OSError as e:
        return e.strerror or f"{type(e).__name__}: {e}"
    return decode_problem(path)


_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")  # line breaks and control characters


def name_problem(rel: str) -> str | None:
    """Why a relative path cannot go into the list, or None.

    The list is UTF-8 text with one entry per line, and DALI takes file names as
    UTF-8 strings: a name with undecodable bytes (Python keeps them as surrogates)
    or a line break cannot be listed.
    """
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8 (rename the file)"
    if _CONTROL.search(rel):
        return "file name contains a line break or control character (rename the file)"
    return None
