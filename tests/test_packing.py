"""Packing layout (boundaries, shifted targets, roles, scatter) and token-budget micro-batching."""

from __future__ import annotations

import random

import pytest
import torch

from vpgea.packing import (
    IGNORE_INDEX,
    ROLE_ANSWER,
    ROLE_COMPLETION,
    ROLE_NONE,
    ROLE_PROMPT,
    PackedBatch,
    micro_batches,
    pack_sequences,
)


def _random_seqs(rng: random.Random, n: int, max_len: int = 9, vocab: int = 50, answers: bool = False):
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, max_len))] for _ in range(n)]
    completions = [[rng.randrange(vocab) for _ in range(rng.randint(0, max_len))] for _ in range(n)]
    tails = [[rng.randrange(vocab) for _ in range(rng.randint(0, 3))] for _ in range(n)] if answers else None
    return prompts, completions, tails


# --------------------------------------------------------------------------------------------------------------------
# pack_sequences


def test_layout_small_example():
    b = pack_sequences([[10, 11], [20]], [[12, 13], []], answers=[[14], [21, 22]])
    # seq 0: 10 11 | 12 13 | 14 ; seq 1: 20 | | 21 22
    assert b.input_ids.tolist() == [10, 11, 12, 13, 14, 20, 21, 22]
    assert b.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert b.cu_seqlens.tolist() == [0, 5, 8] and b.cu_seqlens.dtype == torch.int32
    assert b.max_seqlen == 5 and b.num_tokens == 8 and b.num_seqs == 2 and b.seq_lens == [5, 3]
    assert b.targets.tolist() == [11, 12, 13, 14, -100, 21, 22, -100]
    P, C, A, N = ROLE_PROMPT, ROLE_COMPLETION, ROLE_ANSWER, ROLE_NONE
    assert b.roles.tolist() == [P, C, C, A, N, A, A, N] and b.roles.dtype == torch.int8
    assert b.seq_idx.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert b.input_ids.dtype == b.position_ids.dtype == b.targets.dtype == b.seq_idx.dtype == torch.int64


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_targets_never_cross_boundaries(seed):
    rng = random.Random(seed)
    prompts, completions, answers = _random_seqs(rng, 23, answers=True)
    b = pack_sequences(prompts, completions, answers)
    ids, tgt, seq = b.input_ids.tolist(), b.targets.tolist(), b.seq_idx.tolist()
    for t in range(b.num_tokens):
        if t + 1 < b.num_tokens and seq[t + 1] == seq[t]:
            assert tgt[t] == ids[t + 1]
        else:
            assert tgt[t] == IGNORE_INDEX and b.roles[t] == ROLE_NONE
    # Each sequence's last position is ignored; positions restart at 0.
    cu = b.cu_seqlens.tolist()
    assert all(tgt[e - 1] == IGNORE_INDEX for e in cu[1:])
    assert all(b.position_ids[s] == 0 for s in cu[:-1])
    assert b.max_seqlen == max(len(p) + len(c) + len(a) for p, c, a in zip(prompts, completions, answers))


def test_roles_count_completion_and_answer_tokens():
    rng = random.Random(3)
    prompts, completions, answers = _random_seqs(rng, 17, answers=True)
    b = pack_sequences(prompts, completions, answers)
    per_seq_c = torch.bincount(b.seq_idx[b.roles == ROLE_COMPLETION], minlength=17).tolist()
    per_seq_a = torch.bincount(b.seq_idx[b.roles == ROLE_ANSWER], minlength=17).tolist()
    assert per_seq_c == [len(c) for c in completions]
    assert per_seq_a == [len(a) for a in answers]
    # The targets at completion positions are exactly the completion tokens, in order.
    got = b.scatter(b.targets, role=ROLE_COMPLETION)
    assert [g.tolist() for g in got] == completions
    got = b.scatter(b.targets, role=ROLE_ANSWER)
    assert [g.tolist() for g in got] == answers
    got = b.scatter(b.targets, role=(ROLE_COMPLETION, ROLE_ANSWER))
    assert [g.tolist() for g in got] == [c + a for c, a in zip(completions, answers)]


def test_length_one_sequences():
    b = pack_sequences([[5], [6], [7, 8]], [[], [9], []])
    assert b.cu_seqlens.tolist() == [0, 1, 3, 5]
    assert b.position_ids.tolist() == [0, 0, 1, 0, 1]
    assert b.targets.tolist() == [-100, 9, -100, 8, -100]
    assert [x.tolist() for x in b.scatter(b.targets, role=ROLE_COMPLETION)] == [[], [9], []]
    assert [x.tolist() for x in b.scatter(b.input_ids)] == [[5], [6, 9], [7, 8]]


