"""The online probe and the kNN monitor (bt_fast/probe.py, bt_fast/monitor.py).

Pinned here: the probe leaves the SSL step bit-identical; it is checkpointed and resumes
exactly; the monitor's kNN equals ``bt-fast eval knn --bank N --query M`` on the same
checkpoint; two ranks give the numbers of one process; bad input (no labels, sizes
larger than the data, an error inside the monitor) costs the monitor, never the run;
``train.stop_at`` ends the run cleanly.
"""

import json
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bt_fast import checkpoint, config, methods, metrics, specs
from bt_fast.bench.step import contender
from bt_fast.cli import main
from bt_fast.probe import OnlineProbe
from conftest import CONFIGS


@pytest.fixture(autouse=True)
def _baseline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # never the user's cache


def smoke(dataset, run_dir, *extra):
    sets = [f"data.train_dir={dataset / 'train'}", f"data.val_dir={dataset / 'val'}",
            f"train.run_dir={run_dir}", *extra]
    return ["train", "--config", str(CONFIGS / "smoke.yaml")] + [a for s in sets for a in ("--set", s)]


def jsonl(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def evals(run_dir) -> list[dict]:
    return [r for r in jsonl(run_dir) if "eval_knn_top1" in r]


# ------------------------------------------------------------------ the probe


def test_probe_leaves_the_ssl_step_bit_identical():
    """Same init, same views: weights and gradients of the SSL step are equal bit for
    bit with the probe on (its hook, its backward, its SGD step) and off."""
    cfg = config.load(CONFIGS / "smoke.yaml", [])
    cpu = torch.device("cpu")
    plain, views = contender(cfg, 8, cpu)
    probed, _ = contender(cfg, 8, cpu)
    probe = OnlineProbe(probed.model, 4, lr=0.5, device=cpu)
    probe.attach()
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    timer = metrics.StepTimer(cpu)
    w0 = probe.linear.weight.detach().clone()
    for _ in range(3):
        for run in (plain, probed):
            timer.start()
            from bt_fast.train import train_step
            train_step(run, views, timer)
        probe.step(labels)
        for (name, a), b in zip(plain.model.named_parameters(), probed.model.parameters()):
            assert torch.equal(a, b), name
            assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad)), name
    assert not torch.equal(w0, probe.linear.weight)  # the probe did learn something
    assert probe.train_top1() is not None


def test_probe_ignores_labels_it_cannot_score():
    cfg = config.load(CONFIGS / "smoke.yaml", [])
    run, views = contender(cfg, 4, torch.device("cpu"))
    probe = OnlineProbe(run.model, 3, lr=0.1, device=torch.device("cpu"))
    probe.attach()
    run.model(views)
    probe.step(torch.tensor([0, 7, -1, 2]))  # two labels outside [0, 3)
    assert torch.isfinite(probe.linear.weight).all()
    assert probe.counts[1].item() == 4  # 2 valid labels x 2 views
    run.model(views)
    probe.step(torch.tensor([9, 9, 9, 9]))  # none valid: no NaN either
    assert torch.isfinite(probe.linear.weight).all()


@pytest.mark.parametrize("sizes", [(32, 32, 16, 16, 16), (32, 32, 32, 32)], ids=["2x32+3x16", "4x32"])
@pytest.mark.parametrize("name", ["swav", "dino"])
def test_probe_of_a_multicrop_method_trains_on_the_global_crops_only(name, sizes):
    """Its input rows are the n_global x B global crops' features, in view order, also
    when local crops share the global size (one backbone pass for all of them)."""
    cfg = config.load(CONFIGS / "smoke.yaml", [f"method.name={name}"])
    torch.manual_seed(0)
    model = methods.build(cfg)  # training mode, as in a step
    probe = OnlineProbe(model, 3, lr=0.1, device=torch.device("cpu"))
    probe.attach()
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(4, 3, s, s, generator=g) for s in sizes]
    rows = []
    probe.linear.register_forward_hook(lambda m, args, out: rows.append(args[0].detach()))
    model(views)
    probe.step(torch.tensor([0, 1, 2, 0]))
    (x,) = rows
    with torch.no_grad():
        want = model.encode(views)[: 2 * 4]  # train-mode BN: the same batches give the same features
    assert x.shape == (2 * 4, model.feature_dim)
    torch.testing.assert_close(x, want)
    assert probe.counts[1].item() == 2 * 4


