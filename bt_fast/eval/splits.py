"""The one check every probe runs on its two splits: held-out val, same classes.

A val split that shares images with train scores whatever the probe memorised (a val
folder of links to the train images gave 100 % kNN). ``check_splits`` refuses, for
knn, linear, semi, the pixels baseline and the trainer's online kNN alike:

- the same folder twice;
- class lists that differ (labels index each split's classes.txt);
- any image in both splits: the same file (same path, a symlink or a hard link: same
  device and inode) or identical bytes (a copy).

Cost: one stat() per listed file; files whose byte size occurs in the other split are
compared by a hash of their last 4 KiB (JPEG's entropy-coded tail differs between
different images even when their headers match) and only on a match by a full hash.
The answer is memoised per process for unchanged lists (the trainer asks every eval).
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bt_fast.data import read_file_list
from bt_fast.errors import DataError, EvalError

TAIL = 4096
_DONE: dict[tuple, None] = {}


def check_splits(train_dir: str | os.PathLike, val_dir: str | os.PathLike) -> list[str]:
    """The classes both splits share; EvalError if they are the same folder, have other
    classes or share any image. Memoised while both file lists are unchanged."""
    if Path(train_dir).resolve() == Path(val_dir).resolve():
        raise EvalError(f"train and val are the same folder ({train_dir}); evaluation needs held-out val")
    try:
        train, val = read_file_list(train_dir), read_file_list(val_dir)
    except DataError as e:
        raise EvalError(str(e)) from None
    _same(train[2], val[2], train_dir, val_dir)
    key = tuple((str(Path(d).resolve()), _list_stamp(d)) for d in (train_dir, val_dir))
    if key not in _DONE:
        disjoint([os.path.join(train_dir, p) for p in train[0]], [os.path.join(val_dir, p) for p in val[0]],
                 f"train {train_dir}", f"val {val_dir}")
        _DONE[key] = None
    return train[2]


def _list_stamp(root) -> tuple:
    st = os.stat(Path(root) / "filelist.txt")
    return st.st_size, st.st_mtime_ns, st.st_ino


def same_classes(train_dir, val_dir) -> list[str]:
    """The class list both splits share; EvalError when they differ.

    Labels are indices into each split's classes.txt, so two different lists make
    label k mean two different classes and every accuracy silently wrong.
    """
    try:
        train, val = read_file_list(train_dir)[2], read_file_list(val_dir)[2]
    except DataError as e:
        raise EvalError(str(e)) from None
    return _same(train, val, train_dir, val_dir)


def _same(train: list[str], val: list[str], train_dir, val_dir) -> list[str]:
    if train != val:
        only_t, only_v = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        diff = (f"only in train: {', '.join(only_t) or '-'}; only in val: {', '.join(only_v) or '-'}"
                if only_t or only_v else "same names in another order")
        raise EvalError(f"train {train_dir} and val {val_dir} have different classes ({diff}); "
                        "labels would not match: re-run `bt-fast data check` on both or fix the folders")
    return train


def disjoint(a: list, b: list, name_a: str = "train", name_b: str = "val") -> None:
    """EvalError naming a count and an example if any file of ``a`` is also in ``b``:
    the same file (path, link, hard link) or the same bytes. Missing files are skipped
    (reading them fails later, naming them)."""
    stat_a, stat_b = _stats(a), _stats(b)
    inodes_b = {(st.st_dev, st.st_ino): p for p, st in stat_b.items()}
    same = [(p, inodes_b[(st.st_dev, st.st_ino)]) for p, st in stat_a.items()
            if (st.st_dev, st.st_ino) in inodes_b]
    if same:
        raise EvalError(f"{len(same)} images of {name_a} are also in {name_b} (the same file, or a "
                        f"link to it: e.g. {same[0][0]} and {same[0][1]}); evaluation needs held-out val")
    sizes_a, sizes_b = defaultdict(list), defaultdict(list)
    for stats, sizes in ((stat_a, sizes_a), (stat_b, sizes_b)):
        for p, st in stats.items():
            sizes[st.st_size].append(p)
    common = set(sizes_a) & set(sizes_b)
    # Tails of every file whose size occurs in both splits, read in threads (file I/O
    # releases the GIL): on Fashion-MNIST (~900-byte JPEGs) that is nearly all 70,000.
    both = [p for size in common for p in sizes_a[size] + sizes_b[size]]
    chunks = [both[i::16] for i in range(16)]  # one task per thread: no per-file submit cost
    with ThreadPoolExecutor(16) as pool:
        parts = pool.map(lambda chunk: [(p, _digest(p, TAIL)) for p in chunk], chunks)
    tail = dict(pair for part in parts for pair in part)
    copies = []
    for size in common:
        tails_b = defaultdict(list)
        for p in sizes_b[size]:
            if tail[p] is not None:  # unreadable: reading it fails later, naming it
                tails_b[tail[p]].append(p)
        for p in sizes_a[size]:
            for q in tails_b.get(tail[p], []) if tail[p] is not None else []:
                if _digest(p) == _digest(q) is not None:
                    copies.append((p, q))
                    break
    if copies:
        raise EvalError(f"{len(copies)} images of {name_a} have identical copies in {name_b} (e.g. "
                        f"{copies[0][0]} and {copies[0][1]}); evaluation needs held-out val")


def _stats(paths: list) -> dict:
    out = {}
    for p in paths:
        try:
            out[p] = os.stat(p)  # follows links: a link and its target share an inode
        except OSError:
            continue
    return out


def _digest(path, tail: int | None = None) -> bytes | None:
    """blake2b of the file, or of its last ``tail`` bytes; None if unreadable."""
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            if tail is not None:
                f.seek(max(0, os.fstat(f.fileno()).st_size - tail))
                h.update(f.read(tail))
            else:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    except OSError:
        return None
    return h.digest()
