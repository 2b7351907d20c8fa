"""One VPG-EA training step, stage by stage: tokens/s of the rollouts, the scoring pass and the training pass.

Model: Qwen2.5-1.5B-shaped (``test_bench_packed.QWEN25_15B``), random weights, fp32 master weights under bf16 autocast
(the single-GPU trainer), gradient checkpointing; a word-level tokenizer over the whole vocabulary built in code. The
step is the trainer's own (``vpgea.step``: ``rollouts`` with the transformers engine, ``score``, ``update``) with the
r1 preset's group sizes (K = 4 prior, G = 8 posterior paths per question); random weights sample random tokens, so
every response runs to ``max_new_tokens`` and the pass sizes are fixed. Both loss routes of the training pass are
timed on the same rollouts: ``sweep`` (head gradient produced while the log-probs are computed, 3 vocabulary GEMMs)
and ``two-pass`` (log-probs, logits recomputed in the backward: 4).

Run ``pytest benchmarks/test_bench_step.py -s`` on a GPU; the table lands in ``benchmarks/results/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import pytest
import torch

from _utils import time_left_s, write_results
from conftest import requires_cuda

QUESTIONS = 4
PROMPT_TOKENS = 128
NEW_TOKENS = 512


def _word_tokenizer(vocab_size: int):
    """A word-level fast tokenizer whose ids are the words ``t0 .. t{V-1}`` (``t0`` is EOS), built in code."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="t0", pad_token="t2", unk_token="t1")


def _items(cfg, tokenizer, vocab_size: int, n: int, seed: int = 0):
    from vpgea.data import Example
    from vpgea.train import Item

    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        prompt = torch.randint(3, vocab_size, (PROMPT_TOKENS,), generator=g).tolist()
        hint = prompt + torch.randint(3, vocab_size, (16,), generator=g).tolist()
        answer = f"t{3 + i}"
        tail = tokenizer(cfg.answer_tail.format(answer=answer), add_special_tokens=False)["input_ids"] + [0]
        items.append(Item(Example(" ".join(f"t{t}" for t in prompt), answer, f"bench:{i}"), prompt, hint, tail,
                          (0, len(tail))))
    return items


def _stage_run(model_factory, tokenizer, items, cfg, route: str, device) -> dict:
    from vpgea.engines import make_engine
    from vpgea.methods import make_method
    from vpgea.policy import PolicyModel
    from vpgea.step import StepContext, rollouts, score, update

    policy = PolicyModel.from_model(model_factory(), attn_impl="auto")
    policy.gradient_checkpointing_enable()
    engine = make_engine("hf", policy, tokenizer, batch_size=cfg.rollout_batch_size,
                         dtype=torch.bfloat16 if device.type == "cuda" else None)
    rcfg = dataclasses.replace(cfg, loss_route=route)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    ctx = StepContext(rcfg, policy, tokenizer, engine, __import__("vpgea.distributed", fromlist=["x"]).DistInfo(
        device=device), make_method(rcfg, tokenizer), amp)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    t = time.perf_counter()
    groups, gen_tokens = rollouts(ctx, items, list(range(len(items))))
    sync()
    times["generate"] = time.perf_counter() - t
    t = time.perf_counter()
    score(ctx, groups)
    sync()
    times["score"] = time.perf_counter() - t
    t = time.perf_counter()
    stats = update(ctx, groups, 1.0 / len(items))
    sync()
    times["train"] = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else None
    score_tokens = sum(len(g.item.student) + len(s.path) + len(g.item.tail) for g in groups for s in g.samples["prior"])
    return dict(route=route, gen_tokens=gen_tokens, gen_tok_s=gen_tokens / times["generate"],
                score_tokens=score_tokens, score_tok_s=score_tokens / times["score"],
                train_tokens=int(stats.train_tokens), train_tok_s=stats.train_tokens / times["train"],
                generate_s=times["generate"], score_s=times["score"], train_s=times["train"],
                peak_extra_gib=peak, loss=stats.loss / max(stats.questions, 1))


@requires_cuda
def test_bench_vpgea_step_stages():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from test_bench_packed import QWEN25_15B
    from vpgea.config import TrainConfig

    device = torch.device("cuda")
    tokenizer = _word_tokenizer(QWEN25_15B["vocab_size"])
    cfg = TrainConfig(prior_samples=4, group_size=8, questions_per_step=QUESTIONS, max_new_tokens=NEW_TOKENS,
                      max_prompt_tokens=256, rollout_batch_size=64, max_tokens_per_micro_batch=16384,
                      answer_tail="t5 {answer} t6", answer_marker="t5", temperature=1.0)
    items = _items(cfg, tokenizer, QWEN25_15B["vocab_size"], QUESTIONS)

    def model_factory():
        torch.manual_seed(0)
        with torch.device("cuda"):
            return Qwen2ForCausalLM(Qwen2Config(**QWEN25_15B))  # fp32 master weights, bf16 autocast

    rows = []
    meta = dict(model="Qwen2.5-1.5B shape, random weights, fp32 weights + bf16 autocast, gradient checkpointing",
                questions=QUESTIONS, K=4, G=8, prompt_tokens=PROMPT_TOKENS, max_new_tokens=NEW_TOKENS,
                engine="hf (transformers, bf16 decoding)")
    for route in ("sweep", "two-pass"):
        if time_left_s() < 60:
            rows.append(dict(route=route, note="not run: device-call deadline"))
            continue
        rows.append(_stage_run(model_factory, tokenizer, items, cfg, route, device))
        torch.cuda.empty_cache()
        write_results("vpgea_step_stages", rows, meta)
    print(write_results("vpgea_step_stages", rows, meta).read_text())
    measured = [r for r in rows if "train_s" in r]
    if not measured:
        pytest.skip("device-call deadline: no row measured")
    if len(measured) == 2:  # the same rollouts and weights: the same loss either way
        assert measured[0]["loss"] == pytest.approx(measured[1]["loss"], rel=1e-3, abs=1e-3)


def test_bench_step_harness_cpu_smoke(tmp_path):
    """The stage harness end to end on a tiny Qwen2 on the CPU."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from vpgea.config import TrainConfig

    vocab = 97
    tokenizer = _word_tokenizer(vocab)
    cfg = TrainConfig(prior_samples=2, group_size=2, questions_per_step=2, max_new_tokens=6, max_prompt_tokens=256,
                      rollout_batch_size=8, max_tokens_per_micro_batch=4096, answer_tail="t5 {answer} t6",
                      answer_marker="t5")
    global PROMPT_TOKENS
    old, PROMPT_TOKENS = PROMPT_TOKENS, 5
    try:
        items = _items(cfg, tokenizer, vocab, 2)
    finally:
        PROMPT_TOKENS = old

    def model_factory():
        torch.manual_seed(0)
        return Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab))

    rows = [_stage_run(model_factory, tokenizer, items, cfg, route, torch.device("cpu")) for route in
            ("sweep", "two-pass")]
    md = write_results("vpgea_step_stages_smoke", rows, dict(note="cpu smoke"), results_dir=tmp_path)
    assert "sweep" in md.read_text()
    # 2 questions x (2 prior + 2 posterior) samples of at most 6 tokens; the same rollouts for both routes
    assert all(0 < r["gen_tokens"] <= 2 * 4 * 6 and r["train_tokens"] > 0 for r in rows)
    assert rows[0]["gen_tokens"] == rows[1]["gen_tokens"]
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-5, abs=1e-6)
