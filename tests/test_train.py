"""The trainer end to end on generated JPEGs: learning, exact resume of every method and of
pre-method checkpoints, the finite guard (weights AND buffers unchanged by a skipped step)."""

import json

import pytest
import torch

from bt_fast import checkpoint, config, train
from bt_fast.cli import main
from bt_fast.methods import METHODS
from bt_fast.methods.barlow_twins import BarlowTwins
from conftest import CONFIGS

pytestmark = pytest.mark.slow  # every test here trains


@pytest.fixture(scope="module")
def dataset(tiny_imagefolder):
    return tiny_imagefolder


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


def assert_same_weights(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert list(a["model"]) == list(b["model"])
    for key, value in a["model"].items():  # parameters and buffers (BN statistics, BYOL's target)
        assert torch.equal(value, b["model"][key]), key


@pytest.mark.parametrize("method", list(METHODS))
def test_resume_is_exact(dataset, tmp_path, method):
    """4 steps in one run == 2 steps, a new run that resumes, 2 more steps."""
    pick = f"method.name={method}"
    assert main(smoke_args(dataset, tmp_path / "a", pick, "train.max_steps=4")) == 0
    assert main(smoke_args(dataset, tmp_path / "b", pick, "train.max_steps=2")) == 0
    assert main(smoke_args(dataset, tmp_path / "b", pick, "train.max_steps=4")) == 0
    a = checkpoint.load(tmp_path / "a" / "checkpoints" / "last.pt")
    b = checkpoint.load(tmp_path / "b" / "checkpoints" / "last.pt")
    assert a["step"] == 4 and a["config"]["method"]["name"] == method
    assert_same_weights(a, b)
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in lines if "loss" in x]
    assert [x["step"] for x in logged] == [1, 2, 3, 4]
    assert {f"loss_{t}" for t in METHODS[method].terms} <= set(logged[0])


def pre_method_config(values: dict) -> dict:
    """A config dict as checkpoints saved it before bt_fast.methods: Barlow Twins'
    projector in ``model`` and its loss settings in a ``loss`` section."""
    values = json.loads(json.dumps(values))
    bt = values.pop("method")["barlow_twins"]
    values["model"]["projector"] = bt.pop("projector")
    values["loss"] = bt
    return values


