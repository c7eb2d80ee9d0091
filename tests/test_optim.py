"""LARS and lr_at against independent formulas (numpy float64, written out by hand)."""

import math

import numpy as np
import pytest
import torch

from bt_fast import optim
from bt_fast.config import OptimConfig


def test_lr_at_warmup_cosine_end():
    peak, warm, total = 0.8, 10, 110
    assert optim.lr_at(0, peak, warmup_steps=warm, total_steps=total) == 0.0
    assert optim.lr_at(5, peak, warmup_steps=warm, total_steps=total) == pytest.approx(0.4)
    assert optim.lr_at(10, peak, warmup_steps=warm, total_steps=total) == pytest.approx(peak)
    # halfway through the cosine: the mean of peak and peak/1000
    assert optim.lr_at(60, peak, warmup_steps=warm, total_steps=total) == pytest.approx(0.5 * (peak + peak / 1000))
    assert optim.lr_at(110, peak, warmup_steps=warm, total_steps=total) == pytest.approx(peak / 1000)
    lrs = [optim.lr_at(s, peak, warmup_steps=warm, total_steps=total) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_set_lr_scales_peaks_by_batch():
    model = torch.nn.Linear(3, 2)
    opt = optim.build(model, OptimConfig())
    lw, lb = optim.set_lr(opt, 10, OptimConfig(), global_batch=512, warmup_steps=10, total_steps=100)
    assert lw == pytest.approx(0.2 * 2) and lb == pytest.approx(0.0048 * 2)
    assert [g["lr"] for g in opt.param_groups] == [lw, lb]


def lars_numpy(p, g, mu, *, lr, wd, m, eta, exclude):
    """One official LARS step in float64 numpy, written independently of bt_fast."""
    d = g.copy()
    if not exclude:
        d = d + wd * p
        pn, dn = np.linalg.norm(p), np.linalg.norm(d)
        q = eta * pn / dn if (pn > 0 and dn > 0) else 1.0
        d = d * q
    mu = m * mu + d
    return p - lr * mu, mu


def test_lars_two_steps_match_formula():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))
    model.double()
    opt = optim.LARS(optim.param_groups(model, 1e-2), lr=0.0, weight_decay=1e-2, momentum=0.9, eta=0.02)
    for g, lr in zip(opt.param_groups, (0.5, 0.1)):
        g["lr"] = lr
    ref = {n: (p.detach().numpy().copy(), np.zeros(p.shape)) for n, p in model.named_parameters()}
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        for n, p in model.named_parameters():
            exclude = p.ndim == 1
            lr = 0.1 if exclude else 0.5
            ref[n] = lars_numpy(ref[n][0], p.grad.numpy(), ref[n][1], lr=lr, wd=1e-2, m=0.9, eta=0.02,
                                exclude=exclude)
        opt.step()
    for n, p in model.named_parameters():
        np.testing.assert_allclose(p.detach().numpy(), ref[n][0], rtol=1e-12, atol=1e-12)


def test_lars_skips_nonfinite_step_on_device():
    model = torch.nn.Linear(3, 3)
    opt = optim.build(model, OptimConfig())
    for g in opt.param_groups:
        g["lr"] = 0.1
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step(finite=torch.tensor(True))
    before = [p.detach().clone() for p in model.parameters()]
    mu_before = [opt.state[p]["mu"].clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, math.nan)
    opt.step(finite=torch.tensor(False))
    for p, b, m in zip(model.parameters(), before, mu_before):
        assert torch.equal(p, b) and torch.equal(opt.state[p]["mu"], m)
    # and a finite step after it behaves like the plain path
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step(finite=torch.tensor(True))
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_param_groups_exclude_1d():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    weights, biases = optim.param_groups(model, 1e-6)
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim == 1 for p in biases["params"])
    assert biases["exclude"] and biases["weight_decay"] == 0.0 and not weights["exclude"]


def _twin_models(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 3 * 3, 5, bias=True), torch.nn.Linear(5, 3, bias=False))
    return model, __import__("copy").deepcopy(model)


