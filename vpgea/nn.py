"""``nn.Module`` drop-ins.

``FusedLinearGRPOLoss`` takes the constructor arguments, forward arguments and return values of
``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`` (v0.8.5; every loss type: grpo, bnpo, dr_grpo, dapo, cispo,
sapo, luspo, vespo), so TRL or verl code can swap the import. Differences in how, not what:

- only the unmasked tokens are scored: the masked-in rows of ``_input`` are gathered (``[N, H]``) and sent through
  ``vpgea.token_logprobs`` (fused Triton kernels on CUDA), so time and memory scale with N, not ``B * T``, and no
  ``[N, V]`` logits exist;
- ``compiled`` and ``chunk_size`` are accepted and ignored (there is nothing to chunk or compile);
- ``attention_mask`` is read as a 0/1 mask;
- a head in another dtype than ``_input`` (e.g. a bf16 hidden with an fp32 head) is cast to ``_input``'s dtype for the
  product, as Liger does; its gradient comes back in the head's dtype;
- ``[B, T]`` advantages are per-token advantages (Liger's reading with its default ``chunk_size=1``);
- non-finite advantages (at unmasked positions) are an error, not a NaN loss;
- ``luspo`` is normalised over the unmasked tokens only (TRL's form; Liger also sums its padded positions, see
  ``vpgea.grpo``).
"""

from __future__ import annotations

import warnings

import torch

from vpgea.grpo import LossOptions, check_grpo_options, grpo_loss_packed, vespo_log_is_ratio

__all__ = ["FusedLinearGRPOLoss"]


