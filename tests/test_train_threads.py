"""train.threads: torch's CPU threads, auto = the cores of this rank."""

import pytest
import torch

from bt_fast import config, dist
from bt_fast.errors import ConfigError
from bt_fast.device import set_threads, threads_for


@pytest.fixture(autouse=True)
def keep_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    yield
    torch.set_num_threads(before)


def cfg(*sets):
    return config.load(None, ["data.device=cpu", *sets])


@pytest.mark.parametrize("cores,ranks,dali,want", [(2, 1, 1, 2), (2, 1, 2, 2), (16, 1, 2, 16),
                                                   (16, 2, 2, 8), (4, 4, 1, 1), (2, 4, 1, 1)])
def test_auto_gives_each_rank_its_share_of_the_cores(monkeypatch, cores, ranks, dali, want):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    assert set_threads(cfg(f"data.num_threads={dali}"), dist.Env()) == want


def test_explicit_threads_and_omp_env_win(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert set_threads(cfg("train.threads=3"), dist.Env()) == 3
    torch.set_num_threads(5)
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert set_threads(cfg(), dist.Env()) == 5  # the user's OMP_NUM_THREADS stands


def test_negative_threads_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train.threads=-1: must be in \[0, 4096\]"):
        config.validate(cfg("train.threads=-1"))


def test_gpu_runs_keep_torchs_count(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert threads_for(cfg(), dist.Env(device=torch.device("cuda"))) == 0  # 0 = leave it alone
    assert threads_for(cfg(), dist.Env()) == 8
