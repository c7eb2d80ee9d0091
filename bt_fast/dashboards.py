"""Prometheus scrape config and the Grafana dashboard, generated from one place.

``scrape_config(nodes, gpus, port)`` lists one target per rank: rank ``local_rank`` of
node ``n`` serves on ``<host of n>:<port + local_rank>`` (see bt_fast.metrics). The
compose generator (bt_fast.launch) calls it and writes ``prometheus.yml`` beside the
generated compose file (``build/docker/`` by default); ``main()`` below writes the
committed single-node example ``docker/prometheus.yml``. ``dashboard()`` is the
Grafana dashboard committed as ``docker/grafana/dashboards/bt_fast.json``; a test
checks that the file matches and runs every PromQL expression in it against a real
Prometheus server. Regenerate both with::

    python -m bt_fast.dashboards --nodes 1 --gpus 8 --port 9400
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from bt_fast import safeio

JOB = "bt_fast"
DASHBOARD_UID = "bt-fast-training"
DATASOURCE_UID = "bt-prometheus"  # the provisioned datasource (docker/grafana/provisioning)
DCGM_PORT = 9400  # NVIDIA dcgm-exporter's default; it runs as its own service per node
GPU_ONLY = ("bt_gpu_memory_", "DCGM_")
"""Metric prefixes that only exist on GPU machines (their panels are empty on CPU)."""


def scrape_config(nodes: int, gpus: int, port: int, *, host: str = "node{node}",
                  interval: str = "5s", dcgm_host: str | None = "dcgm{node}") -> dict:
    """Prometheus config scraping ``nodes`` x ``gpus`` ranks (and DCGM per node).

    ``host`` and ``dcgm_host`` are format strings of ``node`` (0-based): the names the
    compose file gives each node's trainer and dcgm-exporter services. ``dcgm_host=None``
    leaves DCGM out; an absent exporter just shows as a down target.
    """
    if nodes < 1 or gpus < 1:
        raise ValueError(f"need at least one node and one rank per node, got {nodes}x{gpus}")
    trainers = [{"targets": [f"{host.format(node=n)}:{port + g}" for g in range(gpus)],
                 "labels": {"node": str(n)}} for n in range(nodes)]
    jobs = [{"job_name": JOB, "static_configs": trainers}]
    if dcgm_host:
        jobs.append({"job_name": "dcgm", "static_configs": [
            {"targets": [f"{dcgm_host.format(node=n)}:{DCGM_PORT}"], "labels": {"node": str(n)}}
            for n in range(nodes)]})
    return {"global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": jobs}


# ---------------------------------------------------------------- Grafana

R = "[$__rate_interval]"
DATA_WAIT_SHARE = (f"sum(rate(bt_data_wait_seconds_sum{R})) / "
                   f"sum(rate(bt_train_step_duration_seconds_sum{R}))")
DATA_WAIT_SHARE_BY_RANK = (f"sum by (rank) (rate(bt_data_wait_seconds_sum{R})) / "
                           f"sum by (rank) (rate(bt_train_step_duration_seconds_sum{R}))")


def _panel(title, targets, *, unit="short", kind="timeseries", desc="", stack=False,
           w=12, h=8, max_=None):
    """One panel; ``targets`` is a list of (PromQL, legend)."""
    defaults = {"unit": unit}
    if max_ is not None:
        defaults.update(min=0, max=max_)
    if kind == "timeseries":
        defaults["custom"] = {"fillOpacity": 60 if stack else 10,
                              "stacking": {"mode": "normal" if stack else "none"}}
    return {"type": kind, "title": title, "description": desc,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"w": w, "h": h},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
                         "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                        for i, (expr, legend) in enumerate(targets)]}


def panels() -> list[dict]:
    phase_mean = (f"avg by (phase) (rate(bt_train_phase_duration_seconds_sum{R}) / "
                  f"rate(bt_train_phase_duration_seconds_count{R}))")
    step_q = "histogram_quantile({q}, sum by (le) (rate(bt_train_step_duration_seconds_bucket%s)))" % R
    return [
        _panel("Images/s (all ranks)", [(f"sum(rate(bt_train_images_total{R}))", "total")],
               unit="short", kind="stat", w=6, desc="Training throughput of the whole job."),
        _panel("Data-wait share", [(DATA_WAIT_SHARE, "all ranks")], unit="percentunit",
               kind="stat", w=6, max_=1,
               desc="Fraction of step time spent waiting for the next batch. Near 0: "
                    "compute-bound. Growing: the input pipeline starves the GPU."),
        _panel("Step time p50 / p95", [(step_q.format(q=0.5), "p50"), (step_q.format(q=0.95), "p95")],
               unit="s", kind="stat", w=6),
        _panel("Run", [("bt_info", "{{rank}}")], kind="table", w=6,
               desc="Version, config hash and world size per rank."),
        _panel("Images/s", [(f"sum(rate(bt_train_images_total{R}))", "total"),
                            (f"sum by (rank) (rate(bt_train_images_total{R}))", "rank {{rank}}")]),
        _panel("Data-wait share per rank", [(DATA_WAIT_SHARE_BY_RANK, "rank {{rank}}")],
               unit="percentunit", max_=1,
               desc="One slow rank holds back all others at the next all-reduce."),
        _panel("Step-time breakdown (mean per step)", [(phase_mean, "{{phase}}")], unit="s",
               stack=True, desc="data_wait, forward, backward, comm (when timed), optimizer; "
                                "the stack height is the mean step time."),
        _panel("Step time quantiles", [(step_q.format(q=q), f"p{int(q * 100)}")
                                       for q in (0.5, 0.9, 0.99)], unit="s"),
        _panel("Loss terms", [("avg(bt_train_loss)", "loss"),
                              ("avg by (term) (bt_train_loss_term)", "{{term}}")],
               desc="The loss and whatever named terms the run's method has (Barlow Twins: "
                    "on_diag, off_diag; VICReg: invariance, variance, covariance; SimCLR and "
                    "BYOL: the loss alone)."),
        _panel("Learning rate", [("avg by (group) (bt_train_lr)", "{{group}}")]),
        representation_quality(),
        _panel("GPU memory", [("max by (rank) (bt_gpu_memory_allocated_bytes)", "allocated {{rank}}"),
                              ("max by (rank) (bt_gpu_memory_reserved_bytes)", "reserved {{rank}}"),
                              ("max by (rank) (bt_gpu_memory_peak_bytes)", "peak {{rank}}")],
               unit="bytes", desc="torch's CUDA allocator; empty on CPU-only runs."),
        _panel("GPU utilisation (DCGM)", [("avg by (node, gpu) (DCGM_FI_DEV_GPU_UTIL)",
                                           "node {{node}} gpu {{gpu}}")], unit="percent",
               desc="From NVIDIA's dcgm-exporter when it runs; empty otherwise."),
        _panel("Process memory (RSS)", [(f'process_resident_memory_bytes{{job="{JOB}"}}',
                                         "{{instance}}")], unit="bytes"),
        _panel("Non-finite steps and checkpoint time",
               [("sum(bt_nonfinite_steps_total)", "non-finite steps"),
                ("max(bt_checkpoint_duration_seconds_sum / bt_checkpoint_duration_seconds_count)",
                 "mean checkpoint s")]),
    ]


def representation_quality() -> dict:
    """The monitor's curve (bt_fast/monitor.py) over its two cached reference lines."""
    panel = _panel(
        "Representation quality",
        [("max by (readout) (bt_eval_knn_top1)", "kNN top-1 {{readout}}"),
         ("max by (readout) (bt_eval_online_linear_top1)", "online linear {{readout}}"),
         ("max by (readout) (bt_eval_online_linear_train_top1)", "online linear, train batches"),
         ("max by (readout, baseline) (bt_eval_knn_baseline_top1)", "{{baseline}} {{readout}}")],
        unit="percent", w=24,
        desc="kNN (k=20, T=0.07) of a fixed val subset against a fixed train bank, every "
             "eval.every steps; the online linear probe on the same query. Dashed: the same "
             "kNN at random init and on the raw pixels (computed once per data set, cached). "
             "A curve under the dashed lines has learned nothing the pixels did not know.")
    panel["fieldConfig"]["defaults"]["custom"]["showPoints"] = "always"
    panel["fieldConfig"]["overrides"] = [{
        "matcher": {"id": "byRegexp", "options": "^(random_init|pixels) .*"},
        "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                       {"id": "custom.showPoints", "value": "never"}]}]
    return panel


def _layout(items: list[dict]) -> list[dict]:
    x = y = row_h = 0
    for i, p in enumerate(items, start=1):
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if x + w > 24:
            x, y, row_h = 0, y + row_h, 0
        p["id"] = i
        p["gridPos"].update(x=x, y=y)
        x, row_h = x + w, max(row_h, h)
    return items


def dashboard() -> dict:
    """The Grafana dashboard (fixed uid, ``$datasource`` variable)."""
    return {
        "uid": DASHBOARD_UID, "title": "bt_fast training", "tags": ["bt_fast"],
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "label": "Data source",
                                 "type": "datasource", "query": "prometheus",
                                 "current": {}, "hide": 0, "refresh": 1}]},
        "panels": _layout(panels()),
    }


def expressions(dash: dict) -> list[str]:
    """Every PromQL expression in a dashboard JSON (what the Prometheus test runs)."""
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", []) if t.get("expr")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bt_fast.dashboards", description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus", type=int, default=1, help="ranks per node")
    p.add_argument("--port", type=int, default=9400, help="metrics.port")
    p.add_argument("--docker-dir", type=Path, default=Path("docker"))
    a = p.parse_args(argv)
    header = (f"# Generated by `python -m bt_fast.dashboards --nodes {a.nodes} --gpus {a.gpus} "
              f"--port {a.port}`; do not edit.\n")
    safeio.write_atomic(a.docker_dir / "prometheus.yml",
                        header + yaml.safe_dump(scrape_config(a.nodes, a.gpus, a.port), sort_keys=False))
    safeio.write_atomic(a.docker_dir / "grafana" / "dashboards" / "bt_fast.json",
                        json.dumps(dashboard(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
