"""Multi-node training on one machine: torchrun agents launched by scripts/train.sh (the
command line every launcher uses), gloo on the loopback interface.

- two agents with --nnodes=2 reach the single-process loss on the same global batch
  (under the official gradient-scale convention, see the test);
- a worker killed mid-run is restarted by the agents and training finishes from the
  last checkpoint, losing at most one checkpoint interval, with no corrupt checkpoint;
- SIGTERM to one worker: both ranks stop at the same step, checkpoint once, exit 0.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from bt_fast import checkpoint
from bt_fast.data import make_synthetic
from bt_fast.procs import free_port
from conftest import REPO

pytestmark = pytest.mark.slow

TORCHRUN = Path(sys.executable).parent / "torchrun"
GLOBAL_BATCH = 16

# Deterministic views (full-image crop, no flip or jitter; view 2 always gray, other mean):
# then a global batch is the same set of pixels however it is split over ranks.
VIEWS = [
    {"size": 32, "scale": [1.0, 1.0], "ratio": [1.0, 1.0], "flip_p": 0.0, "jitter_p": 0.0,
     "grayscale_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0},
    {"size": 32, "scale": [1.0, 1.0], "ratio": [1.0, 1.0], "flip_p": 0.0, "jitter_p": 0.0,
     "grayscale_p": 1.0, "blur_p": 0.0, "solarize_p": 0.0, "mean": [0.5, 0.4, 0.3]},
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    # Exactly one global batch of images: every step sees all of them, on 1 or 2 ranks.
    root = tmp_path_factory.mktemp("data")
    make_synthetic(root, classes=2, train_per_class=GLOBAL_BATCH // 2, val_per_class=1, size=(32, 32))
    return root / "train"


def _config(tmp: Path, data: Path, **train) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    cfg["data"].update(train_dir=str(data), batch_size=GLOBAL_BATCH, num_threads=1, prefetch=1)
    cfg["views"] = VIEWS
    cfg["optim"]["epochs"] = 10_000  # one step per epoch here: the schedule must outlast max_steps
    cfg["train"].update({"precision": "fp32", "log_every": 1, "checkpoint_every": 0,
                         "run_dir": str(tmp / "run"), **train})
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(**extra) -> dict:
    return {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
            "TORCHRUN": str(TORCHRUN), **extra}


def _agents(tmp: Path, config: Path, *, nodes: int, gpus: int, restarts: int = 0) -> list:
    """Start `nodes` torchrun agents (one per simulated node) through scripts/train.sh."""
    env = _env(NODES=str(nodes), GPUS=str(gpus), CONFIG=str(config), MAX_RESTARTS=str(restarts),
               RDZV_HOST="127.0.0.1", RDZV_PORT=str(free_port()), RUN_ID=uuid.uuid4().hex[:12])
    procs = []
    for n in range(nodes):
        log = open(tmp / f"agent{n}.log", "w")
        procs.append(subprocess.Popen([str(REPO / "scripts" / "train.sh")], cwd=tmp, env=env,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def _wait(procs: list, timeout: float = 240) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


def _logs(tmp: Path) -> str:
    return "".join(p.read_text() for p in sorted(tmp.glob("agent*.log")))


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def _workers(agent_pids: list[int]) -> dict[int, int]:
    """{RANK: pid} of the worker processes under the given agents."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        env = dict(e.split(b"=", 1) for e in environ if b"=" in e)
        if ppid in agent_pids and b"RANK" in env:
            found[int(env[b"RANK"])] = int(pid)
    return found


