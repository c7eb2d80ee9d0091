"""Part 1, Environment: versions, GPUs, the JPEG hardware decoder, known incompatibilities.

``Host`` is what the other parts need to know about this machine (GPU count and name,
DALI present or why not); tests build one by hand to fake a host without a GPU, with
one GPU or without DALI.
"""

from __future__ import annotations

import ctypes
import glob
import importlib
import importlib.metadata as md
import os
import re
from dataclasses import dataclass

import torch

from bt_fast.doctor.report import FAIL, PASS, SKIP, Check, skip

MIN_TORCH = (2, 5)  # NVIDIA's PyTorch containers ship 2.5 and later
DALI_ZERO_COPY = (2, 0)  # pipelines/loader.py: the dynamic executor hands buffers over from 2.0
NVJPEG_BACKEND_HARDWARE = 3  # nvjpegBackend_t in nvjpeg.h


@dataclass
class Host:
    gpus: int  # visible CUDA devices
    gpu_name: str = ""  # device 0
    dali: str = ""  # DALI version, "" when not importable
    dali_why: str = ""  # why not, one line
    interpreter: bool = False  # Triton runs in its interpreter (no GPU)
    bf16: bool = False  # device 0 has bf16 tensor cores

    @property
    def cuda(self) -> bool:
        return self.gpus > 0


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def dali_version() -> tuple[str, str]:
    """(version, "") when ``nvidia.dali`` imports, else ("", why)."""
    try:
        dali = importlib.import_module("nvidia.dali")
    except ImportError as e:
        return "", f"DALI not importable ({e.__class__.__name__}: {e})"
    return getattr(dali, "__version__", "unknown"), ""


def probe() -> Host:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    version, why = dali_version()
    name = torch.cuda.get_device_name(0) if gpus else ""
    bf16 = bool(gpus and torch.cuda.is_bf16_supported())
    return Host(gpus=gpus, gpu_name=name, dali=version, dali_why=why,
                interpreter=os.environ.get("TRITON_INTERPRET") == "1", bf16=bf16)


def _dist_version(*names: str) -> tuple[str, str]:
    """(distribution, version) of the first installed distribution among ``names``."""
    for n in names:
        try:
            return n, md.version(n)
        except md.PackageNotFoundError:
            continue
    return "", ""


def versions(host: Host) -> list[Check]:
    out = []
    tv = _version_tuple(torch.__version__)
    ok = tv[:2] >= MIN_TORCH
    out.append(Check("torch", PASS if ok else FAIL, torch.__version__ + ("" if ok else
                     f": bt_fast needs >= {'.'.join(map(str, MIN_TORCH))}"), {"version": torch.__version__}))
    if torch.version.cuda is None:
        out.append(skip("cuda", "this torch is a CPU-only build"))
    else:
        out.append(Check("cuda", PASS if host.cuda else SKIP, f"built for CUDA {torch.version.cuda}"
                         + ("" if host.cuda else "; no GPU visible"), {"version": torch.version.cuda}))
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    out.append(Check("cudnn", PASS, str(cudnn)) if cudnn else skip("cudnn", "not available in this build"))
    out.append(_nccl())
    _, triton = _dist_version("triton", "pytorch-triton")
    out.append(Check("triton", PASS, triton + (" (interpreter: no GPU)" if host.interpreter else ""))
               if triton else Check("triton", FAIL, "not installed: the dense loss and fused column norm need it"))
    out.append(Check("dali", PASS, host.dali) if host.dali else
               skip("dali", f"{host.dali_why}; pipeline checks skip, the rest runs on synthetic tensors"))
    out.append(_apex())
    return out


def _nccl() -> Check:
    try:
        v = torch.cuda.nccl.version()
    except Exception as e:  # CPU-only builds have no NCCL
        return skip("nccl", f"not available ({type(e).__name__})")
    v = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    return Check("nccl", PASS, v, {"version": v})


def _apex() -> Check:
    try:
        apex = importlib.import_module("apex")
    except ImportError:
        return skip("apex", "not installed (optional: only the opt-in fused LARS uses it)")
    from bt_fast.optim import apex_lars

    fused = "FusedLARS available (opt-in: BT_FAST_APEX_LARS=1)" if apex_lars() else "no FusedLARS in this build"
    return Check("apex", PASS, f"{getattr(apex, '__version__', 'installed')}; {fused}")


def gpu(host: Host) -> list[Check]:
    if not host.cuda:
        return [skip("gpu", "no GPU: running the CPU twins of the correctness part; speed skips")]
    p = torch.cuda.get_device_properties(0)
    data = {"name": host.gpu_name, "count": host.gpus, "memory_gib": round(p.total_memory / 2**30, 1),
            "capability": f"{p.major}.{p.minor}", "bf16": host.bf16}
    detail = (f"{host.gpus} x {host.gpu_name}, {data['memory_gib']} GiB, sm_{p.major}{p.minor}, "
              f"bf16 {'yes' if host.bf16 else 'no'}")
    return [Check("gpu", PASS, detail, data), jpeg_hw_decoder(host, (p.major, p.minor))]


def _nvjpeg():
    """ctypes handle of libnvjpeg: the loader path, then the pip wheels' lib folders."""
    site = os.path.dirname(os.path.dirname(torch.__file__))  # where the nvidia-* wheels unpack
    names = ["libnvjpeg.so", "libnvjpeg.so.13", "libnvjpeg.so.12"]
    names += sorted(glob.glob(os.path.join(site, "nvidia", "**", "libnvjpeg.so*"), recursive=True))
    for n in names:
        try:
            return ctypes.CDLL(n)
        except OSError:
            continue
    return None


def jpeg_hw_decoder(host: Host, capability: tuple[int, int]) -> Check:
    """Ask nvJPEG for its hardware backend (what DALI's `mixed` decoder does itself)."""
    if not host.dali:
        return skip("jpeg_hw_decoder", "DALI not installed")
    lib = _nvjpeg()
    if lib is None:  # fall back to the GPUs known to carry NVJPG engines (A100/A30, H100/H200, B200)
        known = capability in ((8, 0), (9, 0), (10, 0))
        return Check("jpeg_hw_decoder", PASS, f"{'likely present' if known else 'likely absent'} "
                     f"(sm_{capability[0]}{capability[1]}; libnvjpeg not found to ask)", {"present": known})
    def create(backend: int) -> int:
        handle = ctypes.c_void_p()
        status = lib.nvjpegCreateEx(backend, None, None, 0, ctypes.byref(handle))
        if status == 0:
            lib.nvjpegDestroy(handle)
        return status

    status = create(NVJPEG_BACKEND_HARDWARE)
    if status != 0 and create(0) != 0:  # nvJPEG fails altogether: says nothing about the hardware
        return skip("jpeg_hw_decoder", f"nvJPEG does not initialise here (status {status})")
    present = status == 0
    return Check("jpeg_hw_decoder", PASS, "present: `mixed` decode offloads to NVJPG" if present else
                 f"absent (nvJPEG status {status}): decode runs on CUDA cores, competing with training",
                 {"present": present})
