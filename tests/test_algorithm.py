"""The VPG-EA algorithm's plain tensor functions (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from vpgea import algorithm as alg


def _decode(words):
    # A toy tokenizer: id i is the word VOCAB[i], joined with spaces (like a word-level tokenizer).
    return lambda ids: " ".join(words[i] for i in ids)


VOCAB = ["a", "b", "\\boxed{", "7", "}", "<eos>", "\\box", "ed{"]


@pytest.mark.parametrize(
    "ids, expected",
    [
        ([0, 1, 2, 3, 4], 2),  # path = "a b"
        ([0, 2, 3, 4, 1, 2, 3, 4], 5),  # last marker wins
        ([0, 1, 0], 3),  # no marker: the whole response
        ([], 0),
        ([2, 3, 4], 0),  # marker first: empty path
        ([0, 6, 7, 3, 4], 5),  # "\box" + "ed{" decode to "\box ed{" here: no marker, whole response
    ],
)
def test_split_at_marker(ids, expected):
    assert alg.split_at_marker(ids, _decode(VOCAB)) == expected


def test_split_multi_token_marker_without_spaces():
    # A BPE-like tokenizer that joins pieces without spaces: "\box" + "ed{" is the marker.
    dec = lambda ids: "".join(VOCAB[i] for i in ids)  # noqa: E731
    assert alg.split_at_marker([0, 1, 6, 7, 3, 4], dec) == 2


def test_cross_view_reward():
    r = alg.cross_view_reward(torch.tensor([-1.0, -3.0, 0.0]), torch.tensor([-2.0, -4.0]))
    torch.testing.assert_close(r, torch.tensor([2.0, 0.0, 3.0]))
    with pytest.raises(ValueError, match="prior"):
        alg.cross_view_reward(torch.tensor([1.0]), torch.tensor([]))


def test_efficiency():
    eta = alg.efficiency(torch.tensor([10, 40, 0]), 20.0, 0.5)
    torch.testing.assert_close(eta, torch.tensor([math.sqrt(2), math.sqrt(0.5), math.sqrt(20)]))
    torch.testing.assert_close(alg.efficiency(torch.tensor([3, 9]), 5.0, 0.0), torch.ones(2))


def test_group_advantages_zscore_and_equal():
    a = alg.group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert abs(float(a.mean())) < 1e-6 and abs(float(a.std(unbiased=False)) - 1) < 1e-4
    for s in (torch.zeros(8), torch.full((8,), 3.5), torch.tensor([2.0])):
        adv = alg.group_advantages(s)
        assert torch.equal(adv, torch.zeros_like(s))
    with pytest.raises(ValueError, match="finite"):
        alg.group_advantages(torch.tensor([1.0, float("nan")]))


def test_vpgea_scores_end_to_end():
    sc = alg.vpgea_scores(
        u_post=torch.tensor([-0.1, -0.1, -5.0, -0.5]),
        u_prior=torch.tensor([-1.0, -3.0]),  # mean -2
        post_lengths=torch.tensor([10, 40, 10, 20]),
        prior_lengths=torch.tensor([30, 50]),  # L_base 40
        alpha=0.5,
    )
    assert sc.base_length == 40.0
    torch.testing.assert_close(sc.reward, torch.tensor([1.9, 1.9, 0.0, 1.5]))
    torch.testing.assert_close(sc.eta, torch.tensor([2.0, 1.0, 2.0, math.sqrt(2)]))
    assert sc.passed.tolist() == [True, True, False, True]
    # The shortest passing path gets the largest advantage; a failing path the lowest.
    assert int(sc.advantage.argmax()) == 0 and int(sc.advantage.argmin()) == 2


def test_vpgea_scores_no_pass_is_zero_not_nan():
    sc = alg.vpgea_scores(
        u_post=torch.tensor([-9.0, -8.0]), u_prior=torch.tensor([-1.0]),
        post_lengths=torch.tensor([5, 6]), prior_lengths=torch.tensor([5]), alpha=0.5,
    )
    assert not sc.passed.any()
    assert torch.equal(sc.advantage, torch.zeros(2))


def test_vpgea_scores_no_cross_view_ablation():
    sc = alg.vpgea_scores(
        u_post=torch.tensor([-9.0, -8.0, 0.0]), u_prior=torch.tensor([-1.0]),
        post_lengths=torch.tensor([5, 10, 5]), prior_lengths=torch.tensor([5]), alpha=0.0,
        cross_view=False, post_correct=torch.tensor([True, False, False]),
    )
    torch.testing.assert_close(sc.reward, torch.tensor([1.0, 0.0, 0.0]))
    assert int(sc.advantage.argmax()) == 0
    with pytest.raises(ValueError, match="post_correct"):
        alg.vpgea_scores(u_post=torch.zeros(1), u_prior=torch.zeros(1), post_lengths=torch.ones(1),
                         prior_lengths=torch.ones(1), alpha=0.5, cross_view=False)


def test_length_penalty_reward():
    r = alg.length_penalty_reward(torch.tensor([True, True, False, False]), torch.tensor([10, 30, 10, 30]))
    # lam = 0.5 - (L - 10) / 20 -> [0.5, -0.5, 0.5, -0.5]; wrong answers never gain from being short.
    torch.testing.assert_close(r, torch.tensor([1.5, 0.5, 0.0, -0.5]))
    same = alg.length_penalty_reward(torch.tensor([True, False]), torch.tensor([7, 7]))
    torch.testing.assert_close(same, torch.tensor([1.0, 0.0]))
    adv = alg.group_advantages(alg.length_penalty_reward(torch.tensor([True] * 3), torch.tensor([5, 5, 5])))
    assert torch.equal(adv, torch.zeros(3))


# --- the efficient-reasoning baselines ------------------------------------------------------------------------------

from vpgea.algorithm import (  # noqa: E402
    ibpo_select,
    l1_exact_reward,
    l1_max_reward,
    length_schedule,
    limit_at,
    shortest_correct,
    thinkprune_reward,
)

T = torch.tensor


def test_thinkprune_reward_hand_worked():
    # correct within the limit: 1; correct but over (a sampler with a larger limit): 0; wrong: 0; a truncated
    # response (cut at the limit, so no answer) is graded incorrect upstream: 0.
    correct = T([True, True, False, False, True])
    lengths = T([10, 41, 12, 40, 40])
    assert thinkprune_reward(correct, lengths, 40).tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert thinkprune_reward(T([False] * 3), T([1, 2, 3]), 40).tolist() == [0.0] * 3  # none correct
    assert thinkprune_reward(T([True] * 2), T([5, 5]), 40).tolist() == [1.0, 1.0]  # all correct, tied lengths


def test_length_schedule_parsing_and_lookup():
    stages = length_schedule("200:3072,0:4096,400:2048")
    assert stages == [(0, 4096), (200, 3072), (400, 2048)]
    assert [limit_at(stages, s) for s in (0, 199, 200, 399, 400, 10_000)] == [4096, 4096, 3072, 3072, 2048, 2048]
    for bad, msg in (("5:100", "start at step 0"), ("0:100,x", "not step:limit"), ("0:0", "limit >= 1"),
                     ("0:10,0:20", "appears twice")):
        with pytest.raises(ValueError, match=msg):
            length_schedule(bad)


def test_l1_rewards_hand_worked():
    correct = T([True, True, False, True])
    lengths = T([1000, 3000, 1000, 1000])
    # L1-Exact: 1[correct] - a |N - L| with N = 2000, a = 3e-4
    assert l1_exact_reward(correct, lengths, 2000).tolist() == pytest.approx([0.7, 0.7, -0.3, 0.7])
    # L1-Max: 1[correct] * clip(a (N - L) + 0.5, 0, 1): under budget 0.8, over it 0.2, wrong 0
    assert l1_max_reward(correct, lengths, 2000).tolist() == pytest.approx([0.8, 0.2, 0.0, 0.8])
    assert l1_max_reward(T([True]), T([0]), 5000).tolist() == [1.0]  # clipped at 1
    assert l1_max_reward(T([True]), T([9000]), 1000).tolist() == [0.0]  # clipped at 0
    assert l1_exact_reward(T([False, False]), T([5, 5]), 5).tolist() == [0.0, 0.0]  # none correct, exact length


def test_shortest_correct_hand_worked():
    assert shortest_correct(T([False, True, True, True]), T([1, 9, 4, 4])) == 2  # a tie goes to the first
    assert shortest_correct(T([False, False]), T([1, 2])) is None
    assert shortest_correct(T([True, True]), T([7, 3])) == 1


def _ibpo_objective(x, correct, extended, question, budget):
    xs = [i for i in range(len(x)) if x[i]]
    if any(not correct[i] for i in xs):
        return None
    if sum(1 for i in xs if extended[i]) > budget * len(xs) + 1e-9:
        return None
    return (len({question[i] for i in xs}), len(xs))


def test_ibpo_select_is_optimal_against_brute_force():
    import itertools
    import random

    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(1, 8)
        correct = [rng.random() < 0.6 for _ in range(n)]
        extended = [rng.random() < 0.5 for _ in range(n)]
        question = [rng.randint(0, 3) for _ in range(n)]
        budget = rng.choice([0.0, 0.1, 0.25, 0.5, 0.75, 1.0])
        best = max(o for bits in itertools.product([0, 1], repeat=n)
                   if (o := _ibpo_objective(bits, correct, extended, question, budget)) is not None)
        x = ibpo_select(T(correct), T(extended), T(question), budget)
        got = _ibpo_objective(x.tolist(), correct, extended, question, budget)
        assert got == best, (trial, correct, extended, question, budget, x.tolist())
    with pytest.raises(ValueError, match="budget"):
        ibpo_select(T([True]), T([False]), T([0]), 1.5)
