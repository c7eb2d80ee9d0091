"""Safe defaults: the metrics exporter binds loopback unless told otherwise, and the
Docker image builds for any host user, root included (issue 11, items 11 and 12)."""

import os
import subprocess

import pytest

from bt_fast import config, launch
from conftest import REPO


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_binds_metrics_to_loopback(repo_root, name):
    assert config.load(repo_root / "configs" / name).metrics.host == "127.0.0.1"


def _sets(service: dict) -> list[str]:
    cmd = service["command"]
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]


def test_compose_opens_metrics_only_inside_its_own_network():
    bridge = launch.compose(2, 2)
    for name in ("node0", "node1"):
        assert "metrics.host=0.0.0.0" in _sets(bridge["services"][name])
        assert "ports" not in bridge["services"][name]  # reachable from the bridge network only
    host = launch.compose(2, 2, network="host", rdzv_host="10.0.0.1")
    (metrics_host,) = [s for s in _sets(host["services"]["node0"]) if s.startswith("metrics.host=")]
    assert metrics_host.startswith("metrics.host=${METRICS_HOST:?")  # no silent 0.0.0.0 on a real host


def _user_setup_run(repo_root) -> str:
    """The Dockerfile's RUN that creates the user, continuation lines joined."""
    text = (repo_root / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    (run,) = [line for line in text.splitlines() if line.startswith("RUN ") and "useradd" in line]
    return run[len("RUN "):]


STUBS = {
    # A base image where group 0 (root) exists and nothing else of interest does.
    "getent": 'echo "getent $*" >> "$LOG"; [ "$1 $2" = "group 0" ]',
    "groupadd": 'echo "groupadd $*" >> "$LOG"; [ "$2" != 0 ] || { echo "groupadd: GID 0 already exists" >&2; exit 4; }',
    "useradd": 'echo "useradd $*" >> "$LOG"; [ "$2" != 0 ] || { echo "useradd: UID 0 is not unique" >&2; exit 4; }',
    "userdel": "exit 6",
}


@pytest.mark.parametrize("uid,gid", [("0", "0"), ("1000", "1000"), ("1000", "0")])
def test_dockerfile_user_setup_for_any_host_user(repo_root, tmp_path, uid, gid):
    """Run the user-creation step with stand-ins for the account tools (no Docker
    engine here): UID=0 used to fail at `groupadd --gid 0`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    log.touch()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "UID": uid, "GID": gid}
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", _user_setup_run(repo_root)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text()
    assert ("groupadd" in calls) == (gid != "0")
    assert ("useradd --uid 1000" in calls) == (uid != "0")
