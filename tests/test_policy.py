"""PolicyModel and the packed attention backends on tiny random Llama / Qwen2 / Qwen3 / Mistral models (CPU, fp32).

Reference: each sequence alone, unpadded, through the stock model with eager attention and full ``[L, V]`` logits.
"""

from __future__ import annotations

import copy
import json
import logging
import random

import pytest
import torch
import torch.nn.functional as F

from vpgea import attention
from vpgea.packing import ROLE_ANSWER, ROLE_COMPLETION, pack_sequences
from vpgea.policy import PolicyModel

VOCAB = 211  # odd on purpose
ATOL = 1e-5  # fp32, packed masked SDPA vs per-sequence eager attention: only summation order differs


def _config(arch: str, **overrides):
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    common.update(overrides)
    if arch == "llama":
        return tf.LlamaForCausalLM, tf.LlamaConfig(**common)
    if arch == "qwen2":  # tied embeddings, qkv bias
        return tf.Qwen2ForCausalLM, tf.Qwen2Config(tie_word_embeddings=True, **common)
    if arch == "qwen3":  # q/k norm, explicit head_dim
        return tf.Qwen3ForCausalLM, tf.Qwen3Config(head_dim=16, **common)
    if arch == "mistral":
        return tf.MistralForCausalLM, tf.MistralConfig(**common)
    raise ValueError(arch)


def _models(arch: str, seed: int = 0, **overrides):
    """(policy, reference): the same random weights; the reference keeps stock eager attention."""
    cls, cfg = _config(arch, **overrides)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    return PolicyModel.from_model(model, attn_impl="sdpa"), ref


def _random_batch(seed: int, n: int, max_len: int = 12, answers: bool = False):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, max_len))] for _ in range(n)]
    completions = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(0, max_len))] for _ in range(n)]
    tails = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 3))] for _ in range(n)] if answers else None
    return prompts, completions, tails


def _reference_logprobs(ref, prompt, completion, tail=(), temperature: float = 1.0) -> torch.Tensor:
    """Log-probs of ``completion ⊕ tail`` tokens, the sequence alone through the stock model's full logits."""
    ids = list(prompt) + list(completion) + list(tail)
    scored = list(completion) + list(tail)
    logits = ref(input_ids=torch.tensor([ids])).logits[0].float() / temperature  # [L, V]
    logp = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : len(ids) - 1]
    return logp.gather(-1, torch.tensor(scored, dtype=torch.long)[:, None])[:, 0]


ARCHS = ["llama", "qwen2", "qwen3", "mistral"]


