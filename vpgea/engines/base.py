"""The rollout-engine interface: what the trainer and the evaluator need from a sampler.

Two implementations: ``vpgea.engines.hf.HFEngine`` (transformers, works everywhere) and ``vpgea.engines.vllm``
(vLLM, optional). Both take token-id prompts and return generated token ids, so tokenisation and chat templates stay
in one place (the caller).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from vpgea.rng import derive_seed, request_seeds, resolve_seeds  # noqa: F401  (re-exported)

__all__ = ["GenerationOutput", "RolloutEngine", "check_generate_args", "derive_seed", "request_seeds", "resolve_seeds",
           "stop_ids", "unwrap_model"]


def unwrap_model(model):
    """The Hugging Face causal LM itself: a ``PolicyModel`` (anything with ``.model`` and no ``generate``) holds it as
    ``.model``."""
    return getattr(model, "model", model) if not hasattr(model, "generate") else model


def check_generate_args(prompts: Sequence[Sequence[int]], max_new_tokens: int, top_p: float) -> None:
    """The argument checks every engine's ``generate`` makes, with the messages they share."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; a prompt needs at least one token")


def stop_ids(engine: str, *sources) -> list[int]:
    """Token ids that end a response: the ``eos_token_id`` (an int or a list) of each source that has one (a
    tokenizer, a generation config), in order, without repeats. An error naming ``engine`` when there is none."""
    out: list[int] = []
    for source in sources:
        eos = getattr(source, "eos_token_id", None)
        if eos is None:
            continue
        for i in eos if isinstance(eos, (list, tuple)) else [eos]:
            if int(i) not in out:
                out.append(int(i))
    if not out:
        raise ValueError(f"{engine}: no stop token; the tokenizer has no eos_token_id and none was given")
    return out


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
        seed: int | Sequence[int] | None = None,
    ) -> list[GenerationOutput]:
        """One output per prompt (duplicate a prompt to draw several samples); ``temperature=0`` is greedy.

        ``seed``: ``None`` (unseeded), an int, or one int per prompt. Seeded sampling is per prompt: prompt ``i``
        samples from its own stream (``resolve_seeds(seed, n)[i]``), so its response does not depend on which
        other prompts share the call, their order or the batch size (up to floating-point differences in the
        batched forward) -- which is what lets a question's rollouts be the same on whichever rank draws them.
        """
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
