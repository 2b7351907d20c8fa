"""vpgea.integrations.openrlhf and examples/openrlhf_actor.py: an OpenRLHF-style actor's log-probs from hidden states.

OpenRLHF (with DeepSpeed, Ray and vLLM) is not in the dev extra; its actor's math is: fp32 logits of the whole
sequence, ``log_softmax(logits / T)`` at the rolled sequence, the last ``A`` positions times the action mask. That is
the reference here, in float64, on tiny models built in code.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from vpgea.integrations import openrlhf as vo

ROOT = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("openrlhf_actor", ROOT / "examples" / "openrlhf_actor.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _model(kind="llama"):
    from transformers import AutoModelForCausalLM, Gemma2Config, GraniteConfig, LlamaConfig

    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    if kind == "gemma2":  # final-logit softcapping, made small so that it bites
        cfg = Gemma2Config(**common, head_dim=8, final_logit_softcapping=0.7)
    elif kind == "granite":  # logits divided by logits_scaling
        cfg = GraniteConfig(**common, logits_scaling=4.0)
    else:
        cfg = LlamaConfig(**common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).float()


def _batch(seed=0, batch=3, prompt=5, actions=8):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, 97, (batch, prompt + actions), generator=g)
    attn = torch.ones_like(seq)
    attn[0, :2] = 0  # left padding
    act = torch.ones(batch, actions, dtype=torch.long)
    act[1, 4:] = 0  # an early end
    return seq, act, attn


def _gold(model, seq, act, attn, temperature):
    """OpenRLHF's math in float64 from the model's own (transformed) logits: log-probs and entropies, [B, A]."""
    pos = attn.long().cumsum(-1) - 1
    pos.masked_fill_(attn == 0, 1)
    with torch.no_grad():
        hidden = model.base_model(seq, attention_mask=attn, position_ids=pos).last_hidden_state
        head = model.get_output_embeddings()
        z = hidden.double() @ head.weight.double().t()
        scale, cap = vo.head_transform(model.config)
        z = z * scale
        if cap is not None:
            z = cap * torch.tanh(z / cap)
    ls = torch.log_softmax(z / temperature, -1)
    rolled = torch.roll(seq, shifts=-1, dims=1)
    lp = ls.gather(-1, rolled[..., None])[..., 0][:, :-1][:, -act.shape[1]:] * act
    ent = -(ls.exp() * ls).sum(-1)[:, :-1][:, -act.shape[1]:] * act
    return lp, ent


@pytest.mark.parametrize("kind", ["llama", "gemma2", "granite"])
def test_actor_logprobs_match_openrlhf_math(kind):
    model = _model(kind)
    seq, act, attn = _batch()
    lp, ent = vo.actor_logprobs(model, seq, act, attn, temperature=0.8, return_entropy=True)
    gold_lp, gold_ent = _gold(model, seq, act, attn, 0.8)
    assert lp.shape == act.shape and lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), gold_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), gold_ent, rtol=1e-5, atol=1e-5)
    assert torch.all(lp[1, 4:] == 0) and torch.all(ent[1, 4:] == 0)
    # and the gold's scale / softcap are the model's own: its forward's logits give the same log-probs
    ref = _example().openrlhf_reference(model, seq, act, attn, temperature=0.8)
    torch.testing.assert_close(ref.double(), gold_lp, rtol=1e-5, atol=1e-5)


def test_example_matches_openrlhf_reference_with_gradients():
    # the example's actor against its OpenRLHF reference (fp32 materialised logits): values and head gradients
    out = _example().demo("cpu")
    assert out["max_abs_diff"] < 2e-6 and out["head_grad_diff"] < 2e-6 * max(1.0, out["head_grad_norm"])
    assert out["head_grad_norm"] > 0


def test_backbone_gradients_match():
    ex = _example()
    model = _model()
    seq, act, attn = _batch(seed=2)
    grads = []
    for fn in (lambda: ex.FusedLogprobActor(model, 1.3)(seq, act, attn),
               lambda: ex.openrlhf_reference(model, seq, act, attn, 1.3)):
        model.zero_grad()
        (fn() * torch.linspace(-1, 1, act.numel()).view_as(act)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 3
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_zero3_registration_and_partitioned_head(monkeypatch):
    model = _model()
    actor = _example().FusedLogprobActor(model)
    assert vo.register_head_for_zero3(actor) is False  # not a ZeRO-3 parameter: nothing to do
    registered = []
    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(register_external_parameter=lambda mod, p: registered.append((mod, p)))
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    model.lm_head.weight.ds_id = 7  # what DeepSpeed's ZeRO-3 puts on the parameters it partitions
    assert vo.register_head_for_zero3(actor) is True
    assert registered == [(actor, model.lm_head.weight)]
    # A partitioned head that nobody gathered: a clear error, not a shape error from deep inside.
    seq, act, attn = _batch()
    model.lm_head.weight.data = torch.empty(0)
    with pytest.raises(RuntimeError, match="partitioned by DeepSpeed ZeRO-3.*register_head_for_zero3"):
        vo.actor_logprobs(model, seq, act, attn)


def test_bad_shapes():
    model = _model()
    seq, act, attn = _batch()
    with pytest.raises(ValueError, match="action_mask must be"):
        vo.actor_logprobs(model, seq, act[:2], attn)
    with pytest.raises(ValueError, match="attention_mask"):
        vo.actor_logprobs(model, seq, act, attn[:, 1:])
