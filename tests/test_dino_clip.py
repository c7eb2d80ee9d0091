"""DINO's gradient clipping (main_dino.py ``clip_grad``, utils.py ``clip_gradients``): each
parameter's gradient clipped to the norm on its own, after the trainer's finite test, on
unscaled gradients under fp16, before the LARS step."""

import math

import pytest
import torch

from bt_fast import config, optim, train
from bt_fast.errors import ConfigError
from conftest import CONFIGS

SCALE = 2.0 ** 4  # fp16 loss scale of the test: larger ones overflow this tiny net's fp16 backward on CPU


pytestmark = pytest.mark.usefixtures("one_thread")


def clipped64(g: torch.Tensor, clip: float) -> torch.Tensor:
    """g * (clip / (||g|| + 1e-6)) where that is below 1, else g: written out in float64."""
    norm = math.sqrt(sum(x * x for x in g.double().flatten().tolist()))
    coef = clip / (norm + 1e-6)
    return g.double() * coef if coef < 1 else g.double()


def test_each_gradient_is_clipped_on_its_own():
    g = torch.Generator().manual_seed(0)
    grads = [10 * torch.randn(7, 5, generator=g), 0.1 * torch.randn(4, generator=g), torch.zeros(3),
             torch.full((2, 2), 1.5)]  # norms ~60 (clipped), ~0.2 and 0 (kept), exactly 3 (kept: 3 / (3 + 1e-6) < 1)
    want = [clipped64(x, 3.0) for x in grads]
    kept = [x.clone() for x in grads]
    optim.clip_per_parameter(grads, 3.0)
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-12)
    assert abs(grads[0].norm().item() - 3.0) < 1e-5  # clipped to the threshold, not by one global norm
    assert torch.equal(grads[1], kept[1]) and torch.equal(grads[2], kept[2])  # bit-identical below it


def _dino_run(dataset, tmp_path, *extra):
    cfg = config.load(CONFIGS / "smoke.yaml", [f"data.train_dir={dataset / 'train'}", f"train.run_dir={tmp_path}",
                                             "method.name=dino", "eval.online_probe=false", "eval.every=0", *extra])
    run = train.setup(cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = 0.1
    views, _ = next(iter(run.loader))
    timer = train.metrics.StepTimer(run.env.device)
    timer.start()
    return run, views, timer


def _grads(run):
    return [p.grad.detach().clone() for g in run.optimizer.param_groups for p in g["params"] if p.grad is not None]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_step_sees_the_clipped_unscaled_gradients(tiny_imagefolder, tmp_path, monkeypatch, precision):
    """clip 0.05: most gradients of the tiny net are above it, some below. Under fp16 the
    gradients after backward are scaled by S = SCALE; the step must see clip(g / S)."""
    run, views, timer = _dino_run(tiny_imagefolder, tmp_path, "method.dino.clip_grad=0.05",
                                  f"train.precision={precision}")
    if precision == "fp16":
        run.scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    seen = {}
    drop = run.model.drop_frozen_grads
    monkeypatch.setattr(run.model, "drop_frozen_grads", lambda: (drop(), seen.update(raw=_grads(run))))
    step = run.optimizer.step
    monkeypatch.setattr(run.optimizer, "step", lambda *a, **k: (seen.update(stepped=_grads(run)), step(*a, **k)))
    out = train.train_step(run, views, timer)
    assert int(out["nonfinite"]) == 0 and "stepped" in seen
    scale = run.scaler.get_scale() if precision == "fp16" else 1.0
    if precision == "fp16":
        assert scale == SCALE  # no overflow: the scale stayed
    clipped = 0
    for raw, stepped in zip(seen["raw"], seen["stepped"]):
        want = clipped64(raw.double() / scale, 0.05)
        torch.testing.assert_close(stepped.double(), want, rtol=1e-5, atol=1e-12)
        clipped += bool(raw.double().norm() / scale > 0.05 + 1e-6)
    assert 0 < clipped < len(seen["raw"])


def test_an_overflowing_gradient_is_skipped_not_clipped_to_zero(tiny_imagefolder, tmp_path, monkeypatch):
    """Finite gradient entries whose norm overflows (1e30 each): the clip would turn them
    into zeros and a harmless-looking step; the finite test sees them first and the step
    is skipped: no weight, no momentum, no teacher moves."""
    run, views, timer = _dino_run(tiny_imagefolder, tmp_path)
    drop = run.model.drop_frozen_grads

    def overflow():
        drop()
        next(p for p in run.model.backbone.parameters() if p.grad is not None and p.dim() == 4).grad.fill_(1e30)

    monkeypatch.setattr(run.model, "drop_frozen_grads", overflow)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    out = train.train_step(run, views, timer)
    assert int(out["nonfinite"]) == 1
    for key, value in run.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(torch.count_nonzero(s["mu"]) == 0 for s in run.optimizer.state.values())  # no momentum either


def test_clip_grad_config():
    assert config.load(None, ["method.name=dino"]).method.dino.clip_grad == 3.0  # main_dino.py's default
    with pytest.raises(ConfigError, match=r"method.dino: clip_grad=-1.0: must be >= 0"):
        config.load(None, ["method.name=dino", "method.dino.clip_grad=-1"])
    with pytest.raises(ConfigError, match="clip_grad=nan: must be finite"):
        config.load(None, ["method.name=dino", "method.dino.clip_grad=nan"])
