"""Prometheus sink: serves one rank's metrics over HTTP for Prometheus to scrape.

A sink like those in bt_fast/metrics.py (``log``, ``log_checkpoint``, ``log_eval``,
``close``), built by ``metrics.open_sinks`` when ``metrics.prometheus`` is on.

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

from typing import Any, Dict

import torch

from bt_fast.errors import MetricsPortError

PHASES = ("data_wait", "forward", "backward", "comm", "optimizer")
"""Known step phases, in step order; :meth:`StepTimer.mark` accepts any name."""

# Durations span 1 ms (a GPU step) to a minute (a CPU step on a big model).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CHECKPOINT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class PrometheusSink:
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
