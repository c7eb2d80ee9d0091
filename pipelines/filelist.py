"""The one reader and writer of ``ROOT/filelist.txt``, the validated image list.

``bt-fast data check ROOT`` decodes every image under an ImageFolder root and writes
``filelist.txt`` ("relative/path label" per line, UTF-8, labels are indices into
``classes.txt``) and ``classes.txt`` (one class folder name per line). The DALI reader,
the torchvision reference recipe, evaluation and ``bt_fast.data`` all read the list
through :func:`read`, so a blank line, a bad label or a missing list means the same thing
everywhere. Plain Python and NumPy: no DALI, nothing of the trainer but its error family.
"""

from __future__ import annotations

import hashlib
import os
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
    """Parse ``ROOT/filelist.txt`` (and ``ROOT/classes.txt`` when present).

    Blank lines are skipped; anything else that is not "path label" raises
    SourceError naming the file and line.
    """
    root = Path(root)
    listing = root / FILELIST
    if not root.is_dir():
        raise SourceError(f"{root}: data folder not found")
    if not listing.is_file():
        raise SourceError(f"{root}: no {FILELIST}; run `bt-fast data check {root}` to validate "
                            "the images and write it")
    raw = listing.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{listing}: not UTF-8 ({e}); re-run `bt-fast data check {root}`") from None
    paths, labels = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        path, _, label = line.rpartition(" ")
        if not path or not label.isdigit():
            raise SourceError(f"{listing}:{n}: expected 'relative/path label', got {line!r}")
        paths.append(path)
        labels.append(int(label))
    classes = []
    if (root / CLASSES).is_file():
        classes = [c for c in (root / CLASSES).read_text(encoding="utf-8").splitlines() if c]
    return FileList(root, paths, labels, classes, raw)


def write(root: str | os.PathLike, entries: list[tuple[str, int]], classes: list[str]) -> None:
    """Atomically write ``ROOT/filelist.txt`` and ``ROOT/classes.txt``.

    Each is written to a temp file and renamed; on any error (a full disk) the temp
    file is removed and the previous list, if any, stays in place.
    """
    root = Path(root)
    for name, text in ((FILELIST, "".join(f"{p} {y}\n" for p, y in entries)),
                       (CLASSES, "".join(f"{c}\n" for c in classes))):
        tmp = root / f".{name}.tmp.{os.getpid()}"
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, root / name)
        finally:
            tmp.unlink(missing_ok=True)


def image_problem(path: str | os.PathLike) -> str | None:
    """None if the file exists and fully decodes (PIL), else the reason.

    ``data check`` runs it on every file; the DALI reader runs it to name the file
    that stopped a pipeline (DALI's decoder error names none).
    """
    from PIL import Image  # the decoder: only the checks need it

    try:
        if os.stat(path).st_size == 0:
            return "empty file"
        with Image.open(path) as im:
            im.load()  # full decode: catches truncated files that verify() misses
        return None
    except FileNotFoundError:
        return "file not found"
    except Exception as e:  # PIL raises many types for bad data
        return f"{type(e).__name__}: {e}"


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
    if "\n" in rel or "\r" in rel:
        return "file name contains a line break (rename the file)"
    return None
