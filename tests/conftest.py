"""Test setup: run Triton kernels on the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is decided here, at collection time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is a setup error reported elsewhere
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Copies of GSM8K, MATH-500, AIME 2024 and AMC 2023 (gsm8k_test.jsonl, ...) are not shipped: the tests that read them
# run when VPGEA_TEST_DATA names a folder holding them, and skip otherwise.
SHARED_DATA = Path(os.environ["VPGEA_TEST_DATA"]) if os.environ.get("VPGEA_TEST_DATA") else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if SHARED_DATA is None or not SHARED_DATA.is_dir():
        pytest.skip("real data sets not available: set VPGEA_TEST_DATA to a folder with gsm8k_test.jsonl, "
                    "math500_test.jsonl, aime24_test.jsonl and amc23_test.jsonl"
                    + (f" ({SHARED_DATA} is not a folder)" if SHARED_DATA is not None else ""))
    return SHARED_DATA


requires_cuda = pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU")


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A Hugging Face model directory with a tokenizer, built in code: the toy tokenizer and a 1-layer, width-16
    Llama (random weights)."""
    from vpgea import toy

    tok = toy.build_tokenizer()
    d = tmp_path / "model"
    toy.build_model(toy.ToyTask(hidden_size=16, num_layers=1, num_heads=2), tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d
