"""Sequence packing: many variable-length sequences as one flat token batch, and token-budget micro-batching.

A packed batch concatenates sequences ``prompt ⊕ completion ⊕ answer`` into ``input_ids: [T]`` with
``position_ids`` restarting at 0 for each sequence and ``cu_seqlens: [S+1]`` (int32) marking the boundaries, the
layout varlen attention kernels (flash-attn, ``torch.nn.attention.varlen``) consume directly.

Targets are next-token ids shifted *inside* each sequence: ``targets[t] = input_ids[t + 1]`` unless ``t`` is the last
position of its sequence, where the target is ``-100`` (ignored). ``roles[t]`` is the role of the *target* token, so
``roles == ROLE_COMPLETION`` selects exactly the positions whose log-prob is the log-prob of a completion token; the
last position of each sequence has no target and gets ``ROLE_NONE``.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "ROLE_NONE",
    "ROLE_PROMPT",
    "ROLE_COMPLETION",
    "ROLE_ANSWER",
    "IGNORE_INDEX",
    "PackedBatch",
    "pack_sequences",
    "micro_batches",
    "pack_groups",
    "cu_seqlens",
    "segment_sum",
]

ROLE_NONE = -1  # no target: the last position of a sequence
ROLE_PROMPT = 0
ROLE_COMPLETION = 1
ROLE_ANSWER = 2  # the answer tail a(y*) appended after the completion
IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    """``S`` sequences packed into ``T`` tokens.

    input_ids:    [T] int64
    position_ids: [T] int64, 0 at the first token of every sequence
    cu_seqlens:   [S+1] int32, ``cu_seqlens[i]:cu_seqlens[i+1]`` is sequence ``i``
    max_seqlen:   int, the longest sequence
    targets:      [T] int64, next token within the sequence, ``-100`` at each sequence's last position
    roles:        [T] int8, role of the target token (``ROLE_*``), ``ROLE_NONE`` where the target is ``-100``
    seq_idx:      [T] int64, the sequence each token belongs to
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    targets: torch.Tensor
    roles: torch.Tensor
    seq_idx: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1

    @property
    def seq_lens(self) -> list[int]:
        """Length of each sequence (tokens, prompt included)."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        def mv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return PackedBatch(
            input_ids=mv(self.input_ids),
            position_ids=mv(self.position_ids),
            cu_seqlens=mv(self.cu_seqlens),
            max_seqlen=self.max_seqlen,
            targets=mv(self.targets),
            roles=mv(self.roles),
            seq_idx=mv(self.seq_idx),
        )

    def role_mask(self, role: int | Iterable[int]) -> torch.Tensor:
        """``[T]`` bool: positions whose target has ``role`` (one role or several)."""
        roles = [role] if isinstance(role, int) else list(role)
        mask = torch.zeros_like(self.roles, dtype=torch.bool)
        for r in roles:
            mask |= self.roles == r
        return mask

    def scatter(self, values: torch.Tensor, role: int | Iterable[int] | None = None) -> list[torch.Tensor]:
        """Split per-token ``values: [T, ...]`` back into one tensor per sequence.

        With ``role=None`` every position of the sequence is kept (``[L_i, ...]``); otherwise only the positions
        whose target has that role (or one of those roles), in order. Differentiable (indexing only).
        """
        if values.shape[0] != self.num_tokens:
            raise ValueError(
                f"PackedBatch.scatter: values has {values.shape[0]} rows, the batch has {self.num_tokens} tokens"
            )
        bounds = self.cu_seqlens.tolist()
        if role is None:
            return [values[bounds[i] : bounds[i + 1]] for i in range(self.num_seqs)]
        mask = self.role_mask(role).to(values.device)
        # Positions kept per sequence, then one split: a single gather instead of S boolean indexings.
        kept = torch.nonzero(mask, as_tuple=False)[:, 0]
        counts = torch.bincount(self.seq_idx.to(values.device)[kept], minlength=self.num_seqs).tolist()
        return list(torch.split(values[kept], counts))


def _check_ids(name: str, i: int, seq) -> list[int]:
    if hasattr(seq, "tolist"):  # torch tensor / numpy array
        seq = seq.tolist()
    if not isinstance(seq, Sequence) or isinstance(seq, (str, bytes)):
        raise TypeError(f"pack_sequences: {name}[{i}] must be a list of token ids, got {type(seq).__name__}")
    # Fast path first (this runs over every token of a training step); find the culprit only on failure.
    if all(isinstance(tok, int) for tok in seq) and (not seq or min(seq) >= 0):
        return list(seq)
    for j, tok in enumerate(seq):
        if not isinstance(tok, int) or tok < 0:
            raise ValueError(f"pack_sequences: {name}[{i}][{j}] must be a non-negative int token id, got {tok!r}")
    raise AssertionError("unreachable")


def pack_sequences(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]] | None = None,
) -> PackedBatch:
    """Pack ``prompt_i ⊕ completion_i (⊕ answer_i)`` for every ``i`` into one :class:`PackedBatch` (on the CPU).

    Every prompt needs at least one token (the first completion token is predicted from it). Completions and
    answers may be empty.
    """
    n = len(prompts)
    if n == 0:
        raise ValueError("pack_sequences: no sequences to pack")
    if len(completions) != n:
        raise ValueError(f"pack_sequences: {n} prompts but {len(completions)} completions")
    if answers is not None and len(answers) != n:
        raise ValueError(f"pack_sequences: {n} prompts but {len(answers)} answers")

    ids: list[int] = []
    roles: list[int] = []
    lens: list[int] = []
    for i in range(n):
        p = _check_ids("prompts", i, prompts[i])
        c = _check_ids("completions", i, completions[i])
        a = _check_ids("answers", i, answers[i]) if answers is not None else []
        if not p:
            raise ValueError(f"pack_sequences: prompts[{i}] is empty; a sequence needs at least one prompt token")
        ids += p + c + a
        # Role of the *target* of each position: position j predicts token j+1.
        roles += [ROLE_PROMPT] * (len(p) - 1) + [ROLE_COMPLETION] * len(c) + [ROLE_ANSWER] * len(a) + [ROLE_NONE]
        lens.append(len(p) + len(c) + len(a))

    input_ids = torch.tensor(ids, dtype=torch.int64)  # [T]
    seqlens = torch.tensor(lens, dtype=torch.int64)  # [S]
    cu = cu_seqlens(seqlens).long()
    seq_idx = torch.repeat_interleave(torch.arange(n), seqlens)  # [T]
    position_ids = torch.arange(len(ids), dtype=torch.int64) - cu[:-1][seq_idx]
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:-1] = input_ids[1:]
    targets[cu[1:] - 1] = IGNORE_INDEX  # never predict across a boundary
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        cu_seqlens=cu.to(torch.int32),
        max_seqlen=max(lens),
        targets=targets,
        roles=torch.tensor(roles, dtype=torch.int8),
        seq_idx=seq_idx,
    )


def cu_seqlens(lengths: Sequence[int] | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """``[S+1]`` int32 boundaries ``[0, l_0, l_0 + l_1, ...]`` of sequences of the given lengths (the one builder)."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    cu[1:] = torch.cumsum(lengths, 0)
    if int(cu[-1]) >= 2**31:
        raise ValueError(f"cu_seqlens: {int(cu[-1])} tokens do not fit int32 boundaries")
    return cu.to(torch.int32).to(device if device is not None else lengths.device)


