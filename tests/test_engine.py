"""The transformers rollout engine: determinism, stopping, lengths, padding invariance, the factory."""

from __future__ import annotations

import pytest
import torch

from vpgea.engines import GenerationOutput, RolloutEngine, make_engine
from vpgea.engines.hf import HFEngine, sample_next

EOS, PAD = 1, 0


class _Tok:
    eos_token_id = EOS
    pad_token_id = PAD


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


PROMPTS = [[5, 6, 7], [9], [3, 4, 5, 6, 7, 8, 9, 10]]


def _greedy_alone(model, prompt, n):
    ids, out = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(ids).logits[0, -1].argmax())
            out.append(t)
            if t == EOS:
                break
            ids = torch.cat([ids, torch.tensor([[t]])], 1)
    return out


def test_protocol_and_factory(model):
    eng = make_engine("hf", model, _Tok())
    assert isinstance(eng, RolloutEngine) and isinstance(eng, HFEngine)
    with pytest.raises(ValueError, match="unknown engine"):
        make_engine("nope", model, _Tok())


def test_vllm_missing_is_a_clear_error(model):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm installed")
    with pytest.raises(RuntimeError, match="vllm"):
        make_engine("vllm", "/nonexistent", _Tok())


def test_seeded_sampling_is_deterministic(model):
    eng = HFEngine(model, _Tok(), batch_size=4)
    prompts = PROMPTS * 3
    a = eng.generate(prompts, max_new_tokens=20, seed=7)
    b = eng.generate(prompts, max_new_tokens=20, seed=7)
    c = eng.generate(prompts, max_new_tokens=20, seed=8)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def test_greedy_matches_unpadded_decoding(model):
    # Left padding and per-row positions: each row decodes exactly as it would alone.
    eng = HFEngine(model, _Tok(), batch_size=8)
    outs = eng.generate(PROMPTS, max_new_tokens=12, temperature=0.0)
    for p, o in zip(PROMPTS, outs):
        assert o.token_ids == _greedy_alone(model, p, 12)


def test_stop_and_length(model):
    eng = HFEngine(model, _Tok(), batch_size=16)
    outs = eng.generate(PROMPTS * 5, max_new_tokens=15, seed=0)
    for o in outs:
        assert isinstance(o, GenerationOutput)
        assert 1 <= len(o.token_ids) <= 15
        if o.finish_reason == "stop":
            assert o.token_ids[-1] == EOS and EOS not in o.token_ids[:-1]
        else:
            assert len(o.token_ids) == 15 and EOS not in o.token_ids
    # Whatever greedy decoding emits first, made a stop token, ends the response right there.
    first_tok = _greedy_alone(model, PROMPTS[0], 1)[0]
    eng2 = HFEngine(model, _Tok(), stop_token_ids=[first_tok])
    first = eng2.generate([PROMPTS[0]], max_new_tokens=5, temperature=0.0)[0]
    assert first.finish_reason == "stop" and first.token_ids == [first_tok]


def test_edge_cases(model):
    eng = HFEngine(model, _Tok())
    assert eng.generate([], max_new_tokens=5) == []
    assert eng.generate([[3]], max_new_tokens=0)[0].token_ids == []
    with pytest.raises(ValueError, match="empty"):
        eng.generate([[3], []], max_new_tokens=3)
    with pytest.raises(ValueError, match="top_p"):
        eng.generate([[3]], max_new_tokens=3, top_p=0.0)
    assert model.training is False  # generate restores the training flag
    model.train()
    eng.generate([[3]], max_new_tokens=2, seed=0)
    assert model.training is True
    model.eval()


