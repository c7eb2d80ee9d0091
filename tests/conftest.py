"""Shared test set-up: CPU twins of every GPU path.

Triton kernels run under the interpreter when no GPU is present; the variable must be
set before triton is first imported, hence here and not in a fixture.
"""

import os

if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("PROMETHEUS_DISABLE_CREATED_SERIES", "True")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu marker); this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
