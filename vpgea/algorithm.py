"""The VPG-EA algorithm as plain tensor functions (no model): path splitting, cross-view validation, efficiency,
utilities and group advantages, plus the grpo-lp baseline's reward. See ../shared/DESIGN.md, "The algorithm".

Everything here works on one question's group at a time: ``U_*`` are summed log-probabilities of the answer tail
under the student view, lengths are generated-token counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "DEFAULT_MARKER",
    "VPGEAScores",
    "cross_view_reward",
    "efficiency",
    "group_advantages",
    "length_penalty_reward",
    "split_at_marker",
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
