"""python -m vpgea.train end to end on tiny settings: metrics, checkpoints, exact resume, modes, bad input."""

from __future__ import annotations

import json
import os
import signal

import pytest

from vpgea import toy, train
from vpgea.config import TrainConfig, parse_args

# Tiny settings: a 20-step warm start not held to an accuracy (cached per test session), 2 questions per step, short
# responses.
TINY = ["--toy-sft-steps", "20", "--toy-min-accuracy", "0", "--questions-per-step", "2", "--group-size", "3",
        "--prior-samples", "2", "--max-new-tokens", "24", "--eval-limit", "8", "--rollout-batch-size", "64",
        "--lr", "1e-4"]
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
    for r in rows:  # issue 14's diagnostics: U means, what is distilled, pass rates by kind (leaks: the toy knows)
        assert r["u_prior"] is not None and r["u_post"] is not None and r["leak_frac"] is not None
        assert r["pass_correct"] is None or 0 <= r["pass_correct"] <= 1
        assert r["gate_frac"] == 0 or r["gated_len"] > 0
    assert sorted(p.name for p in (out / "vpgea").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert not list((out / "vpgea").glob(".tmp-*"))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "vpgea" / "checkpoint-3")  # Hugging Face format
    grpo = _metrics(out / "grpo_lp" / "metrics.jsonl")
    assert len(grpo) == 3 and grpo[0]["posterior_len"] is None


