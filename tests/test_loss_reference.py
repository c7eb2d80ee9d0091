"""The oracle itself: kernels/reference.py against a float64 formula written here."""

import pytest
import torch

from bt_fast.kernels.reference import barlow_twins_loss_reference, off_diagonal, official_loss


def loss64(z1, z2, lambd=0.0051, eps=1e-5):
    """The paper's formula, element by element in float64, independent of reference.py."""
    z1, z2 = z1.double(), z2.double()
    n, d = z1.shape
    m1, m2 = z1.sum(0) / n, z2.sum(0) / n
    s1 = (((z1 - m1) ** 2).sum(0) / n + eps).sqrt()
    s2 = (((z2 - m2) ** 2).sum(0) / n + eps).sqrt()
    c = torch.einsum("ni,nj->ij", (z1 - m1) / s1, (z2 - m2) / s2) / n
    eye = torch.eye(d, dtype=torch.bool)
    return ((c[eye] - 1) ** 2).sum() + lambd * (c[~eye] ** 2).sum()


def _z(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 2 + 0.5, torch.randn(n, d, generator=g)


@pytest.mark.parametrize("n,d", [(37, 50), (5, 3), (64, 16)])
def test_reference_matches_float64_formula(n, d):
    z1, z2 = _z(n, d)
    z1.requires_grad_(True)
    loss = barlow_twins_loss_reference(z1, z2)
    want = loss64(z1, z2)
    assert loss.dtype == torch.float32
    assert abs(loss.double() - want) / want <= 1e-5
    (g,) = torch.autograd.grad(loss, z1)
    (g64,) = torch.autograd.grad(want, z1)
    assert ((g.double() - g64).norm() / g64.norm()) <= 1e-4


def test_reference_terms_and_lambd():
    z1, z2 = _z(37, 50)
    loss, on_diag, off_diag = barlow_twins_loss_reference(z1, z2, lambd=0.3, return_terms=True)
    torch.testing.assert_close(loss, on_diag + 0.3 * off_diag)
    assert abs(loss.double() - loss64(z1, z2, lambd=0.3)) / loss <= 1e-5


def test_reference_invariant_to_affine_rescaling_per_column():
    z1, z2 = _z(37, 50)
    z1, z2 = z1.double(), z2.double()
    g = torch.Generator().manual_seed(1)
    a = torch.rand(50, generator=g, dtype=torch.float64) * 5 + 0.1  # a > 0
    b = torch.randn(50, generator=g, dtype=torch.float64) * 10
    base = barlow_twins_loss_reference(z1, z2, eps=0.0)
    torch.testing.assert_close(barlow_twins_loss_reference(z1 * a + b, z2, eps=0.0), base)
    torch.testing.assert_close(barlow_twins_loss_reference(z1, z2 * a - b, eps=0.0), base)


def test_off_diagonal_and_official_formulation_agree_with_reference():
    x = torch.arange(16.0).view(4, 4)
    assert off_diagonal(x).tolist() == [v for v in range(16) if v % 5 != 0]
    z1, z2 = _z(37, 50)
    torch.testing.assert_close(official_loss(z1, z2), barlow_twins_loss_reference(z1, z2))