@pytest.mark.slow
def test_probe_is_checkpointed_and_resumes_exactly(tiny_imagefolder, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(smoke(tiny_imagefolder, a, "train.max_steps=4")) == 0
    assert main(smoke(tiny_imagefolder, b, "train.max_steps=2")) == 0
    assert main(smoke(tiny_imagefolder, b, "train.max_steps=4")) == 0
    pa = checkpoint.load(a / "checkpoints" / "last.pt")["online_probe"]
    pb = checkpoint.load(b / "checkpoints" / "last.pt")["online_probe"]
    for key, value in pa["linear"].items():
        assert torch.equal(value, pb["linear"][key]), key
    mom_a = [s["momentum_buffer"] for s in pa["optimizer"]["state"].values()]
    mom_b = [s["momentum_buffer"] for s in pb["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(mom_a, mom_b)) and len(mom_a) == 2
    logged = [r for r in jsonl(a) if "loss" in r]
    assert all("online_linear_train_top1" in r for r in logged)


# ------------------------------------------------------------------ the monitor = eval


@pytest.mark.slow
@pytest.mark.parametrize("readout", ["layer4:1", "layer2:2"])
def test_monitor_equals_offline_eval_knn(tiny_imagefolder, tmp_path, capsys, readout):
    run = tmp_path / "run"
    assert main(smoke(tiny_imagefolder, run, "eval.every=5", "eval.bank=40", "eval.query=11",
                      f"model.readout={readout}")) == 0
    (rec,) = evals(run)
    assert rec["step"] == 5 and rec["images_seen"] == 5 * 16
    capsys.readouterr()
    ckpt = str(run / "checkpoints" / "last.pt")
    for key, spec in (("eval_knn_top1", readout), ("eval_knn_top1_layer4:1", "layer4:1")):
        if key not in rec:
            assert readout == "layer4:1"
            continue
        assert main(["eval", "knn", "--checkpoint", ckpt, "--bank", "40", "--query", "11", "--json",
                     "--workers", "0", "--no-cache", "--readout", spec]) == 0
        offline = json.loads(capsys.readouterr().out)
        assert offline["n_train"] == 40 and offline["n_val"] == 11
        assert abs(offline["top1"] - rec[key]) <= 0.01, (key, offline["top1"], rec[key])


def _two_rank_worker(rank, world, port, train, val, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _measure_once(train, val, out)


def _measure_once(train, val, out):
    from bt_fast import dist, methods
    from bt_fast.monitor import Monitor

    env = dist.init(want_cuda=False)
    cfg = config.load(CONFIGS / "smoke.yaml", [f"data.train_dir={train}", f"data.val_dir={val}",
                                               "eval.bank=37", "eval.query=13", "model.readout=layer3:2"])
    torch.manual_seed(3)
    model = methods.build(cfg)
    mon = Monitor(cfg, env, model)
    record = mon._measure(step=7, global_batch=16)
    if env.is_main:
        with open(out, "w") as f:
            json.dump(record, f)
    dist.close()


@pytest.mark.slow
def test_two_ranks_give_the_numbers_of_one_process(tiny_imagefolder, tmp_path, monkeypatch):
    from bt_fast.procs import run_workers

    train, val = str(tiny_imagefolder / "train"), str(tiny_imagefolder / "val")
    monkeypatch.setenv("PYTHONPATH", os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    run_workers("test_monitor:_two_rank_worker", 2, train, val, str(tmp_path / "two.json"), timeout=600)
    _measure_once(train, val, str(tmp_path / "one.json"))
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert set(one) == set(two) and {"eval_knn_top1", "eval_knn_top1_layer4:1",
                                     "eval_online_linear_top1", "baseline_knn_top1_pixels"} <= set(one)
    for key in one:
        assert abs(one[key] - two[key]) <= 0.01, (key, one[key], two[key])


# ------------------------------------------------------------------ bad input


@pytest.mark.slow
def test_an_error_inside_the_monitor_switches_it_off_and_training_goes_on(
        tiny_imagefolder, tmp_path, monkeypatch, capsys):
    from bt_fast.eval import bank

    real, calls = bank.featurize, []

    def flaky(*args, **kwargs):
        calls.append(1)
        # the first monitor works (bank + query for the live net, the random init and the
        # pixels: 6 calls); the second one fails
        if len(calls) > 6:
            raise RuntimeError("disk went away\nsecond line")
        return real(*args, **kwargs)

    monkeypatch.setattr(bank, "featurize", flaky)
    run = tmp_path / "run"
    assert main(smoke(tiny_imagefolder, run, "eval.every=2", "train.max_steps=6")) == 0
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if "kNN monitor failed" in line]
    assert len(failed) == 1 and "disk went away" in failed[0] and "second line" not in err
    assert [r["step"] for r in evals(run)] == [2]
    assert checkpoint.load(run / "checkpoints" / "last.pt")["step"] == 6


@pytest.mark.slow
def test_unlabelled_data_switches_probe_and_monitor_off(tmp_path, capsys):
    from bt_fast.data import make_synthetic

    make_synthetic(tmp_path / "d", classes=1, train_per_class=32, val_per_class=4, size=(40, 40), seed=0)
    run = tmp_path / "run"
    assert main(smoke(tmp_path / "d", run, "train.max_steps=2")) == 0
    err = capsys.readouterr().err
    assert sum("no labels to learn from" in line for line in err.splitlines()) == 1
    assert evals(run) == [] and "online_probe" not in checkpoint.load(run / "checkpoints" / "last.pt")


@pytest.mark.slow
def test_sizes_larger_than_the_data_are_clamped_and_said_once(tiny_imagefolder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(smoke(tiny_imagefolder, run, "eval.every=2", "train.max_steps=4", "eval.bank=100000",
                      "eval.query=7")) == 0
    err = capsys.readouterr().err
    assert sum("eval.bank=100000: more than the 64 images" in line for line in err.splitlines()) == 1
    assert [r["step"] for r in evals(run)] == [2, 4]


@pytest.mark.slow
def test_stop_at_ends_the_run_cleanly_at_the_target(tiny_imagefolder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(smoke(tiny_imagefolder, run, "eval.every=2", "train.max_steps=8",
                      "train.stop_at=knn=0.0")) == 0
    err = capsys.readouterr().err
    assert checkpoint.load(run / "checkpoints" / "last.pt")["step"] == 2
    assert "reached kNN 0 (" in err and "at 0m" in err and ", 32 images" in err
    assert "monitor " in err and "% of the loop" in err
    assert "stopped by signal" not in err


@pytest.mark.parametrize("value, message", [
    ("knn", "expected knn=TOP1 or linear=TOP1"), ("acc=3", "expected knn=TOP1"),
    ("knn=high", "expected knn=TOP1"), ("knn=101", "in [0, 100]"), ("linear=-3", "in [0, 100]"),
    ("knn=nan", "in [0, 100]"), ("knn=inf", "in [0, 100]")])
def test_bad_stop_at_is_one_line_and_exit_2(tiny_imagefolder, tmp_path, capsys, value, message):
    assert main(smoke(tiny_imagefolder, tmp_path, f"train.stop_at={value}")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "train.stop_at" in err


@given(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["knn", "linear"]))
def test_stop_at_accepts_exactly_the_reachable_top1_targets(value, metric):
    """Any float: a target in [0, 100] parses to itself, anything else (NaN, inf, out of
    range) is refused with the reason, never accepted to be waited for forever."""
    spec = f"{metric}={value!r}"
    if 0.0 <= value <= 100.0:
        assert specs.parse_stop_at(spec) == (metric, value)
    else:
        with pytest.raises(ValueError, match=r"in \[0, 100\]"):
            specs.parse_stop_at(spec)


def test_stop_at_without_the_monitor_is_refused(tiny_imagefolder, tmp_path, capsys):
    assert main(smoke(tiny_imagefolder, tmp_path, "train.stop_at=knn=50", "eval.every=0")) == 2
    assert "needs the monitor: set eval.every > 0" in capsys.readouterr().err


# ------------------------------------------------------------------ bench tta


def test_tta_verdict_reports_null_for_a_side_that_never_got_there():
    from bt_fast.bench.tta import verdict

    fast = [{"step": 10, "images": 1280, "seconds": 5.0, "cpu_seconds": 9.0, "knn_top1": 80.0},
            {"step": 20, "images": 2560, "seconds": 10.0, "cpu_seconds": 19.0, "knn_top1": 85.5}]
    slow = [{"step": 10, "images": 1280, "seconds": 30.0, "cpu_seconds": 50.0, "knn_top1": 84.0},
            {"step": 20, "images": 2560, "seconds": 60.0, "cpu_seconds": 95.0, "knn_top1": 86.0}]
    v = verdict({"contender": fast, "baseline": slow}, 85.0)
    assert (v["contender_seconds"], v["baseline_seconds"], v["ratio"]) == (10.0, 60.0, 6.0)
    assert v["cpu_ratio"] == 5.0 and v["contender_images"] == v["baseline_images"] == 2560
    v = verdict({"contender": fast, "baseline": slow}, 85.9)
    assert v["contender_seconds"] is None and v["baseline_seconds"] == 60.0 and v["ratio"] is None


@pytest.mark.slow
def test_bench_tta_json_races_both_sides_to_the_target(tiny_imagefolder, tmp_path, capsys):
    sets = [f"data.train_dir={tiny_imagefolder / 'train'}", f"data.val_dir={tiny_imagefolder / 'val'}",
            "train.max_steps=4"]
    assert main(["bench", "tta", "--config", str(CONFIGS / "smoke.yaml"), "--target", "knn=0",
                 "--budget", "600", "--every", "2", "--json", "--out", str(tmp_path)]
                + [a for s in sets for a in ("--set", s)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["target"] == "knn=0" and r["contender_seconds"] > 0 and r["baseline_seconds"] > 0
    assert r["ratio"] == round(r["baseline_seconds"] / r["contender_seconds"], 2)
    for side in ("contender", "baseline"):
        (point,) = r[f"{side}_curve"]  # the target is met at the first monitor: it stops there
        assert point["step"] == 2 and point["images"] == 32 and point["seconds"] == r[f"{side}_seconds"]
        assert r[f"{side}_budget_used_s"] > 0
    assert checkpoint.load(tmp_path / "contender" / "checkpoints" / "last.pt")["step"] == 2


def test_bench_tta_refuses_a_target_it_cannot_race_to(capsys):
    assert main(["bench", "tta", "--target", "linear=50", "--json"]) == 2
    assert "races to a kNN top-1" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--budget", "0"), ("--budget", "nan"), ("--budget", "-5"),
                                        ("--every", "0"), ("--every", "-1"), ("--target", "knn=101"),
                                        ("--target", "knn=abc"), ("--target", "knn=nan")])
def test_bench_tta_refuses_a_budget_or_monitor_spacing_out_of_range(flag, value, capsys):
    assert main(["bench", "tta", "--target", "knn=50", flag, value, "--json"]) == 2  # the last --target wins
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{flag} " in err


def test_the_monitor_leaves_an_nchw_live_model_trainable_and_in_its_layout(tiny_imagefolder):
    """A live model kept NCHW (bench tta's plain loop, whatever train.channels_last says)
    must come out of a monitor with the same parameters, still trainable."""
    from types import SimpleNamespace

    from bt_fast import dist, methods
    from bt_fast.monitor import Monitor

    cfg = config.load(CONFIGS / "smoke.yaml", [f"data.train_dir={tiny_imagefolder / 'train'}",
                                               f"data.val_dir={tiny_imagefolder / 'val'}", "eval.every=1"])
    assert cfg.train.channels_last
    model = methods.build(cfg)  # NCHW, as the plain loop keeps it
    before = {n: (p.data_ptr(), p.stride()) for n, p in model.named_parameters()}
    mon = Monitor(cfg, dist.Env(), model)
    sink = SimpleNamespace(log_eval=lambda record, step: None)
    mon.evaluate(SimpleNamespace(step=1, cfg=cfg), sink)
    assert mon.every == 1  # it worked and stays on
    assert {n: (p.data_ptr(), p.stride()) for n, p in model.named_parameters()} == before
    views = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    model.baseline_loss(model(views)).backward()  # inference tensors would refuse this
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