def test_resume_reproduces_losses(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = [*TINY, "--max-steps", "4", "--no-baseline", "--eval-limit", "2", "--save-every", "1", "--keep-last", "4"]
    assert train.main([*common, "--output-dir", str(a)]) == 0
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
    (row,) = _metrics(out / "vpgea" / "metrics.jsonl")
    # Without cross-view validation "pass" is the rule check: every correct path passes, no wrong one; U is not scored.
    assert row["u_post"] is None and row["leak_frac"] is not None
    assert row["pass_correct"] in (None, 1.0) and row["pass_wrong"] in (None, 0.0)
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
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    with pytest.raises(train.Interrupted) as info:
        train.train(cfg, policy, tok, items, tmp_path, engine=engine)
    assert info.value.checkpoint.name == "checkpoint-2"
    assert (info.value.checkpoint / "trainer_state.pt").is_file()
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


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


# --- hard edges: configuration, concurrent runs, resume settings, faults --------------------------------------------


@pytest.mark.parametrize("args,expected", [
    (["--group-size", "0"], "group_size must be >= 1"),
    (["--mode", "bogus"], "invalid choice: 'bogus'"),  # argparse's own check (the flag lists its choices)
    (["--device", "bogus"], "device must be 'auto'"),
    (["--student-template", "{question} {foo}"], "unknown field {foo}"),
    (["--lr", "inf"], "lr must be a finite number"),
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--temperature", "-1"], "temperature must be > 0"),
    (["--eval-temperature", "inf"], "eval_temperature must be a finite number"),
    (["--eval-temperature", "-0.5"], "eval_temperature must be >= 0"),
    (["--answer-tail", "\\boxed{{answer}}"], "does not put the answer into the text"),
    (["--teacher-template", "{question} hint {answer:.0}"], "does not put the answer into the text"),
    (["--answer-tail", "{answer}"], "must contain answer_marker"),
])
def test_config_errors_exit_2_with_a_message(args, expected, capsys):
    if "invalid choice" in expected:  # argparse prints the usage line and "error: ...", exit status 2
        with pytest.raises(SystemExit) as e:
            train.main(args)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "error: argument --mode" in err and expected in err and "Traceback" not in err
        return
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config: ") and expected in err and "Traceback" not in err


def test_greedy_repeated_samples_warn(tmp_path, capsys):
    cfg = parse_args(["--eval-samples", "2", "--eval-temperature", "0"])
    assert any("repeats the same response" in w for w in cfg.warnings())


def test_second_run_on_one_output_dir_is_refused(tmp_path, capsys):
    from vpgea.rundir import RunLock

    with RunLock(tmp_path / "run"):  # a run in progress (this process stands in for it)
        assert train.main([*TINY, "--max-steps", "1", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"pid {os.getpid()}" in err and "is in use by another" in err
    assert not (tmp_path / "run" / "summary.json").exists()


def test_resume_refuses_changes_that_alter_results(tmp_path, capsys):
    out = tmp_path / "r"
    common = [*TINY, "--no-baseline", "--eval-limit", "2", "--save-every", "1", "--keep-last", "3"]
    assert train.main([*common, "--max-steps", "2", "--output-dir", str(out)]) == 0
    ckpt = str(out / "vpgea" / "checkpoint-1")
    capsys.readouterr()
    assert train.main([*common, "--max-steps", "2", "--seed", "1", "--group-size", "4", "--resume", ckpt,
                       "--output-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--seed: 0 in the checkpoint, 1 now" in err and "--group-size: 3 in the checkpoint, 4 now" in err
    assert not list((tmp_path / "x").iterdir())  # refused before anything was written (the lock is gone too)
    # More steps and another logging cadence do not change the steps done: accepted when asked for explicitly.
    more = [*common, "--max-steps", "3", "--log-every", "2", "--resume", ckpt, "--output-dir", str(tmp_path / "y")]
    assert train.main(more) == 2
    assert "--allow-config-change" in capsys.readouterr().err
    assert train.main([*more, "--allow-config-change"]) == 0
    assert [r["step"] for r in _metrics(tmp_path / "y" / "vpgea" / "metrics.jsonl")] == [2, 3]


def test_resume_after_a_partial_metrics_line(tmp_path):
    out = tmp_path / "p"
    common = [*TINY, "--no-baseline", "--eval-limit", "2", "--save-every", "1", "--keep-last", "3", "--max-steps", "3"]
    assert train.main([*common, "--output-dir", str(out)]) == 0
    metrics = out / "vpgea" / "metrics.jsonl"
    full = metrics.read_text()
    metrics.write_text(full[: len(full) - 40])  # a crash in the middle of writing step 3's line ...
    (out / "summary.json").write_text(json.dumps({"before": json.loads((out / "summary.json").read_text())["before"]}))
    assert train.main([*common, "--resume", str(out / "vpgea" / "checkpoint-2"), "--output-dir", str(out)]) == 0
    assert [r["step"] for r in _metrics(metrics)] == [1, 2, 3]


def _small_run(tmp_path):
    from vpgea.engines import make_engine
    from vpgea.policy import PolicyModel

    cfg = parse_args([*TINY, "--max-steps", "5", "--save-every", "1", "--output-dir", str(tmp_path)])
    tok = toy.build_tokenizer()
    policy = PolicyModel.from_model(toy.build_model(toy.ToyTask(hidden_size=16, num_layers=1, num_heads=2), tok))
    items, _ = train.prepare(cfg, tok, toy.make_examples(10, seed=0))
    return cfg, policy, tok, items, make_engine("hf", policy, tok)


def test_second_signal_during_the_shutdown_save_keeps_the_first_code(tmp_path, monkeypatch):
    cfg, policy, tok, items, engine = _small_run(tmp_path)
    real_generate, real_save = engine.generate, train.save_checkpoint
    calls = {"gen": 0}

    def generate(*args, **kw):
        calls["gen"] += 1
        if calls["gen"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_generate(*args, **kw)

    def save(*args, **kw):  # a second signal (SIGINT) arrives while the shutdown checkpoint is being written
        if calls["gen"] >= 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_save(*args, **kw)

    engine.generate = generate
    monkeypatch.setattr(train, "save_checkpoint", save)
    with pytest.raises(train.Interrupted) as info:
        train.train(cfg, policy, tok, items, tmp_path, engine=engine)
    assert info.value.signum == signal.SIGTERM  # the first signal's code, not the second's
    assert info.value.checkpoint.name == "checkpoint-2" and (info.value.checkpoint / "trainer_state.pt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".", "checkpoint"))) == ["checkpoint-2"]


def test_second_signal_outside_a_save_stops_at_once_with_the_first_code(tmp_path):
    cfg, policy, tok, items, engine = _small_run(tmp_path)
    real_generate = engine.generate
    calls = {"gen": 0}

    def generate(*args, **kw):
        calls["gen"] += 1
        if calls["gen"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
        return real_generate(*args, **kw)

    engine.generate = generate
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    with pytest.raises(train.Interrupted) as info:
        train.train(cfg, policy, tok, items, tmp_path, engine=engine)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored after a second signal too
    assert info.value.signum == signal.SIGTERM and info.value.checkpoint is None
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-1"]  # the step-1 save stays
