"""The dashboards against a real Prometheus server (the Debian package ``prometheus``).

A server on a free loopback port scrapes two ranks' exporters (fake ones driven by
PrometheusSink here; the trainer with two ranks in the end-to-end test), then every
PromQL expression of the Grafana dashboard is evaluated through the HTTP API. Skips,
saying why, only when the prometheus binary is absent.
"""

import json
import math
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from bt_fast import dashboards

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="the prometheus server binary is not installed "
    "(Debian package prometheus; `make setup` installs it)")
SCRAPE_S = 1
RATE_WINDOW = "5s"  # stands in for Grafana's $__rate_interval (>= 4 scrapes)


def free_ports(n: int) -> int:
    """A base port with n consecutive free loopback ports after it."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            socks = [socket.socket() for _ in range(n)]
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


class Prometheus:
    """A throwaway Prometheus server scraping ``gpus`` local ranks from ``port``."""

    def __init__(self, tmp: Path, ranks: int, port: int):
        cfg = dashboards.scrape_config(1, ranks, port, host="127.0.0.1",
                                       interval=f"{SCRAPE_S}s", dcgm_host=None)
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.url = f"http://127.0.0.1:{free_ports(1)}"
        self.log = open(tmp / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address={self.url.split('//')[1]}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready(tmp)

    def _wait_ready(self, tmp: Path, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(tmp / 'prometheus.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("prometheus did not become ready")

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as r:
            return json.loads(r.read())

    def query_range(self, expr: str, start: float, end: float) -> dict:
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="1s")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def check_dashboard_queries(prom: Prometheus, start: float, end: float) -> dict:
    """Evaluate every dashboard expression over [start, end]; return expr -> series count."""
    dash = json.loads((ROOT / "docker/grafana/dashboards/bt_fast.json").read_text())
    found = {}
    for expr in dashboards.expressions(dash):
        promql = expr.replace("$__rate_interval", RATE_WINDOW)
        res = prom.query_range(promql, start, end)
        assert res["status"] == "success", (expr, res)
        found[expr] = len(res["data"]["result"])
    gpu_only = [e for e in found if any(p in e for p in dashboards.GPU_ONLY)]
    empty = [e for e, n in found.items() if n == 0 and e not in gpu_only]
    assert not empty, f"dashboard expressions without data: {empty}"
    return found


def wait_scraped(prom: Prometheus, ranks: int, timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        res = prom.api("query", query='count(up{job="bt_fast"} == 1)')["data"]["result"]
        if res and int(float(res[0]["value"][1])) == ranks:
            return
        time.sleep(0.5)
    raise AssertionError(f"prometheus never saw {ranks} ranks up: {prom.api('targets')}")


FAKE_RANK = textwrap.dedent("""
    import sys, time
    from bt_fast.metrics import PrometheusSink
    rank, port, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    sink = PrometheusSink(port=port, rank=rank, world_size=2, config_hash="fake")
    print("ready", flush=True)
    step, end = 0, time.time() + seconds
    while time.time() < end:
        step += 5
        d = {"data_wait": [0.01] * 5, "forward": [0.02] * 5, "backward": [0.04] * 5,
             "optimizer": [0.01] * 5, "step": [0.08] * 5}
        sink.log_eval({"eval_knn_top1": 50.0 + step / 10, "eval_online_linear_top1": 40.0,
                       "baseline_knn_top1_random_init": 30.0, "baseline_knn_top1_pixels": 35.0,
                       "monitor_s": 1.0}, step)
        sink.log({"loss": 100.0 / step, "loss_on_diag": 1.0, "loss_off_diag": 2.0,
                  "lr": 0.1, "lr_biases": 0.01, "images": 320.0, "epoch": step / 100,
                  "nonfinite_steps": 0.0, "durations": d, "online_linear_train_top1": 45.0}, step)
        if step % 20 == 0:
            sink.log_checkpoint(0.3, step)
        time.sleep(0.4)
    sink.close()