# --------------------------------------------------------------------------------------------------------------------
# correctness against per-sequence forwards


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_logprobs_match_per_sequence(arch):
    policy, ref = _models(arch)
    # Length-1 sequences (prompt only), one-token completions, and many sequences: T is 1 + ... (odd, no pattern).
    prompts, completions, _ = _random_batch(1, 13)
    prompts += [[7], [8], [9, 10]]
    completions += [[], [11], []]
    batch = pack_sequences(prompts, completions)
    assert batch.num_tokens == 193  # prime: no block or tile size divides T
    with torch.no_grad():
        logps = policy.packed_logprobs(batch, impl="torch")  # [T]
    assert logps.dtype == torch.float32 and logps.shape == (batch.num_tokens,)
    assert torch.all(logps[batch.targets == -100] == 0)
    got = batch.scatter(logps, role=ROLE_COMPLETION)
    with torch.no_grad():
        for i, (p, c) in enumerate(zip(prompts, completions)):
            want = _reference_logprobs(ref, p, c)
            torch.testing.assert_close(got[i], want, atol=ATOL, rtol=0, msg=f"{arch} sequence {i}")
        # Every position, prompt included: the whole hidden state path agrees.
        for i, (p, c) in enumerate(zip(prompts, completions)):
            ids = torch.tensor([p + c])
            want_h = ref.model(input_ids=ids).last_hidden_state[0]
            got_h = policy.forward_hidden(batch)[batch.cu_seqlens[i] : batch.cu_seqlens[i + 1]]
            torch.testing.assert_close(got_h, want_h, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_changing_one_sequence_leaves_others_bit_identical(arch):
    policy, _ = _models(arch)
    prompts, completions, _ = _random_batch(2, 9)
    batch = pack_sequences(prompts, completions)
    k = 4
    prompts2 = copy.deepcopy(prompts)
    completions2 = copy.deepcopy(completions)
    prompts2[k] = [(t * 7 + 3) % VOCAB for t in prompts2[k]]
    completions2[k] = [(t * 5 + 1) % VOCAB for t in completions2[k]]
    batch2 = pack_sequences(prompts2, completions2)
    with torch.no_grad():
        h1, h2 = policy.forward_hidden(batch), policy.forward_hidden(batch2)
        l1, l2 = policy.packed_logprobs(batch, impl="torch"), policy.packed_logprobs(batch2, impl="torch")
    for i, (a, b) in enumerate(zip(batch.scatter(h1), batch2.scatter(h2))):
        if i == k:
            assert not torch.equal(a, b)
        else:
            assert torch.equal(a, b), f"sequence {i} changed when only sequence {k} did"
    for i, (a, b) in enumerate(zip(batch.scatter(l1), batch2.scatter(l2))):
        if i != k:
            assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gradients_match_per_sequence(arch):
    policy, ref = _models(arch)
    prompts, completions, _ = _random_batch(3, 6, max_len=8)
    completions[0] = [5]
    weights = [torch.randn(len(c), generator=torch.Generator().manual_seed(i)) for i, c in enumerate(completions)]

    got = policy.sequence_logprobs(prompts, completions, max_tokens=40, impl="torch")  # several micro-batches
    sum((w * lp).sum() for w, lp in zip(weights, got)).backward()
    want = [_reference_logprobs(ref, p, c) for p, c in zip(prompts, completions)]
    sum((w * lp).sum() for w, lp in zip(weights, want)).backward()

    ref_params = dict(ref.named_parameters())
    checked = 0
    for name, p in policy.model.named_parameters():
        q = ref_params[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=ATOL, rtol=1e-4, msg=name)
            checked += 1
    assert checked >= 10


def test_sequence_logprobs_answers_microbatches_and_temperature():
    policy, ref = _models("qwen3")
    prompts, completions, tails = _random_batch(4, 11, answers=True)
    with torch.no_grad():
        one = policy.sequence_logprobs(prompts, completions, answers=tails, impl="torch")
        many = policy.sequence_logprobs(prompts, completions, answers=tails, max_tokens=30, impl="torch")
        hot = policy.sequence_logprobs(prompts, completions, temperature=1.7, impl="torch")
        for i, (p, c, a) in enumerate(zip(prompts, completions, tails)):
            assert one[i].shape == (len(c) + len(a),) and one[i].dtype == torch.float32
            torch.testing.assert_close(one[i], many[i], atol=ATOL, rtol=0)
            torch.testing.assert_close(one[i], _reference_logprobs(ref, p, c, a), atol=ATOL, rtol=0)
            torch.testing.assert_close(hot[i], _reference_logprobs(ref, p, c, temperature=1.7), atol=ATOL, rtol=0)
    assert policy.sequence_logprobs([], []) == []
    with pytest.raises(ValueError, match="sequence 0 has"):
        policy.sequence_logprobs([[1] * 20], [[2] * 20], max_tokens=30)
    with pytest.raises(ValueError, match="2 prompts, 1 completions"):
        policy.sequence_logprobs([[1], [2]], [[3]])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_attention_runs_in_the_autocast_dtype(monkeypatch, arch):
    # fp32 weights under bf16 autocast (the single-GPU trainer): RoPE returns fp32 q/k while v is bf16. Attention must
    # see one half-precision dtype, or flash/varlen would be refused (checked here on the CPU's autocast).
    policy, _ = _models(arch)
    seen = []
    real = attention.varlen_attention
    monkeypatch.setattr(attention, "varlen_attention",
                        lambda q, k, v, *a, **kw: seen.append((q.dtype, k.dtype, v.dtype)) or real(q, k, v, *a, **kw))
    prompts, completions, _ = _random_batch(7, 5)
    with torch.no_grad():
        want = policy.sequence_logprobs(prompts, completions, impl="torch")
        assert seen and all(d == (torch.float32,) * 3 for d in seen)  # no autocast: fp32 throughout
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = policy.sequence_logprobs(prompts, completions, impl="torch")
    assert seen and all(d == (torch.bfloat16,) * 3 for d in seen), seen
    for g, w in zip(got, want):  # bf16 activations: close to fp32, not equal
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=0.1, rtol=0.05)


