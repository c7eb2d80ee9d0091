"""Where encoded images come from: an ImageFolder file list or WebDataset tar shards.

A source knows its size, a fingerprint (so a checkpoint taken on one dataset is refused
on another) and how to create its DALI reader for one shard. Every reader is created
with ``pad_last_batch=True`` (each rank's shard is padded to whole batches, so ranks
never wait on each other at an epoch's end) and ``stick_to_shard=False`` (shards rotate
across epochs, so every rank sees the whole dataset over ``num_shards`` epochs).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from nvidia.dali import fn, types

from . import filelist
from .errors import SourceError
from .filelist import FILELIST, image_problem
from .images import decode_problem, header_problem
IMAGE_EXTS = ("jpg", "jpeg", "png")
SIZE_SAMPLE = 256  # files whose sizes enter a folder's fingerprint
SHUFFLE_BUFFER = 1024  # DALI's default initial_fill: samples shuffled together


def _common(shard_id: int, num_shards: int, seed: int, name: str, n: int) -> dict:
    return dict(shard_id=shard_id, num_shards=num_shards, seed=seed, name=name,
                random_shuffle=True, initial_fill=max(1, min(SHUFFLE_BUFFER, n // num_shards)),
                pad_last_batch=True, stick_to_shard=False)


class FolderSource:
    """An ImageFolder root read through its validated ``ROOT/filelist.txt``.

    The list ("relative/path label" per line) is written by ``bt-fast data check ROOT``,
    which decodes every file first: DALI cannot skip a corrupt JPEG mid-epoch.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.list = filelist.read(self.root)
        self.paths, self.labels = self.list.paths, self.list.labels
        if not self.paths:
            raise SourceError(f"{self.root / FILELIST} lists no images")
        # Hash the list plus the byte sizes of up to 256 evenly spaced files: catches a
        # different dataset with the same names without a stat() of every file.
        digest = hashlib.sha256(self.list.raw)
        step = max(1, len(self.paths) // SIZE_SAMPLE)
        for p in self.paths[::step][:SIZE_SAMPLE]:
            try:
                size = (self.root / p).stat().st_size
            except OSError as e:
                raise SourceError(f"{self.root / p}: listed in {FILELIST} but unreadable "
                                    f"({e.strerror}); re-run `bt-fast data check {self.root}`") from None
            digest.update(f"{size}\n".encode())
        self._sha = digest.hexdigest()
        self._hashes = None
        if not self.list.checked:
            self._check_headers()

    def _check_headers(self) -> None:
        """A list ``data check`` did not write (made or edited by hand): every file's
        header under the read gate's rules (pipelines/images.py) before DALI decodes any,
        since DALI's decoder has no pixel limit and stops on a format it cannot read.
        Cost: one header read per file, in threads (PIL releases the GIL on I/O)."""
        files = [self.root / p for p in self.paths]
        print(f"{self.root / FILELIST}: not written by `bt-fast data check` (no matching "
              f"{filelist.STAMP}): checking the headers of its {len(files)} images first; "
              "run `bt-fast data check` once to skip this", file=sys.stderr, flush=True)
        with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
            for path, why in zip(files, pool.map(header_problem, files, chunksize=64)):
                if why:
                    raise SourceError(f"{path}: {why} (listed in {self.root / FILELIST}, which "
                                      f"`bt-fast data check {self.root}` did not write)")

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> dict:
        """What identifies the data: kind, image count, hash of the file list and sizes."""
        return {"kind": "folder", "count": len(self), "sha256": self._sha}

    def entry_hashes(self) -> np.ndarray:
        """Sorted int64 hashes of the list's entries (see ``FileList.entry_hashes``)."""
        if self._hashes is None:
            self._hashes = self.list.entry_hashes()
        return self._hashes

    def reader(self, *, shard_id: int, num_shards: int, seed: int, name: str):
        """(encoded images, int32 labels) DALI nodes for one shard."""
        # The checked list is sorted by class and DALI shards are contiguous slices of
        # it, so shuffle once (same order on every rank: it depends on seed only).
        order = np.random.default_rng(seed).permutation(len(self))
        files = [str(self.root / self.paths[i]) for i in order]
        labels = [self.labels[i] for i in order]
        return fn.readers.file(files=files, labels=labels,
                               **_common(shard_id, num_shards, seed, name, len(self)))

    def find_unreadable(self, *, shard_id: int, num_shards: int, seed: int, epoch: int,
                        sample: int, log=None) -> tuple[Path, str] | None:
        """(path, reason) of a listed file that is gone, empty or no longer decodes.

        DALI stops on such a file without naming it (NVIDIA/DALI#3913). In epoch ``e``
        this rank reads shard ``(shard_id + e) % num_shards``, a contiguous slice of the
        seeded order, shuffled within a buffer of SHUFFLE_BUFFER; so the files around
        ``sample`` (samples already read this epoch) in that slice are decoded first,
        then the rest of the list. A stat() of every file comes first: cheap, and it
        finds deleted or emptied files. None if every file decodes (not a data problem).
        """
        order = np.random.default_rng(seed).permutation(len(self)).tolist()
        n, s = len(order), (shard_id + epoch) % num_shards
        lo, hi = n * s // num_shards, n * (s + 1) // num_shards
        start = min(hi, lo + max(0, sample - SHUFFLE_BUFFER))
        candidates = [self.root / self.paths[i] for i in order[start:hi] + order[lo:start] + order[:lo] + order[hi:]]
        for path in candidates:
            try:
                if path.stat().st_size == 0:
                    return path, "empty file"
            except OSError as e:
                return path, e.strerror or type(e).__name__
        if log:
            log(f"searching {n} listed files for the one DALI could not decode "
                f"(shard {s} of {num_shards} first)")
        threads = min(32, os.cpu_count() or 1)
        chunk = 64 * threads
        with ThreadPoolExecutor(threads) as pool:  # PIL decodes without holding the GIL
            for k in range(0, n, chunk):
                part = candidates[k:k + chunk]
                for path, reason in zip(part, pool.map(image_problem, part)):
                    if reason is not None:
                        return path, reason
        return None


class WebDatasetSource:
    """WebDataset tar shards: members ``KEY.jpg`` (or .jpeg/.png) and ``KEY.cls``.

    ``.cls`` holds the label as decimal ASCII (the WebDataset convention; trailing
    whitespace is fine). The shards are scanned once at construction to count samples.
    """

    def __init__(self, paths: list[str | os.PathLike], *, label_ext: str = "cls", max_label_digits: int = 9):
        self.paths = [str(p) for p in paths]
        if not self.paths:
            raise SourceError("WebDatasetSource needs at least one .tar shard")
        self.label_ext, self.digits = label_ext, max_label_digits
        digest, count = hashlib.sha256(), 0
        for p in self.paths:
            if not os.path.isfile(p):
                raise SourceError(f"{p}: WebDataset shard not found")
            for name, size in self._members(p):
                key, _, ext = os.path.basename(name).partition(".")
                digest.update(f"{key}.{ext}:{size}\n".encode())
                count += ext.lower() in IMAGE_EXTS
        if count == 0:
            raise SourceError(f"no .jpg/.jpeg/.png members in {self.paths}")
        self.count, self._sha = count, digest.hexdigest()

    @staticmethod
    def _members(path: str) -> list[tuple[str, int]]:
        """(name, size) of every member of one shard; SourceError naming it if it is not a
        whole tar file. Python's tarfile stops quietly at a cut-off header, so the archive
        must also end properly: a zero block (the end marker) where the next header would
        be, or the file ends exactly after the last member's data (no marker written)."""
        try:
            with tarfile.open(path) as tar:
                members = [(m.name, m.size) for m in tar]
                end = tar.offset
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                f.seek(end)
                block = f.read(512)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise SourceError(f"{path}: not a readable tar shard ({type(e).__name__}: {e})") from None
        if size < end or (block and (len(block) < 512 or any(block))):
            raise SourceError(f"{path}: truncated tar shard (its members end at byte {end} of {size}); "
                              "re-create or re-copy it")
        return members

    def find_unreadable(self, **_) -> tuple[str, str] | None:
        """(shard, reason) of a shard that stopped the DALI reader (cut off since it was
        scanned), or None; the loader calls it when the pipeline fails (see FolderSource)."""
        for p in self.paths:
            try:
                self._members(p)
            except SourceError as e:
                return p, str(e).removeprefix(f"{p}: ")
        for p in self.paths:  # whole shards: then a member image DALI could not decode
            with tarfile.open(p) as tar:
                for m in tar:
                    if m.isfile() and m.name.rpartition(".")[2].lower() in IMAGE_EXTS:
                        why = decode_problem(f"{p}:{m.name}", tar.extractfile(m).read())
                        if why:
                            return f"{p}:{m.name}", why
        return None

    def __len__(self) -> int:
        return self.count

    def fingerprint(self) -> dict:
        """What identifies the data: kind, sample count, hash of member names and sizes."""
        return {"kind": "webdataset", "count": self.count, "sha256": self._sha}

    def reader(self, *, shard_id: int, num_shards: int, seed: int, name: str):
        """(encoded images, int32 labels) DALI nodes for one shard."""
        images, raw = fn.readers.webdataset(paths=self.paths, ext=[";".join(IMAGE_EXTS), self.label_ext],
                                            dtypes=[types.UINT8, types.UINT8],
                                            **_common(shard_id, num_shards, seed, name, self.count))
        return images, self._parse_label(raw)

    def _parse_label(self, raw):
        # raw: uint8 [n] ASCII digits, maybe followed by whitespace. Pad to L digits:
        # sum(d_i * 10^(L-1-i)) = label * 10^(L-n), then divide by 10^(L-n).
        L = self.digits
        code = fn.cast(raw, dtype=types.INT64)
        is_digit = (code >= 48) & (code <= 57)
        digits = fn.pad((code - 48) * is_digit, shape=[L], fill_value=0)
        weights = types.Constant(np.array([10 ** (L - 1 - i) for i in range(L)], np.int64))
        scaled = fn.reductions.sum(digits * weights)
        n = fn.reductions.sum(fn.cast(is_digit, dtype=types.INT64))
        scale = fn.lookup_table(L - n, keys=list(range(L + 1)), values=[float(10 ** k) for k in range(L + 1)],
                                dtype=types.INT64)
        return fn.cast(scaled // scale, dtype=types.INT32)
