"""Fused column normalization of a view pair (Triton): statistics, normalize, diag of c.

For the raw pair z1, z2 [N, D] (any float dtype), one program per block of BLOCK_D
columns makes three passes down the N rows, all in fp32:

    pass 1:  mean_k  = (1/N) sum_n z_nk                              (both views)
    pass 2:  var_k   = (1/N) sum_n (z_nk - mean_k)^2                 (two-pass: no cancellation)
             inv_k   = 1 / sqrt(var_k + eps)
    pass 3:  a_nk    = (z_nk - mean_k) inv_k                         written out, [N, D] each
             c_kk    = (1/N) sum_n a1_nk a2_nk                       the diagonal of c

Torch needs about ten full passes over [N, 2D] for the same; on a GPU these passes cost
as much as gram's matmuls at N = 2048, D = 8192, so fusing them is where Triton pays.
On a CPU gram uses the torch version (gram.gathered_normalize); this kernel runs there
only in the interpreter, in tests.
"""

from __future__ import annotations

import torch

from bt_fast.kernels.tiles import COLNORM_BLOCK_D, COLNORM_BLOCK_N
from bt_fast.kernels.triton_env import tl, triton


@triton.jit
def _rows(n0, N, col_ok, BLOCK_N: tl.constexpr):
    """Rows n0 .. n0 + BLOCK_N (int64: n * stride passes 2^31) and the in-bounds mask."""
    rows = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    return rows, (rows[:, None] < N) & col_ok[None, :]


@triton.jit
def _tile(ptr, rows, cols, stride_n, stride_d, m):
    """The [BLOCK_N, BLOCK_D] tile rows x cols of a strided [N, D] tensor as fp32, 0 outside m."""
    return tl.load(ptr + rows[:, None] * stride_n + cols[None, :] * stride_d, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _colnorm_pair_kernel(
    z1_ptr,  # [N, D] raw view 1 (fp32 / fp16 / bf16)
    z2_ptr,  # [N, D] raw view 2
    a1_ptr,  # [N, D] fp32 out: normalized view 1
    a2_ptr,  # [N, D] fp32 out: normalized view 2
    inv_ptr,  # [2, D] fp32 out: 1 / sqrt(var + eps) of view 1, then view 2
    diag_ptr,  # [D] fp32 out: c_kk
    N, D,
    stride_z1n, stride_z1d, stride_z2n, stride_z2d, stride_an,
    eps,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    cols = (tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)  # int64: n * stride passes 2^31
    col_ok = cols < D
    sum1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    sum2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):  # pass 1: column sums
        rows, m = _rows(n0, N, col_ok, BLOCK_N)
        sum1 += tl.sum(_tile(z1_ptr, rows, cols, stride_z1n, stride_z1d, m), axis=0)
        sum2 += tl.sum(_tile(z2_ptr, rows, cols, stride_z2n, stride_z2d, m), axis=0)
    mean1 = sum1 / N
    mean2 = sum2 / N
    sq1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    sq2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):  # pass 2: centred squares
        rows, m = _rows(n0, N, col_ok, BLOCK_N)
        x1 = _tile(z1_ptr, rows, cols, stride_z1n, stride_z1d, m)
        x2 = _tile(z2_ptr, rows, cols, stride_z2n, stride_z2d, m)
        x1 = tl.where(m, x1 - mean1[None, :], 0.0)
        x2 = tl.where(m, x2 - mean2[None, :], 0.0)
        sq1 += tl.sum(x1 * x1, axis=0)
        sq2 += tl.sum(x2 * x2, axis=0)
    inv1 = 1.0 / tl.sqrt(sq1 / N + eps)
    inv2 = 1.0 / tl.sqrt(sq2 / N + eps)
    dot = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):  # pass 3: normalize, write, diagonal of c
        rows, m = _rows(n0, N, col_ok, BLOCK_N)
        x1 = _tile(z1_ptr, rows, cols, stride_z1n, stride_z1d, m)
        x2 = _tile(z2_ptr, rows, cols, stride_z2n, stride_z2d, m)
        y1 = tl.where(m, (x1 - mean1[None, :]) * inv1[None, :], 0.0)
        y2 = tl.where(m, (x2 - mean2[None, :]) * inv2[None, :], 0.0)
        tl.store(a1_ptr + rows[:, None] * stride_an + cols[None, :], y1, mask=m)
        tl.store(a2_ptr + rows[:, None] * stride_an + cols[None, :], y2, mask=m)
        dot += tl.sum(y1 * y2, axis=0)
    tl.store(inv_ptr + cols, inv1, mask=col_ok)
    tl.store(inv_ptr + D + cols, inv2, mask=col_ok)
    tl.store(diag_ptr + cols, dot / N, mask=col_ok)


def colnorm_pair(z1, z2, eps: float, *, block_n: int = COLNORM_BLOCK_N, block_d: int = COLNORM_BLOCK_D):
    """(a1, a2 [N, D] fp32, inv_sigma [2D] fp32, c_diag [D] fp32) of the raw pair z1, z2 [N, D]."""
    if z1.shape != z2.shape or z1.dim() != 2 or z1.device != z2.device:
        raise ValueError(f"expected two [N, D] tensors on one device, got {tuple(z1.shape)}, {tuple(z2.shape)}")
    if z1.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"colnorm_pair takes fp32/fp16/bf16, got {z1.dtype}")
    n, d = z1.shape
    a1 = torch.empty((n, d), dtype=torch.float32, device=z1.device)
    a2 = torch.empty_like(a1)
    inv_sigma = torch.empty(2 * d, dtype=torch.float32, device=z1.device)
    c_diag = torch.empty(d, dtype=torch.float32, device=z1.device)
    grid = (triton.cdiv(d, block_d),)
    _colnorm_pair_kernel[grid](
        z1, z2, a1, a2, inv_sigma, c_diag, n, d,
        z1.stride(0), z1.stride(1), z2.stride(0), z2.stride(1), a1.stride(0), eps,
        BLOCK_N=block_n, BLOCK_D=block_d,
    )
    return a1, a2, inv_sigma, c_diag
