"""python -m vpgea.train end to end on tiny settings: metrics, checkpoints, exact resume, modes, bad input."""

from __future__ import annotations

import json
import os
import signal

import pytest

from vpgea import toy, train
from vpgea.config import TrainConfig, parse_args

# Tiny settings: a 20-step warm start (cached per test session), 2 questions per step, short responses.
TINY = ["--toy-sft-steps", "20", "--questions-per-step", "2", "--group-size", "3", "--prior-samples", "2",
        "--max-new-tokens", "24", "--eval-limit", "8", "--rollout-batch-size", "64", "--lr", "1e-4"]
KEYS = ("step", "loss", "reward_mean", "prior_len", "posterior_len", "cross_view_pass", "gate_frac", "kl",
        "tokens_per_s", "step_time")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VPGEA_CACHE", str(tmp_path_factory.getbasetemp() / "vpgea-cache"))


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_default_run_tiny(tmp_path):
    out = tmp_path / "run"
    assert train.main([*TINY, "--max-steps", "3", "--save-every", "2", "--keep-last", "2",
                       "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("before", "vpgea", "grpo_lp"):
        assert set(summary[key]) >= {"acc", "avg_tokens", "eps3"}
    rows = _metrics(out / "vpgea" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert set(r) >= set(KEYS)
        assert all(r[k] is None or r[k] == r[k] for k in KEYS)  # no NaN
    assert sorted(p.name for p in (out / "vpgea").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert not list((out / "vpgea").glob(".tmp-*"))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "vpgea" / "checkpoint-3")  # Hugging Face format
    grpo = _metrics(out / "grpo_lp" / "metrics.jsonl")
    assert len(grpo) == 3 and grpo[0]["posterior_len"] is None


def test_resume_reproduces_losses(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = [*TINY, "--max-steps", "4", "--no-baseline", "--eval-limit", "2"]
    assert train.main([*common, "--save-every", "1", "--keep-last", "4", "--output-dir", str(a)]) == 0
    assert train.main([*common, "--resume", str(a / "vpgea" / "checkpoint-2"), "--output-dir", str(b)]) == 0
    full, resumed = _metrics(a / "vpgea" / "metrics.jsonl"), _metrics(b / "vpgea" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [3, 4]
    for r_full, r_res in zip(full[2:], resumed):
        for k in ("loss", "reward_mean", "prior_len", "posterior_len", "grad_norm"):
            assert r_full[k] == r_res[k], (k, r_full[k], r_res[k])


def test_ablations_and_grpo_mode(tmp_path):
    out = tmp_path / "abl"
    assert train.main([*TINY, "--max-steps", "1", "--no-baseline", "--no-cross-view", "--beta", "0", "--alpha", "0",
                       "--eval-limit", "2", "--output-dir", str(out)]) == 0
    assert len(_metrics(out / "vpgea" / "metrics.jsonl")) == 1
    out2 = tmp_path / "grpo"
    assert train.main([*TINY, "--max-steps", "1", "--mode", "grpo-lp", "--eval-limit", "2",
                       "--output-dir", str(out2)]) == 0
    s = json.loads((out2 / "summary.json").read_text())
    assert "grpo_lp" in s and "vpgea" not in s


def test_sigint_saves_checkpoint(tmp_path):
    from vpgea.engines import make_engine
    from vpgea.policy import PolicyModel

    cfg = parse_args([*TINY, "--max-steps", "5", "--output-dir", str(tmp_path)])
    tok = toy.build_tokenizer()
    policy = PolicyModel.from_model(toy.build_model(toy.ToyTask(hidden_size=16, num_layers=1, num_heads=2), tok))
    items, _ = train.prepare(cfg, tok, toy.make_examples(10, seed=0))
    engine = make_engine("hf", policy, tok)
    calls = {"n": 0}
    real_generate = engine.generate

    def generate(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_generate(*args, **kw)

    engine.generate = generate
    with pytest.raises(train.Interrupted) as info:
        train.train(cfg, policy, tok, items, tmp_path, engine=engine)
    assert info.value.checkpoint.name == "checkpoint-2"
    assert (info.value.checkpoint / "trainer_state.pt").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


# --- bad input ---------------------------------------------------------------------------------------------------


def _real(model_dir, data, tmp_path, *extra):
    return ["--model", str(model_dir), "--train-data", str(data), "--output-dir", str(tmp_path / "out"),
            "--max-steps", "1", "--questions-per-step", "2", "--group-size", "2", "--prior-samples", "1",
            "--max-new-tokens", "8", "--instruction", "", "--student-template", "{question}",
            "--teacher-template", "{question} hint {answer}", "--answer-tail", "\\boxed{{ {answer} }}", *extra]


def test_real_run_and_overlong_prompts(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    rows = [{"question": "3 +4", "answer": "3 +4 = 7 #### 7"}, {"question": "5 -2 +1", "answer": "#### 4"},
            {"question": " ".join(["1"] + ["+1"] * 40), "answer": "#### 1"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert train.main(_real(tiny_model_dir, data, tmp_path, "--max-prompt-tokens", "20")) == 0
    assert "skipped 1 of 3" in capsys.readouterr().err
    m = _metrics(tmp_path / "out" / "metrics.jsonl")
    assert m[0]["skipped_prompts"] == 1 and m[0]["loss"] == m[0]["loss"]
    assert (tmp_path / "out" / "checkpoint-1" / "config.json").is_file()


def test_bad_inputs(tiny_model_dir, tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"question": "3 +4", "answer": "#### 7"}) + "\n")
    assert train.main(_real(tmp_path / "nope", good, tmp_path)) == 2
    assert "does not exist" in capsys.readouterr().err
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    assert train.main(_real(no_tok, good, tmp_path)) == 2
    assert "tokenizer" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "3 +4", "answer": "#### 7"}) + "\n{not json\n")
    assert train.main(_real(tiny_model_dir, bad, tmp_path)) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert train.main(_real(tiny_model_dir, empty, tmp_path)) == 2
    assert train.main(_real(tiny_model_dir, good, tmp_path, "--max-prompt-tokens", "2")) == 2
    assert "no training questions" in capsys.readouterr().err
    with pytest.raises(ValueError, match="group_size"):
        TrainConfig(group_size=0)
    with pytest.raises(SystemExit):
        parse_args(["--no-such-flag"])


def test_help_documents_every_flag(capsys):
    import dataclasses

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text
    from vpgea.config import field_docs

    assert set(field_docs()) == {f.name for f in dataclasses.fields(TrainConfig)}