class FusedLinearGRPOLoss(torch.nn.Module):
    """Fused linear head + GRPO loss, Liger-compatible.

    Args (Liger's, in Liger's order):
        beta: weight of the k3 KL penalty against the reference policy.
        compiled, chunk_size: accepted for compatibility, ignored.
        use_ref_model: read reference log-probs from ``ref_per_token_logps`` or compute them from
            ``ref_input``/``ref_weight``/``ref_bias``; when False the KL term is zero.
        epsilon_low, epsilon_high: clip range ``[1 - epsilon_low, 1 + epsilon_high]`` of the importance ratio.
        loss_type: "grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo" or "vespo" (``vpgea.grpo`` has the
            formulas). For "cispo" ``epsilon_high`` is the ratio cap itself (e.g. 5.0) and ``epsilon_low`` is unused.
        max_completion_length: the "dr_grpo" normaliser (required for it).
        importance_sampling_level: "token" or "sequence" (GSPO; not for cispo / sapo / vespo).
        sapo_temperature_pos, sapo_temperature_neg: sapo's gate temperatures for positive / other advantages.
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: vespo's gamma weight shape and rate for
            non-negative / negative advantages.
        temperature: logits are divided by it.
        delta: optional upper clamp of the unclipped ratio (two-sided clipping).
        use_bias_correction_kl: multiply the KL by the importance ratio.
        impl: vpgea addition, passed to ``vpgea.token_logprobs`` ("auto", "triton" or "torch").
    """

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: int | None = None,
        importance_sampling_level: str = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        temperature: float = 1.0,
        delta: float | None = None,
        use_bias_correction_kl: bool = False,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        *,
        impl: str = "auto",
    ):
        super().__init__()
        check_grpo_options(loss_type, importance_sampling_level, max_completion_length, delta,
                           LossOptions(sapo_temperature_pos, sapo_temperature_neg))
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.beta = beta
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.chunk_size = chunk_size
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.loss_type = loss_type
        self.max_completion_length = max_completion_length
        self.importance_sampling_level = importance_sampling_level
        self.sapo_temperature_pos = sapo_temperature_pos
        self.sapo_temperature_neg = sapo_temperature_neg
        self.temperature = temperature
        self.delta = delta
        self.use_bias_correction_kl = use_bias_correction_kl
        self.vespo_k_pos = vespo_k_pos
        self.vespo_lambda_pos = vespo_lambda_pos
        self.vespo_k_neg = vespo_k_neg
        self.vespo_lambda_neg = vespo_lambda_neg
        self.impl = impl

    def forward(
        self,
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
        vllm_is_ratio: torch.Tensor | None = None,
        num_items_in_batch=None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """GRPO loss of a padded batch of completions.

        Args:
            _input: ``[B, T, H]`` last hidden states at the completion positions (position t predicts token t).
            lin_weight: ``[V, H]`` LM head (another float dtype than ``_input`` is cast to it); bias: ``[V]`` or
                None.
            selected_token_ids: ``[B, T]`` int64 completion tokens; attention_mask: ``[B, T]`` 0/1 completion mask.
            advantages: ``[B]`` (one per completion) or ``[B, T]`` (one per token; not for vespo); finite.
            ref_per_token_logps / old_per_token_logps: ``[B, T]`` or None.
            ref_input: ``[B, T, H]`` reference-model hidden states with ref_weight ``[V, H]``, ref_bias ``[V]``
                (used when ``use_ref_model`` and ``ref_per_token_logps`` is None).
            vllm_is_ratio: ``[B, T]``, ``[B, 1]`` or ``[B]`` importance-sampling correction, or None.
            num_items_in_batch: total unmasked tokens of the whole generation batch (dapo normaliser), or None.

        Returns:
            ``(loss, metrics)``: ``loss`` 0-d float32; ``metrics`` a tuple of detached 0-d tensors,
            ``(kl, clip_ratio)`` when ``beta != 0`` else ``(clip_ratio,)``.
        """
        from vpgea.logprobs import token_logprobs

        if _input.dim() != 3:
            raise ValueError(f"FusedLinearGRPOLoss: _input must be [B, T, H], got shape {tuple(_input.shape)}")
        B, T, H = _input.shape
        for name, t in (("selected_token_ids", selected_token_ids), ("attention_mask", attention_mask),
                        ("ref_per_token_logps", ref_per_token_logps), ("old_per_token_logps", old_per_token_logps)):
            if t is not None and t.shape != (B, T):
                raise ValueError(f"FusedLinearGRPOLoss: {name} must be [B, T] = {(B, T)}, got {tuple(t.shape)}")
        if advantages.shape not in ((B,), (B, T)):
            raise ValueError(
                f"FusedLinearGRPOLoss: advantages must be [B] = ({B},) or [B, T] = ({B}, {T}), got "
                f"{tuple(advantages.shape)}"
            )
        token_adv = advantages.dim() == 2
        if token_adv and self.loss_type == "vespo":
            raise ValueError("FusedLinearGRPOLoss: loss_type 'vespo' weights whole completions by the sign of their "
                             "advantage; pass advantages [B], not [B, T]")
        use_ref = self.use_ref_model and self.beta != 0.0
        if self.use_ref_model and ref_per_token_logps is None and ref_input is None:
            raise ValueError("FusedLinearGRPOLoss: use_ref_model=True needs ref_per_token_logps or ref_input")
        if self.use_ref_model and ref_per_token_logps is not None and ref_input is not None:
            warnings.warn("Both ref_per_token_logps and ref_input are provided. Using ref_per_token_logps.")

        # Gather the unmasked tokens: [N] flat indices in row-major order, so each row's tokens stay contiguous.
        mask = attention_mask.reshape(B, T) != 0
        lengths = mask.sum(dim=1)  # [B]
        cu_seqlens = torch.zeros(B + 1, device=_input.device, dtype=torch.int32)
        cu_seqlens[1:] = torch.cumsum(lengths, 0)
        flat = mask.reshape(-1).nonzero().squeeze(1)  # [N]
        adv = advantages.reshape(-1).index_select(0, flat) if token_adv else advantages  # [N] or [B]
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(adv).all()):
            bad = (~torch.isfinite(adv)).nonzero()[0, 0]
            where = f"token {int(flat[bad]) % T} of completion {int(flat[bad]) // T}" if token_adv else \
                f"completion {int(bad)}"
            raise ValueError(f"FusedLinearGRPOLoss: advantages must be finite; found {adv[bad].item()} at {where}")
        hidden = _input.reshape(B * T, H).index_select(0, flat)  # [N, H]
        targets = selected_token_ids.reshape(-1).index_select(0, flat).long()  # [N]
        # A head in another dtype (bf16 hidden, fp32 master head) is cast to the hidden's dtype, as Liger does; the
        # cast is differentiable, so the head's gradient comes back in its own dtype.
        weight = lin_weight if lin_weight.dtype == hidden.dtype else lin_weight.to(hidden.dtype)
        logps = token_logprobs(hidden, weight, targets, bias=bias, temperature=self.temperature,
                               impl=self.impl)  # [N] fp32

        ref_logps = None
        if use_ref:
            if ref_per_token_logps is not None:
                ref_logps = ref_per_token_logps.reshape(-1).index_select(0, flat).float()
            else:
                if ref_weight is None:
                    raise ValueError("FusedLinearGRPOLoss: ref_input needs ref_weight")
                with torch.no_grad():
                    ref_hidden = ref_input.reshape(B * T, H).index_select(0, flat)
                    ref_logps = token_logprobs(ref_hidden, ref_weight.to(ref_hidden.dtype), targets, bias=ref_bias,
                                               temperature=self.temperature, impl=self.impl)
        old_logps = None
        if old_per_token_logps is not None:
            old_logps = old_per_token_logps.reshape(-1).index_select(0, flat).float()
        is_ratio = seq_log_is = None
        if vllm_is_ratio is not None:
            r = vllm_is_ratio
            if r.dim() == 2 and r.shape == (B, T):
                is_ratio = r.reshape(-1).index_select(0, flat)
            elif r.numel() == B and (r.dim() == 1 or r.shape == (B, 1)):
                is_ratio = r.reshape(B).repeat_interleave(lengths, output_size=flat.numel())
            else:
                raise ValueError(
                    f"FusedLinearGRPOLoss: vllm_is_ratio must be ({B}, {T}), ({B}, 1) or ({B},), got {tuple(r.shape)}"
                )
            if self.loss_type == "vespo":  # folded into vespo's sequence weight, over every column given
                seq_log_is = vespo_log_is_ratio(r.reshape(B, -1))

        loss, kl, clip_ratio = grpo_loss_packed(
            logps, adv, cu_seqlens, old_logps=old_logps, ref_logps=ref_logps, beta=self.beta,
            epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, loss_type=self.loss_type,
            max_completion_length=self.max_completion_length,
            importance_sampling_level=self.importance_sampling_level, delta=self.delta,
            use_bias_correction_kl=self.use_bias_correction_kl, is_ratio=is_ratio,
            num_items_in_batch=num_items_in_batch, options=self._options(), token_advantages=token_adv,
            vespo_seq_log_is=seq_log_is,
        )
        metrics = (clip_ratio,) if self.beta == 0.0 else (kl, clip_ratio)
        return loss, metrics

    def _options(self) -> LossOptions:
        return LossOptions(self.sapo_temperature_pos, self.sapo_temperature_neg, self.vespo_k_pos,
                           self.vespo_lambda_pos, self.vespo_k_neg, self.vespo_lambda_neg)
