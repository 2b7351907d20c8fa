"""Drop-ins for other RL trainers, each importing its peer only when used.

- ``vpgea.integrations.trl``: ``patch_trl()`` routes the installed TRL's per-token log-probs (TRL >= 1.14) or its
  GRPO loss module (TRL 1.7-1.13) through vpgea.
- ``vpgea.integrations.verl``: ``linear_cross_entropy``, verl's fused-kernel contract, and ``patch_verl()``;
  importing ``vpgea.integrations.verl_patch`` (verl's ``external_lib``) patches.
- ``vpgea.integrations.openrlhf``: ``actor_logprobs``, an OpenRLHF-style actor's log-probs from hidden states, with the
  ZeRO-3 gather of the head.
"""
