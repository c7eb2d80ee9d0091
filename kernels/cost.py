"""The written cost models behind ``impl="auto"``: flops, bytes moved, bytes sent.

Barlow Twins here; VICReg ("vicreg_costs") at the end of the file. Per rank, for a
global batch N = W * n, embedding width D and input itemsize s:

    impl       flops                        extra memory (bytes)        sent per rank
    gram       8 n N D + 2 N D              4 (4 N D + 2 n N + 4 n D)   G + 2 (W-1)/W 4 2D
    dense      6 N D^2 + 4 n D^2            8 tiles + 2 N D s (*)       G + Z
    reference  6 N D^2                      16 D^2 + 8 N D              (W-1) 2 n D s
    official   6 n D^2                      16 D^2                      2 (W-1)/W 4 D^2 + Z

    (*) plus, in backward, ``split`` partial [n, D] fp32 gradients (dense.backward_grid:
        1 in the interpreter, up to D / DENSE_BLOCK_D on a GPU); not modelled

    G = (W-1) * 2 n D * s   one ring all-gather of the normalized pair (bf16 allowed)
    Z = 2 (W-1)/W * 4 * 8D  fp32 all-reduces of normalization: [2D], [2D] forward, [4D] backward
    gram gathers the raw pair and takes the statistics from it, and replaces
    normalization's backward [4D] by one forward [2D] (norms of c's rows and columns):
    two collectives per step, none in backward.

(``official`` is the official code's dense c + all-reduce, the benchmark's baseline; it
is never picked: its gradient has the 1/W convention.) Collective costs follow the
ring algorithms gloo and NCCL use for large messages: an all-reduce of S bytes sends
2 (W-1)/W S per rank, an all-gather of W pieces of S bytes sends (W-1) S.

Modelled seconds = flops / F + bytes moved / M + bytes sent / L with per-device rates
(F: matmul flop/s, M: memory bandwidth, L: link bandwidth) below. On a CPU the Triton
kernels only run in the interpreter, a correctness twin, so ``dense`` is not a
candidate there. Rates are round numbers: they order the candidates, not predict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from bt_fast.kernels.collectives import world_size
from bt_fast.kernels.tiles import DENSE_BLOCK_D

# Per-device rates. Round numbers: they order the candidates, they do not predict.
# CPU: this project's development machines (2 shared AVX2 cores).
CPU_MATMUL_FLOPS = 5e10  # fp32 sgemm through MKL measured 50-90 GFLOP/s here (1024x4096x1024)
CPU_HALF_MATMUL_FLOPS = 5e10  # no bf16/fp16 matrix units: half matmuls are not faster
CPU_MEMORY_BYTES_PER_S = 1e10  # a DDR4 channel shared by two cores (torch elementwise: 3-10 GB/s)
CPU_LINK_BYTES_PER_S = 2e9  # gloo over loopback TCP, the CPU twin of the interconnect
# CUDA: A100/H100-class data-centre GPUs, rounded from the vendors' data sheets.
CUDA_MATMUL_FLOPS = 2e13  # fp32 without TF32: A100 19.5, H100 SXM 67 TFLOP/s peak
CUDA_HALF_MATMUL_FLOPS = 2e14  # bf16 tensor cores: A100 312, H100 989 TFLOP/s peak, ~20-60 % achieved
CUDA_MEMORY_BYTES_PER_S = 2e12  # HBM: A100-80GB 2.0, H100 SXM 3.35 TB/s
CUDA_LINK_BYTES_PER_S = 2.5e10  # 200 Gb/s of InfiniBand per GPU between nodes (NVLink is faster)

# kind -> (matmul flop/s fp32, matmul flop/s half, memory B/s, link B/s)
RATES = {
    "cpu": (CPU_MATMUL_FLOPS, CPU_HALF_MATMUL_FLOPS, CPU_MEMORY_BYTES_PER_S, CPU_LINK_BYTES_PER_S),
    "cuda": (CUDA_MATMUL_FLOPS, CUDA_HALF_MATMUL_FLOPS, CUDA_MEMORY_BYTES_PER_S, CUDA_LINK_BYTES_PER_S),
}


@dataclass
class ImplCost:
    impl: str
    flops: float
    memory_bytes: float  # extra memory held at the peak (beyond z and its grad)
    moved_bytes: float  # memory traffic, rough
    sent_bytes: float  # bytes each rank sends per step (ring algorithms)
    seconds: float  # modelled time per forward+backward

    def as_dict(self) -> dict:
        return asdict(self)


def _ring_all_reduce(nbytes: float, w: int) -> float:
    return 2 * (w - 1) / w * nbytes if w > 1 else 0.0


def _ring_all_gather(piece_bytes: float, w: int) -> float:
    return (w - 1) * piece_bytes


def _sizes(n_global: int, d: int, world_size: int, dtype, device: str):
    """(N, D, W, n_local, dtype, bytes per element, RATES row) of one cost question."""
    N, D, W = float(n_global), float(d), int(world_size)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    return N, D, W, N / W, dtype, torch.empty((), dtype=dtype).element_size(), RATES[kind]


def _priced(rows: dict, flop_rate: float, mem_rate: float, link_rate: float) -> dict:
    """{impl: (flops, memory, bytes moved, bytes sent)} -> {impl: ImplCost} with modelled seconds."""
    return {impl: ImplCost(impl, flops, memory, moved, sent,
                           flops / flop_rate + moved / mem_rate + sent / link_rate)
            for impl, (flops, memory, moved, sent) in rows.items()}


def loss_costs(n_global: int, d: int, world_size: int = 1, dtype=torch.float32, device: str = "cpu") -> dict:
    """Modelled per-rank cost of each implementation, as {impl: ImplCost}."""
    N, D, W, n, dtype, s, rates = _sizes(n_global, d, world_size, dtype, device)
    half = dtype in (torch.float16, torch.bfloat16)
    f32_rate, half_rate, mem_rate, link_rate = rates
    flop_rate = half_rate if half else f32_rate
    norm_sent = _ring_all_reduce(4 * 8 * D, W)
    gather_sent = _ring_all_gather(2 * n * D * s, W)
    tiles = (D / DENSE_BLOCK_D) ** 2  # forward programs; each writes 2 fp32
    rows = {
        "gram": (8 * n * N * D + 2 * N * D, 4 * (4 * N * D + 2 * n * N + 4 * n * D), 4 * 4 * (N * D + n * N),
                 gather_sent + _ring_all_reduce(4 * 2 * D, W)),
        "dense": (6 * N * D * D + 4 * n * D * D, 8 * tiles + 2 * N * D * s, 3 * 2 * N * D * (D / DENSE_BLOCK_D) * s, gather_sent + norm_sent),
        "reference": (6 * N * D * D, 16 * D * D + 8 * N * D, 4 * 4 * D * D, _ring_all_gather(2 * n * D * s, W)),
        "official": (6 * n * D * D, 16 * D * D, 4 * 4 * D * D, _ring_all_reduce(4 * D * D, W) + norm_sent),
    }
    return _priced(rows, flop_rate, mem_rate, link_rate)


def candidates(device: str = "cpu") -> tuple[str, ...]:
    """Implementations ``auto`` may pick on ``device`` (no interpreter on CPU)."""
    return ("gram", "dense", "reference") if str(device).startswith("cuda") else ("gram", "reference")


def choose_impl(n_global: int, d: int, world_size: int = 1, dtype=torch.float32, device: str = "cpu"):
    """(impl, costs): the candidate with the least modelled time, and the whole table."""
    costs = loss_costs(n_global, d, world_size, dtype, device)
    best = min(candidates(device), key=lambda impl: costs[impl].seconds)
    return best, costs


# ---------------------------------------------------------------- VICReg
# Per rank, for a global batch N = W n, width D, input itemsize s, both branches:
#
#    impl       flops                      extra memory (bytes)         sent per rank
#    gram       8 n N D + 12 N D           4 (4 N D + 2 n N + 4 n D)    (W-1) 2 n D s + ring 24
#    reference  8 N D^2 + 12 N D           4 (6 D^2 + 4 N D)            (W-1) 2 n D s
#    official   8 N D^2 + 12 N D           4 (6 D^2 + 4 N D)            (W-1) 2 n D s + 2 (W-1)/W 2 N D s
#
# gram: G_r = X_r X^T and P_r = G_r X, 2 n N D flops each per branch, an all-reduce of
# 3 fp64 scalars; reference: X^T X forward and its gradient backward, 2 N D^2 each per
# branch, on every rank over the whole global batch (the covariance, its off-diagonal
# copy and their gradients are D x D). Both gather the raw rows once (gram in one
# collective, the reference in two); neither has a collective in backward. So gram wins
# whenever n N < N D, i.e. n < D. ``official`` is main_vicreg.py, the benchmark's
# baseline: the reference's work, plus its gather layer all-reduces the [N, D]
# gradients of both branches in backward; never picked.


def vicreg_costs(n_global: int, d: int, world_size: int = 1, dtype=torch.float32, device: str = "cpu") -> dict:
    """Modelled per-rank cost of each VICReg implementation, as {impl: ImplCost}."""
    N, D, W, n, dtype, s, rates = _sizes(n_global, d, world_size, dtype, device)
    flop_rate, _, mem_rate, link_rate = rates  # both compute in fp32 whatever the input dtype
    gather_sent = _ring_all_gather(2 * n * D * s, W)
    rows = {
        "gram": (8 * n * N * D + 12 * N * D, 4 * (4 * N * D + 2 * n * N + 4 * n * D), 4 * 4 * (3 * N * D + n * N),
                 gather_sent + _ring_all_reduce(3 * 8, W)),
        "reference": (8 * N * D * D + 12 * N * D, 4 * (6 * D * D + 4 * N * D), 4 * 6 * D * D, gather_sent),
        "official": (8 * N * D * D + 12 * N * D, 4 * (6 * D * D + 4 * N * D), 4 * 6 * D * D,
                     gather_sent + _ring_all_reduce(2 * N * D * s, W)),
    }
    return _priced(rows, flop_rate, mem_rate, link_rate)


def choose_vicreg_impl(n_global: int, d: int, world_size: int = 1, dtype=torch.float32, device: str = "cpu"):
    """(impl, costs) for ``vicreg_loss(impl="auto")``: the least modelled time."""
    costs = vicreg_costs(n_global, d, world_size, dtype, device)
    return min(("gram", "reference"), key=lambda impl: costs[impl].seconds), costs


def resolve(impl: str, impls: tuple, choose, z: torch.Tensor, group=None, *, loss: str = "loss") -> str:
    """The concrete implementation ``impl`` stands for: itself, or for "auto" the one
    ``choose(n_global, d, world, dtype, device_type)`` picks for z [n_local, D] on ``group``."""
    if impl not in impls:
        raise ValueError(f"{loss} impl must be one of {', '.join(impls)}; got {impl!r}")
    if impl != "auto":
        return impl
    w = world_size(group)
    return choose(z.shape[0] * w, z.shape[1], w, z.dtype, z.device.type)[0]
