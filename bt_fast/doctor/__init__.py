"""``bt-fast doctor [--json] [--quick] [--config PATH]``: will this node train correctly, and how fast?

Three parts, one line per check, each PASS / FAIL / SKIP with the reason:

  Environment   versions (torch, CUDA, cuDNN, NCCL, Triton, DALI, apex), GPUs, the JPEG
                hardware decoder, known incompatibilities
  Correctness   Triton dense loss, gram and the fused column norm vs the float64 oracle
                (fp32/bf16, odd sizes); DALI's GPU graph vs its CPU graph; a few steps of
                the recipe with finite, decreasing loss; NCCL loss over 2 GPUs vs 1 process
  Speed         images/s per GPU and TFLOP/s at the recipe, loss timings, DALI images/s,
                the data-wait share, and the verdict against docs/gpu.md's on-paper figure

Missing pieces degrade to SKIP lines: no DALI -> the pipeline checks; one GPU -> NCCL; no
GPU -> the correctness part runs its CPU twins (Triton in its interpreter) and speed
skips. Exit 1 if any line FAILs, else 0. ``--quick`` uses fewer sizes and steps.
Budget on one GPU: under 8 minutes, ``--quick`` under 2 (never run on a GPU yet).
"""

from __future__ import annotations

import os
import sys
import time

from bt_fast.doctor import compat, correctness, environment, pipeline_check, speed
from bt_fast.doctor.report import FAIL, Check, Report, run_check

DEFAULT_CONFIG = "configs/imagenet.yaml"


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and steps (under 2 minutes on a GPU)")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"the recipe to check (default {DEFAULT_CONFIG})")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1),
                        help="DALI threads for the pipeline checks (default: min(8, cores))")


def switch_triton() -> str:
    """Import Triton through the kernels' one switch (interpreter when torch sees no GPU);
    "" when ready, else why the kernel checks will fail."""
    try:
        from bt_fast.kernels import triton_env
    except ImportError as e:
        return f"triton does not import ({e})"
    import torch

    if not torch.cuda.is_available() and not triton_env.INTERPRETED:
        return ("no GPU and TRITON_INTERPRET is not 1 (set before triton was first imported): "
                "Triton has no driver to compile for")
    return ""


def environment_part(host: environment.Host, cfg, triton_problem: str) -> list[Check]:
    checks = environment.versions(host)
    if triton_problem:
        checks = [Check("triton", FAIL, triton_problem) if c.name == "triton" else c for c in checks]
    checks += run_check("gpu", environment.gpu, host)
    checks += run_check("incompatibilities", compat.incompatibilities, host, cfg.train.precision)
    return checks


def correctness_part(host, cfg, quick: bool) -> list[Check]:
    out = []
    out += run_check("loss.dense", correctness.loss_impl, "dense", host, quick)
    out += run_check("loss.gram", correctness.loss_impl, "gram", host, quick)
    out += run_check("colnorm", correctness.colnorm, host, quick)
    out += run_check("dali.gpu_vs_cpu", pipeline_check.gpu_vs_cpu, host, quick)
    out += run_check("train_steps", correctness.train_steps, host, cfg, quick)
    out += run_check("nccl.distributed_loss", correctness.distributed_loss, host, quick)
    return out


def speed_part(host, cfg, quick: bool, threads: int) -> list[Check]:
    step = run_check("step_images_per_s", speed.step_speed, host, cfg, quick)
    out = step + run_check("loss_ms", speed.loss_speed, host, quick)
    out += run_check("pipeline_images_per_s", pipeline_check.pipeline_speed, host, quick, threads)
    out += run_check("data_wait_share", pipeline_check.data_wait, host, cfg, quick, threads)
    out += run_check("verdict", speed.verdict, host, cfg, step[0])
    return out


def diagnose(cfg, *, quick: bool, threads: int, config_path: str = "", host=None) -> Report:
    """The whole report; ``host`` overrides the probe (tests fake a host with it)."""
    t0 = time.perf_counter()
    triton_problem = switch_triton()
    host = host or environment.probe()
    import torch

    report = Report(meta={"tool": "bt-fast doctor", "quick": quick, "config": config_path,
                          "host": {"gpus": host.gpus, "gpu": host.gpu_name, "dali": host.dali or None,
                                   "torch": torch.__version__, "triton_interpreter": host.interpreter}})
    report.meta["host_line"] = (f"torch {torch.__version__}, " + (f"{host.gpus} x {host.gpu_name}" if host.cuda
                                else "no GPU: CPU twins, speed skips") + (", quick" if quick else ""))
    report.add("environment", environment_part(host, cfg, triton_problem))
    report.add("correctness", correctness_part(host, cfg, quick))
    report.add("speed", speed_part(host, cfg, quick, threads))
    report.meta["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def run(args) -> int:
    from bt_fast import config

    cfg = config.load(args.config)
    report = diagnose(cfg, quick=args.quick, threads=args.threads, config_path=args.config)
    print(report.to_json() if args.json else report.to_text())
    sys.stdout.flush()
    return report.exit_code()


__all__ = ["add_arguments", "diagnose", "run"]
