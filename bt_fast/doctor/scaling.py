"""Scaling on paper: the official recipe on 8, 32 and 64 H100s under each
``dist.grad_compression``; docs/gpu.md quotes ``markdown()`` and a test pins the two.

    python -m bt_fast.doctor.scaling      # prints the table docs/gpu.md embeds

Per GPU and step, for per-GPU batch b and W GPUs:

    compute    t_c = b / R                 R: bt_fast img/s per H100 on paper (paper.py)
    backward   t_b = 2/3 t_c               (backward ~ 2x forward)
    bytes      S   = gradcomm.sent_bytes   ring all-reduce, 2 (W-1)/W x the buffers
    comm       t_n = S / L + k a           L: link bytes/s per GPU, k all-reduces of
                                           latency a each (1 per bucket; 3 for PowerSGD)
    exposed    t_e = max(t_n - t_b, t_n / buckets)   overlap with backward hides at most
                                           t_b, never the last bucket's share
    compress   t_p = 4 r sum(n m) / F      PowerSGD's M Q and M^T P (F: fp32 matmul flop/s)
    efficiency t_c / (t_c + t_p + t_e)

Links (stated, not measured): up to 8 GPUs one node on NVLink, 450 GB/s per GPU per
direction (H100 SXM NVLink 4: 900 GB/s bidirectional), 10 us per all-reduce; beyond 8,
the ring crosses nodes at 50 GB/s per GPU (one 400 Gb/s InfiniBand NDR adapter per GPU,
as in a DGX H100), 30 us per all-reduce. The same flat-ring model as docs/gpu.md's DDP
line; NCCL's hierarchical and tree algorithms do somewhat better. *Never run on a GPU.*
"""

from __future__ import annotations

import math

import torch

from bt_fast import config, gradcomm, methods
from bt_fast.doctor import paper
from bt_fast.kernels.cost import CUDA_MATMUL_FLOPS

WORLDS = (8, 32, 64)
GPUS_PER_NODE = 8
NVLINK_BYTES_PER_S, NVLINK_LATENCY_S = 450e9, 10e-6
IB_BYTES_PER_S, IB_LATENCY_S = 50e9, 30e-6
BUCKET_BYTES = 25 * 2**20  # dist.bucket_cap_mb's default
TARGET = 0.9


def shapes_of(cfg) -> list[tuple[int, ...]]:
    """Gradient shapes of ``cfg``'s model, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return gradcomm.grad_shapes(methods.build(cfg))


def recipe_shapes() -> list[tuple[int, ...]]:
    """configs/imagenet.yaml's model: ResNet-50 + 8192-8192-8192 (the config defaults)."""
    return shapes_of(config.Config())


def buckets(shapes, cap: int = BUCKET_BYTES) -> int:
    """DDP's bucket count: fp32 gradients packed in backward (reverse) order, a bucket
    closing once it holds ``cap`` bytes (a 256 MB projector matrix is a bucket alone).
    7 for the recipe, as bench comm counts on real steps."""
    count, held = 0, 0
    for shape in reversed(shapes):
        held += 4 * math.prod(shape)
        if held >= cap:
            count, held = count + 1, 0
    return count + (held > 0)


def link(world: int) -> tuple[float, float]:
    return (NVLINK_BYTES_PER_S, NVLINK_LATENCY_S) if world <= GPUS_PER_NODE else (IB_BYTES_PER_S, IB_LATENCY_S)


def step(option: str, world: int, batch_per_gpu: float, shapes=None, rank: int = 4) -> dict:
    """Seconds and bytes of one step per GPU (see the module docstring)."""
    shapes = shapes or recipe_shapes()
    n_buckets = buckets(shapes)
    rate, latency = link(world)
    sent = gradcomm.sent_bytes(shapes, option, world, rank)
    calls = n_buckets * (3 if option == "powersgd" else 1)
    t_c = batch_per_gpu / paper.expected_images_per_s("H100")
    t_n = sent / rate + calls * latency
    t_e = max(t_n - 2 / 3 * t_c, t_n / n_buckets)
    t_p = 0.0
    if option == "powersgd":
        t_p = sum(4 * gradcomm.compressed(s, rank) * math.prod(s) for s in shapes) / CUDA_MATMUL_FLOPS
    return {"compute_s": t_c, "sent_bytes": sent, "comm_s": t_n, "exposed_s": t_e, "compress_s": t_p,
            "efficiency": t_c / (t_c + t_p + t_e)}


def batch_for(option: str, world: int, shapes=None, target: float = TARGET) -> int:
    """The smallest per-GPU batch whose efficiency is >= target (efficiency grows with it)."""
    shapes = shapes or recipe_shapes()
    lo, hi = 1, 1 << 20
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if step(option, world, mid, shapes)["efficiency"] >= target else (mid + 1, hi)
    return lo


def pick(world: int, batch_per_gpu: float, shapes=None) -> tuple[str, str]:
    """(option, why) for ``world`` GPUs: the least compression within 2 points of the best
    efficiency on paper (compression is not free: bf16 rounds, PowerSGD approximates)."""
    if world <= 1:
        return "none", "one GPU: nothing to communicate"
    shapes = shapes or recipe_shapes()
    eff = {o: step(o, world, batch_per_gpu, shapes)["efficiency"] for o in gradcomm.OPTIONS}
    best = max(eff.values())
    option = next(o for o in gradcomm.OPTIONS if eff[o] >= best - 0.02)
    table = ", ".join(f"{o} {100 * e:.0f} %" for o, e in eff.items())
    return option, (f"{world} H100s at {batch_per_gpu:g} images per GPU, bt_fast's on-paper compute rate and "
                    f"the stated links: efficiency {table}; {option} is the least compression within 2 points "
                    "of the best")


def rows(batch: int = paper.BATCH) -> list[list[str]]:
    shapes = recipe_shapes()
    out = []
    for world in WORLDS:
        for option in gradcomm.OPTIONS:
            s = step(option, world, batch / world, shapes)
            out.append([str(world), option, f"{batch / world:g}", f"{1e3 * s['compute_s']:.1f}",
                        f"{s['sent_bytes'] / 1e6:,.1f}", f"{1e3 * s['comm_s']:.2f}",
                        f"{1e3 * (s['exposed_s'] + s['compress_s']):.2f}", f"{100 * s['efficiency']:.0f} %",
                        str(batch_for(option, world, shapes))])
    return out


def markdown() -> str:
    head = ["GPUs", "option", "images/GPU", "compute ms", "MB sent/GPU", "comm ms", "exposed ms",
            "efficiency", "images/GPU for 90 %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
