"""Helpers shared by the Triton launchers."""

from __future__ import annotations

import os

import torch

# Under TRITON_INTERPRET=1 kernels run on the CPU through numpy. Triton 3.9's interpreter computes tl.dot on bf16
# operands wrongly (errors of order 1e10 on a 16x16 product) while fp32 operands are exact, so launchers pass
# DOT_FP32=True there and kernels upcast their dot operands. On a GPU the operands stay in the input dtype.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_runnable(device: torch.device) -> bool:
    """True when Triton kernels can run for tensors on ``device``: CUDA, or CPU under the interpreter."""
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and INTERPRET


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())
