"""Barlow Twins terms with Triton: c tile by tile, never the D x D matrix.

For normalized views A, B [N, D] and c = A^T B / N, split c into BLOCK_D x BLOCK_D
tiles. Each forward program computes one tile (a loop over N in BLOCK_N rows),

    c[I, J] = sum_n A[n, I]^T B[n, J] / N

and reduces it on the spot into two partial sums, sum_{i=j} (c_ii - 1)^2 and
sum_{i!=j} c_ij^2, written to a [tiles, 2] buffer. Backward recomputes each tile (the
way flash attention recomputes its N x N scores) and applies d loss / d c, which is
elementwise in c:

    G_ij = 2 g_on (c_ii - 1)   if i == j
         = 2 g_off c_ij         otherwise
    dA[n, I] = sum_J B[n, J] G[I, J]^T / N

One kernel gives dA; the same kernel with A and B swapped gives dB, because c(B, A) is
c(A, B)^T and G is symmetric in its definition. Extra memory: O(tiles + split n D),
never O(D^2). Flops: 2 N D^2 forward, 2 x (2 N D^2 recompute + 2 n D^2 gradient) backward.
Accumulation is fp32 whatever the input dtype (fp16 would overflow: the off-diagonal
sum starts near D^2 / N).

Distributed, A and B are the gathered global rows (collectives.all_gather_pair); each rank
recomputes every tile over all N rows and writes the gradient of its own n rows only.

Grids: forward (T, T) programs for T = cdiv(D, BLOCK_D); backward (T, split), a
program per column block of dA and per share of the J blocks (``backward_grid``), so a
GPU has work for every SM even at D = 512. Addresses are computed in int64: a row
offset n * stride passes 2^31 once N * 2D does (the gathered [N, 2D] pair), e.g. at
N = 131072, D = 8192.
"""

from __future__ import annotations

import torch

from bt_fast.kernels import collectives
from bt_fast.kernels.tiles import DENSE_BLOCK_D, DENSE_BLOCK_N
from bt_fast.kernels.triton_env import INTERPRETED, tl, triton


@triton.jit
def _c_tile(a_ptr, b_ptr, offs_i, offs_j, N, D, stride_an, stride_ad, stride_bn, stride_bd, inv_n,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32_IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """c[I, J] = A[:, I]^T B[:, J] / N for one [BLOCK_D, BLOCK_D] tile, fp32 accumulation."""
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)  # n * stride passes 2^31 at N * 2D
        # A[n, I] loaded transposed: [BLOCK_D, BLOCK_N]
        a_t = tl.load(a_ptr + offs_i[:, None] * stride_ad + offs_n[None, :] * stride_an,
                      mask=(offs_i[:, None] < D) & (offs_n[None, :] < N), other=0.0)
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_j[None, :] * stride_bd,
                    mask=(offs_n[:, None] < N) & (offs_j[None, :] < D), other=0.0)  # [BLOCK_N, BLOCK_D]
        if UPCAST:
            a_t, b = a_t.to(tl.float32), b.to(tl.float32)
        if FP32_IEEE:
            acc = tl.dot(a_t, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a_t, b, acc)
    return acc * inv_n


