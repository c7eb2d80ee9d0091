"""nt_xent_loss (SimCLR) and byol_loss against their formulas written out here in float64."""

import math

import pytest
import torch

from bt_fast.kernels import byol_loss, byol_loss_reference, nt_xent_loss, nt_xent_loss_reference
from test_loss_kernels import assert_ignores_autocast

UPSTREAM = 1.7
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-5, 1e-2)}  # (loss, gradient) relative


def nt_xent64(z1, z2, temperature):
    """SimCLR's NT-Xent anchor by anchor in float64: positive = the other view of the same
    sample, the 2N - 2 other rows negatives, the anchor itself left out."""
    z = torch.cat([z1, z2]).double()
    u = z / z.norm(dim=1, keepdim=True)
    n2 = u.shape[0]
    sim = u @ u.T / temperature
    losses = []
    for i in range(n2):
        others = [k for k in range(n2) if k != i]
        losses.append(torch.logsumexp(sim[i, others], 0) - sim[i, (i + n2 // 2) % n2])
    return torch.stack(losses).mean()


def byol64(p1, p2, z1, z2):
    """BYOL's symmetric loss sample by sample in float64; z enters as a constant."""
    def cos(p, z):
        p, z = p.double(), z.detach().double()
        return (p * z).sum(1) / (p.norm(dim=1) * z.norm(dim=1))

    return ((2 - 2 * cos(p1, z2)) + (2 - 2 * cos(p2, z1))).mean()


def _z(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.3
    z2 = 0.7 * z1 + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return z1, z2


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def _loss_and_grads(fn, tensors, dtype):
    xs = [t.detach().to(dtype).clone().requires_grad_(True) for t in tensors]
    loss = fn(*xs)
    (loss * UPSTREAM).backward()
    return loss, [x.grad for x in xs]


@pytest.mark.parametrize("n,d,t", [(37, 50, 0.1), (3, 7, 0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fn", [nt_xent_loss, nt_xent_loss_reference])
def test_nt_xent_matches_float64_formula(fn, dtype, n, d, t):
    z1, z2 = (z.to(dtype).double() for z in _z(n, d))  # the values dtype can hold
    want, (w1, w2) = _loss_and_grads(lambda a, b: nt_xent64(a, b, t), (z1, z2), torch.float64)
    loss, (g1, g2) = _loss_and_grads(lambda a, b: fn(a, b, temperature=t), (z1, z2), dtype)
    loss_tol, grad_tol = TOL[dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.double() - want).item() <= loss_tol * want.item()
    assert g1.dtype == dtype and _rel(g1, w1) <= grad_tol and _rel(g2, w2) <= grad_tol


@pytest.mark.parametrize("t", [0.07, 0.03])
def test_nt_xent_keeps_its_digits_when_the_loss_is_small(t):
    """Well-separated positives (SimCLR late in training): the loss is 4e-3 (t = 0.07) or
    2e-7 (t = 0.03) while lse_i and L_i,pos are ~ 1/t, so lse - L_pos would keep 3 or
    no digits of fp32, and 1 - p_pos in the gradient none. The kernel keeps 1e-5 (loss)
    and 1e-4 (gradient); measured here <= 1.2e-6 and 5e-6. (The reference's
    cross_entropy subtracts, so it is not held to this.)"""
    z1, z2 = _z(16, 128, seed=7)
    want, (w1, w2) = _loss_and_grads(lambda a, b: nt_xent64(a, b, t), (z1, z2), torch.float64)
    loss, (g1, g2) = _loss_and_grads(lambda a, b: nt_xent_loss(a, b, temperature=t), (z1, z2), torch.float32)
    assert want < 0.01
    assert abs(loss.double() - want).item() <= 1e-5 * want.item()
    assert _rel(g1, w1) <= 1e-4 and _rel(g2, w2) <= 1e-4


def test_nt_xent_known_values_and_invariance():
    # every row the same direction: all 2N - 1 candidates tie, l_i = log(2N - 1)
    same = torch.ones(5, 3)
    assert abs(nt_xent_loss(same, 2 * same).item() - math.log(9)) <= 1e-6
    # cosine similarity: rescaling any row by a positive factor changes nothing
    z1, z2 = _z(9, 6, seed=4)
    scale = torch.rand(9, 1, dtype=torch.float64) * 10 + 0.1
    torch.testing.assert_close(nt_xent_loss(z1 * scale, z2), nt_xent_loss(z1, z2))
    # swapping the views relabels anchors only
    torch.testing.assert_close(nt_xent_loss(z2, z1), nt_xent_loss(z1, z2))
    # the temperature matters
    assert nt_xent_loss(z1, z2, temperature=0.5) != nt_xent_loss(z1, z2, temperature=0.1)


def test_nt_xent_ignores_a_callers_autocast():
    assert_ignores_autocast(nt_xent_loss, *(z.float() for z in _z(9, 6, seed=8)))


def test_nt_xent_passes_gradcheck_and_rejects_bad_input():
    z1, z2 = _z(4, 3, seed=5)
    z1.requires_grad_(True), z2.requires_grad_(True)
    torch.autograd.gradcheck(lambda a, b: nt_xent_loss(a, b, temperature=0.3), (z1, z2))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(z1, z2, temperature=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        nt_xent_loss(z1[:1], z2[:1])
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        nt_xent_loss(z1, z2[:3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fn", [byol_loss, byol_loss_reference])
def test_byol_matches_float64_formula_and_stops_the_target_gradient(fn, dtype):
    g = torch.Generator().manual_seed(6)
    p1, p2, z1, z2 = (torch.randn(19, 33, generator=g, dtype=torch.float64).to(dtype).double() for _ in range(4))
    want, wants = _loss_and_grads(byol64, (p1, p2, z1, z2), torch.float64)
    loss, grads = _loss_and_grads(fn, (p1, p2, z1, z2), dtype)
    loss_tol, grad_tol = TOL[dtype]
    assert loss.dtype == torch.float32 and abs(loss.double() - want).item() <= loss_tol * want.item()
    assert _rel(grads[0], wants[0]) <= grad_tol and _rel(grads[1], wants[1]) <= grad_tol
    assert grads[2] is None and grads[3] is None  # the target network learns by EMA only


def test_byol_known_values():
    p = torch.randn(7, 5)
    assert abs(byol_loss(p, 3 * p, p, p).item()) <= 1e-6  # predictions on target: 0
    assert abs(byol_loss(p, p, -p, -2 * p).item() - 8.0) <= 1e-5  # opposite: 2 * (2 + 2)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        byol_loss(p, p, p, p[:, :4])
