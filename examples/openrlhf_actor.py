"""OpenRLHF recipe: the actor's log-probs from hidden states with ``vpgea.token_logprobs`` (no ``[B, T, V]`` logits).

OpenRLHF's ``Actor.forward`` computes full fp32 logits and log-softmaxes them. To use vpgea instead, override the
log-prob branch (``openrlhf.models.actor.Actor``; the non-packed path) with ``actor_logprobs``, and under ZeRO-3
register the head with the actor module once after ``deepspeed.initialize``:

    from openrlhf.models.actor import Actor
    from vpgea.integrations.openrlhf import actor_logprobs, register_head_for_zero3

    class FusedActor(Actor):
        def forward(self, sequences, action_mask=None, attention_mask=None, return_output=False,
                    return_entropy=False, **kwargs):
            if action_mask is None or return_output or self.packing_samples:
                return super().forward(sequences, action_mask, attention_mask, return_output=return_output,
                                       return_entropy=return_entropy, **kwargs)
            return actor_logprobs(self.model, sequences, action_mask, attention_mask,
                                  temperature=self.temperature)

    actor = FusedActor(pretrain, ...)                 # where the strategy builds Actor
    engine, *_ = deepspeed.initialize(model=actor, ...)
    register_head_for_zero3(actor)                    # ZeRO-3 only; a no-op otherwise

Why the registration: the fused op reads ``lm_head.weight`` directly instead of calling the ``lm_head`` module, so
ZeRO-3's per-module hooks never gather it; ``deepspeed.zero.register_external_parameter`` makes the actor's own
forward (and backward) gather it, which is also when the op's weight gradient is produced.

``python examples/openrlhf_actor.py`` runs this actor on a tiny model built in code (CPU or GPU, no OpenRLHF or
DeepSpeed needed) and compares it with OpenRLHF's materialised-logits computation.
"""

from __future__ import annotations

import torch

from vpgea.integrations.openrlhf import actor_logprobs


class FusedLogprobActor(torch.nn.Module):
    """The part of OpenRLHF's ``Actor`` this recipe replaces, standing alone: ``forward(sequences, action_mask,
    attention_mask)`` returns ``[B, A]`` action log-probs (times the mask), computed from hidden states."""

    def __init__(self, model: torch.nn.Module, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.temperature = temperature

    def forward(self, sequences, action_mask, attention_mask, return_entropy: bool = False):
        return actor_logprobs(self.model, sequences, action_mask, attention_mask, temperature=self.temperature,
                              return_entropy=return_entropy)


def openrlhf_reference(model, sequences, action_mask, attention_mask, temperature=1.0):
    """OpenRLHF's own computation (``Actor.forward``, non-packed): fp32 logits of the whole sequence, log-softmax at
    the rolled sequence, the last ``A`` positions times the action mask."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    logits = model(sequences, attention_mask=attention_mask, position_ids=position_ids).logits.float()
    rolled = torch.roll(sequences, shifts=-1, dims=1)
    log_probs = torch.log_softmax(logits / temperature, -1).gather(-1, rolled[..., None])[..., 0][:, :-1]
    return log_probs[:, -action_mask.shape[1]:] * action_mask.float()


def demo(device: str = "cpu", seed: int = 0) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(device)
    batch, prompt, actions = 3, 6, 9
    sequences = torch.randint(0, 211, (batch, prompt + actions), device=device)
    attention_mask = torch.ones_like(sequences)
    attention_mask[0, :2] = 0  # a left-padded prompt
    action_mask = torch.ones(batch, actions, dtype=torch.long, device=device)
    action_mask[1, 5:] = 0  # a response that ended early
    actor = FusedLogprobActor(model, temperature=0.8)
    lp = actor(sequences, action_mask, attention_mask)
    (-(lp.sum())).backward()
    head_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    ref = openrlhf_reference(model, sequences, action_mask, attention_mask, temperature=0.8)
    (-(ref.sum())).backward()
    return {"max_abs_diff": (lp - ref).abs().max().item(),
            "head_grad_diff": (head_grad - model.lm_head.weight.grad).abs().max().item(),
            "head_grad_norm": head_grad.norm().item()}


if __name__ == "__main__":
    for k, v in demo("cuda" if torch.cuda.is_available() else "cpu").items():
        print(f"{k:>16}: {v:.3g}")
