"""GRPO-family policy loss (clipped importance-weighted surrogate + k3 KL), on packed tokens and on padded batches.

Semantics follow ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`` (v0.8.5) and TRL's ``GRPOTrainer`` for the
loss types ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``, ``sapo``, ``luspo``, ``vespo`` (this is our own
implementation of that documented math). Per token t of sequence i, with ``logp`` the current policy's log-prob,
``old`` the behaviour policy's (``logp.detach()`` when not given), ``ref`` the reference model's (``logp.detach()``
when not given) and ``A`` the advantage (``A_i`` per sequence, or ``A_t`` per token):

    w_t    = exp(logp_t - old_t)                                   importance_sampling_level="token"
           = exp(mean_{s in i}(logp_s - old_s))                    importance_sampling_level="sequence" (GSPO)
    l_t    = -min(w_t A, clip(w_t, 1 - eps_low, 1 + eps_high) A)   grpo, bnpo, dr_grpo, dapo, luspo (w_t clamped to
                                                                     <= delta first if delta)
           = -sg[min(w_t, eps_high)] A logp_t                      cispo (eps_high is the ratio cap itself, e.g. 5)
           = -(4 / tau) sigmoid(tau (w_t - 1)) A                   sapo, tau = sapo_temperature_pos if A > 0, else _neg
           = -sg[phi_i] A logp_t                                   vespo, phi_i = e^lam w_i^k e^(-lam w_i) with
                                                                     (k, lam) = vespo_k/lambda_pos if A_i >= 0, else
                                                                     _neg, and log w_i = clamp(sum_{s in i}
                                                                     clamp(logp_s - old_s, +-20) + sum log is_ratio,
                                                                     [log 1e-8, 20])
    l_t   *= is_ratio_t                                            (vLLM importance-sampling correction, optional;
                                                                     vespo folds it into phi instead)
    l_t   += beta * kl_t,  kl_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1    (k3; times w_t with
                                                                     use_bias_correction_kl)

and the batch loss, with n_i unmasked tokens in sequence i, B sequences and N = sum n_i:

- ``grpo``, ``sapo``:         ``(1/B) sum_i (1/max(n_i, 1)) sum_t l_t``
- ``bnpo``:                   ``sum l / max(N, 1)``
- ``dr_grpo``:                ``sum l / (B * max_completion_length)``
- ``dapo``, ``cispo``, ``vespo``: ``sum l / max(N_global / world, 1)`` (N_global all-reduced when torch.distributed is
  initialised, or ``num_items_in_batch / world`` when given)
- ``luspo``:                  ``(1/B) sum_i sum_t l_t`` (each sequence's mean loss weighted by its length, TRL's
  form). Liger computes ``sum_{i,t} l_t n_i / (B T)`` over the padded ``[B, T]`` grid, padding included: the two
  agree when nothing is padded, and at ``importance_sampling_level="sequence"`` with ``beta = 0`` and no per-token
  correction (the recommended LUSPO setup, where Liger's grid is ``[B, 1]``).

``cispo``, ``sapo`` and ``vespo`` take ``importance_sampling_level="token"`` only (as Liger); ``vespo`` needs one
advantage per sequence.

Metrics (no gradient), in Liger's order: ``kl`` = ``sum kl / max(N, 1)`` (only when ``beta != 0``), then
``clip_ratio`` = fraction of unmasked tokens whose ratio was clipped on the side that matters
(``w < 1 - eps_low`` with ``A < 0``, or ``w > 1 + eps_high`` with ``A > 0``; for ``cispo`` ``w > eps_high`` with
``A > 0``; always 0 for ``sapo`` and ``vespo``, which do not clip).

``grpo_loss`` works on packed tokens (``[N]`` log-probs, ``cu_seqlens``); ``grpo_loss_reference`` on padded
``[B, T]`` tensors with a mask, the straightforward form used as the test oracle; ``grpo_fused_linear_reference``
materialises the ``[B, T, V]`` logits (the eager baseline of the benchmarks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "LOSS_TYPES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "LossOptions",
    "vespo_log_is_ratio",
    "k3_kl",
    "grpo_loss",
    "grpo_loss_packed",
    "grpo_loss_reference",
    "grpo_fused_linear_reference",
]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
_TOKEN_LEVEL_ONLY = ("cispo", "sapo", "vespo")
# vespo's log-weight bounds (TRL's and Liger's): per-token log-ratios are clipped to +-20, the sequence's log-weight
# to [log 1e-8, 20], so exp() neither overflows nor gives phi = e^lam * 0^k from a weight of exactly 0.
_VESPO_TOKEN_CLAMP = 20.0
_VESPO_LOG_W_MIN = math.log(1e-8)


@dataclass(frozen=True)
class LossOptions:
    """The loss-type-specific parameters (Liger's names and defaults)."""

    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0


def k3_kl(ref_logps: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || ref) per token (http://joschu.net/blog/kl-approx.html): ``e^d - d - 1``,
    ``d = ref - logp``. Non-negative, zero when equal."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1.0


def check_grpo_options(loss_type: str, importance_sampling_level: str, max_completion_length, delta=None,
                       options: LossOptions | None = None) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got {importance_sampling_level!r}"
        )
    if importance_sampling_level == "sequence" and loss_type in _TOKEN_LEVEL_ONLY:
        raise ValueError(
            f"importance_sampling_level='sequence' is not supported for loss_type={loss_type!r} (as in Liger); use "
            f"'token'"
        )
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("max_completion_length must be provided for loss_type 'dr_grpo'")
    if delta is not None and not delta > 0:
        raise ValueError(f"delta must be positive, got {delta}")
    opts = options or LossOptions()
    for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
        if not getattr(opts, name) > 0:
            raise ValueError(f"{name} must be positive, got {getattr(opts, name)}")


def vespo_log_is_ratio(is_ratio: torch.Tensor) -> torch.Tensor:
    """``[B]`` per-sequence ``sum log(is_ratio)`` for vespo's weight, each log clamped to ``[log 1e-8, 20]``, summed
    over every column given (``[B, T]``, ``[B, 1]`` or ``[B]``), padding included: Liger's and TRL's form."""
    r = is_ratio.float() if is_ratio.dtype != torch.float64 else is_ratio
    logs = torch.clamp(torch.log(r), _VESPO_LOG_W_MIN, _VESPO_TOKEN_CLAMP)
    return logs.reshape(logs.shape[0], -1).sum(-1)


def _vespo_phi(log_w: torch.Tensor, adv: torch.Tensor, o: LossOptions) -> torch.Tensor:
    """``phi(w) = e^lam w^k e^{-lam w}`` (``phi(1) = 1``) from a clamped log-weight, in log space; no gradient."""
    log_w = torch.clamp(log_w, _VESPO_LOG_W_MIN, _VESPO_TOKEN_CLAMP)
    nonneg = adv >= 0
    k = torch.where(nonneg, o.vespo_k_pos, o.vespo_k_neg)
    lam = torch.where(nonneg, o.vespo_lambda_pos, o.vespo_lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _policy_term(loss_type, logps, log_w, adv, epsilon_low, epsilon_high, delta, o: LossOptions, vespo_phi=None):
    """``(per-token policy loss, clipped mask)`` for the loss types' rows of the module docstring. Shapes broadcast
    (``[N]`` packed, or ``[B, T]`` / ``[B, 1]`` padded)."""
    coef_1 = torch.exp(log_w)
    if loss_type == "cispo":
        capped = torch.clamp(coef_1, max=epsilon_high).detach()
        return -capped * adv * logps, (coef_1 > epsilon_high) & (adv > 0)
    if loss_type == "sapo":
        tau = torch.where(adv > 0, o.sapo_temperature_pos, o.sapo_temperature_neg)
        return -(torch.sigmoid(tau * (coef_1 - 1.0)) * 4.0 / tau) * adv, torch.zeros_like(coef_1, dtype=torch.bool)
    if loss_type == "vespo":
        return -vespo_phi.detach() * adv * logps, torch.zeros_like(coef_1, dtype=torch.bool)
    coef_2, low, high = _clip(coef_1, epsilon_low, epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    return -torch.min(coef_1 * adv, coef_2 * adv), (low & (adv < 0)) | (high & (adv > 0))


def _dapo_normalizer(num_tokens: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Per-process DAPO normaliser: global unmasked tokens / world size (clamped to >= 1)."""
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if num_items_in_batch is not None:
        total = torch.as_tensor(num_items_in_batch, device=num_tokens.device, dtype=torch.float32)
    else:
        total = num_tokens.float().clone()
        if world > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return torch.clamp(total / world, min=1.0)


def _up(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64, so gradcheck can run in double precision)."""
    return t if t.dtype == torch.float64 else t.float()


def _clip(coef: torch.Tensor, epsilon_low: float, epsilon_high: float):
    lo, hi = 1.0 - epsilon_low, 1.0 + epsilon_high
    return torch.clamp(coef, lo, hi), coef < lo, coef > hi


# --------------------------------------------------------------------------------------------------------------------
# packed tokens


def _segment_sum(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[B]`` per-sequence sums of ``x: [N]`` by a float64 prefix sum: deterministic on CUDA (``index_add`` uses
    atomics, so its float sums vary from run to run), and differentiable."""
    prefix = torch.cat([x.new_zeros(1, dtype=torch.float64), x.double().cumsum(0)])
    cu = cu_seqlens.long()
    return (prefix[cu[1:]] - prefix[cu[:-1]]).to(x.dtype)


def grpo_loss_packed(
    logps: torch.Tensor,
    advantages: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    importance_sampling_level: str = "token",
    delta: float | None = None,
    use_bias_correction_kl: bool = False,
    is_ratio: torch.Tensor | None = None,
    num_items_in_batch=None,
    options: LossOptions | None = None,
    token_advantages: bool = False,
    vespo_seq_log_is: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """GRPO-family loss on packed tokens; returns ``(loss, kl or None, clip_ratio)`` (see the module docstring).

    Args:
        logps: ``[N]`` float, current log-probs of the N unmasked tokens (differentiable).
        advantages: ``[B]`` float, one per sequence, or ``[N]`` one per token with ``token_advantages=True``
            (constant).
        cu_seqlens: ``[B+1]`` int32/int64 sequence boundaries over the N tokens (empty sequences allowed; they count
            in B).
        old_logps / ref_logps: ``[N]`` or None. is_ratio: ``[N]`` per-token correction factor or None.
        options: the sapo / vespo parameters (``LossOptions()`` when None).
        vespo_seq_log_is: ``[B]`` ``sum log is_ratio`` per sequence for vespo (``vespo_log_is_ratio``), or None.
    """
    opts = options or LossOptions()
    check_grpo_options(loss_type, importance_sampling_level, max_completion_length, delta, opts)
    num_tokens = logps.numel()
    num_seqs = cu_seqlens.numel() - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # [B]
    seg = torch.repeat_interleave(torch.arange(num_seqs, device=logps.device), lengths, output_size=num_tokens)
    logps = _up(logps)
    old = _up(old_logps) if old_logps is not None else logps.detach()
    ref = _up(ref_logps) if ref_logps is not None else logps.detach()
    adv = _up(advantages.detach()) if token_advantages else _up(advantages.detach())[seg]  # [N]
    n_f = lengths.to(logps.dtype).clamp(min=1.0)

    log_ratio = logps - old
    if importance_sampling_level == "token":
        log_w = log_ratio
    else:
        log_w = (_segment_sum(log_ratio, cu_seqlens) / n_f)[seg]  # sequence mean, broadcast back to tokens
    phi = None
    if loss_type == "vespo":
        if token_advantages:
            raise ValueError("loss_type 'vespo' weights whole sequences by the sign of their advantage: pass one "
                             "advantage per sequence ([B]), not per token")
        with torch.no_grad():
            seq_log_w = _segment_sum(torch.clamp(log_ratio.detach(), -_VESPO_TOKEN_CLAMP, _VESPO_TOKEN_CLAMP),
                                     cu_seqlens)
            if vespo_seq_log_is is not None:
                seq_log_w = seq_log_w + _up(vespo_seq_log_is)
            phi = _vespo_phi(seq_log_w, _up(advantages.detach()), opts)[seg]
    per_token, clipped = _policy_term(loss_type, logps, log_w, adv, epsilon_low, epsilon_high, delta, opts, phi)
    if is_ratio is not None and loss_type != "vespo":
        per_token = per_token * _up(is_ratio)
    kl = None
    if beta != 0.0:
        kl = k3_kl(ref, logps)
        if use_bias_correction_kl:
            kl = kl * torch.exp(log_w)
        per_token = per_token + beta * kl

    if loss_type in ("grpo", "sapo"):
        loss = (per_token / n_f[seg]).sum() / max(num_seqs, 1)  # the sum of sequence means, without atomics
    elif loss_type == "bnpo":
        loss = per_token.sum() / max(num_tokens, 1)
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (num_seqs * max_completion_length)
    elif loss_type == "luspo":
        loss = per_token.sum() / max(num_seqs, 1)
    else:  # dapo, cispo, vespo
        loss = per_token.sum() / _dapo_normalizer(torch.tensor(float(num_tokens), device=logps.device),
                                                  num_items_in_batch)

    with torch.no_grad():
        denom = max(num_tokens, 1)
        kl_metric = kl.sum() / denom if kl is not None else None
        clip_ratio = clipped.float().sum() / denom
    return loss, kl_metric, clip_ratio


def grpo_loss(
    logps: torch.Tensor,
    advantages: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    importance_sampling_level: str = "token",
    options: LossOptions | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO clipped surrogate on packed completion tokens (the grpo-lp baseline's loss).

    Args:
        logps: ``[N]`` float32 current log-probs of the completion tokens of B sequences, packed.
        advantages: ``[B]``. cu_seqlens: ``[B+1]`` int32 over the N tokens.
        old_logps: ``[N]`` behaviour-policy log-probs (None: on-policy, ratio 1 with the gradient of ``logps``).
        ref_logps: ``[N]`` reference log-probs for the k3 KL term (used when ``beta != 0``).
        loss_type, importance_sampling_level, epsilon_low/high, max_completion_length, options (sapo / vespo
            parameters): see the module docstring.

    Returns:
        ``(loss, metrics)``: metrics ``{"clip_ratio"}`` plus ``"kl"`` when ``beta != 0``; detached 0-d tensors.
    """
    if logps.dim() != 1 or advantages.dim() != 1 or cu_seqlens.dim() != 1:
        raise ValueError("grpo_loss: logps [N], advantages [B] and cu_seqlens [B+1] must be 1-D")
    if cu_seqlens.numel() != advantages.numel() + 1:
        raise ValueError(
            f"grpo_loss: cu_seqlens must have B + 1 = {advantages.numel() + 1} entries, got {cu_seqlens.numel()}"
        )
    for arg, t in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if t is not None and t.shape != logps.shape:
            raise ValueError(f"grpo_loss: {arg} must match logps shape {tuple(logps.shape)}, got {tuple(t.shape)}")
    if not torch.compiler.is_compiling():
        cu = cu_seqlens.long()
        if int(cu[0]) != 0 or int(cu[-1]) != logps.numel() or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(
                f"grpo_loss: cu_seqlens must start at 0, be non-decreasing and end at N = {logps.numel()}; "
                f"got {cu.tolist() if cu.numel() <= 16 else '[...]'}"
            )
        if not bool(torch.isfinite(advantages).all()):
            raise ValueError("grpo_loss: advantages must be finite")
    loss, kl, clip_ratio = grpo_loss_packed(
        logps, advantages, cu_seqlens, old_logps=old_logps, ref_logps=ref_logps, beta=beta,
        epsilon_low=epsilon_low, epsilon_high=epsilon_high, loss_type=loss_type,
        max_completion_length=max_completion_length, importance_sampling_level=importance_sampling_level,
        options=options,
    )
    metrics = {"clip_ratio": clip_ratio}
    if kl is not None:
        metrics["kl"] = kl
    return loss, metrics


# --------------------------------------------------------------------------------------------------------------------
# padded reference (test oracle)


def grpo_loss_reference(
    per_token_logps: torch.Tensor,
    attention_mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    ref_per_token_logps: torch.Tensor | None = None,
    old_per_token_logps: torch.Tensor | None = None,
    beta: float = 0.04,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    importance_sampling_level: str = "token",
    delta: float | None = None,
    use_bias_correction_kl: bool = False,
    vllm_is_ratio: torch.Tensor | None = None,
    num_items_in_batch=None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The GRPO-family loss on padded ``[B, T]`` tensors, written plainly from the module docstring's formulas.

    Args:
        per_token_logps: ``[B, T]`` float32; attention_mask: ``[B, T]`` 0/1; advantages: ``[B]`` or ``[B, T]``.
        ref_per_token_logps / old_per_token_logps: ``[B, T]`` or None. vllm_is_ratio: ``[B, T]``, ``[B, 1]``,
            ``[B]`` or None.

    Returns:
        ``(loss, metrics)``, metrics ``(kl, clip_ratio)`` when ``beta != 0`` else ``(clip_ratio,)``.
    """
    check_grpo_options(loss_type, importance_sampling_level, max_completion_length, delta,
                       LossOptions(sapo_temperature_pos, sapo_temperature_neg))
    lp = _up(per_token_logps)
    mask = attention_mask.to(lp.dtype)
    ref = _up(ref_per_token_logps) if ref_per_token_logps is not None else lp.detach()
    old = _up(old_per_token_logps) if old_per_token_logps is not None else lp.detach()
    adv = _up(advantages)
    adv = adv[:, None] if adv.dim() == 1 else adv  # [B, 1] or [B, T]
    ratio = None
    if vllm_is_ratio is not None:
        ratio = _up(vllm_is_ratio)
        ratio = ratio[:, None] if ratio.dim() == 1 else ratio
    log_ratio = lp - old
    if importance_sampling_level == "token":
        log_w = log_ratio  # [B, T]
    else:
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]  # [B, 1]
    coef_1 = torch.exp(log_w)
    zeros = torch.zeros_like(coef_1 * adv, dtype=torch.bool)
    if loss_type == "cispo":
        per_token = -torch.clamp(coef_1, max=epsilon_high).detach() * adv * lp
        clipped = (coef_1 > epsilon_high) & (adv > 0)
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token = -torch.sigmoid(tau * (coef_1 - 1.0)) * (4.0 / tau) * adv
        clipped = zeros
    elif loss_type == "vespo":
        if adv.shape[1] != 1:
            raise ValueError("loss_type 'vespo' needs one advantage per sequence ([B])")
        with torch.no_grad():
            seq = (torch.clamp(log_ratio, -_VESPO_TOKEN_CLAMP, _VESPO_TOKEN_CLAMP) * mask).sum(-1, keepdim=True)
            if ratio is not None:
                seq = seq + vespo_log_is_ratio(ratio)[:, None]
            log_w_seq = torch.clamp(seq, _VESPO_LOG_W_MIN, _VESPO_TOKEN_CLAMP)
            pos = adv >= 0
            k = torch.where(pos, vespo_k_pos, vespo_k_neg)
            lam = torch.where(pos, vespo_lambda_pos, vespo_lambda_neg).clamp(min=1e-4)
            phi = (torch.exp(lam) * torch.exp(log_w_seq) ** k * torch.exp(-lam * torch.exp(log_w_seq)))
            phi = phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        per_token = -phi * adv * lp
        clipped = zeros
    else:
        lo, hi = 1.0 - epsilon_low, 1.0 + epsilon_high
        coef_2 = torch.clamp(coef_1, lo, hi)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token = -torch.min(coef_1 * adv, coef_2 * adv)
        clipped = ((torch.exp(log_w) < lo) & (adv < 0)) | ((torch.exp(log_w) > hi) & (adv > 0))
    if ratio is not None and loss_type != "vespo":
        per_token = per_token * ratio
    if beta != 0.0:
        kl = k3_kl(ref, lp)
        if use_bias_correction_kl:
            kl = kl * torch.exp(log_w)
        per_token = per_token + beta * kl
    per_token = per_token.expand_as(mask) if per_token.shape != mask.shape else per_token
    num_b = mask.shape[0]
    total = mask.sum().clamp(min=1.0)
    if loss_type in ("grpo", "sapo"):
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / num_b
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / total
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (num_b * max_completion_length)
    elif loss_type == "luspo":
        loss = (per_token * mask).sum() / num_b
    else:  # dapo, cispo, vespo
        loss = (per_token * mask).sum() / _dapo_normalizer(mask.sum(), num_items_in_batch)
    with torch.no_grad():
        metrics = []
        if beta != 0.0:
            metrics.append((kl * mask).sum() / total)
        metrics.append((clipped.float().expand_as(mask) * mask).sum() / total)
    return loss, tuple(metrics)


def grpo_fused_linear_reference(
    _input: torch.Tensor,
    lin_weight: torch.Tensor,
    selected_token_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    advantages: torch.Tensor,
    bias: torch.Tensor | None = None,
    ref_per_token_logps: torch.Tensor | None = None,
    old_per_token_logps: torch.Tensor | None = None,
    ref_input: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    use_ref_model: bool = True,
    **options,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Eager GRPO loss from hidden states: materialises ``[B, T, V]`` fp32 logits, log-softmax, gather.

    Same arguments as ``FusedLinearGRPOLoss.forward`` (``_input: [B, T, H]``, ``lin_weight: [V, H]``, ids and mask
    ``[B, T]``, advantages ``[B]``) plus the loss options of ``grpo_loss_reference`` as keywords.
    """

    def logps_of(h, w, b):
        logits = (h @ w.t()).float()
        if b is not None:
            logits = logits + b.float()
        logits = logits / temperature
        return torch.log_softmax(logits, dim=-1).gather(-1, selected_token_ids[..., None].long())[..., 0]

    logps = logps_of(_input, lin_weight, bias)
    ref = None
    if use_ref_model and options.get("beta", 0.04) != 0.0:
        if ref_per_token_logps is not None:
            ref = ref_per_token_logps
        elif ref_input is not None:
            with torch.no_grad():
                ref = logps_of(ref_input, ref_weight, ref_bias)
    return grpo_loss_reference(logps, attention_mask, advantages, ref_per_token_logps=ref,
                               old_per_token_logps=old_per_token_logps, **options)
