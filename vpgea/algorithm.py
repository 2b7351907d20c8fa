"""The VPG-EA algorithm as plain tensor functions (no model): path splitting, cross-view validation, efficiency,
utilities and group advantages, plus the grpo-lp baseline's reward. See ../shared/DESIGN.md, "The algorithm".

Everything here works on one question's group at a time: ``U_*`` are summed log-probabilities of the answer tail
under the student view, lengths are generated-token counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "DEFAULT_MARKER",
    "VPGEAScores",
    "cross_view_reward",
    "efficiency",
    "group_advantages",
    "ibpo_select",
    "l1_exact_reward",
    "l1_max_reward",
    "length_penalty_reward",
    "length_schedule",
    "limit_at",
    "shortest_correct",
    "split_at_marker",
    "thinkprune_reward",
    "vpgea_scores",
]

DEFAULT_MARKER = "\\boxed{"
# Group std below this counts as "all utilities equal": advantages are then exactly zero instead of noise / 1e-6.
_EQUAL_STD = 1e-8


def split_at_marker(token_ids: Sequence[int], decode: Callable[[Sequence[int]], str], marker: str = DEFAULT_MARKER) -> int:
    """Number of leading tokens of a response that form its reasoning path ``z``.

    ``z`` is the response up to its last final-answer ``marker``; the token that holds the marker's first character
    is excluded with everything after it. With no marker (e.g. a response cut at the length limit) the whole
    response is the path; a trailing stop token is not part of it then either, since the answer tail is appended
    after ``z``. ``decode`` maps ids to text; prefixes are decoded O(log n) times (binary search), so multi-token
    markers and tokenizers that merge characters across the marker both work.
    """
    n = len(token_ids)
    if n == 0:
        return 0
    text = decode(list(token_ids))
    pos = text.rfind(marker)
    if pos < 0:
        return n
    lo, hi = 1, n  # smallest i such that decode(ids[:i]) reaches past pos
    while lo < hi:
        mid = (lo + hi) // 2
        if len(decode(list(token_ids[:mid]))) > pos:
            hi = mid
        else:
            lo = mid + 1
    return lo - 1


def cross_view_reward(u_post: torch.Tensor, u_prior: torch.Tensor) -> torch.Tensor:
    """``R(z_i) = max(0, U(z_i) - mean U_prior)``.

    u_post: [G] float, u_prior: [K] float (K >= 1). Returns [G] float32.
    """
    if u_prior.numel() == 0:
        raise ValueError("cross_view_reward: need at least one prior path (prior_samples >= 1)")
    return (u_post.float() - u_prior.float().mean()).clamp(min=0.0)


def efficiency(lengths: torch.Tensor, base_length: float, alpha: float) -> torch.Tensor:
    """``eta(z) = (L_base / L(z))^alpha``; lengths [G] in tokens (clamped to >= 1), alpha 0 gives ones. [G] float32."""
    lengths = lengths.float().clamp(min=1.0)
    base = max(float(base_length), 1.0)
    return (base / lengths) ** alpha


def group_advantages(scores: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Group z-score ``(s - mean) / (std + eps)`` with the population std (so a group of one is defined).

    scores: [G]. All equal (std < 1e-8) gives exact zeros, never NaN. NaN/inf scores are an error. [G] float32.
    """
    scores = scores.float()
    if not torch.isfinite(scores).all():
        raise ValueError(f"group_advantages: scores must be finite, got {scores.tolist()}")
    if scores.numel() == 0:
        return scores
    std = scores.std(unbiased=False)
    if std < _EQUAL_STD:
        return torch.zeros_like(scores)
    return (scores - scores.mean()) / (std + eps)


@dataclass
class VPGEAScores:
    """One question's posterior group after scoring (all [G] float32 unless said otherwise)."""

    reward: torch.Tensor  # R: cross-view reward (or rule-checked correctness in the no-cross-view ablation)
    eta: torch.Tensor  # efficiency
    utility: torch.Tensor  # R * eta
    advantage: torch.Tensor  # group z-score of the utility
    passed: torch.Tensor  # [G] bool: R > 0
    base_length: float  # L_base: mean prior length


