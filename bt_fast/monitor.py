"""Online evaluation while training: the linear probe (bt_fast/probe.py) every step and a
kNN monitor every ``eval.every`` steps, with their cost measured and a stop target.

The trainer calls it in a few places (bt_fast/train.py)::

    mon = run.monitor;  mon.start()                 # before the loop: hooks, clock
    train_step(...);    mon.after_step(labels)      # the probe's SGD step
    log_window(...):    mon.window_record()         # probe train top-1 (log steps)
    if mon.due(step):   stopping |= mon.evaluate(run, logger)   # kNN; True at the target
    checkpoint:         **mon.state()               # the probe and its optimizer

The kNN monitor featurises a seeded subset of the train split (the bank, ``eval.bank``
images) and of ``data.val_dir`` (the query, ``eval.query``) with the live backbone in
eval mode, at ``model.readout`` and, when that differs, at the global pool, and scores
weighted kNN (k = 20, T = 0.07, cosine) with the code ``bt-fast eval knn --bank N
--query M`` runs (bt_fast/eval/bank.py): for a checkpoint both give the same number.
Under torchrun every rank featurises a strided shard and the features are gathered, so
every rank computes the same result (and stops at the same step). The probe is scored
on the query's global-pool features. The random-init and raw-pixel baselines of the same
bank and query are computed once per data set and cached (bt_fast/baselines.py).

Failure isolation: an error while featurising is one line on stderr and switches the kNN
monitor off on every rank (one all-reduce of a flag); training goes on.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from bt_fast import baselines, dist, metrics
from bt_fast.specs import parse_readout, parse_stop_at
from bt_fast.eval import bank
from bt_fast.eval.readout import Readout
from bt_fast.eval.splits import check_splits
from bt_fast.probe import OnlineProbe

GLOBAL = "layer4:1"  # the standard global pool: what the projector reads and the probe trains on


def cpu_seconds() -> float:
    """CPU seconds of this process (all threads: DALI's too) and its live and finished
    children (e.g. DataLoader workers), from /proc where there is one."""
    import os
    import resource

    total = time.process_time()
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    total += child.ru_utime + child.ru_stime
    me, tick = str(os.getpid()), os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:  # ppid; utime, stime are fields 14 and 15 of stat
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def say(env, msg: str) -> None:
    if env.is_main:
        print(f"monitor: {msg}", file=sys.stderr, flush=True)


def labelled_classes(cfg) -> list[str] | None:
    """Class names of the labelled split the probe trains on (train_dir's file list; the
    val list when the reader has no folder); None when there are no labels to use."""
    from bt_fast.data import read_file_list
    from bt_fast.errors import DataError

    root = cfg.data.train_dir if cfg.data.reader == "folder" else cfg.data.val_dir
    if not root:
        return None
    try:
        classes = read_file_list(root)[2]
    except DataError:
        return None
    return classes if len(classes) >= 2 else None


class Monitor:
    def __init__(self, cfg, env, model, probe_state: dict | None = None):
        self.cfg, self.env, self.model = cfg, env, model
        self.every = cfg.eval.every
        self.target = parse_stop_at(cfg.train.stop_at)  # (metric, value) or None
        self.reached: str | None = None
        # wall time inside the monitor (probe steps + kNN monitors + the baselines, once)
        self.seconds = 0.0
        self.cpu = 0.0  # CPU seconds of this process inside the monitor
        self.baseline_seconds = 0.0  # once per data set (cached afterwards)
        self.readouts = [cfg.model.readout] + ([GLOBAL] if parse_readout(cfg.model.readout) != [(4, 1)] else [])
        self.sets = None  # preloaded (bank, query) shards: decoded at the first monitor
        self.baseline = None
        self.probe = None
        # Said when training starts (``start``), not here: a run that then fails in setup
        # (a taken port, a locked run folder) prints its one error line and nothing else.
        self.notices: list[str] = []
        want = cfg.eval.online_probe or self.every > 0
        classes = labelled_classes(cfg) if want else None
        if want and classes is None:
            self.notices.append(f"no labels to learn from (data.{'train' if cfg.data.reader == 'folder' else 'val'}_dir "
                     "lists fewer than 2 classes, or none is set): online probe and kNN monitor off")
            self.every = 0
        elif cfg.eval.online_probe:
            self.probe = OnlineProbe(model, len(classes), lr=cfg.eval.probe_lr, device=env.device,
                                     seed=cfg.train.seed)
            if probe_state is not None:
                try:
                    self.probe.load_state_dict(probe_state)
                except (RuntimeError, KeyError, ValueError) as e:  # classes or features changed
                    say(env, f"the checkpoint's online probe does not fit this run "
                             f"({str(e).strip().splitlines()[0]}): it starts afresh")
                    self.probe = OnlineProbe(model, len(classes), lr=cfg.eval.probe_lr,
                                             device=env.device, seed=cfg.train.seed)
        if self.every and not self._knn_data_ok():
            self.every = 0
        self.t0, self.cpu0 = time.perf_counter(), 0.0

    def _knn_data_ok(self) -> bool:
        d = self.cfg.data
        for key, root in (("data.train_dir", d.train_dir), ("data.val_dir", d.val_dir)):
            if not root or not Path(root, "filelist.txt").is_file():
                self.notices.append(f"{key} {'is not set' if not root else f'{root} has no filelist.txt'}: "
                              "kNN monitor off (the online probe, if on, still trains)")
                return False
        # A val split sharing images with train would score what the backbone memorised:
        # refused here as by every other probe (bt_fast/eval/splits.py), before training.
        check_splits(d.train_dir, d.val_dir)
        return True

    # ------------------------------------------------------------ the loop's calls

    def start(self) -> None:
        for notice in self.notices:
            say(self.env, notice)
        if self.probe is not None:
            self.probe.attach()
        self.t0, self.cpu0 = time.perf_counter(), cpu_seconds()

    def close(self) -> None:
        if self.probe is not None:
            self.probe.detach()

    def after_step(self, labels: torch.Tensor) -> None:
        if self.probe is not None:
            t, c = time.perf_counter(), time.process_time()
            self.probe.step(labels)
            self.seconds += time.perf_counter() - t
            self.cpu += time.process_time() - c

    def window_record(self) -> dict:
        top1 = self.probe.train_top1() if self.probe is not None else None
        return {} if top1 is None else {"online_linear_train_top1": top1}

    def state(self) -> dict:
        return {"online_probe": self.probe.state_dict()} if self.probe is not None else {}

    def due(self, step: int, last_step: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == last_step)

    def evaluate(self, run, logger) -> bool:
        """One kNN monitor at run.step; True when ``train.stop_at`` is reached."""
        t, c = time.perf_counter(), time.process_time()
        record = self._measure(run.step, run.cfg.data.batch_size)
        self.seconds += time.perf_counter() - t
        self.cpu += time.process_time() - c
        if record is None:
            return False
        # Cumulative: the time to a point is elapsed_s - monitor_s (bench tta), in CPU
        # seconds cpu_s - monitor_cpu_s (on a shared machine, what load does not bend).
        record.update(monitor_s=self.seconds, cpu_s=cpu_seconds() - self.cpu0, monitor_cpu_s=self.cpu)
        logger.log_eval(record, run.step)
        if self.target is not None and self.reached is None:
            metric, value = self.target
            got = record.get("eval_knn_top1" if metric == "knn" else "eval_online_linear_top1")
            if got is not None and got >= value:
                name = "kNN" if metric == "knn" else "online linear"
                self.reached = (f"reached {name} {value:g} ({got:.2f}) at "
                                f"{metrics.fmt_duration(time.perf_counter() - self.t0)}, "
                                f"{record['images_seen']:,} images")
                return True
        return False

    def summary(self, loop_seconds: float) -> str:
        """The cost clause of the run's summary line (and the target, when reached)."""
        parts = []
        if self.probe is not None or self.every:
            recurring = self.seconds - self.baseline_seconds  # the baselines: once per data set
            share = 100.0 * recurring / max(loop_seconds, 1e-9)
            parts.append(f"monitor {recurring:.1f} s = {share:.1f} % of the loop")
            if self.baseline_seconds >= 0.05:  # computed this run, not read from the cache
                parts.append(f"baselines computed once in {self.baseline_seconds:.1f} s (now cached)")
        if self.reached:
            parts.append(self.reached)
        return "".join(f"; {p}" for p in parts)

    # ------------------------------------------------------------ the kNN monitor

    def _measure(self, step: int, global_batch: int) -> dict | None:
        """Featurise on every rank (errors agreed on by all), gather, score."""
        local, why = self.all_ok(self._live_features)
        if why is None and self.baseline is None:
            t = time.perf_counter()
            try:  # raises on every rank or on none: its collectives follow an agreement
                self.baseline = baselines.get(self)
            except baselines.Failed as e:
                why = str(e)
            self.baseline_seconds = time.perf_counter() - t  # the summary says it apart
        if why is None:
            feats = self.gather(local)
            record, why = self.all_ok(lambda: self._score(feats, step * global_batch))
        if why is not None:
            print(f"monitor: rank {self.env.rank}: kNN monitor failed at step {step} ({why}); "
                  "it is off for the rest of this run, training goes on", file=sys.stderr, flush=True)
            self.every = 0
            return None
        return record

    def _score(self, feats: dict, images_seen: int) -> dict:
        """The record of one monitor from the gathered features (the same on every rank)."""
        if self.env.device.type == "cuda":  # the [Q, N] similarity search: on the GPU there is one
            feats = {r: tuple(t.to(self.env.device) for t in v) for r, v in feats.items()}
        record = {"images_seen": images_seen}
        for i, readout in enumerate(self.readouts):
            key = "eval_knn_top1" if i == 0 else f"eval_knn_top1_{readout}"
            record[key] = bank.knn_top1(*feats[readout])
        if self.probe is not None:
            _, _, qx, qy = feats[self.readouts[-1]]  # GLOBAL: the last readout (or the only one)
            record["eval_online_linear_top1"] = self.probe.top1(qx, qy)
        record.update(self.baseline or {})
        return record

    def agree(self, ok: bool) -> bool:
        """True when every rank's ``ok`` is True (one all-reduce of a flag)."""
        if not self.env.distributed:
            return ok
        flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=self.env.device)
        torch.distributed.all_reduce(flag)
        return int(flag.item()) == 0

    def all_ok(self, work):
        """``work()`` on this rank, then one agreement: (its value, None) where it worked on
        every rank, else (None, why). Collectives only ever follow such an agreement, so a
        failure on one rank never leaves another waiting in a gather."""
        value, error = None, None
        try:
            value = work()
        except Exception as e:  # noqa: BLE001 - isolation is the point: the run goes on
            error = f"{type(e).__name__}: {e}".splitlines()[0]
        if self.agree(error is None):
            return value, None
        return None, error or "it failed on another rank"

    def _live_features(self) -> dict:
        if self.sets is None:
            self.sets = self._load_sets()  # decoded once, at the first monitor
        return self.features(self.model.backbone, self.readouts)

    def _load_sets(self):
        """This rank's shards of the seeded bank and query subsets, decoded once."""
        cfg, env, out = self.cfg, self.env, []
        for root, size, key in ((cfg.data.train_dir, cfg.eval.bank, "eval.bank"),
                                (cfg.data.val_dir, cfg.eval.query, "eval.query")):
            n = len(bank.ImageList(root, None))
            if size > n or size <= 0:
                say(env, f"{key}={size}: {'more than' if size > n else 'means'} the {n} images of "
                         f"{root}: using all of them")
            idx = bank.subset_indices(n, size) or list(range(n))
            out.append(bank.image_set(cfg, root, bank.shard(idx, env.rank, env.world_size), preload=True))
        return out

    def features(self, net, readouts: list[str], flat_dim: int | None = None) -> dict:
        """{readout: [bank_x, bank_y, query_x, query_y]} of this rank's shards, ``net`` (a
        ResNet, fc = Identity) read at every readout in one pass; ``flat_dim``: ``net``
        is a flat feature map (the pixels), read as is."""
        if flat_dim is not None:
            module, dims = net, [flat_dim]
        else:  # the backbone itself for the global pool alone, as eval's with_readout does
            module = net if readouts == [GLOBAL] else Readout(net, ",".join(readouts))
            dims = [Readout(net, r).dim for r in readouts]
        modes = [(m, m.training) for m in self.model.modules()]
        try:
            # Never re-layout the live model: extract runs in inference mode, where .to()
            # would swap its parameters for inference tensors that backward refuses.
            live = net is self.model.backbone
            out = [bank.featurize(module, s, self.cfg, bf16=bank.bf16_default("auto"),
                                  channels_last=not live) for s in self.sets]
        finally:
            for m, training in modes:  # the live model goes back to exactly how it was
                m.training = training
        split = {}
        for x, y in out:
            for readout, part in zip(readouts, x.split(dims, dim=1)):
                split.setdefault(readout, []).extend([part, y])
        return split

    def gather(self, local: dict) -> dict:
        """Every rank's shards in subset order: {readout: (bank_x, bank_y, query_x, query_y)}."""
        parts = dist.gather_per_rank(local)
        return {r: tuple(bank.unshard([p[r][i] for p in parts]) for i in range(4)) for r in local}