""")


def test_dashboard_file_is_generated_and_well_formed():
    committed = json.loads((ROOT / "docker/grafana/dashboards/bt_fast.json").read_text())
    assert committed == dashboards.dashboard(), "regenerate: python -m bt_fast.dashboards"
    assert committed["uid"] == dashboards.DASHBOARD_UID
    assert [v["name"] for v in committed["templating"]["list"]] == ["datasource"]
    for panel in committed["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    titles = " ".join(p["title"] for p in committed["panels"]).lower()
    for needed in ("images/s", "data-wait share", "breakdown", "loss", "learning rate",
                   "gpu memory", "dcgm", "representation quality"):
        assert needed in titles
    ds = yaml.safe_load((ROOT / "docker/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["uid"] == dashboards.DATASOURCE_UID


def test_scrape_config_covers_nodes_times_ranks(tmp_path):
    cfg = dashboards.scrape_config(3, 4, 9400)
    (job, dcgm) = cfg["scrape_configs"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert len(targets) == 12 and "node2:9403" in targets and len(set(targets)) == 12
    assert [sc["labels"]["node"] for sc in dcgm["static_configs"]] == ["0", "1", "2"]
    promtool = shutil.which("promtool")
    if promtool:
        (tmp_path / "p.yml").write_text(yaml.safe_dump(cfg))
        subprocess.run([promtool, "check", "config", str(tmp_path / "p.yml")], check=True,
                       capture_output=True)
    with pytest.raises(ValueError):
        dashboards.scrape_config(0, 1, 9400)


@needs_prometheus
@pytest.mark.slow
def test_dashboard_queries_return_data_from_fake_ranks(tmp_path):
    port = free_ports(2)
    prom = Prometheus(tmp_path, ranks=2, port=port)
    procs = []
    try:
        start = time.time()
        for rank in range(2):
            procs.append(subprocess.Popen([sys.executable, "-c", FAKE_RANK, str(rank),
                                           str(port + rank), "12"], stdout=subprocess.PIPE))
        for p in procs:
            assert p.stdout.readline().strip() == b"ready"
        wait_scraped(prom, ranks=2)
        for p in procs:
            p.wait(timeout=60)
        found = check_dashboard_queries(prom, start, time.time())
        assert found["sum by (rank) (rate(bt_train_images_total[$__rate_interval]))"] == 2
        images = prom.query_range(f"sum(rate(bt_train_images_total[{RATE_WINDOW}]))",
                                  start, time.time())["data"]["result"][0]["values"]
        peak = max(float(v) for _, v in images)
        assert 400 < peak < 1200, peak  # 2 ranks x 160 images / ~0.4 s
    finally:
        for p in procs:
            p.kill()
        prom.close()


@needs_prometheus
@pytest.mark.slow
def test_dashboard_queries_return_data_from_a_two_rank_training_run(tmp_path):
    """A real run: torchrun, 2 gloo ranks, smoke config, exporter on every rank."""
    from bt_fast import data

    root = data.make_synthetic(tmp_path / "data")
    port, master = free_ports(2), free_ports(1)
    prom = Prometheus(tmp_path, ranks=2, port=port)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(master), "-m", "bt_fast", "train",
           "--config", str(ROOT / "configs/smoke.yaml"),
           "--set", f"data.train_dir={root / 'train'}", "--set", f"data.val_dir={root / 'val'}",
           "--set", f"train.run_dir={tmp_path / 'run'}", "--set", "train.max_steps=60",
           "--set", "train.log_every=2", "--set", "train.checkpoint_every=20",
           "--set", "optim.epochs=100", "--set", "eval.every=30",
           "--set", "metrics.prometheus=true", "--set", f"metrics.port={port}"]
    try:
        start = time.time()
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        end = time.time()
        assert res.returncode == 0, res.stderr[-3000:]
        found = check_dashboard_queries(prom, start, end)
        assert found["sum by (rank) (rate(bt_train_images_total[$__rate_interval]))"] == 2
        info = prom.query_range("bt_info", start, end)["data"]["result"]
        assert sorted(s["metric"]["rank"] for s in info) == ["0", "1"]
        assert {s["metric"]["world_size"] for s in info} == {"2"}
        share = prom.query_range(dashboards.DATA_WAIT_SHARE.replace("$__rate_interval", RATE_WINDOW),
                                 start, end)["data"]["result"][0]["values"]
        # A window in which no step ended (the kNN monitor pausing the loop for longer than
        # this test's 5 s window) is 0/0: a gap in Grafana, not a wrong share.
        values = [float(v) for _, v in share]
        assert all(0 <= v <= 1 for v in values if not math.isnan(v)) and any(not math.isnan(v) for v in values)
        phases = prom.query_range("count by (phase) (bt_train_phase_duration_seconds_count)",
                                  start, end)["data"]["result"]
        assert {s["metric"]["phase"] for s in phases} >= {"data_wait", "forward", "backward",
                                                          "optimizer"}
    finally:
        prom.close()