def test_answer_roles_are_scored_with_completion():
    policy, _ = _models("llama")
    batch = pack_sequences([[5, 6]], [[7, 8]], answers=[[9]])
    with torch.no_grad():
        lp = policy.packed_logprobs(batch, impl="torch")
        both = policy.sequence_logprobs([[5, 6]], [[7, 8]], answers=[[9]], impl="torch")[0]
    torch.testing.assert_close(both, lp[(batch.roles == ROLE_COMPLETION) | (batch.roles == ROLE_ANSWER)])


def test_sliding_window_matches_stock_mask():
    # Mistral with a window shorter than the sequences: the packed mask must follow transformers' convention.
    policy, ref = _models("mistral", sliding_window=3)
    prompts, completions, _ = _random_batch(5, 5)
    batch = pack_sequences(prompts, completions)
    with torch.no_grad():
        got = batch.scatter(policy.packed_logprobs(batch, impl="torch"), role=ROLE_COMPLETION)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            torch.testing.assert_close(got[i], _reference_logprobs(ref, p, c), atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# model plumbing


def test_head_weight_tied_and_untied():
    qwen2, _ = _models("qwen2")
    assert qwen2.head_weight.data_ptr() == qwen2.model.get_input_embeddings().weight.data_ptr()
    assert qwen2.head_bias is None
    llama, _ = _models("llama")
    assert llama.head_weight.data_ptr() != llama.model.get_input_embeddings().weight.data_ptr()
    assert llama.head_weight.shape == (VOCAB, 32)
    assert llama.device == torch.device("cpu") and llama.config is llama.model.config


def test_never_computes_logits():
    policy, _ = _models("llama")
    calls = []
    policy.model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    batch = pack_sequences([[3, 4, 5]], [[6, 7]])
    with torch.no_grad():
        h = policy.forward_hidden(batch)
        policy.sequence_logprobs([[3, 4, 5]], [[6, 7]], impl="torch")
    assert h.shape == (5, 32) and calls == []


def test_gradient_checkpointing_recomputes_and_matches():
    policy, _ = _models("llama")
    prompts, completions, _ = _random_batch(6, 4)

    def grads():
        policy.model.zero_grad()
        lps = policy.sequence_logprobs(prompts, completions, impl="torch")
        sum(lp.sum() for lp in lps).backward()
        return {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}

    policy.train()
    plain = grads()
    calls = []
    mlp = policy.model.model.layers[0].mlp
    mlp_forward = mlp.forward

    def counting_forward(x):  # an instance attribute, not a hook: transformers' recompute skips module hooks
        calls.append(1)
        return mlp_forward(x)

    mlp.forward = counting_forward
    policy.gradient_checkpointing_enable()
    ckpt = grads()
    assert len(calls) == 2  # forward, then the recomputation in the backward
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5)


def test_stock_forward_and_generation_unchanged_after_wrapping():
    # The HF rollout engine shares the module: padded batches and KV-cached generation must still be exact.
    policy, ref = _models("qwen2")
    ref.set_attn_implementation("sdpa")
    model = policy.model
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = ref(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=ATOL, rtol=0)
        out_a = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        out_b = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(out_a, out_b)


