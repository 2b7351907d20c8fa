"""Local model directories, checked one way everywhere (training, evaluation, the engines): a Hugging Face checkpoint
directory with its ``config.json`` and a tokenizer; nothing is ever downloaded. And the one check that the optional
vLLM package is there."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

__all__ = ["check_model_dir", "load_tokenizer", "model_context", "require_vllm"]


def check_model_dir(path, who: str) -> Path:
    """``path`` as a ``Path`` if it is a Hugging Face model directory (holds ``config.json``), else
    ``FileNotFoundError`` naming ``who`` (the flag or the caller) and what is missing."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{who}: model directory {str(p)!r} does not exist")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{who}: {str(p)!r} has no config.json; expected a Hugging Face model directory")
    return p


def load_tokenizer(path, who: str):
    """The directory's tokenizer (local files only), or ``FileNotFoundError`` naming ``who`` and the reason."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # OSError / ValueError, or ImportError when transformers falls back to a slow tokenizer
        raise FileNotFoundError(f"{who}: no usable tokenizer in {str(path)!r} ({type(e).__name__}: {e})") from e


def model_context(path) -> int | None:
    """The longest sequence the model takes (``max_position_embeddings`` of its ``config.json``), when it says."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    cfg = cfg.get("text_config", cfg)
    n = cfg.get("max_position_embeddings")
    return int(n) if isinstance(n, int) and n > 0 else None


def require_vllm(who: str) -> None:
    """``RuntimeError`` naming ``who`` when the vllm package is not installed (checked at start-up, before any model
    loads)."""
    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError(f"{who}: the vllm package is not installed (pip install 'vpgea[vllm]'), or use --engine hf")
