"""Swap vpgea's ``FusedLinearGRPOLoss`` into TRL's GRPO loss path, in place of Liger's.

TRL's ``GRPOTrainer`` (with ``use_liger_kernel=True``; ``use_liger_loss=True`` in older releases) builds
``self.liger_grpo_loss = LigerFusedLinearGRPOLoss(beta=..., epsilon_low=..., epsilon_high=..., temperature=...,
use_ref_model=..., loss_type=..., max_completion_length=...)`` and calls it from ``compute_liger_loss`` as
``loss, metrics = self.liger_grpo_loss(_input=last_hidden_state, lin_weight=lm_head.weight,
selected_token_ids=completion_ids, attention_mask=completion_mask, advantages=..., bias=lm_head.bias,
ref_per_token_logps=..., old_per_token_logps=...)``, reading ``metrics[0]`` as the KL (when beta != 0) and
``metrics[-1]`` as the clip ratio. ``vpgea.nn.FusedLinearGRPOLoss`` takes the same arguments and returns the same
values, so either of these works:

    # a) before the trainer is built: TRL instantiates ours (liger-kernel need not be installed)
    patch_trl()  # from this file
    trainer = GRPOTrainer(..., args=GRPOConfig(..., use_liger_kernel=True))

    # b) after: replace the module, keeping its settings
    trainer.liger_grpo_loss = swap_module(trainer.liger_grpo_loss)

Run ``python examples/trl_grpo_swap.py`` for a self-contained check (no TRL needed): a tiny Llama built in code, the
call exactly as TRL makes it, and the same loss from materialised logits.
"""

from __future__ import annotations

import torch

from vpgea.nn import FusedLinearGRPOLoss

# Liger's constructor arguments that FusedLinearGRPOLoss shares (copied from an existing module by swap_module).
_SHARED_ATTRS = ("beta", "compiled", "use_ref_model", "chunk_size", "epsilon_low", "epsilon_high", "loss_type",
                 "max_completion_length", "importance_sampling_level", "temperature", "delta",
                 "use_bias_correction_kl")


def swap_module(liger_module: torch.nn.Module, **overrides) -> FusedLinearGRPOLoss:
    """A ``FusedLinearGRPOLoss`` with the settings of an existing ``LigerFusedLinearGRPOLoss``."""
    kwargs = {k: getattr(liger_module, k) for k in _SHARED_ATTRS if hasattr(liger_module, k)}
    kwargs.update(overrides)
    return FusedLinearGRPOLoss(**kwargs)


def patch_trl() -> None:
    """Make TRL's GRPO trainer build ``FusedLinearGRPOLoss`` wherever it would build Liger's loss."""
    import trl.trainer.grpo_trainer as grpo_trainer

    grpo_trainer.LigerFusedLinearGRPOLoss = FusedLinearGRPOLoss
    # TRL checks that liger-kernel is importable before building the loss; ours does not need it.
    if hasattr(grpo_trainer, "is_liger_kernel_available"):
        grpo_trainer.is_liger_kernel_available = lambda *a, **k: True


def demo(device: str = "cpu", seed: int = 0) -> dict:
    """TRL's ``compute_liger_loss`` call on a tiny model; returns both losses and the KL / clip-ratio metrics."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vpgea.grpo import grpo_fused_linear_reference

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).to(device)
    batch, prompt_len, completion_len = 4, 5, 9
    prompt_ids = torch.randint(0, 128, (batch, prompt_len), device=device)
    completion_ids = torch.randint(0, 128, (batch, completion_len), device=device)
    completion_mask = torch.ones(batch, completion_len, dtype=torch.long, device=device)
    completion_mask[1, 6:] = 0  # early EOS
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75], device=device)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    # as TRL's _get_last_hidden_state: the hidden state at t predicts token t + 1
    hidden = model.model(input_ids=input_ids).last_hidden_state[:, :-1][:, -completion_len:]
    with torch.no_grad():
        logits = model.lm_head(hidden).float()
        cur = torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None])[..., 0]
    old = cur + 0.1 * torch.randn_like(cur)
    ref = cur + 0.1 * torch.randn_like(cur)

    loss_fn = FusedLinearGRPOLoss(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, temperature=1.0, use_ref_model=True,
                                  loss_type="dapo", max_completion_length=completion_len)
    call = dict(_input=hidden, lin_weight=model.lm_head.weight, selected_token_ids=completion_ids,
                attention_mask=completion_mask, advantages=advantages, bias=model.lm_head.bias,
                ref_per_token_logps=ref, old_per_token_logps=old)
    loss, metrics = loss_fn(**call)
    loss.backward()
    ref_loss, ref_metrics = grpo_fused_linear_reference(**call, beta=0.04, epsilon_low=0.2, epsilon_high=0.28,
                                                        loss_type="dapo", max_completion_length=completion_len)
    return {"loss": loss.item(), "reference_loss": ref_loss.item(), "kl": metrics[0].item(),
            "clip_ratio": metrics[-1].item(), "head_grad_norm": model.lm_head.weight.grad.norm().item()}


if __name__ == "__main__":
    out = demo("cuda" if torch.cuda.is_available() else "cpu")
    for k, v in out.items():
        print(f"{k:>16}: {v:.6g}")
