"""Launch a few local Python processes that talk over gloo: the one way tests and
benchmarks run a multi-rank function on one machine.

Plain subprocesses rather than multiprocessing's spawn, which re-runs the parent's
``__main__`` (``python -m bt_fast`` has no main guard).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(target: str, world: int, *args, timeout: float = 1800, env: dict | None = None) -> None:
    """Run ``target(rank, world, port, *args)`` in ``world`` fresh Python processes.

    ``target`` is "module:function" (importable from the current ``sys.path`` and
    working directory); ``args`` must be JSON-serialisable. Raises RuntimeError with the
    tail of each failed rank's stderr.
    """
    module, func = target.split(":")
    port = free_port()
    # After a clean return the worker leaves with os._exit: its results are on disk, and
    # skipping interpreter finalization means a gloo thread still letting go of a tensor
    # cannot abort the process (see dist.settle). An exception still exits 1 with its
    # traceback.
    code = (f"import json, os, sys; from {module} import {func} as f; f(*json.loads(sys.argv[1])); "
            "sys.stdout.flush(); sys.stderr.flush(); os._exit(0)")
    procs = [subprocess.Popen([sys.executable, "-c", code, json.dumps([rank, world, port, *args])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in range(world)]
    failed = []
    for rank, proc in enumerate(procs):
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise RuntimeError(f"rank {rank} did not finish within {timeout} s") from None
        if proc.returncode != 0:
            failed.append(f"rank {rank} exited {proc.returncode}:\n{err[-3000:]}")
    if failed:
        raise RuntimeError("\n".join(failed))
