"""Benchmarks run under ``pytest benchmarks/``. CUDA cases skip without a GPU; CPU smoke cases check the harness."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

_ROOT = Path(__file__).resolve().parents[1]
for p in (str(_ROOT), str(_ROOT / "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmark needs a CUDA GPU")
