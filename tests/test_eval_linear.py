"""Linear probe on cached features."""

import torch

from bt_fast.eval.linear import linear_probe, standardize


def test_linear_probe_separates_linearly_separable_features():
    g = torch.Generator().manual_seed(0)
    d, c = 24, 5
    w = torch.randn(d, c, generator=g)
    z = torch.randn(3000, d, generator=g)
    logits = z @ w
    top2 = logits.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1]) > 0.5           # a margin: separable, not just barely
    x, y = z[keep][:1200] * 50 + 7, logits[keep][:1200].argmax(1)  # badly scaled on purpose
    assert len(y) == 1200
    acc = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], epochs=30, seed=0)
    assert acc["top1"] >= 95.0, acc
    assert acc["train_top1"] >= 95.0


def test_linear_probe_is_deterministic_for_a_seed():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 8, generator=g), torch.randint(0, 3, (300,), generator=g)
    a = linear_probe(x[:200], y[:200], x[200:], y[200:], epochs=3, seed=4)
    b = linear_probe(x[:200], y[:200], x[200:], y[200:], epochs=3, seed=4)
    assert a == b


def test_standardize_uses_training_statistics():
    train, val = torch.randn(100, 4) * 3 + 2, torch.full((2, 4), 2.0)
    tr, va = standardize(train, val)
    torch.testing.assert_close(tr.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(va, ((val - train.mean(0)) / (train.std(0) + 1e-6)))