@triton.jit
def _tile_terms_fwd_kernel(
    a_ptr,  # [N, D] normalized view 1
    b_ptr,  # [N, D] normalized view 2
    part_ptr,  # [T_I * T_J, 2] fp32 out: per tile (sum (c_ii-1)^2, sum_{i!=j} c_ij^2)
    N, D,
    stride_an, stride_ad, stride_bn, stride_bd,
    inv_n,  # 1 / N
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32_IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_i = (pid_i * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)  # int64: see _c_tile
    offs_j = (pid_j * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    c = _c_tile(a_ptr, b_ptr, offs_i, offs_j, N, D, stride_an, stride_ad, stride_bn, stride_bd,
                inv_n, BLOCK_N, BLOCK_D, FP32_IEEE, UPCAST)  # [BLOCK_D, BLOCK_D] tile of c
    valid = (offs_i[:, None] < D) & (offs_j[None, :] < D)
    is_diag = offs_i[:, None] == offs_j[None, :]
    on = tl.sum(tl.sum(tl.where(valid & is_diag, (c - 1.0) * (c - 1.0), 0.0), axis=1), axis=0)
    off = tl.sum(tl.sum(tl.where(valid & (~is_diag), c * c, 0.0), axis=1), axis=0)
    tile = pid_i * tl.num_programs(1) + pid_j
    tl.store(part_ptr + tile * 2, on)
    tl.store(part_ptr + tile * 2 + 1, off)


@triton.jit
def _tile_terms_bwd_kernel(
    a_ptr,  # [N, D] normalized view whose gradient we want (all global rows)
    b_ptr,  # [N, D] the other view (all global rows)
    g_ptr,  # [2] fp32: upstream (g_on, g_off)
    da_ptr,  # [SPLIT, n_out, D] fp32 out: partial gradients of rows row0 .. row0+n_out of A
    N, D, row0, n_out,
    stride_an, stride_ad, stride_bn, stride_bd, stride_ds, stride_dn, stride_dd,
    inv_n,  # 1 / N
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32_IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    # program (i, s) owns columns I of partial s of dA and walks the column blocks J =
    # s, s + SPLIT, s + 2 SPLIT, ... of c: no two programs write the same element
    pid_i = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_i = (pid_i * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)  # int64: see _c_tile
    g_on = tl.load(g_ptr)
    g_off = tl.load(g_ptr + 1)
    da_ptr += pid_s.to(tl.int64) * stride_ds
    for j0 in range(pid_s * BLOCK_D, D, n_split * BLOCK_D):
        offs_j = (j0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        # recompute the tile c[I, J] over all N rows (the same code as forward)
        c = _c_tile(a_ptr, b_ptr, offs_i, offs_j, N, D, stride_an, stride_ad, stride_bn, stride_bd,
                    inv_n, BLOCK_N, BLOCK_D, FP32_IEEE, UPCAST)
        valid = (offs_i[:, None] < D) & (offs_j[None, :] < D)
        is_diag = offs_i[:, None] == offs_j[None, :]
        g = tl.where(is_diag, 2.0 * g_on * (c - 1.0), 2.0 * g_off * c)
        g_t = tl.trans(tl.where(valid, g, 0.0) * inv_n)  # [BLOCK_D (J), BLOCK_D (I)]
        if not UPCAST and b_ptr.dtype.element_ty != tl.float32:
            g_t = g_t.to(b_ptr.dtype.element_ty)  # half x half on tensor cores, fp32 accumulator
        # dA[rows, I] += B[rows, J] @ G[I, J]^T / N, for this rank's rows only
        for m0 in range(0, n_out, BLOCK_N):
            offs_m = (m0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            b_rows = tl.load(b_ptr + (row0 + offs_m[:, None]) * stride_bn + offs_j[None, :] * stride_bd,
                             mask=(offs_m[:, None] < n_out) & (offs_j[None, :] < D), other=0.0)
            if UPCAST:
                b_rows = b_rows.to(tl.float32)
            d_ptrs = da_ptr + offs_m[:, None] * stride_dn + offs_i[None, :] * stride_dd
            d_mask = (offs_m[:, None] < n_out) & (offs_i[None, :] < D)
            upd = tl.load(d_ptrs, mask=d_mask, other=0.0)
            if FP32_IEEE:
                upd = tl.dot(b_rows, g_t, upd, input_precision="ieee")
            else:
                upd = tl.dot(b_rows, g_t, upd)
            tl.store(d_ptrs, upd, mask=d_mask)


def backward_grid(d: int, block_d: int, programs: int) -> tuple[int, int]:
    """Launch grid (column blocks, J splits) of the backward kernel, a pure function.

    dA has T = cdiv(d, block_d) column blocks; one program per block alone gives only T
    programs (8 at D = 512, on a GPU of 132 SMs). Each column block is therefore split
    over the T column blocks J of c into ``split`` programs, enough to reach
    ``programs``, at most T (each program needs at least one J). Work is unchanged
    (every tile of c is still recomputed once); the price is ``split`` partial [n, D]
    fp32 gradients summed afterwards, no atomics, so the result stays deterministic.
    """
    t = -(-d // block_d)
    split = max(1, min(t, -(-programs // t)))
    return t, split


def _target_programs(device: torch.device) -> int:
    """Two programs per SM on a GPU (one wave computing while another loads); one in the
    interpreter, which runs programs one after another and gains nothing from a split."""
    if device.type != "cuda":
        return 1
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _dot_flags(dtype) -> dict:
    """FP32_IEEE: no TF32 for fp32 inputs (the 1e-5 contract). UPCAST: Triton 3.8's
    interpreter computes bf16 tl.dot wrongly (numpy has no bf16), so the CPU twin
    upcasts bf16 tiles after loading; on a GPU they stay bf16."""
    upcast = dtype == torch.bfloat16 and INTERPRETED
    return dict(FP32_IEEE=dtype == torch.float32 or upcast, UPCAST=upcast)


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"expected two [N, D] tensors, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype not in (torch.float32, torch.float16, torch.bfloat16) or a.dtype != b.dtype:
        raise TypeError(f"dense kernels take fp32/fp16/bf16 pairs, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError("a and b must be on the same device")


def tile_terms_forward(a, b, *, block_n=DENSE_BLOCK_N, block_d=DENSE_BLOCK_D):
    """(on_diag, off_diag) fp32 scalars of c = a^T b / N; a, b [N, D]."""
    _check(a, b)
    n, d = a.shape
    grid = (triton.cdiv(d, block_d), triton.cdiv(d, block_d))
    part = torch.empty((grid[0] * grid[1], 2), dtype=torch.float32, device=a.device)  # O(tiles)
    _tile_terms_fwd_kernel[grid](
        a, b, part, n, d, a.stride(0), a.stride(1), b.stride(0), b.stride(1), 1.0 / n,
        BLOCK_N=block_n, BLOCK_D=block_d, **_dot_flags(a.dtype),
    )
    terms = part.sum(0)  # [2]
    return terms[0], terms[1]


def tile_terms_backward(a, b, g, *, row0=0, n_out=None, block_n=DENSE_BLOCK_N, block_d=DENSE_BLOCK_D,
                        programs=None):
    """Gradient [n_out, D] fp32 of g_on*on_diag + g_off*off_diag w.r.t. rows row0.. of a.

    programs: how many programs the grid should reach (default: two per SM on CUDA, one
    in the interpreter); see ``backward_grid``.
    """
    _check(a, b)
    n, d = a.shape
    n_out = n if n_out is None else n_out
    g = g.to(device=a.device, dtype=torch.float32).contiguous()  # [2]
    grid = backward_grid(d, block_d, _target_programs(a.device) if programs is None else programs)
    part = torch.zeros((grid[1], n_out, d), dtype=torch.float32, device=a.device)  # split x [n, D]
    _tile_terms_bwd_kernel[grid](
        a, b, g, part, n, d, row0, n_out,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), part.stride(0), part.stride(1), part.stride(2),
        1.0 / n, BLOCK_N=block_n, BLOCK_D=block_d, **_dot_flags(a.dtype),
    )
    return part[0] if grid[1] == 1 else part.sum(0)


class DenseTerms(torch.autograd.Function):
    """(a1, a2) [n_local, D] normalized -> (on_diag, off_diag) of the global c, tile by tile."""

    @staticmethod
    def forward(ctx, a1, a2, group, gather_dtype, block_n, block_d):
        n = a1.shape[0]
        A, B = collectives.all_gather_pair(a1, a2, group, gather_dtype)  # [N, D] (a1, a2 when single rank)
        if A.dtype != gather_dtype and gather_dtype in (torch.float16, torch.bfloat16):
            A, B = A.to(gather_dtype), B.to(gather_dtype)  # half inputs: half loads, fp32 accumulation
        A, B = A.contiguous(), B.contiguous()
        on_diag, off_diag = tile_terms_forward(A, B, block_n=block_n, block_d=block_d)
        ctx.save_for_backward(A, B)
        ctx.row0, ctx.n, ctx.blocks = collectives.rank(group) * n, n, (block_n, block_d)
        ctx.out_dtype = a1.dtype
        return on_diag, off_diag

    @staticmethod
    def backward(ctx, g_on, g_off):
        A, B = ctx.saved_tensors
        zero = A.new_zeros((), dtype=torch.float32)
        g = torch.stack([zero if g_on is None else g_on.float(), zero if g_off is None else g_off.float()])
        block_n, block_d = ctx.blocks
        kw = dict(row0=ctx.row0, n_out=ctx.n, block_n=block_n, block_d=block_d)
        da = tile_terms_backward(A, B, g, **kw)
        db = tile_terms_backward(B, A, g, **kw)
        return da.to(ctx.out_dtype), db.to(ctx.out_dtype), None, None, None, None


def dense_terms(a1, a2, *, group=None, gather_dtype=torch.float32, block_n=DENSE_BLOCK_N, block_d=DENSE_BLOCK_D):
    """(on_diag, off_diag) of the global cross-correlation of normalized (a1, a2)."""
    return DenseTerms.apply(a1, a2, group, gather_dtype, block_n, block_d)