def test_positions_alone_give_the_packed_result():
    # Packing info derived from position_ids (no cu_seq_lens kwargs) must agree with the explicit boundaries.
    policy, _ = _models("llama")
    batch = pack_sequences(*_random_batch(7, 6)[:2])
    with torch.no_grad():
        h = policy.forward_hidden(batch)
        h2 = policy.decoder(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None]).last_hidden_state
    assert torch.equal(h, h2[0])


def test_save_and_load_roundtrip(tmp_path):
    policy, _ = _models("qwen3")
    policy.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "vpgea" not in json.dumps(cfg)
    assert policy.model.config._attn_implementation == "vpgea_sdpa"  # restored after export
    loaded = PolicyModel.from_pretrained(tmp_path / "m", dtype="float32", device="cpu")
    batch = pack_sequences([[3, 4, 5], [6]], [[7], [8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_hidden(batch), policy.forward_hidden(batch), atol=0, rtol=0)
    assert loaded.model.config._attn_implementation == "vpgea_varlen"
    bf16 = PolicyModel.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    with torch.no_grad():
        assert bf16.forward_hidden(batch).dtype == torch.bfloat16


def test_from_pretrained_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PolicyModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        PolicyModel.from_pretrained(tmp_path / "empty")


# --------------------------------------------------------------------------------------------------------------------
# attention backends


def test_backend_choice_and_errors(caplog):
    assert attention.resolve_backend("auto", "cpu", torch.float32) == "sdpa"
    assert attention.available_backends("cpu", torch.bfloat16) == ["sdpa"]
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        attention.resolve_backend("flash_attn", "cpu", torch.bfloat16)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        attention.resolve_backend("torch_varlen", "cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="attn_impl must be"):
        attention.resolve_backend("xformers", "cpu", torch.float32)
    with pytest.raises(ValueError, match="attn_impl must be"):
        PolicyModel.from_model(_config("llama")[0](_config("llama")[1]), attn_impl="flash")
    attention._logged.clear()
    q = torch.randn(5, 4, 8)
    with caplog.at_level(logging.INFO, logger="vpgea.attention"):
        attention.varlen_attention(q, q, q, torch.tensor([0, 2, 5], dtype=torch.int32), 3)
    assert "backend 'sdpa' (requested 'auto')" in caplog.text


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 1), (6, 2)])
def test_sdpa_varlen_matches_per_sequence_attention(heads, kv_heads):
    torch.manual_seed(0)
    lens = [1, 7, 3, 1, 12, 5]
    n, d = sum(lens), 8
    q, k, v = torch.randn(n, heads, d), torch.randn(n, kv_heads, d), torch.randn(n, kv_heads, d)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    out = attention.varlen_attention(q, k, v, cu, max(lens), backend="sdpa", scale=0.3)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs = q[s:e].transpose(0, 1)
        ks = k[s:e].transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        vs = v[s:e].transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        want = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=0.3).transpose(0, 1)
        torch.testing.assert_close(out[s:e], want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("lens, route", [([5, 9, 1, 7, 8, 3, 6, 9], "padded"), ([40, 1, 2, 1], "mask"),
                                         ([4, 0, 6, 3, 5, 2, 6], "padded")])
@pytest.mark.parametrize("window", [None, 3])
def test_sdpa_fallback_routes_match_per_sequence_attention_with_gradients(lens, route, window):
    """The masked-SDPA fallback takes many short sequences as a padded batch (S L^2 scores) and a skewed mix through
    the block mask (N^2); both against per-sequence attention in float64, values and gradients, with GQA, a sliding
    window and an empty sequence."""
    n, heads, kv_heads, d = sum(lens), 4, 2, 8
    assert (len(lens) * max(lens) ** 2 < n * n) == (route == "padded")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(n, h, d, generator=g, dtype=torch.float64, requires_grad=True)
               for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    out = attention._sdpa_varlen(q, k, v, cu, max(lens), scale=0.3, dropout=0.0, sliding_window=window)
    want = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs = q[s:e].transpose(0, 1)
        ks, vs = (x[s:e].transpose(0, 1).repeat_interleave(heads // kv_heads, 0) for x in (k, v))
        i = torch.arange(e - s)
        allowed = i[:, None] >= i[None, :]
        if window is not None:
            allowed &= i[:, None] - i[None, :] < window
        want.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=0.3).transpose(0, 1))
    want = torch.cat(want)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got_grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * w).sum(), (q, k, v))
    for a, b in zip(got_grads, want_grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def _fake_varlen_attn(style):
    """A CPU stand-in for torch.nn.attention.varlen.varlen_attn in the signature of one torch release; it computes
    what that release's arguments ask for, with the masked-SDPA reference."""

    def run(q, k, v, cu, max_len, scale, causal):
        assert causal, "vpgea must ask for causal attention"
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        return attention._sdpa_varlen(q, k, v, cu, max_len, scale=scale, dropout=0.0, sliding_window=None)

    if style == "is_causal":  # the first releases: an is_causal flag, no scale, no GQA
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None):
            assert key.shape[1] == query.shape[1], "this release has no GQA"
            return run(query, key, value, cu_seq_q, max_q, None, is_causal)
    elif style == "window":  # later ones (2.13 here): window_size (-1, 0) is causal; scale and enable_gqa exist
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False):
            assert tuple(window_size) == (-1, 0)
            assert enable_gqa or key.shape[1] == query.shape[1]
            return run(query, key, value, cu_seq_q, max_q, scale, True)
    else:  # no way to ask for causal masking
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k):
            raise AssertionError("must not be called")
    return varlen_attn