def test_sample_next_top_p():
    logits = torch.tensor([[5.0, 4.0, -10.0, -10.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_p=0.5, generator=g)
    assert set(draws.tolist()) == {0}  # the top token alone holds > 0.5 of the mass
    draws = sample_next(logits, temperature=1.0, top_p=0.99, generator=g)
    assert set(draws.tolist()) <= {0, 1} and 1 in draws.tolist()
    assert sample_next(logits[:2], temperature=0.0, top_p=1.0, generator=None).tolist() == [0, 0]


def test_works_through_policy_model(model):
    # PolicyModel switches the attention implementation to the packed one; padded decoding must still work.
    policy_mod = pytest.importorskip("vpgea.policy")
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM(model.config)
    m.load_state_dict(model.state_dict())
    policy = policy_mod.PolicyModel.from_model(m)
    eng = make_engine("hf", policy, _Tok())
    outs = eng.generate(PROMPTS, max_new_tokens=10, temperature=0.0)
    for p, o in zip(PROMPTS, outs):
        assert o.token_ids == _greedy_alone(model, p, 10)


def test_per_prompt_seeds_make_samples_batch_independent(model):
    # A prompt's sample depends on its own seed only: not on the other prompts in the call, their order, or the
    # batch size. This is what lets a question's rollouts be the same on whichever rank (or micro-batch) draws them.
    prompts = PROMPTS * 3
    seeds = [101 + i for i in range(len(prompts))]
    full = HFEngine(model, _Tok(), batch_size=16).generate(prompts, max_new_tokens=16, seed=seeds)
    small = HFEngine(model, _Tok(), batch_size=2)
    rev = small.generate(prompts[::-1], max_new_tokens=16, seed=seeds[::-1])[::-1]
    alone = [small.generate([p], max_new_tokens=16, seed=[s])[0] for p, s in zip(prompts, seeds)]
    assert [o.token_ids for o in full] == [o.token_ids for o in rev] == [o.token_ids for o in alone]
    assert len({tuple(o.token_ids) for o in full[:3]} | {tuple(o.token_ids) for o in full[3:6]}) > 3  # seeds differ
    with pytest.raises(ValueError, match="one seed per prompt"):
        small.generate(prompts, max_new_tokens=4, seed=[1, 2])


def test_row_generators_sample_the_distribution():
    # Inverse-CDF sampling with per-row generators draws from softmax(logits / T) restricted to the top-p set.
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))[None].repeat(4000, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    draws = sample_next(logits, temperature=1.0, top_p=1.0, row_generators=gens)
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03), freq
    draws = sample_next(logits, temperature=1.0, top_p=0.7, row_generators=gens)  # keeps {0, 1}: 0.8 >= 0.7
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert freq[2:].sum() == 0 and abs(freq[0] - 0.625) < 0.03, freq


def test_decode_dtype_replica_and_autocast(model):
    # dtype=bf16 (what the trainer asks for on a GPU; checked here with the CPU's autocast): a replica is stored in
    # bf16 and follows the fp32 module through update_weights; a shared fp32 module decodes under autocast.
    seen = []
    hook = lambda mod, args, out: seen.append(out.dtype)  # noqa: E731

    rep = HFEngine(model, _Tok(), batch_size=4, replica=True, dtype=torch.bfloat16)
    assert rep.model is not model and {p.dtype for p in rep.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the trainer's module is untouched
    src = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    try:
        rep.update_weights(model)
        for n, p in rep.model.named_parameters():
            torch.testing.assert_close(p, (src[n] + 0.01).to(torch.bfloat16))
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(src[n])

    shared = HFEngine(model, _Tok(), batch_size=4, dtype=torch.bfloat16)
    assert shared.model is model
    h = model.lm_head.register_forward_hook(hook)
    try:
        outs = shared.generate(PROMPTS, max_new_tokens=6, temperature=0.0)
        assert seen and set(seen) == {torch.bfloat16}
        seen.clear()
        HFEngine(model, _Tok(), batch_size=4).generate(PROMPTS, max_new_tokens=6, temperature=0.0)
        assert set(seen) == {torch.float32}
    finally:
        h.remove()
    assert all(0 < len(o.token_ids) <= 6 for o in outs)
    with pytest.raises(ValueError, match="dtype must be a floating"):
        HFEngine(model, _Tok(), dtype=torch.int8)


def test_decode_uses_the_cache_api_without_deprecation_warnings(model):
    # transformers 5.25 renamed forward's `past_key_values` to `cache` (the old name warns, and goes in 5.40); 5.17
    # and 4.x take `past_key_values`. The loop passes a DynamicCache under whichever name forward declares.
    import warnings

    from vpgea.engines.hf import _cache_keyword, new_kv_cache

    class New:
        def forward(self, input_ids, cache=None, use_cache=None): ...

    class Old:
        def forward(self, input_ids, past_key_values=None, use_cache=None): ...

    assert _cache_keyword(New.forward) == "cache" and _cache_keyword(Old.forward) == "past_key_values"
    (kw, cache), = new_kv_cache(model).items()
    from transformers import DynamicCache

    assert isinstance(cache, DynamicCache) and kw == _cache_keyword(type(model).forward)
    eng = HFEngine(model, _Tok(), batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        outs = eng.generate(PROMPTS, max_new_tokens=12, temperature=0.0)
    for p, o in zip(PROMPTS, outs):
        assert o.token_ids == _greedy_alone(model, p, 12)
