"""Known incompatibilities of this host, and the torch names newer than bt_fast's floor.

bt_fast must run on torch 2.5 (NVIDIA's containers) as well as the pinned 2.14.1.
``NEWER_THAN_FLOOR`` lists public names added after 2.5 that are tempting to use;
tests/test_doctor.py parses bt_fast/, kernels/ and pipelines/ and fails when one is used
outside a guard (``try: ... except (AttributeError, ImportError)`` or ``hasattr``).
"""

from __future__ import annotations

import importlib.metadata as md
import re

import torch

from bt_fast.doctor.environment import DALI_ZERO_COPY, Host, _dist_version, _version_tuple
from bt_fast.doctor.report import FAIL, PASS, Check

NEWER_THAN_FLOOR = {  # dotted name -> the torch release that added it
    "torch.accelerator": "2.6",
    "torch.compiler.set_stance": "2.6",
    "torch.library.triton_op": "2.6",
    "torch.library.wrap_triton": "2.6",
    "torch.nn.utils.get_total_norm": "2.6",
    "torch.nn.utils.clip_grads_with_norm_": "2.6",
    "torch.distributed.get_default_backend_for_device": "2.6",
    "torch.float8_e8m0fnu": "2.7",
    "torch.compiler.nested_compile_region": "2.8",
    "torch.backends.fp32_precision": "2.9",
    "torch.backends.cuda.matmul.fp32_precision": "2.9",
    "torch.backends.cudnn.fp32_precision": "2.9",
    "torch.backends.cudnn.conv.fp32_precision": "2.9",
}


def _torch_wants_triton() -> str:
    """The triton version torch's own metadata pins ("" when it pins none)."""
    for req in md.requires("torch") or []:
        m = re.match(r"(?:pytorch-)?triton\s*(?:==|~=)\s*([\d.]+)", req)
        if m:
            return m.group(1)
    return ""


def _cuda_major_of_dali(dist: str) -> int | None:
    m = re.search(r"cuda(\d\d)", dist)
    return int(m.group(1)[:2]) // 10 if m else None


def incompatibilities(host: Host, precision: str) -> Check:
    """Hard problems FAIL; soft ones are listed as notes on a PASS line."""
    hard, notes = [], []
    want, (_, have) = _torch_wants_triton(), _dist_version("triton", "pytorch-triton")
    if want and have and _version_tuple(want)[:2] != _version_tuple(have)[:2]:
        hard.append(f"triton {have} beside torch {torch.__version__}, built against triton {want}: "
                    "compiled kernels and inductor break; reinstall the pair")
    if host.cuda:
        p = torch.cuda.get_device_properties(0)
        if (p.major, p.minor) < (7, 5):
            hard.append(f"sm_{p.major}{p.minor}: Triton 3 kernels need sm_75 or newer")
        if precision == "bf16" and not host.bf16:
            hard.append(f"{host.gpu_name} has no bf16: set train.precision=fp16 (GradScaler) or fp32")
    dali_dist, dali_v = _dist_version("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110")
    torch_cuda = _version_tuple(torch.version.cuda or "0")[0]
    if dali_dist and torch.version.cuda and _cuda_major_of_dali(dali_dist) not in (None, torch_cuda):
        notes.append(f"{dali_dist} beside torch for CUDA {torch.version.cuda}: two CUDA runtimes in one "
                     f"process; install nvidia-dali-cuda{torch_cuda}0 (Makefile DALI_PKG)")
    if not host.dali:
        notes.append("no DALI: `bt-fast train` cannot read images here (its loader is DALI's); "
                     f"install {f'nvidia-dali-cuda{torch_cuda}0' if torch_cuda else 'the DALI wheel for your CUDA'}")
    elif _version_tuple(host.dali)[:2] < DALI_ZERO_COPY:
        notes.append(f"DALI {host.dali} < 2.0: its classic executor copies every output, so the "
                     "loader's zero-copy hand-over does not hold (one extra device copy per view)")
    data = {"hard": hard, "notes": notes}
    if hard:
        return Check("incompatibilities", FAIL, "; ".join(hard + notes), data)
    return Check("incompatibilities", PASS, "none known" + (" (notes: " + "; ".join(notes) + ")" if notes else ""),
                 data)
