"""Rollout engines: ``make_engine("hf" | "vllm", model_or_path, tokenizer, **kw)``."""

from __future__ import annotations

import importlib

from vpgea.engines.base import GenerationOutput, RolloutEngine

__all__ = ["GenerationOutput", "RolloutEngine", "make_engine"]

_ENGINES = ("hf", "vllm")


def make_engine(name: str, model_or_path, tokenizer, **kw) -> RolloutEngine:
    """Build a rollout engine.

    name: ``"hf"`` (transformers; shares the trainer's module, CPU or GPU) or ``"vllm"`` (needs the ``vllm`` extra).
    model_or_path: an in-memory Hugging Face causal LM (or a ``PolicyModel``) for ``"hf"``; for ``"vllm"`` whatever
        ``vpgea.engines.vllm.VLLMEngine`` accepts (a model directory, usually).
    tokenizer: supplies the EOS/pad ids.
    kw: passed to the engine's constructor.
    """
    if name == "hf":
        from vpgea.engines.hf import HFEngine

        return HFEngine(model_or_path, tokenizer, **kw)
    if name == "vllm":
        from vpgea.modeldir import require_vllm

        require_vllm("engine 'vllm'")
        module = importlib.import_module("vpgea.engines.vllm")
        cls = getattr(module, "VLLMEngine", None)
        if cls is None:
            raise RuntimeError("vpgea.engines.vllm defines no VLLMEngine class")
        return cls(model_or_path, tokenizer, **kw)
    raise ValueError(f"unknown engine {name!r}; expected one of {_ENGINES}")
