"""The rollout-engine interface: what the trainer and the evaluator need from a sampler.

Two implementations: ``vpgea.engines.hf.HFEngine`` (transformers, works everywhere) and ``vpgea.engines.vllm``
(vLLM, optional). Both take token-id prompts and return generated token ids, so tokenisation and chat templates stay
in one place (the caller).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

__all__ = ["GenerationOutput", "RolloutEngine"]


@dataclass
class GenerationOutput:
    """One sampled response.

    token_ids: the generated ids (the prompt excluded), EOS included when the model emitted it.
    finish_reason: ``"stop"`` when an EOS/stop id ended it, ``"length"`` when ``max_new_tokens`` did.
    """

    token_ids: list[int] = field(default_factory=list)
    finish_reason: Literal["stop", "length"] = "length"


@runtime_checkable
class RolloutEngine(Protocol):
    """Batched sampling behind one interface."""

    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[GenerationOutput]:
        """One output per prompt (duplicate a prompt to draw several samples); ``temperature=0`` is greedy."""
        ...

    def update_weights(self, model) -> None:
        """Push the trainer's current weights into the engine (a no-op when the engine shares the module)."""
        ...

    def sleep(self) -> None:
        """Release generation memory (KV cache) while the trainer runs."""
        ...

    def wake(self) -> None:
        """Re-acquire what ``sleep`` released."""
        ...