def segment_sum(x: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """``[S]`` sums of ``x: [T]`` over the segments ``cu: [S+1]``, through a float64 prefix sum: the same bits on
    every run and device (``index_add`` uses atomics on CUDA), differentiable, in ``x``'s dtype."""
    prefix = torch.cat([x.new_zeros(1, dtype=torch.float64), x.double().cumsum(0)])
    cu = cu.long().to(x.device)
    return (prefix[cu[1:]] - prefix[cu[:-1]]).to(x.dtype)


def pack_groups(group_lengths: Sequence[Sequence[int]], max_tokens: int) -> list[list[tuple[int, int]]]:
    """Micro-batches of ``(group, sequence)`` pairs under a token budget, keeping each group whole when it fits.

    ``group_lengths[g]`` are the lengths of group ``g``'s sequences (a question's training sequences). Groups whose
    total fits in ``max_tokens`` are packed whole, longest first into the least-loaded batch (the fewest batches the
    greedy fills); a larger group is split over batches of its own by ``micro_batches``. Returns the batches in a
    deterministic order, each a list of ``(group, sequence)`` in group then sequence order.
    """
    whole = [g for g, ls in enumerate(group_lengths) if ls and sum(ls) <= max_tokens]
    batches: list[list[tuple[int, int]]] = []
    if whole:
        for idx in micro_batches([sum(group_lengths[g]) for g in whole], max_tokens):
            batches.append([(whole[i], j) for i in idx for j in range(len(group_lengths[whole[i]]))])
    for g, ls in enumerate(group_lengths):
        if ls and g not in whole:
            batches += [[(g, j) for j in idx] for idx in micro_batches(ls, max_tokens)]
    return batches


def micro_batches(lengths: Sequence[int], max_tokens: int, *, min_batches: int = 1) -> list[list[int]]:
    """Split sequences into micro-batches of at most ``max_tokens`` tokens each, balancing the tokens per batch.

    Longest-processing-time greedy: fill ``k`` batches longest sequence first, each into the least-loaded batch,
    with ``k`` the fewest batches (from ``max(ceil(sum / max_tokens), min_batches)`` up) for which everything fits.
    ``min_batches`` (at most ``len(lengths)``; no batch is ever empty) lets data-parallel ranks agree on one count:
    FSDP gathers parameters once per forward, so every rank must run the same number of forwards. Returns lists of
    indices into ``lengths``, each sorted; the lists are ordered by their first index. A sequence longer than
    ``max_tokens`` is an error naming it.
    """
    if max_tokens <= 0:
        raise ValueError(f"micro_batches: max_tokens must be positive, got {max_tokens}")
    lengths = [int(x) for x in lengths]
    for i, n in enumerate(lengths):
        if n <= 0:
            raise ValueError(f"micro_batches: sequence {i} has length {n}; lengths must be >= 1")
        if n > max_tokens:
            raise ValueError(
                f"micro_batches: sequence {i} has {n} tokens, more than max_tokens={max_tokens}; "
                "raise max_tokens or shorten the sequence (nothing is truncated silently)"
            )
    if not lengths:
        return []
    if not 1 <= min_batches <= len(lengths):
        raise ValueError(f"micro_batches: min_batches must be in [1, {len(lengths)}] (one per sequence at most), "
                         f"got {min_batches}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    lo = max(-(-sum(lengths) // max_tokens), min_batches)  # no fewer batches can hold the tokens
    bins = _fill(lengths, order, lo, max_tokens)
    if bins is None:
        # Binary search for the fewest batches the greedy fills; one batch per sequence always fits.
        hi, bins = len(lengths), _fill(lengths, order, len(lengths), max_tokens)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            trial = _fill(lengths, order, mid, max_tokens)
            if trial is None:
                lo = mid
            else:
                hi, bins = mid, trial
    out = [sorted(b) for b in bins if b]
    out.sort(key=lambda b: b[0])
    return out


def _fill(lengths: list[int], order: list[int], num_bins: int, max_tokens: int) -> list[list[int]] | None:
    """Longest-first into the least-loaded of ``num_bins`` bins; None if some sequence does not fit."""
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    heap = [(0, b) for b in range(num_bins)]  # (load, bin)
    for i in order:
        load, b = heap[0]  # the least-loaded bin has the most room: if it cannot take i, none can
        if load + lengths[i] > max_tokens:
            return None
        heapq.heapreplace(heap, (load + lengths[i], b))
        bins[b].append(i)
    return bins