@pytest.mark.parametrize("guarded", [False, True])
def test_foreach_step_matches_per_parameter_loop(guarded):
    """The multi-tensor step is the per-parameter formula, incl. the device-side skip."""
    a, b = _twin_models()
    opts = [optim.LARS(optim.param_groups(m, 1e-2), weight_decay=1e-2, eta=0.02, foreach=fe)
            for m, fe in ((a, True), (b, False))]
    for o in opts:
        for g, lr in zip(o.param_groups, (0.5, 0.1)):
            g["lr"] = lr
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        finite = torch.tensor(step != 2) if guarded else None  # step 2 is skipped (NaN grads)
        for pa, pb in zip(a.parameters(), b.parameters()):
            g = torch.randn(pa.shape, generator=gen)
            if finite is not None and not finite:
                g.view(-1)[0] = math.nan
            pa.grad, pb.grad = g.clone(), g.clone()
        for o in opts:
            o.step(finite=finite)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
        assert torch.isfinite(pa).all()
        torch.testing.assert_close(opts[0].state[pa]["mu"], opts[1].state[pb]["mu"], rtol=1e-6, atol=1e-7)


def test_foreach_is_the_default_and_uses_multi_tensor_ops(monkeypatch):
    """The default step reaches torch._foreach_norm (not a per-parameter torch.norm)."""
    model = torch.nn.Linear(4, 3)
    opt = optim.build(model, OptimConfig())
    calls = []
    real = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda ts, *a, **k: calls.append(len(ts)) or real(ts, *a, **k))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.param_groups[0]["lr"] = 0.1
    opt.step()
    assert calls == [1, 1]  # ||p|| and ||d|| of the one weight matrix, in one call each


def test_params_without_grad_or_frozen_are_left_alone():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    for p in model[1].parameters():
        p.requires_grad_(False)  # e.g. BYOL's EMA target network
    groups = optim.param_groups(model, 1e-6)
    ids = {id(p) for g in groups for p in g["params"]}
    assert ids == {id(p) for p in model[0].parameters()}
    opt = optim.build(model, OptimConfig())
    for g in opt.param_groups:
        g["lr"] = 0.1
    model[0].weight.grad = torch.ones_like(model[0].weight)  # the bias has no grad this step
    bias = model[0].bias.detach().clone()
    opt.step(finite=torch.tensor(True))
    assert torch.equal(model[0].bias, bias) and model[0].bias not in opt.state
    assert model[0].weight in opt.state


def test_apex_lars_is_optional_and_opt_in(monkeypatch):
    """apex only with BT_FAST_APEX_LARS=1 and CUDA; its groups map exclude -> is_skipped,
    and step(finite=False) raises apex's device-side noop flag for that step only."""
    assert type(optim.build(torch.nn.Linear(2, 2), OptimConfig())) is optim.LARS

    class FakeFusedLARS(torch.optim.Optimizer):  # the constructor and flag apex has
        def __init__(self, params, lr, momentum, weight_decay, trust_coefficient):
            super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                          trust_coefficient=trust_coefficient, is_skipped=False))
            self._dummy_overflow_buf = torch.zeros(1, dtype=torch.int)
            self.flags = []

        def step(self, closure=None):
            self.flags.append(int(self._dummy_overflow_buf))

    monkeypatch.setattr(optim, "apex_lars", lambda: FakeFusedLARS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert type(optim.build(torch.nn.Linear(2, 2), OptimConfig())) is optim.LARS  # not asked for
    monkeypatch.setenv(optim.APEX_ENV, "1")
    opt = optim.build(torch.nn.Linear(2, 2), OptimConfig(eta=0.003))
    assert isinstance(opt, FakeFusedLARS) and opt.defaults["trust_coefficient"] == 0.003
    assert [g["is_skipped"] for g in opt.param_groups] == [False, True]
    assert opt.param_groups[1]["weight_decay"] == 0.0
    opt.step(finite=torch.tensor(False))
    opt.step(finite=torch.tensor(True))
    opt.step()
    assert opt.flags == [1, 0, 0] and int(opt._dummy_overflow_buf) == 0
