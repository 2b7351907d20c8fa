"""One RL training step (forward + backward) on a long-tailed length mix: packed vs padded.

Model: Qwen2.5-1.5B-shaped (D=1536, 28 layers, 12 query / 2 kv heads, FFN 8960, V=151936, tied embeddings), random
weights, bf16, gradient checkpointing on in both paths (as RL trainers run it).

- packed (one row per available attention backend): ``PolicyModel`` over token-budget micro-batches, last hidden
  states -> ``vpgea.token_logprobs`` (no ``[T, V]`` logits);
- padded HF: micro-batches of ``PAD_BATCH`` sequences in rollout order, right-padded to the longest in each, stock
  ``model(...).logits`` materialised, fp32 ``log_softmax`` + gather.

Both compute the same loss, ``-sum(A_i * log p(completion token)) / completion tokens``, over the same sequences.
Reported: real tokens/s, peak device memory above the weights and gradients, and the ratios to the padded path
(target: >= 2x tokens/s, <= 0.5x peak memory). Run ``pytest benchmarks/test_bench_packed.py -s`` on a GPU; the
table lands in ``benchmarks/results/``.
"""

from __future__ import annotations

import random

import pytest
import torch

from _utils import cuda_time_ms, peak_extra_bytes, time_left_s, write_results
from conftest import requires_cuda

from vpgea import attention
from vpgea.packing import ROLE_COMPLETION, micro_batches, pack_sequences
from vpgea.policy import PolicyModel

QWEN25_15B = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
)
NUM_SEQS = 32
PACK_TOKENS = 8192  # packed micro-batch token budget
PAD_BATCH = 4  # sequences per padded micro-batch


