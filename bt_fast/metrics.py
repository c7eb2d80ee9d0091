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

Prometheus: :class:`bt_fast.prometheus_sink.PrometheusSink` (its module lists the names).
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
from bt_fast.prometheus_sink import PrometheusSink  # noqa: F401 - open_sinks builds it; tests reach it here

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
