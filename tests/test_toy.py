"""The default run's in-code pieces: tokenizer, task, verbose traces, cached warm start."""

from __future__ import annotations

import random
import re

import pytest

from vpgea import toy


def test_tokenizer_roundtrip_and_chat_template():
    tok = toy.build_tokenizer()
    text = "7 +3 = 0 ; check 7 +3 = 0 ok ; \\boxed{ 0 }"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "7 +3"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<user> 7 +3 <assistant>"
    assert tok.eos_token_id is not None and tok.pad_token_id is not None


def test_examples_deterministic_and_splits_disjoint():
    a = toy.make_examples(300, seed=1)
    assert [e.question for e in a] == [e.question for e in toy.make_examples(300, seed=1)]
    ev = toy.make_examples(100, seed=2, split="eval")
    assert not {e.question for e in a} & {e.question for e in ev}
    for e in a[:50]:
        start, *ops = e.question.split()
        v = int(start)
        for op in ops:
            v = (v + int(op)) % 10
        assert e.answer == str(v) and 2 <= len(ops) <= 4
    with pytest.raises(ValueError, match="split"):
        toy.make_examples(1, seed=0, split="test")


def test_verbose_traces():
    task = toy.ToyTask(error_prob=0.0)
    rng = random.Random(0)
    exs = toy.make_examples(400, seed=3, task=task)
    lengths, concise = [], 0
    for e in exs:
        tr = toy.verbose_trace(e.question, rng, task)
        assert re.findall(r"\\boxed\{ (\d) \}", tr) == [e.answer]  # error-free traces end at the answer
        n_ops = len(e.question.split()) - 1
        lengths.append(len(tr.split()))
        concise += ("check" not in tr and "wait" not in tr)
        assert len(tr.split()) >= 5 * n_ops + 3
    # Verbose on average, concise traces rare (about 0.175^n_ops).
    assert sum(lengths) / len(lengths) > 40 and concise / len(exs) < 0.05
    noisy = toy.ToyTask(error_prob=0.5)
    wrong = sum(re.findall(r"\\boxed\{ (\d) \}", toy.verbose_trace(e.question, rng, noisy)) != [e.answer] for e in exs)
    assert wrong > 100


def test_task_validation_and_key():
    with pytest.raises(ValueError, match="check_probs"):
        toy.ToyTask(check_probs=(0.5, 0.4))
    with pytest.raises(ValueError, match="max_ops"):
        toy.ToyTask(min_ops=3, max_ops=2)
    assert toy.ToyTask().key() == toy.ToyTask().key() != toy.ToyTask(seed=1).key()


def test_warm_start_is_cached(tmp_path):
    task = toy.ToyTask(sft_steps=3, sft_examples=50, sft_batch_size=4, hidden_size=16, num_layers=1, num_heads=2,
                       min_accuracy=0.0)
    logs = []
    d1, m1, tok = toy.warm_start(task, cache_dir=tmp_path, log=logs.append)
    assert (d1 / "config.json").is_file() and (d1 / "tokenizer.json").is_file()
    d2, m2, _ = toy.warm_start(task, cache_dir=tmp_path, log=logs.append)
    assert d1 == d2 and "cached" in logs[-1]
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert (a == b).all(), n
    assert not list(tmp_path.glob(".tmp-*"))


_SMALL = dict(sft_examples=50, sft_batch_size=4, hidden_size=16, num_layers=1, num_heads=2, check_questions=4)


def test_warm_start_records_its_measured_accuracy(tmp_path):
    task = toy.ToyTask(sft_steps=3, min_accuracy=0.0, **_SMALL)
    d, model, tok = toy.warm_start(task, cache_dir=tmp_path, log=None)
    rec = toy.read_record(d)
    assert rec["accuracy"] == toy.heldout_accuracy(model, tok, task)  # seeded: the same measurement again
    assert 0.0 <= rec["accuracy"] <= 1.0 and rec["steps"] == 3 and rec["min_accuracy"] == 0.0
    assert rec["task"]["sft_steps"] == 3 and rec["transformers"] and rec["torch"]


