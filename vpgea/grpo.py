"""GRPO-family policy loss (clipped importance-weighted surrogate + k3 KL), on packed tokens and on padded batches.

Semantics follow ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`` (v0.8) for the loss types
``grpo``, ``bnpo``, ``dr_grpo``, ``dapo`` (this is our own implementation of that documented math). Per token t of
sequence i, with ``logp`` the current policy's log-prob, ``old`` the behaviour policy's (``logp.detach()`` when not
given) and ``ref`` the reference model's (``logp.detach()`` when not given):

    w_t    = exp(logp_t - old_t)                                   importance_sampling_level="token"
           = exp(mean_{s in i}(logp_s - old_s))                    importance_sampling_level="sequence" (GSPO)
    l_t    = -min(w_t A_i, clip(w_t, 1 - eps_low, 1 + eps_high) A_i)    (w_t clamped to <= delta first if delta)
    l_t   *= is_ratio_t                                            (vLLM importance-sampling correction, optional)
    l_t   += beta * kl_t,  kl_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1    (k3; times w_t with
                                                                     use_bias_correction_kl)

and the batch loss, with n_i unmasked tokens in sequence i, B sequences and N = sum n_i:

- ``grpo``:    ``(1/B) sum_i (1/max(n_i, 1)) sum_t l_t``
- ``bnpo``:    ``sum l / max(N, 1)``
- ``dr_grpo``: ``sum l / (B * max_completion_length)``
- ``dapo``:    ``sum l / max(N_global / world, 1)`` (N_global all-reduced when torch.distributed is initialised, or
  ``num_items_in_batch / world`` when given)

Metrics (no gradient), in Liger's order: ``kl`` = ``sum kl / max(N, 1)`` (only when ``beta != 0``), then
``clip_ratio`` = fraction of unmasked tokens whose ratio was clipped on the side that matters
(``w < 1 - eps_low`` with ``A < 0``, or ``w > 1 + eps_high`` with ``A > 0``).

``grpo_loss`` works on packed tokens (``[N]`` log-probs, ``cu_seqlens``); ``grpo_loss_reference`` on padded
``[B, T]`` tensors with a mask, the straightforward form used as the test oracle; ``grpo_fused_linear_reference``
materialises the ``[B, T, V]`` logits (the eager baseline of the benchmarks).
"""

from __future__ import annotations

import torch