def vpgea_scores(
    *,
    u_post: torch.Tensor,
    u_prior: torch.Tensor,
    post_lengths: torch.Tensor,
    prior_lengths: torch.Tensor,
    alpha: float,
    cross_view: bool = True,
    post_correct: torch.Tensor | None = None,
) -> VPGEAScores:
    """Steps 2, 4, 5 and 6 of a VPG-EA step for one question.

    u_post: [G] U of the posterior paths; u_prior: [K] U of the prior paths; post_lengths [G], prior_lengths [K]:
    generated tokens. ``cross_view=False`` is the ablation: R is ``post_correct`` ([G] bool, the path's own answer
    checked against the reference), required then.
    """
    base = float(prior_lengths.float().mean()) if prior_lengths.numel() else float(post_lengths.float().mean())
    if cross_view:
        reward = cross_view_reward(u_post, u_prior)
    else:
        if post_correct is None:
            raise ValueError("vpgea_scores: cross_view=False needs post_correct")
        reward = post_correct.float()
    eta = efficiency(post_lengths, base, alpha)
    utility = reward * eta
    return VPGEAScores(reward, eta, utility, group_advantages(utility), reward > 0, base)


def length_penalty_reward(correct: torch.Tensor, lengths: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """The grpo-lp baseline's reward: correctness plus a group-relative length penalty (Kimi k1.5's form).

    ``lam_i = 0.5 - (L_i - L_min) / (L_max - L_min)`` over the group (0 when all lengths are equal);
    ``r_i = 1[correct] + weight * (lam_i if correct else min(0, lam_i))``: among correct answers shorter is better,
    and a wrong answer is never rewarded for being short. correct [G] bool, lengths [G]. Returns [G] float32.
    """
    c = correct.float()
    lengths = lengths.float()
    span = lengths.max() - lengths.min() if lengths.numel() else torch.tensor(0.0)
    if span <= 0:
        lam = torch.zeros_like(lengths)
    else:
        lam = 0.5 - (lengths - lengths.min()) / span
    return c + weight * torch.where(correct.bool(), lam, lam.clamp(max=0.0))


# ----------------------------------------------------------------------------------------------------------------------
# the efficient-reasoning baselines (each a reward or a selection over one group or batch; no model)


def thinkprune_reward(correct: torch.Tensor, lengths: torch.Tensor, limit: int) -> torch.Tensor:
    """ThinkPrune's length-clipped reward (Hou et al. 2025, "ThinkPrune: Pruning Long Chain-of-Thought of LLMs via
    Reinforcement Learning"): ``r_i = 1`` for a correct answer within the current token limit, else 0.

    Responses are sampled with ``max_new_tokens = limit``, so a response cut at the limit has no answer and is
    incorrect anyway; the length check makes the reward exact also when the sampler's limit is larger.
    correct [G] bool, lengths [G] generated tokens. Returns [G] float32."""
    return (correct.bool() & (lengths <= limit)).float()


def length_schedule(spec: str) -> list[tuple[int, int]]:
    """Parse ThinkPrune's staged limits ``"0:4096,200:3072,400:2048"`` (``step:limit``, from that step on) into sorted
    ``[(step, limit)]``; the first stage must start at step 0. An error names the bad part."""
    stages = []
    for part in spec.split(","):
        try:
            step_s, limit_s = part.split(":")
            stage = (int(step_s), int(limit_s))
        except ValueError:
            raise ValueError(f"length schedule {spec!r}: {part!r} is not step:limit (two integers)") from None
        if stage[0] < 0 or stage[1] < 1:
            raise ValueError(f"length schedule {spec!r}: {part!r} needs step >= 0 and limit >= 1")
        stages.append(stage)
    stages.sort()
    if not stages or stages[0][0] != 0:
        raise ValueError(f"length schedule {spec!r}: the first stage must start at step 0")
    if len({s for s, _ in stages}) != len(stages):
        raise ValueError(f"length schedule {spec!r}: a step appears twice")
    return stages


def limit_at(stages: list[tuple[int, int]], step: int) -> int:
    """The token limit of the stage that ``step`` (0-based) is in."""
    return [limit for start, limit in stages if start <= step][-1]


def l1_exact_reward(correct: torch.Tensor, lengths: torch.Tensor, target: int | torch.Tensor,
                    a: float = 3e-4) -> torch.Tensor:
    """L1-Exact (LCPO; Aggarwal & Welleck 2025, "L1: Controlling How Long A Reasoning Model Thinks With Reinforcement
    Learning"): ``r_i = 1[correct_i] - a |N - L_i|`` for the target length N the prompt asked for (a = 3e-4, the
    published default). [G] float32."""
    return correct.float() - a * (torch.as_tensor(target, dtype=torch.float32) - lengths.float()).abs()


def l1_max_reward(correct: torch.Tensor, lengths: torch.Tensor, target: int | torch.Tensor, a: float = 3e-4,
                  delta: float = 0.5) -> torch.Tensor:
    """L1-Max (same source): ``r_i = 1[correct_i] * clip(a (N - L_i) + delta, 0, 1)``: shorter than the budget N is
    fine, longer is penalised (a = 3e-4, delta = 0.5, the published defaults). [G] float32."""
    n = torch.as_tensor(target, dtype=torch.float32)
    return correct.float() * (a * (n - lengths.float()) + delta).clamp(0.0, 1.0)


def shortest_correct(correct: torch.Tensor, lengths: torch.Tensor) -> int | None:
    """Rejection-sampling fine-tuning's pick for ``rft-shortest``: the index of the shortest correct response (the
    first among equally short ones), or None when no response is correct."""
    idx = [i for i in range(correct.numel()) if bool(correct[i])]
    if not idx:
        return None
    return min(idx, key=lambda i: (int(lengths[i]), i))


def ibpo_select(correct: torch.Tensor, extended: torch.Tensor, question: torch.Tensor, budget: float) -> torch.Tensor:
    """IBPO's per-batch selection (Inference Budget-Constrained Policy Optimization, the IBPO seed), as we read it.

    The seed says: responses fall into a regular-length group and an extended group with a higher inference cost; a
    constraint bounds the density mass of each group; the update is a weighted SFT whose weights come from an integer
    linear program solved at each iteration. It does not give the program. Ours, over one batch of responses
    (``correct``, ``extended`` [N] bool; ``question`` [N] int: which question each answers; ``budget`` q in [0, 1]):

        choose x in {0, 1}^N, x_i <= correct_i, with   sum_i x_i extended_i <= q sum_i x_i
        (the extended group's share of what is reinforced stays within the budget), maximising first the number of
        questions with at least one reinforced response, then the number of reinforced responses.

    Solved exactly: reinforcing a correct regular response never hurts (it adds mass and loosens the constraint), so
    every one is taken; with R of them the constraint admits E = floor(q R / (1 - q)) extended ones (every one when
    q = 1). Each extended pick adds one response, so the second objective is min(E, #correct extended) whichever are
    picked, and coverage is maximised by spending the picks first on questions no regular response covers (one each),
    then on the rest. Ties go to lower indices. Returns x as [N] bool. ``tests/test_algorithm.py`` checks optimality
    against brute force on random small batches."""
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"ibpo_select: budget must be in [0, 1], got {budget}")
    correct, extended = correct.bool(), extended.bool()
    x = correct & ~extended
    cand = [i for i in range(correct.numel()) if bool(correct[i] & extended[i])]
    regular = int(x.sum())
    room = len(cand) if budget >= 1.0 else math.floor(budget * regular / (1.0 - budget) + 1e-9)
    covered = {int(question[i]) for i in range(correct.numel()) if bool(x[i])}
    first, rest = [], []
    for i in cand:  # one pick per uncovered question first (lowest index), then the others in index order
        q = int(question[i])
        if q in covered:
            rest.append(i)
        else:
            covered.add(q)
            first.append(i)
    for i in (first + rest)[:room]:
        x[i] = True
    return x
