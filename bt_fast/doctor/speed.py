"""Part 3, Speed: images/s per GPU at the recipe, achieved TFLOP/s, loss timings, verdict.

Timings use synthetic views (data loading is pipeline_check's part) and one host sync
per timed block, after warm-up steps that absorb allocator growth and cuDNN autotuning.
"""

from __future__ import annotations

import time

import torch

from bt_fast.doctor import paper
from bt_fast.doctor.environment import Host
from bt_fast.doctor.report import FAIL, PASS, Check, skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_flops(run, views) -> float:
    """Flops of one train step, counted by torch's FlopCounterMode (matmuls and convs of
    forward + backward; the Triton loss kernels are not seen: < 1.3 % at the recipe)."""
    from torch.utils.flop_counter import FlopCounterMode

    from bt_fast.bench.step import contender_step

    with FlopCounterMode(display=False) as counter:
        contender_step(run, views)
    return float(counter.get_total_flops())


def _seconds_per_step(step, device: torch.device, steps: int, warmup: int) -> float:
    """Mean seconds per call: ``warmup`` untimed calls, then ``steps`` calls and one sync."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()  # one sync for the whole timed block
    return (time.perf_counter() - t0) / steps


def plain_loop_seconds(run, views, device, steps: int, warmup: int) -> float:
    """bench step's baseline on the same weights and views: NCHW, fp32, the official loss."""
    import copy

    from bt_fast import optim
    from bt_fast.bench.step import baseline_step, set_peak_lrs

    plain = copy.deepcopy(run.model).to(memory_format=torch.contiguous_format)
    opt = optim.build(plain, run.cfg.optim)
    set_peak_lrs(opt, run.cfg)
    nchw = [v.contiguous() for v in views]
    return _seconds_per_step(lambda: baseline_step(plain, nchw, opt), device, steps, warmup)


def step_speed(host: Host, cfg, quick: bool) -> Check:
    """bt_fast's train step at the recipe (e.g. ResNet-50, 224 px, channels-last, bf16), and
    without --quick the plain training loop beside it (bench step's ratio)."""
    from bt_fast.bench.step import contender, contender_step
    from bt_fast.doctor.correctness import tiny_twin

    device = torch.device("cuda" if host.cuda else "cpu")
    if host.cuda:
        batch, steps, warmup = (64, 10, 3) if quick else (128, 30, 3)
    else:  # CPU twin: exercises this code; its number says nothing about a GPU
        cfg, batch, steps, warmup = tiny_twin(cfg), 8, 1, 1
    run, views = contender(cfg, batch, device)
    seconds = _seconds_per_step(lambda: contender_step(run, views), device, steps, warmup)
    flops = step_flops(run, views)
    images_per_s, tflops = batch / seconds, flops / seconds / 1e12
    data = {"images_per_s": images_per_s, "tflops": tflops, "batch": batch, "flops_per_image": flops / batch,
            "backbone": cfg.model.backbone, "precision": cfg.train.precision}
    if not (quick and host.cuda):
        plain_s = plain_loop_seconds(run, views, device, max(1, steps // 3), 1)
        data.update(plain_images_per_s=batch / plain_s, speedup_over_plain_loop=plain_s / seconds)
    vs_plain = f"; {data['speedup_over_plain_loop']:.2f}x the plain loop" if "speedup_over_plain_loop" in data else ""
    if not host.cuda:
        return skip("step_images_per_s", f"no GPU; the CPU twin ran ({images_per_s:.0f} img/s, tiny model"
                    f"{vs_plain}): not a GPU figure", **data)
    peak = paper.peak_tflops(host.gpu_name)
    data["peak_tflops"] = peak
    share = f" = {100 * tflops / peak:.1f} % of {peak:.0f} bf16 peak" if peak else " (peak unknown for this GPU)"
    return Check("step_images_per_s", PASS, f"{images_per_s:,.0f} img/s per GPU ({2 * images_per_s:,.0f} views/s), "
                 f"{tflops:.0f} TFLOP/s{share}; {cfg.model.backbone} {cfg.train.precision} batch {batch}{vs_plain}",
                 data)


def loss_speed(host: Host, quick: bool) -> Check:
    """Forward + backward of each loss impl at N x 8192, bf16; does "auto" pick the fastest?"""
    if not host.cuda:
        return skip("loss_ms", "no GPU: the Triton kernels only run in the interpreter here")
    from bt_fast.kernels import barlow_twins_loss, choose_impl, loss_costs

    n, d = (1024 if quick else 2048), 8192
    gen = torch.Generator(device="cuda").manual_seed(0)
    z1, z2 = (torch.randn(n, d, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_(True)
              for _ in range(2))
    costs, ms = loss_costs(n, d, 1, torch.bfloat16, "cuda"), {}
    for impl in ("gram", "dense", "reference"):
        for _ in range(2):  # warm-up: Triton compiles and autotunes here
            barlow_twins_loss(z1, z2, impl=impl).backward()
        torch.cuda.synchronize()
        t0, reps = time.perf_counter(), 5
        for _ in range(reps):
            barlow_twins_loss(z1, z2, impl=impl).backward()
        torch.cuda.synchronize()
        ms[impl] = 1e3 * (time.perf_counter() - t0) / reps
    auto = choose_impl(n, d, 1, torch.bfloat16, "cuda")[0]
    fastest = min(ms, key=ms.get)
    detail = f"N={n}, D={d}, bf16: " + ", ".join(
        f"{i} {t:.1f} ms ({costs[i].flops / t / 1e9:.0f} TFLOP/s)" for i, t in ms.items())
    data = {"ms": ms, "auto": auto, "fastest": fastest}
    if ms[auto] > 1.5 * ms[fastest]:
        return Check("loss_ms", FAIL, f"{detail}; auto picks {auto}, {ms[auto] / ms[fastest]:.1f}x slower than "
                     f"{fastest}: kernels/cost.py's rates are off for this GPU", data)
    return Check("loss_ms", PASS, f"{detail}; auto picks {auto}", data)


def verdict(host: Host, cfg, step: Check) -> Check:
    """Measured images/s against docs/gpu.md's on-paper figure for this GPU."""
    if not host.cuda or "images_per_s" not in step.data or step.status != PASS:
        return skip("verdict", "no GPU measurement to compare" if not host.cuda else "the step timing failed")
    if cfg.model.backbone != "resnet50" or step.data.get("precision") != "bf16":
        return skip("verdict", f"the on-paper figure is for ResNet-50 in bf16, not {cfg.model.backbone} "
                    f"{cfg.train.precision}")
    expected = paper.expected_images_per_s(host.gpu_name)
    if expected is None:
        return skip("verdict", f"no bf16 peak on file for {host.gpu_name} (bt_fast/doctor/paper.py)")
    ratio = step.data["images_per_s"] / expected
    detail = (f"{step.data['images_per_s']:,.0f} img/s = {100 * ratio:.0f} % of the {expected:,.0f} img/s on paper "
              f"(docs/gpu.md; FAIL below {100 * paper.VERDICT_MIN_FRACTION:.0f} %)")
    return Check("verdict", PASS if ratio >= paper.VERDICT_MIN_FRACTION else FAIL, detail,
                 {"ratio": ratio, "expected_images_per_s": expected})
