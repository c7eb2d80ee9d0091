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
