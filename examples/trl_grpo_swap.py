"""TRL's GRPO trainer with vpgea computing the per-token log-probs (or, on older TRL, the whole fused GRPO loss).

    from vpgea.integrations.trl import patch_trl
    replaced = patch_trl()          # before the trainer is built; returns what it replaced
    trainer = GRPOTrainer(...)      # TRL >= 1.16: as usual. TRL 1.8-1.15: with GRPOConfig(use_liger_kernel=True)
    trainer.train()

What ``patch_trl`` replaces depends on the installed TRL (``vpgea.integrations.trl`` has the details):

- TRL >= 1.16: the fused LM head every trainer adds (``add_fused_lm_head``) calls ``_ChunkedLogProbFunction``; vpgea
  takes that call (log-probs, entropy, and the extra metrics SFT / DPO / KTO ask for), with the model's temperature,
  logit scale and final-logit softcapping. No flag needed.
- TRL 1.14-1.15: the same call, made by GRPO when ``use_liger_kernel=True`` (otherwise GRPO materialises the logits).
- TRL 1.8-1.13 (``use_liger_kernel=True``): GRPO builds ``vpgea.nn.FusedLinearGRPOLoss`` instead of Liger's loss
  (liger-kernel need not be installed for the loss; transformers may still want it for its layer kernels, which
  ``liger_kernel_config`` can switch off). ``swap_module`` below also swaps an already-built trainer's loss:
  ``trainer.liger_loss = swap_module(trainer.liger_loss)``.

``python examples/trl_grpo_swap.py`` trains a tiny Llama (built in code, CPU, a few seconds) for two GRPO steps with a
KL term against a reference model, and prints how often TRL called vpgea and how far the head moved.
"""

from __future__ import annotations

import tempfile

import torch

from vpgea.nn import FusedLinearGRPOLoss

# Liger's constructor arguments (v0.8.5), all of which FusedLinearGRPOLoss takes; copied from a module by swap_module.
_SHARED_ATTRS = ("beta", "compiled", "use_ref_model", "chunk_size", "epsilon_low", "epsilon_high", "loss_type",
                 "max_completion_length", "importance_sampling_level", "sapo_temperature_pos", "sapo_temperature_neg",
                 "temperature", "delta", "use_bias_correction_kl", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
                 "vespo_lambda_neg")


def swap_module(liger_module: torch.nn.Module, **overrides) -> FusedLinearGRPOLoss:
    """A ``FusedLinearGRPOLoss`` with the settings of an existing ``LigerFusedLinearGRPOLoss`` (or TRL 1.13's copy)."""
    kwargs = {k: getattr(liger_module, k) for k in _SHARED_ATTRS if hasattr(liger_module, k)}
    kwargs.update(overrides)
    return FusedLinearGRPOLoss(**kwargs)


def main(steps: int = 2, seed: int = 0) -> dict:
    """Two GRPO steps of TRL's trainer on a tiny model with vpgea patched in; returns what happened."""
    import trl
    from datasets import Dataset
    from packaging.version import Version
    from transformers import LlamaConfig, LlamaForCausalLM

    import vpgea.logprobs
    from vpgea import toy
    from vpgea.integrations.trl import patch_trl, unpatch_trl

    tok = toy.build_tokenizer()  # a word-level tokenizer built in code: nothing is downloaded
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None)
    torch.manual_seed(seed)
    prompts = Dataset.from_list([{"prompt": f"7 +{i} -3"} for i in range(1, 9)])

    def reward(completions, **kwargs):  # toy reward: prefer answers that box something, and digits
        return [float("\\boxed{" in c) + 0.1 * sum(w.isdigit() for w in c.split()) for c in completions]

    calls = []
    real = vpgea.logprobs.token_logprobs

    def counted(*args, **kwargs):  # count TRL's calls into vpgea's public op
        calls.append(1)
        return real(*args, **kwargs)

    vpgea.logprobs.token_logprobs = counted
    replaced = patch_trl()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            LlamaForCausalLM(cfg).save_pretrained(f"{tmp}/model")  # a path, so TRL can load the reference model too
            tok.save_pretrained(f"{tmp}/model")
            # Before TRL 1.16 the fused path is GRPO's use_liger_kernel one; Liger's layer kernels (which transformers
            # would patch into the model) are switched off: this tiny run may be on a CPU.
            old_trl = Version(trl.__version__) < Version("1.16")
            layers_off = dict(rope=False, rms_norm=False, swiglu=False, cross_entropy=False,
                              fused_linear_cross_entropy=False)
            args = trl.GRPOConfig(output_dir=tmp, per_device_train_batch_size=4, num_generations=2,
                                  max_completion_length=8, max_steps=steps, learning_rate=1e-2, beta=0.04,
                                  report_to=[], use_cpu=not torch.cuda.is_available(), logging_steps=1,
                                  save_strategy="no", bf16=False, disable_tqdm=True, seed=seed,
                                  use_liger_kernel=old_trl, liger_kernel_config=layers_off if old_trl else None)
            trainer = trl.GRPOTrainer(model=f"{tmp}/model", reward_funcs=reward, args=args, train_dataset=prompts,
                                      processing_class=tok)
            head0 = trainer.model.lm_head.weight.detach().clone()
            trainer.train()
            moved = (trainer.model.lm_head.weight.detach() - head0).abs().max().item()
            logs = [r for r in trainer.state.log_history if "loss" in r]
    finally:
        unpatch_trl(replaced)
        vpgea.logprobs.token_logprobs = real
    return {"trl": trl.__version__, "replaced": sorted(replaced), "vpgea_calls": len(calls), "head_moved": moved,
            "losses": [r["loss"] for r in logs], "kl": [r.get("kl") for r in logs]}


if __name__ == "__main__":
    for key, value in main().items():
        print(f"{key:>12}: {value}")