__all__ = [
    "LOSS_TYPES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "k3_kl",
    "grpo_loss",
    "grpo_loss_packed",
    "grpo_loss_reference",
    "grpo_fused_linear_reference",
]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def k3_kl(ref_logps: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || ref) per token (http://joschu.net/blog/kl-approx.html): ``e^d - d - 1``,
    ``d = ref - logp``. Non-negative, zero when equal."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1.0


def check_grpo_options(loss_type: str, importance_sampling_level: str, max_completion_length, delta=None) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got {importance_sampling_level!r}"
        )
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("max_completion_length must be provided for loss_type 'dr_grpo'")
    if delta is not None and not delta > 0:
        raise ValueError(f"delta must be positive, got {delta}")


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
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """GRPO loss on packed tokens; returns ``(loss, kl or None, clip_ratio)`` (see the module docstring).

    Args:
        logps: ``[N]`` float, current log-probs of the N unmasked tokens (differentiable).
        advantages: ``[B]`` float, one per sequence (constant).
        cu_seqlens: ``[B+1]`` int32/int64 sequence boundaries over the N tokens (empty sequences allowed; they count
            in B).
        old_logps / ref_logps: ``[N]`` or None. is_ratio: ``[N]`` per-token correction factor or None.
    """
    check_grpo_options(loss_type, importance_sampling_level, max_completion_length, delta)
    num_tokens, num_seqs = logps.numel(), advantages.numel()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # [B]
    seg = torch.repeat_interleave(torch.arange(num_seqs, device=logps.device), lengths, output_size=num_tokens)
    logps = _up(logps)
    old = _up(old_logps) if old_logps is not None else logps.detach()
    ref = _up(ref_logps) if ref_logps is not None else logps.detach()
    adv = _up(advantages.detach())[seg]  # [N]
    n_f = lengths.to(logps.dtype).clamp(min=1.0)

    log_ratio = logps - old
    if importance_sampling_level == "token":
        log_w = log_ratio
    else:
        log_w = (_segment_sum(log_ratio, cu_seqlens) / n_f)[seg]  # sequence mean, broadcast back to tokens
    coef_1 = torch.exp(log_w)
    coef_2, low, high = _clip(coef_1, epsilon_low, epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    if is_ratio is not None:
        per_token = per_token * _up(is_ratio)
    kl = None
    if beta != 0.0:
        kl = k3_kl(ref, logps)
        if use_bias_correction_kl:
            kl = kl * torch.exp(log_w)
        per_token = per_token + beta * kl

    if loss_type == "grpo":
        loss = (per_token / n_f[seg]).sum() / max(num_seqs, 1)  # the sum of sequence means, without atomics
    elif loss_type == "bnpo":
        loss = per_token.sum() / max(num_tokens, 1)
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (num_seqs * max_completion_length)
    else:  # dapo
        loss = per_token.sum() / _dapo_normalizer(torch.tensor(float(num_tokens), device=logps.device),
                                                  num_items_in_batch)

    with torch.no_grad():
        denom = max(num_tokens, 1)
        kl_metric = kl.sum() / denom if kl is not None else None
        clipped = (low & (adv < 0)) | (high & (adv > 0))
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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO clipped surrogate on packed completion tokens (the grpo-lp baseline's loss).

    Args:
        logps: ``[N]`` float32 current log-probs of the completion tokens of B sequences, packed.
        advantages: ``[B]``. cu_seqlens: ``[B+1]`` int32 over the N tokens.
        old_logps: ``[N]`` behaviour-policy log-probs (None: on-policy, ratio 1 with the gradient of ``logps``).
        ref_logps: ``[N]`` reference log-probs for the k3 KL term (used when ``beta != 0``).
        loss_type, importance_sampling_level, epsilon_low/high, max_completion_length: see the module docstring.

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
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The GRPO loss on padded ``[B, T]`` tensors, written plainly from the module docstring's formulas.

    Args:
        per_token_logps: ``[B, T]`` float32; attention_mask: ``[B, T]`` 0/1; advantages: ``[B]``.
        ref_per_token_logps / old_per_token_logps: ``[B, T]`` or None. vllm_is_ratio: ``[B, T]``, ``[B, 1]``,
            ``[B]`` or None.

    Returns:
        ``(loss, metrics)``, metrics ``(kl, clip_ratio)`` when ``beta != 0`` else ``(clip_ratio,)``.
    """
    check_grpo_options(loss_type, importance_sampling_level, max_completion_length, delta)
    lp = _up(per_token_logps)
    mask = attention_mask.to(lp.dtype)
    ref = _up(ref_per_token_logps) if ref_per_token_logps is not None else lp.detach()
    old = _up(old_per_token_logps) if old_per_token_logps is not None else lp.detach()
    adv = _up(advantages)[:, None]  # [B, 1]
    log_ratio = lp - old
    if importance_sampling_level == "token":
        log_w = log_ratio  # [B, T]
    else:
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]  # [B, 1]
    coef_1 = torch.exp(log_w)
    coef_2, low, high = _clip(coef_1, epsilon_low, epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    if vllm_is_ratio is not None:
        ratio = _up(vllm_is_ratio)
        per_token = per_token * (ratio[:, None] if ratio.dim() == 1 else ratio)
    if beta != 0.0:
        kl = k3_kl(ref, lp)
        if use_bias_correction_kl:
            kl = kl * torch.exp(log_w)
        per_token = per_token + beta * kl
    num_b = mask.shape[0]
    total = mask.sum().clamp(min=1.0)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / num_b
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / total
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (num_b * max_completion_length)
    else:
        loss = (per_token * mask).sum() / _dapo_normalizer(mask.sum(), num_items_in_batch)
    with torch.no_grad():
        metrics = []
        if beta != 0.0:
            metrics.append((kl * mask).sum() / total)
        clipped = ((low & (adv < 0)) | (high & (adv > 0))).float().expand_as(mask)
        metrics.append((clipped * mask).sum() / total)
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