@pytest.mark.parametrize("style", ["is_causal", "window", "bidirectional-only"])
def test_torch_varlen_argument_conventions(monkeypatch, style):
    # The torch_varlen backend only runs on CUDA; here each signature it adapts to is checked on the CPU against the
    # masked-SDPA reference (causal, the scale, GQA), and a release it cannot make causal is refused.
    import torch.nn.attention.varlen as varlen_mod

    monkeypatch.setattr(varlen_mod, "varlen_attn", _fake_varlen_attn(style))
    attention._torch_varlen_func.cache_clear()
    try:
        if style == "bidirectional-only":
            assert attention._torch_varlen_func() is None
            return
        torch.manual_seed(0)
        lens = [1, 6, 3]
        q, k, v = torch.randn(10, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
        cu = torch.tensor([0, 1, 7, 10], dtype=torch.int32)
        out = attention._torch_varlen(q, k, v, cu, max(lens), scale=0.3, dropout=0.0, sliding_window=None)
        want = attention._sdpa_varlen(q, k, v, cu, max(lens), scale=0.3, dropout=0.0, sliding_window=None)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    finally:
        attention._torch_varlen_func.cache_clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_cuda_backends_match_sdpa(backend):
    if backend not in attention.available_backends("cuda", torch.bfloat16):
        pytest.skip(f"{backend} not available here")
    torch.manual_seed(0)
    lens = [1, 70, 33, 1, 129, 5]
    n, h, hk, d = sum(lens), 8, 2, 64
    q = torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(n, hk, d, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    gold = attention.varlen_attention(q.float(), k.float(), v.float(), cu, max(lens), backend="sdpa")
    ref_bf16 = attention.varlen_attention(q, k, v, cu, max(lens), backend="sdpa")
    out = attention.varlen_attention(q, k, v, cu, max(lens), backend=backend)
    # flash-attn's rule: no worse than twice PyTorch's own error in the same dtype (plus a tiny floor).
    assert (out.float() - gold).abs().max() <= 2 * (ref_bf16.float() - gold).abs().max() + 1e-3
