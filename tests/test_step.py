"""The training step's stages (vpgea.step, vpgea.methods): the refactor keeps the toy's per-step losses, the two loss
routes give the same update, and packing across questions changes nothing but the number of forwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vpgea import train

GOLDEN = Path(__file__).parent / "golden" / "toy_steps.json"  # tests/golden/record_toy_steps.py


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VPGEA_CACHE", str(tmp_path_factory.getbasetemp() / "vpgea-cache"))


def _metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_per_step_losses_match_the_committed_golden_file(tmp_path):
    """Losses, rewards, lengths and gradient norms of 4 toy steps of each method against a committed file (torchtitan's
    habit), so a refactor that changes the numbers shows. Rollouts must be identical (lengths exactly equal); losses
    may differ by fp32 rounding only. (The step's redesign into stages over packed data was checked against a file
    recorded before it, with the old whole-tail U and grpo-lp's token mean: 7e-6 relative at most.)"""
    gold = json.loads(GOLDEN.read_text())
    for mode, sub in (("vpgea", "vpgea"), ("grpo-lp", "grpo_lp")):
        out = tmp_path / mode
        assert train.main([*gold["args"], "--mode", mode, "--output-dir", str(out)]) == 0
        rows = _metrics(out / sub / "metrics.jsonl")
        assert [r["step"] for r in rows] == [g["step"] for g in gold["steps"][mode]]
        for r, g in zip(rows, gold["steps"][mode]):
            assert r["prior_len"] == g["prior_len"] and r["posterior_len"] == g["posterior_len"], (mode, r["step"])
            for k in ("loss", "reward_mean", "grad_norm", "kl", "gate_frac"):
                # kl is a difference of two ~-30-nat log-likelihoods: a few fp32 ulps of those (2e-6 each) absolute
                atol = 1e-5 if k == "kl" else 1e-6
                if g[k] is None:
                    assert r[k] is None, (mode, k)
                else:
                    assert r[k] == pytest.approx(g[k], rel=5e-5, abs=atol), (mode, r["step"], k, r[k], g[k])


TINY = ["--toy-sft-steps", "20", "--toy-min-accuracy", "0", "--questions-per-step", "2", "--group-size", "3",
        "--prior-samples", "2", "--max-new-tokens", "24", "--eval-limit", "2", "--rollout-batch-size", "64", "--lr", "1e-4", "--no-baseline"]


def _final_params(out: Path, mode_dir: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    ckpt = sorted((out / mode_dir).glob("checkpoint-*"))[-1]
    return dict(AutoModelForCausalLM.from_pretrained(ckpt).named_parameters())


@pytest.mark.parametrize("mode,sub", [("vpgea", "vpgea")])
def test_sweep_and_two_pass_routes_give_the_same_update(tmp_path, mode, sub):
    """One step through each loss route from the same weights and rollouts: the same loss and gradient norm to fp32
    rounding, and parameters equal to within a few fp32 ulps of AdamW's step (lr 1e-4). (Over several steps the
    tiny differences are amplified where a group's utilities are nearly equal, since advantages are z-scores.)"""
    runs = {}
    for route in ("sweep", "two-pass"):
        out = tmp_path / route
        assert train.main([*TINY, "--mode", mode, "--max-steps", "1", "--loss-route", route,
                           "--output-dir", str(out)]) == 0
        runs[route] = (_metrics(out / sub / "metrics.jsonl"), _final_params(out, sub))
    (m_a, p_a), (m_b, p_b) = runs["sweep"], runs["two-pass"]
    for a, b in zip(m_a, m_b):
        assert a["prior_len"] == b["prior_len"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    for name, value in p_a.items():
        torch.testing.assert_close(value, p_b[name], rtol=0, atol=1e-6, msg=name)


def test_packing_across_questions_changes_only_the_number_of_forwards(tmp_path, monkeypatch):
    """One step of 3 questions at two token budgets: every group in one forward (U from that forward), and groups
    split over several micro-batches (U then comes from a no-grad pre-pass). The losses, rewards and gradient norms
    agree; the number of training forwards is what changes."""
    from vpgea import step as step_mod

    calls = []
    real_update = step_mod._TrainHead.__call__

    def counting(self, hidden, weight, bias):
        calls.append(int(hidden.shape[0]))
        return real_update(self, hidden, weight, bias)

    monkeypatch.setattr(step_mod._TrainHead, "__call__", counting)
    args = ["--toy-sft-steps", "20", "--toy-min-accuracy", "0", "--questions-per-step", "3", "--group-size", "3",
            "--prior-samples", "2", "--max-new-tokens", "24", "--eval-limit", "2", "--rollout-batch-size", "64", "--lr", "1e-4",
            "--no-baseline", "--max-steps", "1"]
    results = {}
    for budget in (4096, 60):
        calls.clear()
        out = tmp_path / str(budget)
        assert train.main([*args, "--max-tokens-per-micro-batch", str(budget), "--output-dir", str(out)]) == 0
        results[budget] = (_metrics(out / "vpgea" / "metrics.jsonl")[0], list(calls))
    (big, f_big), (small, f_small) = results[4096], results[60]
    assert len(f_big) == 1  # all 3 questions x 6 sequences in one forward
    assert len(f_small) > 3 * 2  # more than one forward per question: every group split
    assert sum(f_big) == sum(f_small)  # the same tokens, packed differently
    for r in (small,):
        for k in ("loss", "reward_mean", "grad_norm", "kl", "gate_frac", "cross_view_pass", "u_post"):
            assert r[k] == pytest.approx(big[k], rel=1e-5, abs=1e-5), k


MODE_KEYS = ("loss", "reward_mean", "prior_len", "acc_prior", "tokens_per_s", "grad_norm")


@pytest.mark.parametrize("mode", ["thinkprune", "l1-exact", "l1-max", "rft-shortest", "ibpo", "no-cross-view",
                                  "beta-0", "alpha-0"])
def test_two_steps_of_each_mode(tmp_path, mode):
    from vpgea.config import MODES

    assert mode in MODES
    out = tmp_path / mode
    assert train.main([*TINY, "--mode", mode, "--max-steps", "2", "--length-schedule", "0:24,1:16",
                       "--l1-range", "8", "20", "--output-dir", str(out)]) == 0
    rows = _metrics(out / mode.replace("-", "_") / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for k in MODE_KEYS:
            assert r[k] is not None and r[k] == r[k], (mode, k, r[k])
    if mode == "thinkprune":
        assert [r["length_limit"] for r in rows] == [24, 16]
        assert all(r["prior_len"] <= r["length_limit"] for r in rows)  # sampled under the stage's limit
    if mode.startswith("l1"):
        assert all(8 <= r["l1_target"] <= 20 for r in rows)
    if mode in ("rft-shortest", "ibpo"):
        assert all(0 <= r["reinforced_frac"] <= 1 for r in rows)
    if mode == "no-cross-view":
        assert all(r["u_post"] is None for r in rows)  # no U without cross-view validation
    else:
        assert (rows[0]["gate_frac"] is None) == (mode not in ("beta-0", "alpha-0"))


def test_u_span_scores_the_answer_given_the_marker():
    """--u-tokens answer: U sums the reference answer's tokens only; the marker before it is conditioned on and the
    closing brace and stop token are not scored. Checked on a character-level tokenizer (the answer spans several
    tokens) and against log-probs computed by hand from the policy."""
    import dataclasses

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from vpgea.config import parse_args
    from vpgea.methods import Seq
    from vpgea.policy import PolicyModel
    from vpgea.prompts import answer_tail
    from vpgea.step import StepContext, answer_logprob_sums

    chars = sorted(set("\\boxed{}0123456789 abc"))
    vocab = {"<eos>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")
    cfg = parse_args(["--answer-tail", "\\boxed{{{answer}}}"])
    tail, span = answer_tail(cfg, tok, "42")
    assert tok.convert_ids_to_tokens(tail) == list("\\boxed{42}") + ["<eos>"]
    assert span == (7, 9)
    whole, whole_span = answer_tail(dataclasses.replace(cfg, u_tokens="tail"), tok, "42")
    assert whole == tail and whole_span == (0, len(tail))

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    policy = PolicyModel.from_model(model, attn_impl="sdpa")
    prompt, path = tok("abc")["input_ids"], tok("1 2")["input_ids"]
    ctx = StepContext(dataclasses.replace(cfg, max_tokens_per_micro_batch=64), policy, tok, None,
                      __import__("vpgea.distributed", fromlist=["DistInfo"]).DistInfo(), None,
                      __import__("contextlib").nullcontext)
    got = answer_logprob_sums(ctx, [Seq(prompt, path, tail, span), Seq(prompt, path, tail, None)])
    ids = torch.tensor([prompt + path + tail])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    first = len(prompt) + len(path) - 1  # the position predicting the tail's first token
    torch.testing.assert_close(got[0].double(), logp[first + 7 : first + 9].sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1].double(), logp[first : first + len(tail)].sum(), rtol=1e-5, atol=1e-5)


def test_modes_compare_on_a_real_model(tiny_model_dir, tmp_path):
    """--modes on a real model directory: each mode from the same start into its own folder, each evaluated, one
    summary.json entry per mode beside "before"."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a} +{b}", "answer": f"#### {(a + b) % 10}"}) + "\n"
                            for a in range(3) for b in range(1, 3)))
    out = tmp_path / "out"
    assert train.main(["--model", str(tiny_model_dir), "--train-data", str(data), "--eval-data", str(data),
                       "--eval-limit", "2", "--output-dir", str(out), "--max-steps", "1", "--questions-per-step", "2",
                       "--group-size", "2", "--prior-samples", "1", "--max-new-tokens", "6", "--instruction", "",
                       "--student-template", "{question}", "--teacher-template", "{question} hint {answer}",
                       "--answer-tail", "\\boxed{{ {answer} }}", "--modes", "vpgea,rft-shortest"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"before", "vpgea", "rft_shortest"} <= set(summary)
    for key in ("vpgea", "rft_shortest"):
        assert {"acc", "avg_tokens", "eps3"} <= set(summary[key])
        assert len(_metrics(out / key / "metrics.jsonl")) == 1


def test_vpgea_stats_by_kind_of_path_and_easy_questions():
    """VPGEA.finish's diagnostics on a hand-built question: pass rates of right, wrong and leaked posterior paths, and
    the pass rate of right paths when every prior path is right (the threshold mean U_prior is then near 0)."""
    from types import SimpleNamespace

    from vpgea.config import TrainConfig
    from vpgea.methods import VPGEA, Group, Sample

    cfg = TrainConfig(group_size=4, prior_samples=2)
    method = VPGEA(cfg)
    item = SimpleNamespace(tail=[7, 8])

    def group(prior_ok, post):
        g = Group(index=0, item=item)
        g.samples["prior"] = [Sample([1, 2, 3], [1, 2], ok) for ok in prior_ok]
        g.samples["post"] = [Sample([1] * (n + 1), [1] * n, ok, leak) for n, ok, leak, _ in post]
        g.u_prior = torch.tensor([-1e-3 if ok else -10.0 for ok in prior_ok])
        g.u_post = torch.tensor([u for *_, u in post])
        return g

    # (path length, own answer right, leak, U). Prior all right: threshold mean U_prior = -1e-3.
    easy = group([True, True], [(4, True, False, -1e-4), (5, True, False, -2e-3), (3, True, True, -5.0),
                                (6, False, False, -9.0)])
    w = method.weights(easy, None, 1.0)
    st = method.finish(easy, w, torch.zeros(8), torch.zeros(8)).record()
    assert st["pass_correct"] == pytest.approx(1 / 3) and st["pass_wrong"] == 0.0 and st["pass_leak"] == 0.0
    assert st["leak_frac"] == 0.25 and st["easy_frac"] == 1.0 and st["pass_correct_easy"] == pytest.approx(1 / 3)
    # One prior path wrong: threshold (-1e-3 - 10) / 2, every right path passes; not an easy question.
    hard = group([True, False], [(4, True, False, -1e-4), (5, True, False, -2e-3), (3, True, True, -5.0),
                                 (6, False, False, -9.0)])
    st = method.finish(hard, method.weights(hard, None, 1.0), torch.zeros(8), torch.zeros(8)).record()
    assert st["pass_correct"] == 1.0 and st["pass_leak"] == 1.0 and st["pass_wrong"] == 0.0
    assert st["easy_frac"] == 0.0 and st["pass_correct_easy"] is None