def long_tailed_lengths(n: int, seed: int = 0, max_len: int = 3072) -> list[tuple[int, int]]:
    """(prompt, completion) lengths: prompts 64-256 tokens, completions log-normal (median ~400, long tail)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = rng.randint(64, 256)
        c = min(max_len - p, max(16, int(rng.lognormvariate(6.0, 0.9))))
        out.append((p, c))
    return out


def make_workload(lengths, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (p,), generator=g).tolist() for p, _ in lengths]
    completions = [torch.randint(3, vocab, (c,), generator=g).tolist() for _, c in lengths]
    advantages = torch.randn(len(lengths), generator=g).tolist()
    return prompts, completions, advantages


def packed_step(policy: PolicyModel, prompts, completions, advantages, *, max_tokens: int, impl: str = "auto"):
    """Forward + backward of the loss over packed micro-batches; returns the loss value (a 0-d tensor)."""
    n_tok = sum(len(c) for c in completions)
    total = 0.0
    for idx in micro_batches([len(prompts[i]) + len(completions[i]) for i in range(len(prompts))], max_tokens):
        batch = pack_sequences([prompts[i] for i in idx], [completions[i] for i in idx]).to(policy.device)
        logps = policy.packed_logprobs(batch, impl=impl)  # [T] float32
        adv = torch.tensor([advantages[i] for i in idx], device=logps.device)[batch.seq_idx]  # [T]
        mask = batch.roles == ROLE_COMPLETION
        loss = -(logps * adv * mask).sum() / n_tok
        loss.backward()
        total = total + loss.detach()
    return total


def padded_step(model, prompts, completions, advantages, *, batch_size: int, pad_id: int = 0):
    """The same loss through the stock model: right-padded micro-batches, full ``[B, L, V]`` logits."""
    device = next(model.parameters()).device
    n_tok = sum(len(c) for c in completions)
    total = 0.0
    for s in range(0, len(prompts), batch_size):
        rows = list(range(s, min(s + batch_size, len(prompts))))
        seqs = [prompts[i] + completions[i] for i in rows]
        width = max(len(x) for x in seqs)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        scored = torch.zeros((len(rows), width), dtype=torch.bool)  # position t scores token t + 1
        for r, i in enumerate(rows):
            ids[r, : len(seqs[r])] = torch.tensor(seqs[r])
            attn[r, : len(seqs[r])] = 1
            scored[r, len(prompts[i]) - 1 : len(seqs[r]) - 1] = True
        ids, attn, scored = ids.to(device), attn.to(device), scored.to(device)
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits  # [B, L, V]
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]  # [B, L-1]
        adv = torch.tensor([advantages[i] for i in rows], device=device)[:, None]
        loss = -(logp * adv * scored[:, :-1]).sum() / n_tok
        loss.backward()
        total = total + loss.detach()
    return total


def _tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=97, tie_word_embeddings=True, max_position_embeddings=256,
    )
    return Qwen2ForCausalLM(cfg)


def test_packed_harness_smoke_cpu():
    """The two step functions compute the same loss and gradients (tiny model, CPU): the comparison is fair."""
    import copy

    model = _tiny_qwen2()
    lengths = [(p % 7 + 1, c % 11) for p, c in long_tailed_lengths(9, max_len=64)]
    prompts, completions, adv = make_workload(lengths, 97)
    stock = copy.deepcopy(model)
    policy = PolicyModel.from_model(model, attn_impl="sdpa")
    a = packed_step(policy, prompts, completions, adv, max_tokens=48, impl="torch")
    b = padded_step(stock, prompts, completions, adv, batch_size=3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for (n, p), q in zip(model.named_parameters(), stock.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)


@requires_cuda
@pytest.mark.cuda
def test_bench_packed_vs_padded():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(**QWEN25_15B)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.set_attn_implementation("sdpa")
    model.train()
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the transformers 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)

    lengths = long_tailed_lengths(NUM_SEQS)
    prompts, completions, adv = make_workload(lengths, cfg.vocab_size)
    real_tokens = sum(p + c for p, c in lengths)
    padded_tokens = sum(
        len(lengths[s : s + PAD_BATCH]) * max(p + c for p, c in lengths[s : s + PAD_BATCH])
        for s in range(0, NUM_SEQS, PAD_BATCH)
    )

    def zero():
        for p in model.parameters():
            p.grad = None

    rows = []

    def measure(name, backend, step):
        zero()
        if time_left_s() < 20:
            rows.append({"path": name, "attention": backend, "result": "not run: device-call deadline"})
            return
        try:
            loss = float(step())  # also allocates the gradients, so the peak below is above weights + grads
            ms = cuda_time_ms(step, warmup=1, reps=3)
            peak = peak_extra_bytes(step)
        except torch.OutOfMemoryError:
            zero()
            torch.cuda.empty_cache()
            rows.append({"path": name, "attention": backend, "result": "OOM"})
            return
        except Exception as e:  # one backend failing is a result for the table, not the end of the run
            zero()
            torch.cuda.empty_cache()
            rows.append({"path": name, "attention": backend, "result": f"error: {type(e).__name__}: {str(e)[:80]}"})
            return
        rows.append(
            {
                "path": name,
                "attention": backend,
                "ms/step": ms,
                "tokens/s": real_tokens / (ms * 1e-3),
                "peak GiB": peak / 2**30,
                "loss": loss,
            }
        )
        zero()

    meta = {
        "model": "Qwen2.5-1.5B shape, random weights, bf16, gradient checkpointing",
        "sequences": NUM_SEQS,
        "real tokens": real_tokens,
        "padded tokens": padded_tokens,
        "completion lengths (min/median/max)": (
            f"{min(c for _, c in lengths)}/{sorted(c for _, c in lengths)[NUM_SEQS // 2]}/{max(c for _, c in lengths)}"
        ),
        "packed micro-batch budget": PACK_TOKENS,
        "padded micro-batch": f"{PAD_BATCH} sequences",
        "target": "packed >= 2x tokens/s and <= 0.5x peak memory of padded HF",
        "memory": "peak above the weights and their gradients (allocated before the measured step)",
    }

    def save():  # after every row: a run cut short still leaves its table
        base = rows[0]
        for r in rows:
            if "tokens/s" in r and "tokens/s" in base:
                r["speedup"] = r["tokens/s"] / base["tokens/s"]
                r["mem ratio"] = r["peak GiB"] / base["peak GiB"]
        return write_results("packed_vs_padded", rows, meta)

    measure("padded HF (logits)", "sdpa", lambda: padded_step(model, prompts, completions, adv, batch_size=PAD_BATCH))
    save()
    for backend in attention.available_backends("cuda", torch.bfloat16):

        wrapped = {}

        def step(backend=backend, wrapped=wrapped):  # wrapped on the first (untimed) call, inside measure's try:
            if not wrapped:                          # a backend that fails to wrap is a row, not a crash
                wrapped["policy"] = PolicyModel.from_model(model, attn_impl=backend)
            return packed_step(wrapped["policy"], prompts, completions, adv, max_tokens=PACK_TOKENS)

        measure("packed vpgea", backend, step)
        save()
    path = save()
    print(path.read_text())
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) >= 1
    # Same loss on every path (bf16 forward; the per-token log-probs are fp32).
    assert max(losses) - min(losses) <= 5e-2 * max(1.0, abs(losses[0]))
