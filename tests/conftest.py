"""Shared test kit: CPU twins of every GPU path, and the fixtures most tests need.

Triton kernels run under the interpreter when no GPU is present: the one switch
(bt_fast.kernels.triton_env) must act before anything imports triton, hence imported
here at collection time and not in a fixture.

Markers: ``gpu`` (skipped without CUDA) and ``slow`` (trains, spawns processes or runs
the Triton interpreter). ``make test-fast`` runs ``-m "not slow"``; ``make test`` runs all.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("PROMETHEUS_DISABLE_CREATED_SERIES", "True")

import pytest  # noqa: E402

import bt_fast.kernels.triton_env  # noqa: E402,F401  (sets TRITON_INTERPRET=1 without CUDA)

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
# tests/ on sys.path so that `from helpers import ...` and worker targets
# ("test_module:function") import from any working directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu marker); this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (configs/, scripts/, docker/ hang off it)."""
    return REPO


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory) -> Path:
    """A generated labelled JPEG set, shared by the whole session: read, never write.

    root/train: 4 classes x 16 images, root/val: 4 x 4, 48x40 px, each split with its
    validated filelist.txt. Tests that change files make their own copy.
    """
    from bt_fast.data import make_synthetic

    root = tmp_path_factory.mktemp("tiny_imagefolder")
    make_synthetic(root, classes=4, train_per_class=16, val_per_class=4, size=(48, 40), seed=0)
    return root


@pytest.fixture()
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free when the test started."""
    from bt_fast.procs import free_port as pick

    return pick()


@pytest.fixture
def one_thread():
    """Tiny steps: one torch thread is ~100x faster than two fighting over a shared
    machine's cores. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
