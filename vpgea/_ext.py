"""Lazy build and load of the CUDA C++ extension in ``csrc/`` (the packed-sequence loss reduction).

``load_loss_ext()`` compiles ``csrc/vpgea_loss.cu`` with ``torch.utils.cpp_extension.load`` the first time it is
called on a machine with CUDA and nvcc, registers fake implementations of its ops for ``torch.compile``, and returns
``torch.ops.vpgea``; it returns None (and says why in ``load_error()``) when CUDA, nvcc or the source is missing, or
the build fails. Nothing is compiled at import time. ``VPGEA_NO_EXT=1`` disables the extension.

Ops registered by the extension (see ``csrc/vpgea_loss.cu``):

- ``vpgea::vpgea_loss_fwd_cuda(teacher (T,), student (T,), advantages (S,) fp32, cu_seqlens (S+1,) int32,
  beta, scale, normalize) -> (4,) fp32`` [loss, kl, adv_logq, gate_frac]
- ``vpgea::vpgea_loss_bwd_cuda(grad (), teacher, student, advantages, cu_seqlens, beta, scale, normalize)
  -> (d_teacher (T,), d_student (T,))``
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import torch

__all__ = ["CSRC_DIR", "LOSS_SOURCES", "load_loss_ext", "load_error", "nvcc_path"]

# A source checkout keeps the sources in `csrc/` beside the package; a wheel ships them as `vpgea/csrc/`.
_HERE = Path(__file__).resolve().parent
CSRC_DIR = _HERE / "csrc" if (_HERE / "csrc").is_dir() else _HERE.parent / "csrc"
LOSS_SOURCES = [CSRC_DIR / "vpgea_loss.cu"]

_lock = threading.Lock()
_state: dict = {"tried": False, "ops": None, "error": None}


def nvcc_path() -> str | None:
    """Path of nvcc from ``CUDA_HOME``/``CUDA_PATH`` or ``PATH``, or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def load_error() -> str | None:
    """Why the last ``load_loss_ext()`` returned None (None if it has not failed)."""
    return _state["error"]


def _register_fakes() -> None:
    @torch.library.register_fake("vpgea::vpgea_loss_fwd_cuda")
    def _(teacher, student, advantages, cu_seqlens, beta, scale, normalize):
        return advantages.new_empty(4, dtype=torch.float32)

    @torch.library.register_fake("vpgea::vpgea_loss_bwd_cuda")
    def _(grad, teacher, student, advantages, cu_seqlens, beta, scale, normalize):
        return torch.empty_like(teacher), torch.empty_like(student)


def _ninja_available() -> bool:
    from torch.utils.cpp_extension import is_ninja_available

    return is_ninja_available()


def load_loss_ext(verbose: bool = False):
    """Build (once, cached by torch under ``~/.cache/torch_extensions``) and load the loss extension.

    Returns ``torch.ops.vpgea`` with ``vpgea_loss_fwd_cuda``/``vpgea_loss_bwd_cuda``, or None when unavailable.
    """
    with _lock:
        if _state["tried"]:
            return _state["ops"]
        _state["tried"] = True
        reason = None
        if os.environ.get("VPGEA_NO_EXT", "0") == "1":
            reason = "disabled by VPGEA_NO_EXT=1"
        elif not torch.cuda.is_available() or torch.version.cuda is None:
            reason = "needs a CUDA build of torch and a CUDA device"
        elif nvcc_path() is None:
            reason = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
        elif not _ninja_available():
            reason = "ninja not found: torch builds extensions with it (pip install 'vpgea[cuda]' or pip install ninja)"
        elif not all(p.is_file() for p in LOSS_SOURCES):
            reason = f"CUDA sources not found under {CSRC_DIR} (not shipped in this install)"
        if reason is not None:
            _state["error"] = reason
            return None
        try:
            from torch.utils.cpp_extension import load

            load(
                name="vpgea_loss_ext",
                sources=[str(p) for p in LOSS_SOURCES],
                extra_cuda_cflags=["-O3", "-lineinfo"],
                is_python_module=False,
                verbose=verbose,
            )
            _register_fakes()
            _state["ops"] = torch.ops.vpgea
        except Exception as exc:  # a broken toolchain must not break the Triton path
            _state["error"] = f"build failed: {type(exc).__name__}: {exc}"
            _state["ops"] = None
        return _state["ops"]