def _wait_for_step(run_dir: Path, step: int, procs: list, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        losses = _losses(run_dir)
        if losses and losses[-1][0] >= step:
            return losses[-1][0]
        assert all(p.poll() is None for p in procs), "an agent exited early"
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def test_two_nodes_match_single_process(tmp_path, data_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    cfg1 = _config(one, data_dir, max_steps=3)
    # Gradient scale (README, "Gradient scale and world size"): as in the official code, each of W ranks gets 1/W of the
    # global-loss gradient. LARS-adapted weights do not see the scale (the trust ratio
    # divides it out) except through weight decay; the 1-D BN/bias parameters take plain
    # momentum steps. So W=2 ranks == one process with lr_biases / 2 and weight_decay x 2.
    optim = yaml.safe_load(cfg1.read_text())["optim"]
    lr_biases, wd = optim.get("lr_biases", 0.0048), optim.get("weight_decay", 1e-6)
    proc = subprocess.run([sys.executable, "-m", "bt_fast", "train", "--config", str(cfg1),
                           "--set", f"optim.lr_biases={lr_biases / 2}",
                           "--set", f"optim.weight_decay={wd * 2}"],
                          cwd=one, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg2 = _config(two, data_dir, max_steps=3)
    rcs = _wait(_agents(two, cfg2, nodes=2, gpus=1))
    assert rcs == [0, 0], _logs(two)[-4000:]
    ref, got = _losses(one / "run"), _losses(two / "run")
    assert [s for s, _ in got] == [s for s, _ in ref] == [1, 2, 3]
    # Step 1: SyncBatchNorm + global-batch loss; steps 2-3: DDP's gradient mean + LARS.
    for (step, a), (_, b) in zip(ref, got):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5), f"step {step}: 1 process {a}, 2 nodes {b}"


def test_killed_worker_restarts_from_last_checkpoint(tmp_path, data_dir):
    every, last = 3, 12
    config = _config(tmp_path, data_dir, max_steps=last, checkpoint_every=every)
    run_dir = tmp_path / "run"
    procs = _agents(tmp_path, config, nodes=2, gpus=1, restarts=3)
    _wait_for_step(run_dir, every + 1, procs)  # a checkpoint exists, training goes on
    workers = _workers([p.pid for p in procs])
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[0], signal.SIGKILL)  # rank 0: the one that writes checkpoints
    rcs = _wait(procs)
    logs = _logs(tmp_path)
    assert rcs == [0, 0], logs[-4000:]
    steps = [s for s, _ in _losses(run_dir)]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    resumed_from, reached = steps[restart] - 1, max(steps[:restart])
    assert f"resuming from {run_dir / 'checkpoints' / 'last.pt'} at step {resumed_from}" in logs
    assert resumed_from % every == 0 and resumed_from >= every
    assert reached - resumed_from <= every  # lost at most one checkpoint interval
    assert steps[restart:] == list(range(resumed_from + 1, last + 1))
    files = sorted((run_dir / "checkpoints").iterdir())
    # last.pt and the one before it (the fallback when last.pt does not load); no temp files
    assert [f.name for f in files] == ["last.pt", "prev.pt"]
    for f in files:  # a leftover temp file would be from the killed writer: must not exist
        assert not f.name.startswith("."), f"stray {f.name}"
    ckpt = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert ckpt["step"] == last and len(ckpt["pipeline"]) == 2


@pytest.mark.parametrize("target", ["worker", "agent"])
def test_sigterm_stops_all_ranks_at_one_step(tmp_path, data_dir, target):
    """worker: SIGTERM to one rank only. agent: what SLURM and `docker stop` do; torchrun
    forwards it to every worker and gives them 30 s before SIGKILL."""
    config = _config(tmp_path, data_dir, max_steps=1000)
    run_dir = tmp_path / "run"
    procs = _agents(tmp_path, config, nodes=1, gpus=2)
    _wait_for_step(run_dir, 3, procs)
    workers = _workers([p.pid for p in procs])
    os.kill(workers[1] if target == "worker" else procs[0].pid, signal.SIGTERM)
    rcs = _wait(procs, timeout=120)
    logs = _logs(tmp_path)
    if target == "worker":
        assert rcs == [0], logs[-4000:]  # the workers exit 0, so does their agent
    else:  # torchrun itself exits non-zero after a signal, but never had to SIGKILL
        assert "SIGKILL" not in logs and "exitcode: -9" not in logs, logs[-4000:]
    stopped = dict(re.findall(r"rank (\d) stopped by signal at step (\d+)", logs))
    assert set(stopped) == {"0", "1"} and len(set(stopped.values())) == 1, stopped
    step = int(stopped["0"])
    ckpt = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert ckpt["step"] == step < 1000 and len(ckpt["pipeline"]) == 2
    assert _losses(run_dir)[-1][0] == step
