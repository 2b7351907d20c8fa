"""Random numbers in one home: the seeds that name each rollout (a pure function of the run's seed and the rollout's
coordinates, so any rank draws the same sample) and the capture/restore of the process's RNG states (checkpoints, and
the vLLM engine, whose start-up would reseed them)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import torch

__all__ = ["capture_rng", "derive_seed", "request_seeds", "resolve_seeds", "restore_rng"]


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


def capture_rng() -> dict:
    """Python, torch CPU and CUDA RNG states."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if torch.cuda.is_available():
        # This process's device only: under torchrun every rank sees every GPU, and a state per visible device
        # could not be restored where fewer are visible. (Rollouts draw from their own seeds, never from it.)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    cuda = state.get("cuda")
    if isinstance(cuda, torch.Tensor) and torch.cuda.is_available():  # (a list: an older per-device format, skipped)
        torch.cuda.set_rng_state(cuda)
