"""``MultiViewLoader``: the torch-facing iterator over the multi-view DALI pipeline.

    loader = MultiViewLoader(FolderSource(root), views, batch_size, device="cpu")
    for epoch in range(epochs):
        for views, labels in loader:        # one epoch, len(loader) batches
            ...                             # views: list of float32 [B, 3, H, W], channels-last
    state = loader.state_dict()             # resume: MultiViewLoader(..., state=state)

Buffer contract: the tensors are the caller's to keep. DALI's dynamic executor (the
default since DALI 2.0) hands its output buffers to torch zero-copy through DLPack and
allocates fresh ones while a handed-out buffer is still referenced (tested: 30 kept
batches, 30 distinct buffers, none overwritten), so the loader copies nothing; with the
classic executor the torch iterator copies each output into a fresh tensor itself. The
HWC->[B, 3, H, W] step is a ``permute``: channels-last strides, no copy.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import sys

import torch
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy


from .errors import SourceError, StateMismatch
from .filelist import FILELIST
from .ops import COINS
from .pipeline import READER, multiview_pipeline
from .spec import ViewSpec, expand

STATE_FORMAT = 3  # 2: fused linear colour graph (hue="linear" default); 3: records the device


def batches_per_epoch(images: int, num_shards: int, batch_size: int, where: str = "data") -> int:
    """Full batches each rank yields per epoch (drop last); SourceError if none."""
    n = (images // num_shards) // batch_size
    if n == 0:
        raise SourceError(f"{where}: {images} images over {num_shards} shard(s) give no full batch "
                          f"of {batch_size} per shard: lower the batch size or add images")
    return n


def rank_seed(seed: int, shard_id: int) -> int:
    """The augmentation seed of one rank: differs per rank, reproducible from (seed, rank)."""
    return (seed * 1_000_003 + shard_id * 7_919 + 1) % (2**31 - 1)


class MultiViewLoader:
    """Yields ``(views, labels)`` for one epoch per iteration, sharded and resumable.

    views: list (one per expanded ``ViewSpec``) of float32 ``[B, 3, H, W]`` tensors in
    channels-last memory; labels: int64 ``[B]``; both on the device the pipeline ran on.
    With ``debug=True`` a third item maps each coin name (``ops.COINS``) to an int32
    ``[B, n_views]`` tensor of the per-sample 0/1 draws.

    Every rank yields ``len(loader) = (len(source) // num_shards) // batch_size`` batches
    per epoch (drop last); a rank whose shard holds one more batch runs and discards it.

    Resuming: ``state`` continues exactly (same batches, same pixels) on the same data,
    shards, views and device; anything else raises ``StateMismatch``. With
    ``position_only=True`` the dataset may differ (a file list that lost bad files): the
    epoch counter is kept, DALI's reader state (which belongs to the old list) is not,
    and a fresh reader starts at the next epoch boundary, so the unread rest of the
    interrupted epoch is skipped once. The data device is part of the state: CPU and GPU
    graphs draw different random numbers, so a state is refused on the other device.

    A file that became unreadable after ``bt-fast data check`` stops DALI without a
    name; the loader then finds it (``FolderSource.find_unreadable``) and raises
    ``SourceError`` naming it.
    """

    def __init__(self, source, views: list[ViewSpec], batch_size: int, *, device: str = "cpu",
                 num_threads: int = 2, prefetch: int = 2, seed: int = 0, shard_id: int = 0,
                 num_shards: int = 1, state: dict | None = None, decode: str = "once",
                 debug: bool = False, device_id: int | None = None, hue: str = "linear",
                 position_only: bool = False):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device={device!r}: use 'cpu' or 'gpu'")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id={shard_id} is not in [0, num_shards={num_shards})")
        self.views = expand(list(views))
        for i, v in enumerate(self.views):
            if v.size <= 0:
                raise ValueError(f"view {i} has size {v.size}: set ViewSpec.size")
        self.source, self.batch_size, self.debug = source, int(batch_size), debug
        self.shard_id, self.num_shards, self.seed = shard_id, num_shards, seed
        self._len = batches_per_epoch(len(source), num_shards, self.batch_size,
                                      where=str(getattr(source, "root", "the data source")))
        self._meta = {
            "format": STATE_FORMAT, "dataset": source.fingerprint(), "num_shards": num_shards,
            "shard_id": shard_id, "batch_size": self.batch_size, "seed": seed,
            "views": json.loads(json.dumps([dataclasses.asdict(v) for v in self.views])), "decode": decode,
            "hue": hue, "device": device,
        }
        checkpoint = None
        self.epoch, self._pos = 0, 0
        if state is not None:
            self._check_state(state, position_only)
            self.epoch, self._pos = int(state["epoch"]), int(state["batch_in_epoch"])
            if position_only:  # a fresh reader of the new list, at the next epoch boundary
                self.epoch, self._pos = self.epoch + (self._pos > 0), 0
            else:
                checkpoint = base64.b64decode(state["dali"])
        if device == "gpu" and device_id is None:
            device_id = torch.cuda.current_device()
        self._pipe = multiview_pipeline(
            source, self.views, shard_id=shard_id, num_shards=num_shards, reader_seed=seed,
            device=device, decode=decode, debug=debug, hue=hue,
            batch_size=self.batch_size, num_threads=num_threads, prefetch_queue_depth=prefetch,
            device_id=device_id if device == "gpu" else None, seed=rank_seed(seed, shard_id),
            enable_checkpointing=True, checkpoint=checkpoint)
        self._names = [f"view{i}" for i in range(len(self.views))] + ["labels"]
        if debug:
            self._names += [f"{c}{i}" for i in range(len(self.views)) for c in COINS]
        try:  # builds the pipeline: DALI's readers open (and index) every file or shard here
            self._it = DALIGenericIterator([self._pipe], self._names, reader_name=READER,
                                           last_batch_policy=LastBatchPolicy.DROP, auto_reset=False,
                                           prepare_first_batch=False)
        except RuntimeError:
            self._name_unreadable()
            raise  # no listed file is bad: not a data problem, keep DALI's error

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        if self._pos >= self._len:
            self._next_epoch()
        epoch = self.epoch  # state_dict() may start the next epoch early: stop at this one's end
        while self._pos < self._len and self.epoch == epoch:
            out = self._next()[0]
            self._pos += 1
            # permute: [B, H, W, 3] -> [B, 3, H, W] with channels-last strides, no copy.
            views = [out[f"view{i}"].permute(0, 3, 1, 2) for i in range(len(self.views))]
            labels = out["labels"].reshape(-1)
            if self.debug:
                coins = {c: torch.stack([out[f"{c}{i}"].reshape(-1) for i in range(len(self.views))], 1)
                         for c in COINS}
                yield views, labels, coins
            else:
                yield views, labels
        # The epoch's tail (a possible extra batch on this rank, DALI's epoch end) is
        # consumed lazily by the next __iter__ or state_dict().

    def _next_epoch(self) -> None:
        # Drain with next(), never ``for _ in self._it``: the DALI iterator's __iter__
        # resets it, and the loop would then run (and discard) a whole extra epoch.
        try:
            while True:
                self._next()  # at most one batch this rank has beyond len(loader)
        except StopIteration:
            pass
        self._it.reset()
        self.epoch, self._pos = self.epoch + 1, 0

    def _next(self):
        """The next DALI batch; a pipeline stopped by an unreadable file names the file."""
        try:
            return next(self._it)
        except StopIteration:
            raise
        except RuntimeError:  # DALI's critical pipeline error; the pipeline is now dead
            self._name_unreadable()
            raise  # no listed file is bad: not a data problem, keep DALI's error

    def _name_unreadable(self) -> None:
        """SourceError naming the file (or shard) that stopped DALI, if the source finds one."""
        find = getattr(self.source, "find_unreadable", None)
        found = find and find(shard_id=self.shard_id, num_shards=self.num_shards, seed=self.seed,
                              epoch=self.epoch, sample=self._pos * self.batch_size,
                              log=lambda m: print(m, file=sys.stderr, flush=True))
        if found:
            path, reason = found
            where = (f"it is listed in {self.source.root / FILELIST} but became unreadable after "
                     "`bt-fast data check`" if hasattr(self.source, "root") else "it changed since the run started")
            raise SourceError(f"{path}: {reason}; {where} (the data pipeline stopped in epoch "
                              f"{self.epoch}, batch {self._pos})") from None

    def state_dict(self) -> dict:
        """The position after the last batch handed out: DALI checkpoint + metadata.

        Plain str/int/list/dict, so ``torch.load(weights_only=True)`` accepts it.
        """
        if self._pos >= self._len:
            # Finish the epoch now (drain DALI's tail, reset): a DALI checkpoint taken at
            # the very end of an epoch does not resume identically (measured), one taken
            # at the start of the next does. The next __iter__ would do the same anyway.
            self._next_epoch()
        dali = self._it.checkpoints()[0]
        return {**self._meta, "epoch": self.epoch, "batch_in_epoch": self._pos,
                "dali": base64.b64encode(dali).decode("ascii")}

    def _check_state(self, state: dict, position_only: bool) -> None:
        if not isinstance(state, dict) or "dali" not in state:
            raise StateMismatch("pipeline state is not a MultiViewLoader.state_dict()")
        if state.get("format") == 2:
            # Format 2 did not record the device. Until format 3 no bt_fast release had run
            # a GPU pipeline (README, "What was never run on a GPU"): every such state
            # came from the CPU graph, so it reads as a CPU state.
            state = {**state, "format": 3, "device": "cpu"}
        names = {"format": "state format", "dataset": "dataset (image count / file-list hash)",
                 "num_shards": "number of shards (world size)", "shard_id": "shard id (rank)",
                 "batch_size": "per-rank batch size", "seed": "seed", "views": "views",
                 "decode": "decode mode", "hue": "hue implementation",
                 "device": "data device (set data.device to the checkpoint's)"}
        if position_only:
            del names["dataset"]
        diffs = [f"{label}: checkpoint has {state.get(k)!r}, this loader has {self._meta[k]!r}"
                 for k, label in names.items() if state.get(k) != self._meta[k]]
        if diffs:
            raise StateMismatch("cannot resume the data pipeline from this state; it differs in "
                                + "; ".join(diffs))
