"""Every loss implementation against a float64 formula, on one process.

Triton runs under TRITON_INTERPRET=1 (conftest.py) at small, odd sizes.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bt_fast.kernels import IMPLS, barlow_twins_loss, choose_impl, loss_costs, resolve_impl, vicreg_loss
from bt_fast.kernels.gram import gram_terms
from bt_fast.kernels.normalize import normalize_pair
from bt_fast.kernels.reference import barlow_twins_loss_reference

IMPL_NAMES = ["reference", "gram", pytest.param("dense", marks=pytest.mark.slow)]  # dense: interpreter
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 1e-2), torch.float16: (1e-2, 1e-2)}


def _z(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + 0.5
    z2 = 0.5 * z1 + torch.randn(n, d, generator=g, dtype=torch.float64)  # correlated views
    return z1, z2


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def _run(impl, z1, z2, dtype, upstream=1.7, **kw):
    a = z1.detach().to(dtype).clone().requires_grad_(True)
    b = z2.detach().to(dtype).clone().requires_grad_(True)
    loss = barlow_twins_loss(a, b, impl=impl, **kw)
    (loss * upstream).backward()
    return loss, a.grad, b.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_impl_matches_float64(impl, dtype):
    z1, z2 = _z(37, 50)
    want, g1_want, g2_want = _run("reference", z1, z2, torch.float64)  # fp64 oracle
    loss, g1, g2 = _run(impl, z1, z2, dtype)
    loss_tol, grad_tol = TOL[dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.double() - want).item() / want.item() <= loss_tol
    assert g1.dtype == dtype and g2.dtype == dtype
    assert _rel(g1, g1_want) <= grad_tol
    assert _rel(g2, g2_want) <= grad_tol


@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_terms_and_their_gradients(impl):
    z1, z2 = _z(37, 50, seed=3)
    want = barlow_twins_loss_reference(z1, z2, lambd=0.02, return_terms=True)
    a = z1.float().requires_grad_(True)
    got = barlow_twins_loss(a, z2.float(), lambd=0.02, impl=impl, return_terms=True)
    for x, ref in zip(got, want):
        assert x.dtype == torch.float32
        assert abs(x.double() - ref).item() / ref.item() <= 1e-5
    # the terms carry gradients of their own (metrics may detach them)
    (g_on,) = torch.autograd.grad(got[1] * 0.3 - got[2] * 2.0, a)
    b = z1.clone().requires_grad_(True)
    _, on64, off64 = barlow_twins_loss_reference(b, z2, lambd=0.02, return_terms=True)
    (g_on64,) = torch.autograd.grad(on64 * 0.3 - off64 * 2.0, b)
    assert _rel(g_on, g_on64) <= 1e-4


@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_two_samples_give_no_nan(impl):
    z1, z2 = _z(2, 5)
    loss, g1, g2 = _run(impl, z1, z2, torch.float32)
    assert torch.isfinite(loss) and torch.isfinite(g1).all() and torch.isfinite(g2).all()
    const = torch.ones(2, 5, dtype=torch.float64)  # zero variance: eps keeps it finite
    loss, g1, g2 = _run(impl, const, z2, torch.float32)
    assert torch.isfinite(loss) and torch.isfinite(g1).all() and torch.isfinite(g2).all()


@pytest.mark.slow
def test_dense_kernel_across_many_tiles_and_strides():
    """Small blocks: 4 x 4 tiles, masked edges in N and D, non-contiguous inputs."""
    from bt_fast.kernels.dense import dense_terms  # imports triton: only the tests that run it pay

    z1, z2 = _z(37, 50, seed=5)
    a1, a2 = normalize_pair(z1, z2)
    want = barlow_twins_loss_reference(z1, z2, return_terms=True)[1:]
    x1 = a1.float().T.contiguous().T.requires_grad_(True)  # column-major [N, D]
    x2 = a2.float().requires_grad_(True)
    got = dense_terms(x1, x2, block_n=16, block_d=16)
    for x, ref in zip(got, want):
        assert abs(x.double() - ref).item() / ref.item() <= 1e-5
    (got[0] + 0.7 * got[1]).backward()
    y1, y2 = a1.detach().requires_grad_(True), a2.detach().requires_grad_(True)
    c = y1.T @ y2 / 37
    ((torch.diagonal(c) - 1).pow(2).sum() + 0.7 * (c.pow(2).sum() - torch.diagonal(c).pow(2).sum())).backward()
    assert _rel(x1.grad, y1.grad) <= 1e-4 and _rel(x2.grad, y2.grad) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gram_with_the_fused_triton_normalization(dtype):
    """The CUDA default (colnorm.py kernel) run here under the interpreter."""
    z1, z2 = _z(37, 50, seed=7)
    want = barlow_twins_loss_reference(z1, z2, return_terms=True)
    x1 = z1.detach().to(dtype).clone().requires_grad_(True)
    on_diag, off_diag = gram_terms(x1, z2.to(dtype), fused=True)
    loss_tol, grad_tol = TOL[dtype]
    for x, ref in zip((on_diag, off_diag), want[1:]):
        assert abs(x.double() - ref).item() / ref.item() <= loss_tol
    ((on_diag + 0.0051 * off_diag) * 1.7).backward()
    b = z1.clone().requires_grad_(True)
    (barlow_twins_loss_reference(b, z2) * 1.7).backward()
    assert _rel(x1.grad, b.grad) <= grad_tol


def test_normalization_and_gram_pass_gradcheck():
    z1, z2 = _z(6, 4)
    z1.requires_grad_(True), z2.requires_grad_(True)
    torch.autograd.gradcheck(lambda a, b: normalize_pair(a, b, eps=1e-3), (z1, z2))
    torch.autograd.gradcheck(lambda a, b: gram_terms(a, b, eps=1e-3), (z1, z2))


@pytest.mark.slow
def test_dense_backward_grid_has_enough_programs_and_covers_every_tile():
    """The 2-D backward grid: columns of dA x shares of c's column blocks J.

    Before, one program per column block (8 at D = 512); now a GPU of 132 SMs asking
    for 264 programs gets 64 at D = 512. Every split, uneven ones included (3 shares of
    4 J blocks), must give the same gradient at sizes that are not multiples of the
    blocks (N = 37, D = 50 with 16 x 16 tiles), for a slice of rows (row0, n_out) as
    on a rank of a distributed run.
    """
    from bt_fast.kernels.dense import backward_grid, tile_terms_backward  # imports triton

    assert backward_grid(512, 64, 264) == (8, 8)  # was (8,): 8 programs
    assert backward_grid(8192, 64, 264) == (128, 3)  # 384 programs, 3 partial gradients
    assert backward_grid(50, 16, 1) == (4, 1)  # the interpreter: no split
    assert backward_grid(50, 16, 10) == (4, 3)  # J blocks {0, 3}, {1}, {2}
    assert backward_grid(50, 16, 10**6) == (4, 4)  # never more shares than J blocks

    z1, z2 = _z(37, 50, seed=11)
    a, b = (x.detach() for x in normalize_pair(z1, z2))  # [37, 50] float64
    g_on, g_off = 1.3, -0.4
    x = a.clone().requires_grad_(True)
    c = x.T @ b / 37
    on, off = (torch.diagonal(c) - 1).pow(2).sum(), c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    (want,) = torch.autograd.grad(g_on * on + g_off * off, x)
    g = torch.tensor([g_on, g_off])
    for programs in (1, 4, 8, 12, 16):
        da = tile_terms_backward(a.float(), b.float(), g, row0=5, n_out=29, block_n=16, block_d=16,
                                 programs=programs)
        assert da.shape == (29, 50)
        assert _rel(da, want[5:34]) <= 1e-5, programs


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in bytes) any torch op produces, forward and backward."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def assert_ignores_autocast(loss_fn, z1, z2) -> None:
    """Called inside a caller's bf16 autocast by mistake, a loss must compute as outside
    it: an fp32 result, the same value and gradient to 1e-6."""
    a = z1.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = loss_fn(a, z2)
    outside = loss_fn(a, z2)
    (g_in,), (g_out,) = torch.autograd.grad(inside, a), torch.autograd.grad(outside, a)
    assert inside.dtype == torch.float32 and abs(inside - outside).item() <= 1e-6 * outside.item()
    assert _rel(g_in, g_out.double()) <= 1e-6


def largest_tensor_of(loss_fn, z1, z2) -> int:
    """Bytes of the largest tensor allocated by loss_fn(z1, z2) forward + backward (fp32)."""
    a, b = z1.float().requires_grad_(True), z2.float().requires_grad_(True)
    with _LargestTensor() as seen:
        loss_fn(a, b).backward()
    return seen.largest


@pytest.mark.parametrize("loss,impl,makes_dxd", [
    (barlow_twins_loss, "reference", True), pytest.param(barlow_twins_loss, "dense", False, marks=pytest.mark.slow),
    (barlow_twins_loss, "gram", False), (vicreg_loss, "reference", True), (vicreg_loss, "gram", False)],
    ids=lambda v: getattr(v, "__name__", str(v)))
def test_dense_and_gram_never_allocate_a_dxd_tensor(loss, impl, makes_dxd):
    """Barlow Twins' c and VICReg's covariances are D x D only in the references."""
    n, d = 20, 64  # a D x D fp32 tensor is 16 KiB, far above any [N, D] (5 KiB) or [N, N]
    largest = largest_tensor_of(lambda a, b: loss(a, b, impl=impl), *_z(n, d))
    assert (largest >= 4 * d * d) == makes_dxd, largest  # the reference proves the probe works


def test_auto_uses_the_cost_model_and_never_the_interpreter_on_cpu():
    z = torch.zeros(256, 8192)
    assert resolve_impl("auto", z) == "gram"  # N << D: O(N^2 D) wins
    assert resolve_impl("auto", torch.zeros(4096, 64)) == "reference"  # N >> D: dense c is small
    for n, d, w in [(256, 8192, 1), (2048, 8192, 4), (64, 64, 2)]:
        impl, costs = choose_impl(n, d, w, torch.float32, "cpu")
        assert impl != "dense" and set(costs) == {"gram", "dense", "reference", "official"}
    impl, _ = choose_impl(256, 8192, 8, torch.bfloat16, "cuda")
    assert impl in ("gram", "dense")
    with pytest.raises(ValueError, match="one of"):
        barlow_twins_loss(z[:4, :4], z[:4, :4], impl="fast")
    assert "auto" in IMPLS


def test_cost_model_counts_the_communication_claims():
    """At N_global=2048, D=8192 the bf16 gather sends ~8x fewer bytes than all-reducing c."""
    for w in (2, 4):
        costs = loss_costs(2048, 8192, w, torch.bfloat16)
        official = loss_costs(2048, 8192, w, torch.float32)["official"].sent_bytes
        # the main terms are exactly 2 D / N = 8x apart; both sides add O(D) statistics
        assert official / costs["gram"].sent_bytes >= 7.95
    assert loss_costs(256, 8192, 1)["gram"].sent_bytes == 0


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["dense", "gram"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernels_on_gpu_match_float64(impl, dtype):
    """The same comparison with compiled Triton on CUDA, at a size the interpreter avoids."""
    z1, z2 = _z(512, 1000)
    want, g1_want, g2_want = _run("reference", z1, z2, torch.float64)
    loss, g1, g2 = _run(impl, z1.cuda(), z2.cuda(), dtype)
    loss_tol, grad_tol = TOL[dtype]
    assert abs(loss.double().cpu() - want).item() / want.item() <= loss_tol
    assert _rel(g1.cpu(), g1_want) <= grad_tol and _rel(g2.cpu(), g2_want) <= grad_tol


@pytest.mark.gpu
def test_dense_addresses_past_2_to_the_31_on_gpu():
    """int64 offsets: a column-major [N, 64] view puts column i at i * N, past 2^31 for
    i >= 64 at N = 2^25 + 3 (4 GiB of bf16 per view; never run: no GPU here yet)."""
    from bt_fast.kernels.dense import tile_terms_forward  # imports triton

    n, d = 2**25 + 3, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(d, n, device="cuda", dtype=torch.bfloat16, generator=g).T  # strides (1, n)
    b = (a.float() + torch.randn(n, d, device="cuda", generator=g)).to(torch.bfloat16)
    assert a.stride(1) * (d - 1) >= 2**31
    on_diag, off_diag = tile_terms_forward(a, b)
    c = a.float().T @ b.float() / n
    diag = torch.diagonal(c)
    assert abs(on_diag.item() - (diag - 1).pow(2).sum().item()) <= 1e-3 * max(1.0, on_diag.item())
    off = c.pow(2).sum() - diag.pow(2).sum()
    assert abs(off_diag.item() - off.item()) <= 1e-2 * off.item()