def test_pre_method_checkpoint_resumes_exactly_and_evaluates(dataset, tmp_path, capsys):
    """A checkpoint whose config has no method section (written before the move; the
    state-dict keys, backbone.* and projector.*, did not change) resumes bit-exactly."""
    assert main(smoke_args(dataset, tmp_path / "a", "train.max_steps=4")) == 0
    assert main(smoke_args(dataset, tmp_path / "b", "train.max_steps=2")) == 0
    path = tmp_path / "b" / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt["model"]) == set(BarlowTwins(config.load(CONFIGS / "smoke.yaml").model,
                                                 config.load(CONFIGS / "smoke.yaml").method.barlow_twins
                                                 ).state_dict())
    ckpt["config"] = pre_method_config(ckpt["config"])
    assert "method" not in ckpt["config"] and ckpt["config"]["loss"]["impl"] == "reference"
    torch.save(ckpt, path)
    assert config.from_dict(ckpt["config"]).method.barlow_twins.projector == "64-64"
    assert main(smoke_args(dataset, tmp_path / "b", "train.max_steps=4")) == 0
    assert_same_weights(checkpoint.load(tmp_path / "a" / "checkpoints" / "last.pt"),
                        checkpoint.load(path))
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"] = pre_method_config(ckpt["config"])
    torch.save(ckpt, path)
    capsys.readouterr()
    assert main(["eval", "knn", "--checkpoint", str(path), "--json", "--workers", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4


def test_checkpoint_contents_and_saved_config(dataset, tmp_path, capsys):
    assert main(smoke_args(dataset, tmp_path, "train.max_steps=1")) == 0
    ckpt = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert {"model", "optimizer", "scaler", "step", "rng", "pipeline", "config"} <= set(ckpt)
    saved = config.load(tmp_path / "config.yaml")
    assert config.to_dict(saved) == ckpt["config"] and saved.train.max_steps == 1
    # the run ends with one summary line: steps, images (batch from the config), the checkpoint
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    batch = saved.data.batch_size
    assert last_line.startswith(f"bt-fast train: 1 steps ({batch} images) in 0m")
    assert last_line.endswith(str(tmp_path / "checkpoints" / "last.pt"))


def test_nonfinite_loss_stops_with_exit_3_and_keeps_weights(dataset, tmp_path, monkeypatch, capsys):
    real = BarlowTwins.loss

    def nan_loss(self, outputs, group=None):
        loss, terms = real(self, outputs, group)
        return loss * float("nan"), terms

    monkeypatch.setattr(BarlowTwins, "loss", nan_loss)
    args = smoke_args(dataset, tmp_path, "train.max_steps=3", "train.log_every=3")
    assert main(args) == 3
    assert "NaN/inf for all 3 steps" in capsys.readouterr().err


def _state(run) -> dict:
    return {k: v.clone() for k, v in run.model.state_dict().items()}


@pytest.mark.parametrize("method", ["barlow_twins", "byol", "swav", "dino"])
def test_nan_batch_changes_no_parameter_and_no_buffer(dataset, tmp_path, method):
    """A skipped step leaves BN running stats, num_batches_tracked, BYOL's target, DINO's
    teacher and centre, SwAV's prototypes as they were; the next good step moves them."""
    cfg = config.load(CONFIGS / "smoke.yaml", [f"data.train_dir={dataset / 'train'}",
                                             f"train.run_dir={tmp_path}", f"method.name={method}"])
    run = train.setup(cfg)
    views, _ = next(iter(run.loader))
    for g, lr in zip(run.optimizer.param_groups, (0.2, 0.0048)):
        g["lr"] = lr
    timer = train.metrics.StepTimer(run.env.device)
    timer.start()
    before = _state(run)
    poisoned = [views[0].clone().fill_(float("nan"))] + [v.clone() for v in views[1:]]
    out = train.train_step(run, poisoned, timer)
    assert int(out["nonfinite"]) == 1
    after = _state(run)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    out = train.train_step(run, views, timer)  # a good batch is applied: stats move, stay finite
    assert int(out["nonfinite"]) == 0
    moved = [k for k, v in run.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("running_mean") for k in moved) and any(k.endswith("num_batches_tracked") for k in moved)
    if method == "byol":
        assert any(k.startswith("target.") and k.endswith(".weight") for k in moved)
    if method == "dino":
        assert "center" in moved and any(k.startswith("teacher.") and k.endswith(".weight") for k in moved)
    assert all(torch.isfinite(v.float()).all() for v in run.model.state_dict().values())


def test_exploding_bias_lr_leaves_finite_bn_statistics_in_the_checkpoint(dataset, tmp_path, monkeypatch):
    """A bias/BN learning rate of 1e30 (past optim.lr_biases' range, so forced here
    through the schedule): the first step blows BN weights up, later steps are NaN and
    skipped; their forward passes must not leave NaN/inf running statistics behind."""
    real_set_lr = train.optim.set_lr

    def exploding_set_lr(optimizer, *args, **kwargs):
        lrs = real_set_lr(optimizer, *args, **kwargs)
        optimizer.param_groups[1]["lr"] = 1e30  # the biases and BN group
        return lrs

    monkeypatch.setattr(train.optim, "set_lr", exploding_set_lr)
    args = smoke_args(dataset, tmp_path, "optim.warmup_epochs=0",
                      "train.max_steps=3", "train.log_every=3")
    assert main(args) == 0
    (record,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
                 if "loss" in x]
    assert record["nonfinite_steps"] == 2  # steps 2 and 3 were skipped
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")["model"]
    stats = {k: v for k, v in state.items() if "running_" in k}
    assert stats and all(torch.isfinite(v).all() for v in stats.values())


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