def test_warm_start_keeps_training_until_the_threshold(tmp_path, monkeypatch):
    task = toy.ToyTask(sft_steps=3, sft_max_steps=9, min_accuracy=0.5, **_SMALL)
    accs = iter([0.1, 0.2, 0.6])
    monkeypatch.setattr(toy, "heldout_accuracy", lambda *a: next(accs))
    logs = []
    d, _, _ = toy.warm_start(task, cache_dir=tmp_path, log=logs.append)
    rec = toy.read_record(d)
    assert rec["accuracy"] == 0.6 and rec["steps"] == 9 and [h["steps"] for h in rec["history"]] == [3, 6, 9]
    assert "held-out accuracy 0.600 after 9 steps" in logs[-1]
    d2, _, _ = toy.warm_start(task, cache_dir=tmp_path, log=logs.append)  # cached: no training, no check
    assert d2 == d and "cached" in logs[-1] and "0.600" in logs[-1]


def test_warm_start_that_cannot_learn_stops_with_an_error(tmp_path, monkeypatch):
    task = toy.ToyTask(sft_steps=3, sft_max_steps=8, min_accuracy=0.5, **_SMALL)
    monkeypatch.setattr(toy, "heldout_accuracy", lambda *a: 0.1)
    with pytest.raises(toy.WarmStartError, match=r"0\.100 after 6 steps, below the required 0\.5.*bound of 8"):
        toy.warm_start(task, cache_dir=tmp_path, log=None)
    assert not list(tmp_path.iterdir())  # nothing cached: the next run trains again


def test_default_run_fails_clearly_when_the_warm_start_cannot_reach_the_threshold(tmp_path, monkeypatch, capsys):
    from vpgea import train

    monkeypatch.setenv("VPGEA_CACHE", str(tmp_path / "cache"))
    args = ["--toy-sft-steps", "5", "--toy-sft-max-steps", "5", "--toy-min-accuracy", "0.95",
            "--output-dir", str(tmp_path / "out")]
    assert train.main(args) == 1
    err = capsys.readouterr().err
    assert "error: the toy warm start reached held-out accuracy" in err and "--toy-min-accuracy" in err


def test_answer_aware_traces_and_leaks():
    """The default toy's premise: concise traces rare under the student view, common under the teacher view, some
    teacher-view traces box the hint after a partial derivation, and is_leak finds exactly those."""
    task = toy.ToyTask(error_prob=0.0)
    assert task.variant == "answer-aware"
    rng = random.Random(0)
    exs = toy.make_examples(2000, seed=4, task=task)
    student = [toy.trace(e.question, rng, task) for e in exs]
    teacher = [toy.trace(e.question, rng, task, hint=e.answer) for e in exs]
    share = lambda rows, style: sum(s == style for _, s in rows) / len(rows)  # noqa: E731
    assert share(student, "concise") < 0.05 and share(student, "leak") == 0
    assert 0.45 < share(teacher, "concise") < 0.55 and 0.15 < share(teacher, "leak") < 0.25
    mean_len = lambda rows: sum(len(t.split()) for t, _ in rows) / len(rows)  # noqa: E731
    assert mean_len(teacher) < 0.6 * mean_len(student)
    for e, (t, style) in [*zip(exs, student), *zip(exs, teacher)]:
        assert re.findall(r"\\boxed\{ (\d) \}", t) == [e.answer]  # error-free; leaks box the (right) hint
        assert toy.is_leak(e.question, t) == (style == "leak"), (e.question, t, style)
    q = "7 +3 -5"
    assert toy.is_leak(q, "7 +3 = 0 ; \\boxed{ 5 }")
    assert not toy.is_leak(q, "7 +3 = 0 ; check 7 +3 = 0 ok ; wait 0 -5 = 4 no 0 -5 = 5 ; \\boxed{ 5 }")
    assert not toy.is_leak(q, "7 +3 = 0 ; 0 -5 = 5 ;")  # no answer boxed: not a leak, just unfinished
