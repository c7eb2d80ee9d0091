"""Step timing and metric sinks: console progress, JSONL, Prometheus.

The trainer times each step with :class:`StepTimer` and, every ``train.log_every``
steps, hands one record to the object returned by :func:`open_sinks`::

    timer = metrics.StepTimer(device)
    logger = metrics.open_sinks(cfg, run_dir, rank=rank, local_rank=local_rank,
                                world_size=world_size, total_steps=total_steps)
    for step in ...:
        timer.start()
        views = next(loader);      timer.mark("data_wait")
        loss = model(views);       timer.mark("forward")
        loss.backward();           timer.mark("backward")
        optimizer.step();          timer.mark("optimizer")
        if step % log_every == 0:
            logger.log({"loss": ..., "durations": timer.collect()}, step)  # sync point
    logger.close()

A sink is anything with ``log(record, step)`` and ``close()`` (and, optionally,
``log_checkpoint(seconds, step)``); adding one, e.g. TensorBoard, is one class.

Prometheus names (each with a ``rank`` label; README, "Watching throughput"):

=====================================  =========  =====================================
bt_train_images_total                  counter    images this rank trained on
bt_train_step_duration_seconds         histogram  wall time of a whole step
bt_data_wait_seconds                   histogram  time the step waited for its batch
bt_train_phase_duration_seconds        histogram  per ``phase``: data_wait, forward,
                                                  backward, optimizer, comm (if timed)
bt_train_loss                          gauge      last logged loss (any method)
bt_train_loss_term                     gauge      per ``term``: the method's named terms
                                                  (VICReg: invariance, variance, covariance)
bt_train_loss_on_diag, _loss_off_diag  gauge      Barlow Twins' two terms (runs of it only)
bt_train_lr                            gauge      per ``group``: weights, biases
bt_train_epoch, bt_train_step          gauge      progress
bt_nonfinite_steps_total               counter    steps whose loss was NaN/inf
bt_checkpoint_duration_seconds         histogram  time to write one checkpoint
bt_info                                info       version, config_hash, world_size
bt_eval_knn_top1                       gauge      per ``readout``: the kNN monitor's top-1 %
bt_eval_online_linear_top1             gauge      per ``readout``: the online probe on the query
bt_eval_online_linear_train_top1       gauge      the probe's train top-1 % over the last window
bt_eval_knn_baseline_top1              gauge      per ``readout``, ``baseline`` (random_init,
                                                  pixels): the reference lines (cached)
bt_eval_monitor_seconds                gauge      wall time spent in the monitor so far
bt_gpu_memory_{allocated,reserved,     gauge      bytes, CUDA only
peak}_bytes
process_*                              (std)      RSS, CPU seconds, open fds
=====================================  =========  =====================================
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from bt_fast import safeio
from bt_fast.errors import MetricsPortError

PHASES = ("data_wait", "forward", "backward", "comm", "optimizer")
"""Known step phases, in step order; :meth:`StepTimer.mark` accepts any name."""

# Durations span 1 ms (a GPU step) to a minute (a CPU step on a big model).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CHECKPOINT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


# ---------------------------------------------------------------- step timer


class StepTimer:
    """Per-phase step durations without a host<->device sync per step.

    On CUDA each mark records a ``torch.cuda.Event`` (asynchronous); the events are
    resolved in :meth:`collect`, the single sync point, called every ``log_every``
    steps. An event measures when the GPU reached that point of the stream, so a
    data-wait mark after the batch is ready counts the GPU's idle time waiting for
    the host, which is what a starved GPU costs. On CPU, marks read ``perf_counter``.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self._steps: List[List[tuple]] = []  # finished steps: [(phase, stamp), ...]
        self._current: Optional[List[tuple]] = None

    def _stamp(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        """Top of a step; closes the previous step if it is still open."""
        self._close()
        self._current = [("start", self._stamp())]

    def mark(self, phase: str) -> None:
        """Attribute the time since the previous mark (or start) to ``phase``."""
        if self._current is None:
            raise RuntimeError("StepTimer.mark() before start()")
        self._current.append((phase, self._stamp()))

    def _close(self) -> None:
        if self._current is not None and len(self._current) > 1:
            self._steps.append(self._current)
        self._current = None

    def collect(self) -> Dict[str, List[float]]:
        """Per-step seconds per phase, plus ``step`` (total), for the steps since the
        last collect; clears them. SYNC POINT on CUDA: call every log_every steps."""
        self._close()
        steps, self._steps = self._steps, []
        if self.cuda and steps:
            steps[-1][-1][1].synchronize()  # the last event done => all earlier ones
        out: Dict[str, List[float]] = {}
        for i, marks in enumerate(steps):
            seen: Dict[str, float] = {}
            for (_, t0), (phase, t1) in zip(marks, marks[1:]):
                seen[phase] = seen.get(phase, 0.0) + self._seconds(t0, t1)
            seen["step"] = self._seconds(marks[0][1], marks[-1][1])
            for phase, seconds in seen.items():
                # A phase missing from earlier steps gets zeros so lists stay aligned.
                out.setdefault(phase, [0.0] * i).append(seconds)
            for phase, values in out.items():
                if len(values) < i + 1:
                    values.append(0.0)
        return out

    def _seconds(self, t0, t1) -> float:
        return t0.elapsed_time(t1) / 1e3 if self.cuda else t1 - t0


def summarize(durations: Dict[str, List[float]]) -> Dict[str, float]:
    """Per-phase means as ``time_<phase>_s`` and the data-wait share of step time."""
    out = {f"time_{k}_s": sum(v) / len(v) for k, v in durations.items() if v}
    total = sum(durations.get("step", []))
    if total > 0:
        out["data_wait_share"] = sum(durations.get("data_wait", [])) / total
    return out


# ---------------------------------------------------------------- sinks


class Sink:
    """The sink interface: ``log(record, step)`` and ``close()``.

    ``record`` is the trainer's dict: floats plus ``durations`` (phase -> list of
    per-step seconds, from :meth:`StepTimer.collect`).
    """

    def log(self, record: Dict[str, Any], step: int) -> None:
        raise NotImplementedError

    def log_checkpoint(self, seconds: float, step: int) -> None:
        """A checkpoint took ``seconds`` to write; sinks may ignore it."""

    def log_eval(self, record: Dict[str, Any], step: int) -> None:
        """A monitor's result (bt_fast/monitor.py: eval_knn_top1, ...); sinks may ignore it."""

    def close(self) -> None:
        """Flush and release resources."""


def fmt_duration(seconds: float) -> str:
    """3m07s, or 1h02m past an hour: progress lines and the end-of-run summary."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ConsoleSink(Sink):
    """One progress line per log: step/total, loss, lr, images/s, data wait, ETA."""

    def __init__(self, total_steps: int, stream=None):
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self._last: Optional[tuple] = None  # (monotonic time, step)

    def log(self, record: Dict[str, Any], step: int) -> None:
        now = time.monotonic()
        parts = [f"step {step}/{self.total_steps}" if self.total_steps else f"step {step}"]
        if "loss" in record:
            parts.append(f"loss {record['loss']:.4g}")
        if "lr" in record:
            parts.append(f"lr {record['lr']:.3g}")
        if "images_per_s" in record:
            parts.append(f"{record['images_per_s']:.1f} img/s")
        share = summarize(record.get("durations") or {}).get("data_wait_share")
        if share is not None:
            parts.append(f"data wait {share:.0%}")
        if self._last and self.total_steps and step > self._last[1]:
            per_step = (now - self._last[0]) / (step - self._last[1])
            parts.append(f"ETA {fmt_duration(per_step * (self.total_steps - step))}")
        if record.get("nonfinite_steps"):
            parts.append(f"non-finite steps {int(record['nonfinite_steps'])}")
        if "online_linear_train_top1" in record:
            parts.append(f"probe train {record['online_linear_train_top1']:.1f}%")
        self._last = (now, step)
        print(" | ".join(parts), file=self.stream, flush=True)

    def log_eval(self, record: Dict[str, Any], step: int) -> None:
        """One line per monitor: the curve's points as they come."""
        parts = [f"step {step}: eval"]
        for key, value in record.items():
            if key.startswith("eval_knn_top1"):
                readout = key[len("eval_knn_top1_"):] or "model.readout"
                parts.append(f"kNN {value:.2f} ({readout})")
        if "eval_online_linear_top1" in record:
            parts.append(f"online linear {record['eval_online_linear_top1']:.2f}")
        if "images_seen" in record:
            parts.append(f"{int(record['images_seen']):,} images")
        if "monitor_s" in record:
            parts.append(f"monitor {record['monitor_s']:.1f} s so far")
        print(" | ".join(parts), file=self.stream, flush=True)

    def log_checkpoint(self, seconds: float, step: int) -> None:
        print(f"step {step}: checkpoint written in {seconds:.2f} s", file=self.stream, flush=True)


class JsonlSink(Sink):
    """``run_dir/metrics.jsonl``: one JSON object per log, floats plus ``step``.

    Durations are stored as per-phase means (``time_forward_s``...) and
    ``data_wait_share``; checkpoint writes as ``{"step", "checkpoint_duration_s"}``.
    """

    def __init__(self, path: Path):
        self.path = path
        # Line-buffered: readable while running. Through the write gate: never appends
        # through a link left at the path (bt_fast.safeio.open_append).
        self._file = safeio.open_append(path)
        torn = False
        if path.stat().st_size:  # a plain file now (open_append refused links and FIFOs)
            with open(path, "rb") as f:
                f.seek(-1, 2)
                torn = f.read(1) != b"\n"
        if torn:  # a killed run's torn last line: end it, or it swallows our first record
            self._file.write("\n")
        self._t0 = time.time()

    def _write(self, obj: dict) -> None:
        try:
            self._file.write(json.dumps(obj, allow_nan=True) + "\n")
        except OSError as e:  # a full disk mid-run: one line naming the file
            raise safeio.as_write_error(e, self.path) from None

    def log(self, record: Dict[str, Any], step: int) -> None:
        now = time.time()
        out: Dict[str, Any] = {"step": int(step), "time": now, "elapsed_s": now - self._t0}
        for key, value in record.items():
            if key == "durations":
                out.update(summarize(value or {}))
            elif isinstance(value, (int, float)):
                out[key] = float(value)
        self._write(out)

    def log_checkpoint(self, seconds: float, step: int) -> None:
        self._write({"step": int(step), "time": time.time(), "checkpoint_duration_s": seconds})

    def log_eval(self, record: Dict[str, Any], step: int) -> None:
        """{"step", "time", "elapsed_s", "eval_knn_top1", ...}: one record per monitor."""
        now = time.time()
        self._write({"step": int(step), "time": now, "elapsed_s": now - self._t0,
                     **{k: float(v) for k, v in record.items() if isinstance(v, (int, float))}})

    def close(self) -> None:
        self._file.close()


class Sinks(Sink):
    """Fan-out to several sinks; what :func:`open_sinks` returns."""

    def __init__(self, sinks: List[Sink]):
        self.sinks = list(sinks)

    def log(self, record: Dict[str, Any], step: int) -> None:
        for sink in self.sinks:
            sink.log(record, step)

    def log_checkpoint(self, seconds: float, step: int) -> None:
        for sink in self.sinks:
            sink.log_checkpoint(seconds, step)

    def log_eval(self, record: Dict[str, Any], step: int) -> None:
        for sink in self.sinks:
            sink.log_eval(record, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class PrometheusSink(Sink):
    """Serves this rank's metrics over HTTP for Prometheus to scrape.

    One registry and one HTTP server per rank, on its own port (``metrics.port +
    local_rank``), so no multiprocess mode is needed. ``log`` only touches host
    floats that the trainer already synced, plus CUDA memory counters (no sync).
    """

    def __init__(self, port: int, host: str = "127.0.0.1", *, rank: int = 0,
                 world_size: int = 1, config_hash: str = "", version: Optional[str] = None,
                 terms: Optional[tuple] = None, readout: str = "layer4:1"):
        import prometheus_client as pc
        from bt_fast import __version__

        self.registry = reg = pc.CollectorRegistry()
        pc.ProcessCollector(registry=reg)
        r = ["rank"]
        self.images = pc.Counter("bt_train_images", "Images this rank trained on.", r, registry=reg)
        self.step_s = pc.Histogram("bt_train_step_duration_seconds", "Wall time of one training step.",
                                   r, buckets=DURATION_BUCKETS, registry=reg)
        self.data_wait_s = pc.Histogram("bt_data_wait_seconds", "Time a step waited for its batch.",
                                        r, buckets=DURATION_BUCKETS, registry=reg)
        self.phase_s = pc.Histogram("bt_train_phase_duration_seconds",
                                    "Step time per phase (data_wait, forward, backward, comm, optimizer).",
                                    r + ["phase"], buckets=DURATION_BUCKETS, registry=reg)
        self.gauges = {key: pc.Gauge(f"bt_train_{key}", doc, r, registry=reg) for key, doc in (
            ("loss", "Training loss of the run's method at the last log."),
            ("loss_on_diag", "Barlow Twins invariance term: sum_i (1 - c_ii)^2."),
            ("loss_off_diag", "Barlow Twins redundancy term, unweighted: sum_{i!=j} c_ij^2 (loss = on + lambd * off)."),
            ("epoch", "Current (fractional) epoch."),
            ("step", "Current optimizer step."))}
        self.loss_term = pc.Gauge("bt_train_loss_term", "Named loss terms of the run's method at the "
                                  "last log (bt_fast.methods; unweighted where the loss weights them).",
                                  r + ["term"], registry=reg)
        # The method's terms, to show at zero before the first log; None: whatever is logged.
        self.terms = tuple(terms or ())
        self.lr = pc.Gauge("bt_train_lr", "Learning rate per parameter group.", r + ["group"], registry=reg)
        self.nonfinite = pc.Counter("bt_nonfinite_steps", "Steps with a NaN/inf loss.", r, registry=reg)
        self.checkpoint_s = pc.Histogram("bt_checkpoint_duration_seconds", "Time to write a checkpoint.",
                                         r, buckets=CHECKPOINT_BUCKETS, registry=reg)
        # The monitor (bt_fast/monitor.py): series appear at the first monitor, not at 0 %.
        self.readout = readout
        self.knn = pc.Gauge("bt_eval_knn_top1", "kNN top-1 (%) of the monitor's query set, k=20 T=0.07.",
                            r + ["readout"], registry=reg)
        self.online = pc.Gauge("bt_eval_online_linear_top1", "Online linear probe top-1 (%) on the "
                               "monitor's query set.", r + ["readout"], registry=reg)
        self.online_train = pc.Gauge("bt_eval_online_linear_train_top1", "Online linear probe train "
                                     "top-1 (%) over the last log window.", r, registry=reg)
        self.baseline = pc.Gauge("bt_eval_knn_baseline_top1", "kNN top-1 (%) of the same bank and "
                                 "query at random init or on raw pixels (cached reference lines).",
                                 r + ["readout", "baseline"], registry=reg)
        self.monitor_s = pc.Gauge("bt_eval_monitor_seconds", "Wall time spent in the monitor so far.",
                                  r, registry=reg)
        info = pc.Info("bt", "bt_fast build and run.", r, registry=reg)
        info.labels(rank=str(rank)).info({"version": version or __version__,
                                          "config_hash": config_hash, "world_size": str(world_size)})
        self.gpu_mem = {}
        if torch.cuda.is_available():
            self.gpu_mem = {kind: pc.Gauge(f"bt_gpu_memory_{kind}_bytes", f"CUDA memory {kind} by torch.",
                                           r, registry=reg) for kind in ("allocated", "reserved", "peak")}
        self.rank, self.world_size = str(rank), world_size
        self._init_children()
        try:
            self._server, self._thread = pc.start_http_server(port, addr=host, registry=reg)
        except OSError as e:
            raise MetricsPortError(
                f"Prometheus exporter cannot listen on {host}:{port} ({e.strerror or e}); "
                f"is another run or rank using it? Set metrics.port to a free base port "
                f"(rank r uses metrics.port + local_rank) or metrics.prometheus=false") from e
        self.address = (host, self._server.server_port)

    def _init_children(self) -> None:
        # Create every labelled series up front so a scrape before the first log
        # already shows the full set, at zero.
        per_method = {f"loss_{t}" for t in ("on_diag", "off_diag")} - {f"loss_{t}" for t in self.terms}
        for m in (self.images, self.nonfinite, self.step_s, self.data_wait_s, self.checkpoint_s,
                  *[g for k, g in self.gauges.items() if k not in per_method], *self.gpu_mem.values()):
            m.labels(rank=self.rank)
        for term in self.terms:
            self.loss_term.labels(rank=self.rank, term=term)
        for phase in PHASES:
            if phase != "comm":  # only shown once something measures it
                self.phase_s.labels(rank=self.rank, phase=phase)

    def log(self, record: Dict[str, Any], step: int) -> None:
        rank = self.rank
        self.images.labels(rank=rank).inc(float(record.get("images", 0)) / self.world_size)
        self.nonfinite.labels(rank=rank).inc(float(record.get("nonfinite_steps", 0)))
        self.gauges["step"].labels(rank=rank).set(step)
        for key, gauge in self.gauges.items():
            if key != "step" and key in record:
                gauge.labels(rank=rank).set(float(record[key]))
        for key, value in record.items():
            if key.startswith("loss_"):  # the trainer logs each method term as loss_<term>
                self.loss_term.labels(rank=rank, term=key[len("loss_"):]).set(float(value))
        if "online_linear_train_top1" in record:
            self.online_train.labels(rank=rank).set(float(record["online_linear_train_top1"]))
        for key, group in (("lr", "weights"), ("lr_biases", "biases")):
            if key in record:
                self.lr.labels(rank=rank, group=group).set(float(record[key]))
        for phase, values in (record.get("durations") or {}).items():
            hist = (self.step_s.labels(rank=rank) if phase == "step"
                    else self.phase_s.labels(rank=rank, phase=phase))
            for seconds in values:
                hist.observe(seconds)
            if phase == "data_wait":
                for seconds in values:
                    self.data_wait_s.labels(rank=rank).observe(seconds)
        if self.gpu_mem:
            self.gpu_mem["allocated"].labels(rank=rank).set(torch.cuda.memory_allocated())
            self.gpu_mem["reserved"].labels(rank=rank).set(torch.cuda.memory_reserved())
            self.gpu_mem["peak"].labels(rank=rank).set(torch.cuda.max_memory_allocated())

    def log_checkpoint(self, seconds: float, step: int) -> None:
        self.checkpoint_s.labels(rank=self.rank).observe(seconds)

    def log_eval(self, record: Dict[str, Any], step: int) -> None:
        rank = self.rank
        for key, value in record.items():
            if key.startswith("eval_knn_top1"):
                readout = key[len("eval_knn_top1_"):] or self.readout
                self.knn.labels(rank=rank, readout=readout).set(float(value))
            elif key.startswith("baseline_knn_top1_"):
                name = key[len("baseline_knn_top1_"):]  # random_init[_<readout>] | pixels
                baseline, _, readout = name.partition("_init")
                baseline = "random_init" if baseline == "random" else baseline
                readout = readout.lstrip("_") or (self.readout if baseline == "random_init" else "pixels")
                self.baseline.labels(rank=rank, readout=readout, baseline=baseline).set(float(value))
        if "eval_online_linear_top1" in record:
            self.online.labels(rank=rank, readout="layer4:1").set(float(record["eval_online_linear_top1"]))
        if "monitor_s" in record:
            self.monitor_s.labels(rank=rank).set(float(record["monitor_s"]))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def config_hash(cfg) -> str:
    """Short stable hash of the resolved config (what ``bt_info`` reports)."""
    from bt_fast.config import to_dict

    text = json.dumps(to_dict(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def open_sinks(cfg, run_dir: Path, *, rank: int, local_rank: int, world_size: int,
               total_steps: int) -> Sinks:
    """Console + JSONL on rank 0; Prometheus on every rank if ``metrics.prometheus``.

    Raises :class:`MetricsPortError` if the exporter port is taken.
    """
    from bt_fast.methods import METHODS

    sinks: List[Sink] = []
    if cfg.metrics.prometheus:
        sinks.append(PrometheusSink(
            port=cfg.metrics.port + local_rank, host=cfg.metrics.host, rank=rank,
            world_size=world_size, config_hash=config_hash(cfg),
            terms=tuple(METHODS[cfg.method.name].terms), readout=cfg.model.readout))
    if rank == 0:
        sinks.append(ConsoleSink(total_steps))
        sinks.append(JsonlSink(Path(run_dir) / "metrics.jsonl"))
    return Sinks(sinks)
