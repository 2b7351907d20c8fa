"""Helpers shared by the Triton launchers (torch only: importable without Triton)."""

from __future__ import annotations

import contextlib
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


def device_guard(t: torch.Tensor):
    """Triton launches on the *current* CUDA device and its stream: make that ``t``'s device for the launch (tensors
    on ``cuda:1`` while ``cuda:0`` is current, e.g. an LM head placed by ``device_map="auto"``)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


# torch >= 2.8 has mm/addmm overloads that take bf16/fp16 operands and write an fp32 result (fp32 accumulation
# inside cuBLAS, no upcast copies). Older torch: upcast copies of the operands instead.
_HAS_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")
_HAS_ADDMM_OUT_DTYPE = hasattr(torch.ops.aten.addmm, "dtype_out")
# Per CUDA device: does addmm.dtype_out accept an fp32 accumulator (``self``/``out``) with bf16/fp16 operands?
_ADDMM_FP32_ACC: dict[tuple[str, int | None], bool] = {}


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in fp32 (cuBLAS bf16/fp16 GEMM with an fp32 output where available)."""
    if a.dtype != torch.float32 and a.is_cuda and _HAS_MM_OUT_DTYPE:
        return torch.ops.aten.mm.dtype(a, b, torch.float32)
    return torch.mm(a.float(), b.float())


def addmm_fp32_accumulator_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``addmm.dtype_out`` can add a ``dtype`` product into an fp32 accumulator on ``device``.

    The first torch releases with the overload require ``self`` in the operands' dtype ("self and mat2 must have
    the same dtype"); later ones accept ``self`` in ``out_dtype``. Probed once per device on a 16 x 16 product and
    checked against fp32 arithmetic, so neither a refusal nor a wrong result can reach the callers.
    """
    key = (device.type, device.index)
    if key not in _ADDMM_FP32_ACC:
        ok = False
        if device.type == "cuda" and _HAS_ADDMM_OUT_DTYPE:
            gen = torch.Generator(device="cpu").manual_seed(0)
            a, b, c = (torch.randn(16, 16, generator=gen) for _ in range(3))
            a, b = a.to(dtype), b.to(dtype)
            want = c + a.float() @ b.float()
            acc = c.to(device)
            try:
                torch.ops.aten.addmm.dtype_out(acc, a.to(device), b.to(device), torch.float32, out=acc)
            except RuntimeError as err:
                if "dtype" not in str(err):  # only a dtype refusal means "not supported"; anything else is real
                    raise
            else:
                ok = torch.allclose(acc.cpu(), want, rtol=1e-4, atol=1e-4)
        _ADDMM_FP32_ACC[key] = ok
    return _ADDMM_FP32_ACC[key]


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with fp32 ``acc``: one cuBLAS call with beta = 1 and an fp32 output where this torch allows
    an fp32 accumulator; otherwise an fp32 product (a temporary the size of ``acc``) added in."""
    if a.dtype != torch.float32 and a.is_cuda and addmm_fp32_accumulator_ok(a.device, a.dtype):
        torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
        return
    acc += mm_fp32(a, b)
