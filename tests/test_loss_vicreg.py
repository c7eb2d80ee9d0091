"""vicreg_loss against main_vicreg.py's formula written out here in float64.

The Gram form (kernels/vicreg.py) must give the official loss and gradient without a
D x D tensor, also at D = 8192 where its covariance term is a difference of large
sums in fp32.
"""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from bt_fast.kernels import VICREG_IMPLS, choose_vicreg_impl, resolve_vicreg_impl, vicreg_loss, vicreg_costs
from test_loss_kernels import assert_ignores_autocast

UPSTREAM = 1.7
# (loss and terms, gradients), relative. bf16 inputs are compared with the formula on
# the same bf16-rounded values: the loss is computed in fp32, the gradient returned in bf16.
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-5, 1e-2)}


def _offdiag_sq(c, n, j0, width):
    """sum over rows j0..j0+width of cov, off the diagonal, of cov_ij^2 (float64)."""
    cov_rows = c[:, j0 : j0 + width].T @ c / (n - 1)  # [width, D] rows of cov
    diag = cov_rows[torch.arange(width), torch.arange(j0, j0 + width)]  # their diagonal entries
    return cov_rows.pow(2).sum() - diag.pow(2).sum()  # fp64: ~1e-16 of the whole, no fp32 in sight


def vicreg64(z1, z2, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4, block=1024):
    """main_vicreg.py's loss in float64, covariance rows a block at a time (checkpointed,
    so D = 8192 fits): (loss, invariance, variance, covariance)."""
    x, y = z1.double(), z2.double()
    n, d = x.shape
    invariance = ((x - y) ** 2).sum() / (n * d)
    var_terms, cov_terms = [], []
    for z in (x, y):
        c = z - z.sum(0) / n
        std = ((c**2).sum(0) / (n - 1) + eps).sqrt()
        var_terms.append(torch.clamp(1 - std, min=0).sum() / d)
        cov_terms.append(sum(checkpoint(_offdiag_sq, c, n, j0, min(block, d - j0), use_reentrant=False)
                             for j0 in range(0, d, block)) / d)
    variance, covariance = (var_terms[0] + var_terms[1]) / 2, cov_terms[0] + cov_terms[1]
    loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    return loss, invariance, variance, covariance


