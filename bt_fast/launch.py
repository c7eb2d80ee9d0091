"""The compose file for N nodes x G GPUs, generated (not hand-copied per node count).

``compose(nodes, gpus, ...)`` returns the docker compose document: one trainer
service per node (``node0`` .. ``node{N-1}``: own hostname, ``ipc: host``, G GPUs
reserved), all running ``scripts/train.sh`` -- the same torchrun command line as
``make train LAUNCHER=torchrun`` and the SLURM script -- with the c10d rendezvous on
``node0``; plus one NVIDIA dcgm-exporter per node, Prometheus (scraping every rank, see
``bt_fast.dashboards.scrape_config``) and Grafana (``docker/grafana``). ``write`` puts
``compose.yaml`` and ``prometheus.yml`` in one folder (``build/docker`` by default)::

    python -m bt_fast.launch --nodes 4 --gpus 8 --config configs/imagenet.yaml
    docker compose -f build/docker/compose.yaml up

Two network modes:

- ``bridge`` (default): all services on one Docker host and one bridge network; node k
  gets GPUs k*G .. k*G+G-1 of that host. One command starts the whole job.
- ``host``: one real machine per node. Copy the folder to every machine and run
  ``docker compose up nodeK dcgmK`` on machine K (and prometheus/grafana on one);
  containers use the host network (InfiniBand/RoCE and the real interfaces), every
  node reserves its own G GPUs, and the rendezvous is ``RDZV_HOST`` (machine 0).
  Each machine sets ``METRICS_HOST`` to its address on the private cluster network:
  the exporter binds that address, not every interface.

NCCL/gloo settings written into every trainer (override them per cluster):

- ``NCCL_SOCKET_IFNAME`` / ``GLOO_SOCKET_IFNAME``: the interface for bootstrap and
  TCP traffic (``eth0`` on the bridge network; set it to the cluster NIC in host mode).
- ``NCCL_IB_DISABLE=0``: use InfiniBand/RoCE when present (needs host mode and the
  devices mapped); ``NCCL_DEBUG=WARN``: ``INFO`` prints the chosen transport per link.
- ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``: a lost peer makes collectives raise, so
  torchrun restarts the group instead of hanging until the timeout.
- ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: reliable elastic restarts.
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

import yaml

from bt_fast import safeio
from bt_fast.errors import UserError

REPO = Path(__file__).resolve().parent.parent
IMAGE = "bt-fast:latest"
RDZV_PORT = 29500
METRICS_PORT = 9400
HOST_METRICS_PORT = 9410  # host network: 9400 is dcgm-exporter's port on the same machine
PROMETHEUS_IMAGE = "prom/prometheus:v2.53.2"
GRAFANA_IMAGE = "grafana/grafana:11.2.2"
DCGM_PORT = 9400
DCGM_IMAGE = "nvcr.io/nvidia/k8s/dcgm-exporter:3.3.8-3.6.0-ubuntu22.04"


def hostname(node: int) -> str:
    """Service and host name of node ``node``; the names bt_fast.dashboards scrapes."""
    return f"node{node}"


def nccl_env(network: str) -> dict:
    """NCCL/gloo/torchrun settings of every trainer (see the module docstring)."""
    env = {
        "NCCL_DEBUG": "WARN",
        "NCCL_IB_DISABLE": "0",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    if network == "bridge":
        env.update(NCCL_SOCKET_IFNAME="eth0", GLOO_SOCKET_IFNAME="eth0")
    else:  # host network: the cluster NIC, chosen on each machine
        env.update(NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}",
                   GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-eth0}")
    return env


def _gpus(node: int, gpus: int, network: str) -> dict:
    device = {"driver": "nvidia", "capabilities": ["gpu"]}
    if network == "bridge":  # one Docker host: disjoint GPU sets per node
        device["device_ids"] = [str(node * gpus + g) for g in range(gpus)]
    else:
        device["count"] = gpus
    return {"resources": {"reservations": {"devices": [device]}}}


def trainer(node: int, *, nodes: int, gpus: int, image: str, config: str, network: str,
            rdzv_host: str, run_id: str, max_restarts: int, metrics_port: int,
            context: str, overrides: list[str]) -> dict:
    """One node's service: ``scripts/train.sh`` with this job's torchrun settings."""
    # The exporter must answer Prometheus in another container: on the bridge network
    # 0.0.0.0 reaches only that private network (trainer ports are not published); on
    # the host network it would be every interface of the machine, so there each node
    # binds the address it names in METRICS_HOST (its private cluster address).
    host = ("0.0.0.0" if network == "bridge"
            else "${METRICS_HOST:?set METRICS_HOST to this machine's private cluster address}")
    sets = ["metrics.prometheus=true", f"metrics.host={host}", f"metrics.port={metrics_port}",
            *overrides]
    command = ["scripts/train.sh"] + [a for s in sets for a in ("--set", s)]
    svc = {
        "image": image,
        # Host uid/gid for the non-root user (the Makefile exports them), so runs/ stays yours.
        "build": {"context": context, "dockerfile": "docker/Dockerfile",
                  "args": {"UID": "${BT_UID:-1000}", "GID": "${BT_GID:-1000}"}},
        "command": command,
        "environment": {
            "NODES": str(nodes), "GPUS": str(gpus), "CONFIG": config,
            "RDZV_HOST": rdzv_host, "RDZV_PORT": str(RDZV_PORT), "RUN_ID": run_id,
            "MAX_RESTARTS": str(max_restarts), **nccl_env(network),
        },
        "ipc": "host",  # PyTorch/DALI/NCCL share memory between processes
        "ulimits": {"memlock": -1, "stack": 67108864},  # as NVIDIA's containers ask
        "volumes": [f"{context}/data:/workspace/bt_fast/data",  # data check writes file lists
                    f"{context}/runs:/workspace/bt_fast/runs"],
        "deploy": _gpus(node, gpus, network),
        "restart": "no",  # torchrun restarts workers; a dead container is a lost node
        # `docker compose stop` sends SIGTERM: torchrun forwards it, all ranks stop at one
        # step and checkpoint (torchrun allows 30 s); Docker's default 10 s is too short.
        "stop_grace_period": "60s",
    }
    if network == "bridge":
        svc["hostname"] = hostname(node)
        svc["networks"] = ["bt"]
        if node == 0:
            svc["expose"] = [str(RDZV_PORT)]
    else:
        svc["network_mode"] = "host"
    return svc


def compose(nodes: int, gpus: int, image: str = IMAGE, config: str = "configs/imagenet.yaml", *,
            network: str = "bridge", rdzv_host: str | None = None, run_id: str = "bt_fast",
            max_restarts: int = 3, metrics_port: int | None = None, context: str = "../..",
            docker_dir: str = "../../docker", overrides: list[str] = ()) -> dict:
    """The compose document for ``nodes`` x ``gpus`` ranks (paths relative to its folder)."""
    if nodes < 1 or gpus < 1:
        raise ValueError(f"need at least one node and one GPU per node, got {nodes}x{gpus}")
    if network not in ("bridge", "host"):
        raise ValueError(f"network={network!r}: use bridge | host")
    if rdzv_host is None:
        rdzv_host = hostname(0) if network == "bridge" else "${RDZV_HOST:?set RDZV_HOST to machine 0}"
    if metrics_port is None:
        metrics_port = METRICS_PORT if network == "bridge" else HOST_METRICS_PORT
    if network == "host" and metrics_port <= DCGM_PORT < metrics_port + gpus:
        raise ValueError(f"metrics ports {metrics_port}..{metrics_port + gpus - 1} collide with "
                         f"dcgm-exporter's {DCGM_PORT} on the host network")
    services = {}
    common = dict(nodes=nodes, gpus=gpus, image=image, config=config, network=network,
                  rdzv_host=rdzv_host, run_id=run_id, max_restarts=max_restarts,
                  metrics_port=metrics_port, context=context, overrides=list(overrides))
    for n in range(nodes):
        services[hostname(n)] = trainer(n, **common)
    for n in range(nodes):
        # Exports the GPU counters of node n's GPUs only (same reservation as node n).
        dcgm = {"image": DCGM_IMAGE, "cap_add": ["SYS_ADMIN"], "deploy": _gpus(n, gpus, network)}
        dcgm.update({"hostname": f"dcgm{n}", "networks": ["bt"]} if network == "bridge"
                    else {"network_mode": "host"})
        services[f"dcgm{n}"] = dcgm
    services["prometheus"] = {
        "image": PROMETHEUS_IMAGE,
        "volumes": ["./prometheus.yml:/etc/prometheus/prometheus.yml:ro"],
        "ports": ["9090:9090"],
    }
    services["grafana"] = {
        "image": GRAFANA_IMAGE,
        "depends_on": ["prometheus"],
        "environment": {"GF_AUTH_ANONYMOUS_ENABLED": "true", "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer"},
        "volumes": [f"{docker_dir}/grafana/provisioning:/etc/grafana/provisioning:ro",
                    f"{docker_dir}/grafana/dashboards:/var/lib/grafana/dashboards:ro"],
        "ports": ["3000:3000"],
    }
    for name in ("prometheus", "grafana"):
        services[name].update({"networks": ["bt"]} if network == "bridge" else {"network_mode": "host"})
    doc = {"name": "bt_fast", "services": services}
    if network == "bridge":
        doc["networks"] = {"bt": {"driver": "bridge"}}
    return doc


def prometheus(nodes: int, gpus: int, port: int = METRICS_PORT) -> dict:
    from bt_fast.dashboards import scrape_config

    return scrape_config(nodes, gpus, port, host="node{node}", dcgm_host="dcgm{node}")


def write(out: str | Path, nodes: int, gpus: int, **kw) -> Path:
    """Write ``compose.yaml`` and ``prometheus.yml`` into ``out``; returns the compose path."""
    out = safeio.make_dir(Path(out).resolve())
    kw.setdefault("context", os.path.relpath(REPO, out))
    kw.setdefault("docker_dir", os.path.relpath(REPO / "docker", out))
    doc = compose(nodes, gpus, **kw)
    argv = " ".join(shlex.quote(a) for a in ("--nodes", str(nodes), "--gpus", str(gpus)))
    header = (f"# Generated by `python -m bt_fast.launch {argv} ...`; do not edit, regenerate.\n"
              "# Validated on machines without Docker (parsed and checked by tests), not run there.\n")
    path = out / "compose.yaml"
    safeio.write_atomic(path, header + yaml.safe_dump(doc, sort_keys=False))
    port = kw.get("metrics_port") or (METRICS_PORT if kw.get("network", "bridge") == "bridge"
                                      else HOST_METRICS_PORT)
    safeio.write_atomic(out / "prometheus.yml",
                        "# Generated by bt_fast.launch from bt_fast.dashboards.scrape_config.\n"
                        + yaml.safe_dump(prometheus(nodes, gpus, port), sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bt_fast.launch",
                                description="Write the compose file for N nodes x G GPUs.")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus", type=int, default=1, help="GPUs (= ranks) per node")
    p.add_argument("--config", default="configs/imagenet.yaml", help="path inside the image")
    p.add_argument("--image", default=IMAGE)
    p.add_argument("--network", choices=("bridge", "host"), default="bridge")
    p.add_argument("--rdzv-host", default=None, help="host mode: machine 0's address")
    p.add_argument("--run-id", default="bt_fast")
    p.add_argument("--max-restarts", type=int, default=3)
    p.add_argument("--metrics-port", type=int, default=None,
                   help=f"rank r serves on PORT + local rank (default {METRICS_PORT}; host network {HOST_METRICS_PORT})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=str(REPO / "build" / "docker"))
    a = p.parse_args(argv)
    try:
        path = write(a.out, a.nodes, a.gpus, image=a.image, config=a.config, network=a.network,
                     rdzv_host=a.rdzv_host, run_id=a.run_id, max_restarts=a.max_restarts,
                     metrics_port=a.metrics_port, overrides=a.overrides)
    except (ValueError, UserError) as e:  # a bad flag, or an --out the write gate refuses
        p.error(str(e))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
