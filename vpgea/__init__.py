"""vpgea: VPG-EA training for efficient LLM reasoning, with fused Triton kernels.

Public API (imported lazily so that ``import vpgea`` stays cheap):

- ``vpgea.token_logprobs``: fused linear -> log-softmax -> gather, never materialising ``[N, V]`` logits.
- ``vpgea.linear_logprob_loss``: a loss linear in the per-token log-probs (fixed coefficients), with the head
  gradient produced in the same sweep (the trainer's training pass).
- ``vpgea.vpgea_loss``: the VPG-EA gated-KL/advantage loss over packed paths.
- ``vpgea.PolicyModel``: a packed-sequence wrapper around any Hugging Face causal LM returning hidden states.
- ``vpgea.nn``: ``nn.Module`` drop-ins (``FusedLinearGRPOLoss``).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "token_logprobs": "vpgea.logprobs",
    "linear_logprob_loss": "vpgea.logprobs",
    "vpgea_loss": "vpgea.losses",
    "vpgea_loss_fused_linear": "vpgea.losses",
    "grpo_loss": "vpgea.losses",
    "PolicyModel": "vpgea.policy",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name == "nn":
        return importlib.import_module("vpgea.nn")
    raise AttributeError(f"module 'vpgea' has no attribute {name!r}")
