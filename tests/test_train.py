"""The trainer end to end on generated JPEGs: learning, exact resume, finite guard."""

import json

import pytest
import torch

from bt_fast import checkpoint, config, data, train
from bt_fast.cli import main
from conftest import CONFIGS

pytestmark = pytest.mark.slow  # every test here trains


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return data.make_synthetic(tmp_path_factory.mktemp("syn"), classes=4, train_per_class=16,
                               val_per_class=4, size=(40, 36))


def smoke_args(dataset, run_dir, *extra):
    sets = [f"data.train_dir={dataset / 'train'}", f"data.val_dir={dataset / 'val'}",
            f"train.run_dir={run_dir}", *extra]
    return ["train", "--config", str(CONFIGS / "smoke.yaml")] + [a for s in sets for a in ("--set", s)]


def test_five_steps_lower_the_loss_on_a_fixed_batch(dataset, tmp_path):
    cfg = config.load(CONFIGS / "smoke.yaml", [f"data.train_dir={dataset / 'train'}",
                                             f"train.run_dir={tmp_path}"])
    run = train.setup(cfg)
    views, _ = next(iter(run.loader))
    views = [v.clone() for v in views]
    for g, lr in zip(run.optimizer.param_groups, (0.2, 0.0048)):
        g["lr"] = lr
    losses = []
    timer = train.metrics.StepTimer(run.env.device)
    for _ in range(5):
        timer.start()
        out = train.train_step(run, views, timer)
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0], losses


def test_resume_is_exact(dataset, tmp_path):
    """4 steps in one run == 2 steps, a new run that resumes, 2 more steps."""
    assert main(smoke_args(dataset, tmp_path / "a", "train.max_steps=4")) == 0
    assert main(smoke_args(dataset, tmp_path / "b", "train.max_steps=2")) == 0
    assert main(smoke_args(dataset, tmp_path / "b", "train.max_steps=4")) == 0
    a = checkpoint.load(tmp_path / "a" / "checkpoints" / "last.pt")
    b = checkpoint.load(tmp_path / "b" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4]


def test_checkpoint_contents_and_saved_config(dataset, tmp_path):
    assert main(smoke_args(dataset, tmp_path, "train.max_steps=1")) == 0
    ckpt = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert {"model", "optimizer", "scaler", "step", "rng", "pipeline", "config"} <= set(ckpt)
    saved = config.load(tmp_path / "config.yaml")
    assert config.to_dict(saved) == ckpt["config"] and saved.train.max_steps == 1


def test_nonfinite_loss_stops_with_exit_3_and_keeps_weights(dataset, tmp_path, monkeypatch, capsys):
    real = train.barlow_twins_loss

    def nan_loss(z1, z2, **kw):
        loss, on, off = real(z1, z2, **kw)
        return loss * float("nan"), on, off

    monkeypatch.setattr(train, "barlow_twins_loss", nan_loss)
    args = smoke_args(dataset, tmp_path, "train.max_steps=3", "train.log_every=3")
    assert main(args) == 3
    assert "NaN/inf for all 3 steps" in capsys.readouterr().err


def test_finite_loss_with_nonfinite_gradient_is_skipped():
    model = torch.nn.Linear(3, 2)
    loss = model(torch.ones(1, 3)).sum()
    loss.backward()
    opt = train.optim.build(model, config.OptimConfig())
    assert bool(train.all_finite(loss.detach(), opt))
    model.weight.grad[0, 0] = float("inf")
    assert not bool(train.all_finite(loss.detach(), opt))


def test_fp16_run_with_gradscaler_trains(dataset, tmp_path):
    """fp16 path (GradScaler): early overflow steps are the scaler's business, not a NaN stop."""
    assert main(smoke_args(dataset, tmp_path, "train.max_steps=2", "train.precision=fp16")) == 0
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["step"] == 2