def test_scatter_values_with_trailing_dims_and_grad():
    b = pack_sequences([[1, 2], [3]], [[4], [5, 6]])
    values = torch.arange(b.num_tokens * 2, dtype=torch.float32).reshape(-1, 2).requires_grad_()
    parts = b.scatter(values, role=ROLE_COMPLETION)
    assert [p.shape for p in parts] == [(1, 2), (2, 2)]
    sum(p.sum() for p in parts).backward()
    assert values.grad[:, 0].tolist() == [0, 1, 0, 1, 1, 0]  # roles: P C N C C N
    with pytest.raises(ValueError, match="5 rows"):
        b.scatter(torch.zeros(5))


def test_to_moves_every_tensor():
    b = pack_sequences([[1, 2]], [[3]]).to("meta")
    assert isinstance(b, PackedBatch) and b.max_seqlen == 3
    for name in ("input_ids", "position_ids", "cu_seqlens", "targets", "roles", "seq_idx"):
        assert getattr(b, name).device.type == "meta"


def test_accepts_tensors_as_token_lists():
    b = pack_sequences([torch.tensor([1, 2])], [torch.tensor([3])])
    assert b.input_ids.tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    "args, match",
    [
        (([], []), "no sequences"),
        (([[1]], [[2], [3]]), "1 prompts but 2 completions"),
        (([[1]], [[2]], [[3], [4]]), "1 prompts but 2 answers"),
        (([[1], []], [[2], [3]]), r"prompts\[1\] is empty"),
        (([[1]], [[2, -3]]), r"completions\[0\]\[1\]"),
        (([[1]], [[2, 1.5]]), r"completions\[0\]\[1\]"),
    ],
)
def test_pack_errors(args, match):
    with pytest.raises(ValueError, match=match):
        pack_sequences(*args)


def test_pack_rejects_strings():
    with pytest.raises(TypeError, match=r"prompts\[0\]"):
        pack_sequences(["abc"], [[1]])


# --------------------------------------------------------------------------------------------------------------------
# micro_batches


@pytest.mark.parametrize("seed", range(5))
def test_micro_batches_budget_cover_and_balance(seed):
    rng = random.Random(seed)
    # Long-tailed lengths, as rollouts have.
    lengths = [min(500, int(rng.lognormvariate(3.5, 1.0)) + 1) for _ in range(rng.randint(1, 60))]
    budget = 600
    mbs = micro_batches(lengths, budget)
    flat = sorted(i for mb in mbs for i in mb)
    assert flat == list(range(len(lengths)))  # every sequence exactly once
    loads = [sum(lengths[i] for i in mb) for mb in mbs]
    assert max(loads) <= budget
    assert all(mb == sorted(mb) for mb in mbs) and [mb[0] for mb in mbs] == sorted(mb[0] for mb in mbs)
    # Never more than twice the lower bound (first-fit-decreasing guarantee is far tighter in practice).
    lower = -(-sum(lengths) // budget)
    assert len(mbs) <= max(lower, 1) * 2
    if len(mbs) > 1:  # balanced: the spread of loads is at most one sequence
        assert max(loads) - min(loads) <= max(lengths)


def test_micro_batches_exact_fill_and_single():
    assert micro_batches([5], 5) == [[0]]
    assert micro_batches([], 10) == []
    mbs = micro_batches([4, 4, 4, 4], 8)
    assert len(mbs) == 2 and all(len(mb) == 2 for mb in mbs)
    # Equal split of equal work.
    mbs = micro_batches([3, 3, 3, 3, 3, 3], 9)
    assert sorted(len(mb) for mb in mbs) == [3, 3]


def test_micro_batches_errors_name_the_sequence():
    with pytest.raises(ValueError, match=r"sequence 2 has 11 tokens, more than max_tokens=10"):
        micro_batches([3, 4, 11, 2], 10)
    with pytest.raises(ValueError, match="sequence 1 has length 0"):
        micro_batches([3, 0], 10)
    with pytest.raises(ValueError, match="max_tokens must be positive"):
        micro_batches([3], 0)


def test_micro_batches_hard_case_is_fast_and_valid():
    # Every pair overflows the budget: one batch per sequence, found without trying every count.
    lengths = [51] * 2000
    mbs = micro_batches(lengths, 100)
    assert len(mbs) == 2000 and all(len(mb) == 1 for mb in mbs)
