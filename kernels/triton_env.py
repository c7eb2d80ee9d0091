"""The one switch between compiled Triton and its CPU interpreter; import triton from here.

Without a GPU there is no Triton driver ("0 active drivers"), so the kernels run in
Triton's interpreter on CPU tensors: slowly, as a correctness twin of the compiled
kernels. Triton reads TRITON_INTERPRET when it is first imported, so
the variable is set here, before the import, and only when torch sees no CUDA device
(asking torch does not import triton). A value the user set wins (setdefault).

Every kernel module does ``from bt_fast.kernels.triton_env import INTERPRETED, tl, triton``;
the package ``__init__`` never imports this module, so ``import bt_fast.kernels`` stays
free of triton until a Triton path is first used.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# Fixed from here on: triton has read the variable, later changes would not take effect.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

__all__ = ["INTERPRETED", "tl", "triton"]
