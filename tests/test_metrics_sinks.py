"""StepTimer, the sink interface, console/JSONL sinks and the Prometheus exporter.

Metric names and types are checked against issue 6's list through prometheus_client's
own parser of what the exporter serves over HTTP.
"""

import io
import json
import contextlib
import socket
import time
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from bt_fast import errors, metrics
from bt_fast.config import Config

# name as exposed (families drop _total for counters) -> type
EXPECTED = {
    "bt_train_images": "counter",
    "bt_train_step_duration_seconds": "histogram",
    "bt_data_wait_seconds": "histogram",
    "bt_train_phase_duration_seconds": "histogram",
    "bt_train_loss": "gauge",
    "bt_train_loss_on_diag": "gauge",
    "bt_train_loss_off_diag": "gauge",
    "bt_train_loss_term": "gauge",
    "bt_train_lr": "gauge",
    "bt_nonfinite_steps": "counter",
    "bt_checkpoint_duration_seconds": "histogram",
    "bt": "info",
}


def _durations(n=3):
    return {"data_wait": [0.01] * n, "forward": [0.02] * n, "backward": [0.03] * n,
            "optimizer": [0.04] * n, "step": [0.1] * n}


def _record(**kw):
    rec = dict(loss=12.5, loss_on_diag=2.5, loss_off_diag=10.0, lr=0.2, lr_biases=0.0048,
               images=96.0, images_per_s=480.0, epoch=0.25, nonfinite_steps=1.0,
               durations=_durations())
    rec.update(kw)
    return rec


def test_step_timer_attributes_time_since_previous_mark():
    timer = metrics.StepTimer(torch.device("cpu"))
    for _ in range(2):
        timer.start()
        time.sleep(0.02)
        timer.mark("data_wait")
        time.sleep(0.01)
        timer.mark("forward")
        timer.mark("backward")
        timer.mark("optimizer")
    d = timer.collect()
    assert set(d) == {"data_wait", "forward", "backward", "optimizer", "step"}
    assert all(len(v) == 2 for v in d.values())
    assert all(0.015 < s < 0.2 for s in d["data_wait"])
    assert all(0.005 < s < 0.2 for s in d["forward"])
    for i in range(2):
        parts = sum(d[p][i] for p in ("data_wait", "forward", "backward", "optimizer"))
        assert d["step"][i] == pytest.approx(parts)
    assert timer.collect() == {}  # collect clears


def test_step_timer_aligns_phases_missing_in_some_steps():
    timer = metrics.StepTimer("cpu")
    timer.start(); timer.mark("data_wait"); timer.mark("forward")
    timer.start(); timer.mark("data_wait"); timer.mark("comm"); timer.mark("forward")
    d = timer.collect()
    assert d["comm"][0] == 0.0 and len(d["comm"]) == len(d["forward"]) == 2
    with pytest.raises(RuntimeError):
        metrics.StepTimer("cpu").mark("forward")


def test_jsonl_stores_phase_means_and_floats(tmp_path):
    sink = metrics.JsonlSink(tmp_path / "metrics.jsonl")
    sink.log(_record(), 10)
    sink.log_checkpoint(1.5, 10)
    sink.close()
    first, second = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert first["step"] == 10 and first["loss"] == 12.5 and first["images_per_s"] == 480.0
    assert first["time_forward_s"] == pytest.approx(0.02)
    assert first["time_step_s"] == pytest.approx(0.1)
    assert first["data_wait_share"] == pytest.approx(0.1)
    assert "durations" not in first
    assert second == {"step": 10, "time": second["time"], "checkpoint_duration_s": 1.5}


def test_console_line_has_progress_fields():
    out = io.StringIO()
    sink = metrics.ConsoleSink(total_steps=100, stream=out)
    sink.log(_record(), 10)
    sink.log(_record(), 20)
    lines = out.getvalue().splitlines()
    assert lines[1].startswith("step 20/100")
    for part in ("loss 12.5", "lr 0.2", "480.0 img/s", "data wait 10%", "ETA"):
        assert part in lines[1]


def test_a_new_sink_is_one_class(tmp_path):
    class Collect(metrics.Sink):
        def __init__(self):
            self.seen = []

        def log(self, record, step):
            self.seen.append(step)

    mine = Collect()
    fan = metrics.Sinks([mine, metrics.JsonlSink(tmp_path / "m.jsonl")])
    fan.log(_record(), 3)
    fan.log_checkpoint(0.1, 3)
    fan.close()
    assert mine.seen == [3]


def test_open_sinks_by_rank(tmp_path):
    cfg = Config()
    rank0 = metrics.open_sinks(cfg, tmp_path, rank=0, local_rank=0, world_size=2, total_steps=5)
    rank1 = metrics.open_sinks(cfg, tmp_path, rank=1, local_rank=1, world_size=2, total_steps=5)
    assert [type(s).__name__ for s in rank0.sinks] == ["ConsoleSink", "JsonlSink"]
    assert rank1.sinks == []  # Prometheus is off by default
    rank0.close(); rank1.close()


