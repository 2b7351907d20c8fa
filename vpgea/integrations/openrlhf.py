"""An OpenRLHF-style actor's log-probs from hidden states, never materialising ``[B, T, V]`` logits.

OpenRLHF's ``Actor.forward`` runs the whole causal LM, casts its logits to fp32 (a ``[B, T, V]`` fp32 tensor: 9.9 GB
for 16 x 1024 tokens of a 151936-word vocabulary) and takes ``log_softmax(logits / T)`` at the rolled sequence.
``actor_logprobs`` runs only the backbone and scores the action positions with ``vpgea.token_logprobs`` (fused Triton
kernels on CUDA), applying the model's logit scale and final-logit softcapping from its config. The returned values
are what ``Actor.forward(sequences, action_mask, attention_mask)`` returns (``[B, A]`` log-probs times the action
mask), and the entropy of the same positions when asked.

Under DeepSpeed ZeRO-3 the head weight is partitioned outside its own module's forward, and the fused op reads it
directly. ``register_head_for_zero3(actor)`` tells DeepSpeed that the actor module uses the head
(``deepspeed.zero.register_external_parameter``), so ZeRO-3 gathers it for the actor's forward and again for its
backward, where the op's gradient for it is produced; call it once, after ``deepspeed.initialize``. Without it,
``actor_logprobs`` finds an empty (partitioned) head and says so.
"""

from __future__ import annotations

import torch

from vpgea import logprobs as _lp

__all__ = ["actor_logprobs", "head_transform", "register_head_for_zero3"]


def head_transform(config) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` of a Hugging Face config: Gemma-2-style ``final_logit_softcapping``; Cohere's
    ``logit_scale``; Granite / MiniCPM's ``logits_scaling`` (the logits are divided by it); Falcon-H1's
    ``lm_head_multiplier``."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    if scale is None:
        scale = getattr(cfg, "lm_head_multiplier", None)
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        scale = 1.0 / cfg.logits_scaling
    return (1.0 if scale is None else float(scale)), (None if softcap is None else float(softcap))


def _head(model):
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"actor_logprobs: {type(model).__name__} has no output embeddings (LM head)")
    return head


def register_head_for_zero3(actor: torch.nn.Module, model: torch.nn.Module | None = None) -> bool:
    """Under ZeRO-3, register the LM head's parameters as used by ``actor``'s forward (and backward). Returns
    whether it registered anything (False when the head is not a ZeRO-3 parameter, e.g. ZeRO-2 or no DeepSpeed).

    Args:
        actor: the module whose forward calls ``actor_logprobs`` (OpenRLHF's ``Actor``, wrapped by the engine).
        model: the Hugging Face causal LM inside it (default: ``actor.model``).
    """
    model = model if model is not None else actor.model
    head = _head(model)
    params = [p for p in (head.weight, getattr(head, "bias", None)) if p is not None and hasattr(p, "ds_id")]
    if not params:
        return False
    import deepspeed

    for p in params:
        deepspeed.zero.register_external_parameter(actor, p)
    return True


def actor_logprobs(
    model: torch.nn.Module,
    sequences: torch.Tensor,
    action_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the action tokens, as OpenRLHF's ``Actor.forward(sequences, action_mask, attention_mask)``.

    Args:
        model: a Hugging Face causal LM (``get_output_embeddings()`` is its head; ``base_model`` its backbone).
        sequences: ``[B, S]`` int64 prompt + response ids (left-padded prompts, as OpenRLHF's).
        action_mask: ``[B, A]`` 0/1: which of the last ``A`` positions are response tokens.
        attention_mask: ``[B, S]`` 0/1.
        temperature: the sampling temperature (the logits are divided by it).
        return_entropy: also return the entropy of each action position's distribution.
        impl: ``vpgea.token_logprobs``'s implementation.

    Returns:
        ``[B, A]`` float32 log-probs of ``sequences[:, -A:]`` (each predicted from the position before), zero where
        ``action_mask`` is 0; with ``return_entropy``, ``(log_probs, entropy)``. Only the masked-in action positions
        are scored.
    """
    batch, seqlen = sequences.shape
    if attention_mask.shape != sequences.shape:
        raise ValueError(f"actor_logprobs: attention_mask {tuple(attention_mask.shape)} must be sequences' shape "
                         f"{tuple(sequences.shape)}")
    if action_mask.dim() != 2 or action_mask.shape[0] != batch or not 0 < action_mask.shape[1] < seqlen:
        raise ValueError(f"actor_logprobs: action_mask must be [B, A] with B = {batch} and 0 < A < {seqlen}, got "
                         f"{tuple(action_mask.shape)}")
    num_actions = action_mask.shape[1]
    position_ids = attention_mask.long().cumsum(-1) - 1  # OpenRLHF's positions for left padding
    position_ids.masked_fill_(attention_mask == 0, 1)
    hidden = model.base_model(sequences, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    # position t predicts token t + 1: the action tokens sequences[:, -A:] are predicted by positions [-A-1, -1)
    hidden = hidden[:, -num_actions - 1 : -1]  # [B, A, D]
    targets = sequences[:, -num_actions:]
    keep = action_mask.bool()
    head = _head(model)
    weight, bias = head.weight, getattr(head, "bias", None)
    if weight.numel() == 0:
        raise RuntimeError(
            "actor_logprobs: the LM head's weight is empty, i.e. partitioned by DeepSpeed ZeRO-3 outside its module's "
            "forward; call vpgea.integrations.openrlhf.register_head_for_zero3(actor) once after deepspeed.initialize"
        )
    hidden = hidden.to(weight.device)
    if weight.dtype != hidden.dtype and not torch.is_autocast_enabled(hidden.device.type):
        weight = weight.to(hidden.dtype)
    scale, softcap = head_transform(model.config)
    out = _lp.token_logprobs(hidden[keep], weight, targets[keep].to(weight.device), bias=bias,
                             temperature=float(temperature), logit_scale=scale, softcap=softcap,
                             return_entropy=return_entropy, impl=impl)
    lp, ent = out if return_entropy else (out, None)
    # scatter back to [B, A]; masked_scatter keeps the graph even when nothing is masked in
    logp = lp.new_zeros(keep.shape).masked_scatter(keep, lp)
    if not return_entropy:
        return logp
    return logp, ent.new_zeros(keep.shape).masked_scatter(keep, ent)
