"""The rollout-engine interface: what the trainer and the evaluator need from a sampler.

Two implementations: ``vpgea.engines.hf.HFEngine`` (transformers, works everywhere) and ``vpgea.engines.vllm``
(vLLM, optional). Both take token-id prompts and return generated token ids, so tokenisation and chat templates stay
in one place (the caller).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

__all__ = ["GenerationOutput", "RolloutEngine", "derive_seed", "request_seeds", "resolve_seeds"]


def derive_seed(*parts: int | str) -> int:
    """A seed in ``[0, 2**31)`` that is a pure function of ``parts`` (stable across processes and Python runs, unlike
    ``hash``): e.g. ``derive_seed(run_seed, step, question, view, sample)`` names one rollout wherever it is drawn."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def request_seeds(seed: int, n: int) -> list[int]:
    """``n`` distinct per-request seeds in ``[0, 2**31)``, a pure function of ``seed``.

    Distinct, so that duplicated prompts (the G samples of one question) draw different samples; derived from one
    seed, so that a call with the same prompts and seed is reproducible.
    """
    rng = random.Random(int(seed))
    seen: set[int] = set()
    out: list[int] = []
    while len(out) < n:
        s = rng.getrandbits(31)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def resolve_seeds(seed: int | Sequence[int] | None, n: int) -> list[int] | None:
    """The per-prompt seeds of a ``generate`` call: ``None`` (unseeded), one int (expanded with
    :func:`request_seeds`) or one seed per prompt (checked)."""
    if seed is None:
        return None
    if not isinstance(seed, Sequence):
        return request_seeds(int(seed), n)
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"generate: {len(seeds)} seeds for {n} prompts; give one seed per prompt, or one int")
    return seeds


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