def _scrape(sink):
    host, port = sink.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
        return list(text_string_to_metric_families(r.read().decode()))


def test_prometheus_names_types_and_labels():
    sink = metrics.PrometheusSink(port=0, rank=1, world_size=2, config_hash="abc")
    try:
        sink.log(_record(), 10)
        sink.log_checkpoint(2.0, 10)
        families = {f.name: f for f in _scrape(sink) if f.name.startswith("bt")}
        types = {f.name: f.type for f in sink.registry.collect()}  # true types (info!)
    finally:
        sink.close()
    assert {n: types.get(n) for n in EXPECTED} == EXPECTED
    assert "bt_info" in families  # the text format shows the info as a gauge named bt_info
    for fam in families.values():
        for s in fam.samples:
            assert s.labels["rank"] == "1", s  # every bt_ series carries the rank
            assert set(s.labels) <= {"rank", "phase", "group", "le", "version",
                                     "config_hash", "world_size", "term"}, s
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for f in families.values() for s in f.samples}
    assert value[("bt_train_images_total", (("rank", "1"),))] == 48.0  # 96 global / 2 ranks
    assert value[("bt_nonfinite_steps_total", (("rank", "1"),))] == 1.0
    assert value[("bt_train_lr", (("group", "biases"), ("rank", "1")))] == 0.0048
    assert value[("bt_train_loss_on_diag", (("rank", "1"),))] == 2.5  # Barlow Twins' names stay
    assert value[("bt_train_loss_term", (("rank", "1"), ("term", "off_diag")))] == 10.0
    assert value[("bt_train_step_duration_seconds_count", (("rank", "1"),))] == 3
    assert value[("bt_data_wait_seconds_sum", (("rank", "1"),))] == pytest.approx(0.03)
    assert value[("bt_train_phase_duration_seconds_sum", (("phase", "backward"), ("rank", "1")))] \
        == pytest.approx(0.09)
    info = families["bt_info"].samples[0].labels
    assert info["world_size"] == "2" and info["config_hash"] == "abc" and info["version"]


def test_exporter_refuses_a_port_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(errors.MetricsPortError) as err:
            metrics.PrometheusSink(port=port, host="127.0.0.1")
    msg = str(err.value)
    assert f"127.0.0.1:{port}" in msg and "metrics.port" in msg


@contextlib.contextmanager
def prometheus_sink(cfg, tmp_path, *, rank: int, local_rank: int, world_size: int):
    """open_sinks' one Prometheus sink (skips if another process took the port first)."""
    try:
        logger = metrics.open_sinks(cfg, tmp_path, rank=rank, local_rank=local_rank,
                                    world_size=world_size, total_steps=1)
    except metrics.MetricsPortError:
        pytest.skip("raced for a free port")
    try:
        (prom,) = logger.sinks
        yield prom
    finally:
        logger.close()


def test_open_sinks_serves_on_port_plus_local_rank(tmp_path, free_port):
    cfg = Config()
    cfg.metrics.prometheus, cfg.metrics.port = True, free_port - 1
    with prometheus_sink(cfg, tmp_path, rank=3, local_rank=1, world_size=4) as prom:
        assert prom.address == ("127.0.0.1", free_port)


def _samples(sink) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in _scrape(sink) if f.name.startswith("bt_train_loss") for s in f.samples}


def test_prometheus_shows_the_methods_terms_and_only_those():
    """A VICReg run: its three terms from the first scrape on, no Barlow Twins series."""
    sink = metrics.PrometheusSink(port=0, rank=0, terms=("invariance", "variance", "covariance"))
    try:
        before = _samples(sink)
        record = {k: v for k, v in _record().items() if k not in ("loss_on_diag", "loss_off_diag")}
        sink.log(record | {"loss_invariance": 0.5, "loss_variance": 0.25, "loss_covariance": 2.0}, 10)
        after = _samples(sink)
    finally:
        sink.close()
    terms = {("bt_train_loss_term", (("rank", "0"), ("term", t))) for t in ("invariance", "variance", "covariance")}
    assert terms <= set(before) and all(before[k] == 0 for k in terms)
    assert not [k for k in after if k[0] in ("bt_train_loss_on_diag", "bt_train_loss_off_diag")]
    assert after[("bt_train_loss_term", (("rank", "0"), ("term", "covariance")))] == 2.0
    assert after[("bt_train_loss", (("rank", "0"),))] == 12.5


def test_open_sinks_takes_the_terms_from_the_method(tmp_path, free_port):
    cfg = Config()
    cfg.method.name = "vicreg"
    cfg.metrics.prometheus, cfg.metrics.port = True, free_port
    with prometheus_sink(cfg, tmp_path, rank=1, local_rank=0, world_size=2) as prom:
        assert prom.terms == ("invariance", "variance", "covariance")