def _z(n, d, seed=0):
    """Correlated views whose feature scales straddle 1, so the variance hinge is half active."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.3, 1.6, d, dtype=torch.float64)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64) * scale + 0.5
    z2 = 0.6 * z1 + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    return z1, z2


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def _grads(terms_fn, z1, z2, dtype):
    """Terms and d(1.7 * loss)/d(z1, z2) of terms_fn on dtype copies."""
    a = z1.detach().to(dtype).clone().requires_grad_(True)
    b = z2.detach().to(dtype).clone().requires_grad_(True)
    terms = terms_fn(a, b)
    (terms[0] * UPSTREAM).backward()
    return terms, a.grad, b.grad


@pytest.mark.parametrize("n,d", [(37, 50), (5, 3), (64, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["reference", "gram"])
def test_impl_matches_float64_formula(impl, dtype, n, d):
    z1, z2 = _z(n, d)
    z1, z2 = z1.to(dtype).double(), z2.to(dtype).double()  # the values dtype can hold
    want, w1, w2 = _grads(vicreg64, z1, z2, torch.float64)
    got, g1, g2 = _grads(lambda a, b: vicreg_loss(a, b, impl=impl, return_terms=True), z1, z2, dtype)
    loss_tol, grad_tol = TOL[dtype]
    for x, ref in zip(got, want):
        assert x.dtype == torch.float32 and x.dim() == 0
        assert abs(x.double() - ref).item() <= loss_tol * abs(ref).item(), (x, ref)
    assert want[2] > 0  # the hinge is active on some features
    assert g1.dtype == dtype and _rel(g1, w1) <= grad_tol and _rel(g2, w2) <= grad_tol


@pytest.mark.parametrize("impl", ["reference", "gram"])
def test_coefficients_and_each_term_carry_their_own_gradient(impl):
    z1, z2 = _z(37, 50, seed=1)
    kw = dict(sim_coeff=3.0, std_coeff=0.5, cov_coeff=7.0, eps=1e-3)
    want = vicreg64(z1, z2, **kw)
    a = z1.float().requires_grad_(True)
    got = vicreg_loss(a, z2.float(), impl=impl, return_terms=True, **kw)
    for x, ref in zip(got, want):
        assert abs(x.double() - ref).item() <= 1e-5 * abs(ref).item()
    b = z1.clone().requires_grad_(True)
    ref_terms = vicreg64(b, z2, **kw)
    for k in (1, 2, 3):  # metrics may detach the terms; the loss is what trains
        (g,) = torch.autograd.grad(got[k] * -0.8, a, retain_graph=True)
        (g64,) = torch.autograd.grad(ref_terms[k] * -0.8, b, retain_graph=True)
        assert _rel(g, g64) <= 1e-4, k


def test_gram_ignores_a_callers_autocast():
    """Called inside autocast by mistake, the Gram matrices must stay fp32 (bf16 would
    lose the covariance difference): the same loss and gradient as outside."""
    assert_ignores_autocast(lambda a, b: vicreg_loss(a, b, impl="gram"), *(z.float() for z in _z(37, 50, seed=4)))


def test_gram_passes_gradcheck_on_every_term():
    z1, z2 = _z(6, 4, seed=2)
    z1.requires_grad_(True), z2.requires_grad_(True)
    torch.autograd.gradcheck(lambda a, b: vicreg_loss(a, b, impl="gram", eps=1e-3, return_terms=True)[1:], (z1, z2))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["random", "one_feature_100x"])
def test_gram_in_fp32_at_d_8192_against_float64(case):
    """The covariance term is ||G||^2 - sum v^2: fp32 G, fp64 sums. Stated tolerance: 1e-5
    relative on every term and gradient (measured here: <= 7e-8 and 3e-7)."""
    z1, z2 = _z(40, 8192, seed=3)
    if case == "one_feature_100x":  # one variance dominates sum v^2: the hard cancellation
        z1[:, 0] *= 100
    want, w1, w2 = _grads(lambda a, b: vicreg64(a, b, block=2048), z1, z2, torch.float64)
    got, g1, g2 = _grads(lambda a, b: vicreg_loss(a, b, impl="gram", return_terms=True), z1, z2, torch.float32)
    for x, ref in zip(got, want):
        assert abs(x.double() - ref).item() <= 1e-5 * abs(ref).item(), (x, ref)
    assert _rel(g1, w1) <= 1e-5 and _rel(g2, w2) <= 1e-5


def test_auto_follows_the_cost_model():
    assert resolve_vicreg_impl("auto", torch.zeros(256, 8192)) == "gram"  # N << D: O(N^2 D) wins
    assert resolve_vicreg_impl("auto", torch.zeros(4096, 64)) == "reference"  # N >> D: cov is small
    impl, costs = choose_vicreg_impl(2048, 8192, 8, torch.bfloat16, "cuda")
    assert impl == "gram" and set(costs) == {"gram", "reference", "official"}
    c = vicreg_costs(256, 8192)
    assert c["reference"].memory_bytes / c["gram"].memory_bytes > 10  # 6 D^2 against 4 N D
    assert vicreg_costs(2048, 8192, 4, torch.bfloat16)["gram"].sent_bytes == 3 * 512 * 2 * 8192 * 2 + 1.5 * 24
    assert "auto" in VICREG_IMPLS
    with pytest.raises(ValueError, match="one of"):
        vicreg_loss(torch.zeros(4, 4), torch.zeros(4, 4), impl="dense")
    with pytest.raises(ValueError, match="at least 2"):
        vicreg_loss(torch.zeros(1, 4), torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        vicreg_loss(torch.zeros(4, 4), torch.zeros(4, 5))
