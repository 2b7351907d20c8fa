"""Data loading, answer grading and the evaluation loop (ACC, A.Tok, eps3, incremental JSONL, resume)."""

from __future__ import annotations

import json

import pytest

from vpgea.data import Example, load_jsonl_dataset
from vpgea.engines.base import GenerationOutput
from vpgea.eval import evaluate
from vpgea.grading import extract_answer, is_correct


@pytest.mark.parametrize("name,n,first_answer", [("gsm8k_test.jsonl", 1319, "18"), ("math500_test.jsonl", 500, None),
                                                 ("aime24_test.jsonl", 30, None), ("amc23_test.jsonl", 40, None)])
def test_loads_shared_sets(shared_data, name, n, first_answer):
    ex = load_jsonl_dataset(shared_data / name)
    assert len(ex) == n
    assert all(e.question and e.answer for e in ex)
    assert ex[0].source.endswith(f"{name}:1")
    if first_answer is not None:
        assert ex[0].answer == first_answer
    if name == "amc23_test.jsonl":
        assert ex[0].answer == "27"  # stored as 27.0


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_jsonl_dataset(tmp_path / "nope.jsonl")
    f = tmp_path / "bad.jsonl"
    f.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "x", "answer": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        load_jsonl_dataset(f)
    f.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: missing field 'answer'"):
        load_jsonl_dataset(f)
    f.write_text('{"question": "q", "answer": "so 3\\n#### 3"}\n{"question": "q2", "answer": "no marker"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: GSM8K"):
        load_jsonl_dataset(f)
    f.write_text("\n\n")
    with pytest.raises(ValueError, match="no examples"):
        load_jsonl_dataset(f)
    f.write_text('{"q": "what", "a": "7"}\n')
    assert load_jsonl_dataset(f, question_field="q", answer_field="a")[0] == Example("what", "7", f"{f}:1")


@pytest.mark.parametrize("text,expected", [
    (r"so \boxed{\frac{1}{2}} then \boxed{3}", "3"),
    (r"nested \boxed{\frac{a}{\sqrt{b}}}.", r"\frac{a}{\sqrt{b}}"),
    (r"truncated \boxed{12", None),
    ("work\n#### 1,234", "1,234"),
    ("The answer is 42.", "42"),
    ("no answer here", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("pred,gold,ok", [
    ("1,000", "1000", True), ("27", "27.0", True), ("0.5", r"\frac{1}{2}", True), (r"\dfrac{3}{4}", "0.75", True),
    (r"\left( 3, \frac{\pi}{2} \right)", r"\left( 3, \frac{\pi}{2} \right)", True), (r"(3, \pi/2)",
     r"\left( 3, \frac{\pi}{2} \right)", True), ("[1, 2)", "[1,2)", True), ("[1, 2]", "[1,2)", False),
    ("17", "18", False), (None, "3", False), ("", "3", False), (r"2\sqrt{2}", r"\sqrt{8}", True),
])
def test_is_correct(pred, gold, ok):
    assert is_correct(pred, gold) is ok


class _CannedEngine:
    """Returns a fixed response per prompt (keyed by the prompt's first token)."""

    def __init__(self, table):
        self.table = table
        self.calls = 0

    def generate(self, prompts, *, max_new_tokens, temperature=1.0, top_p=1.0, seed=None):
        self.calls += 1
        return [GenerationOutput(list(self.table[p[0]]), "stop") for p in prompts]


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"\\boxed{{{i}}}" if i < 100 else "w" for i in ids)


def test_evaluate_metrics_jsonl_and_resume(tmp_path):
    examples = [Example("a", "5", "f:1"), Example("b", "7", "f:2"), Example("c", "9", "f:3")]
    # problem 0: correct in 4 tokens; problem 1: wrong in 2; problem 2: no answer in 6.
    engine = _CannedEngine({0: [100, 101, 102, 5], 1: [100, 3], 2: [100] * 6})
    out = tmp_path / "r.jsonl"
    res = evaluate(engine, _Tok(), examples, samples=2, batch_size=4, prompt_fn=lambda ex: [ord(ex.question) - 97],
                   results_path=out)
    assert res["acc"] == pytest.approx(1 / 3)
    assert res["avg_tokens"] == pytest.approx(4.0)
    assert res["eps3"] == pytest.approx((1 / 3) ** 2 / 4.0)
    assert res["num_no_answer"] == 2 and res["num_responses"] == 6
    assert res["avg_tokens_correct"] == 4.0 and res["avg_tokens_incorrect"] == 4.0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 6 and {(r["problem"], r["sample"]) for r in lines} == {(i, s) for i in range(3)
                                                                                 for s in range(2)}
    # Interrupted run: keep 3 records plus a partial line, then resume generates only the other 3.
    out.write_text("".join(json.dumps(r) + "\n" for r in lines[:3]) + '{"problem": 2, "sam')
    engine2 = _CannedEngine(engine.table)
    res2 = evaluate(engine2, _Tok(), examples, samples=2, batch_size=10,
                    prompt_fn=lambda ex: [ord(ex.question) - 97], results_path=out, resume=True)
    assert engine2.calls == 1
    assert res2 == res
    assert len(out.read_text().splitlines()) == 6


# --- python -m vpgea.eval end to end (a tiny model and tokenizer built in code) ----------------------------------


def test_cli_end_to_end_and_resume(tiny_model_dir, tmp_path, capsys):
    from vpgea import eval as ev
    from vpgea import toy

    data = tmp_path / "toyset.jsonl"
    data.write_text("".join(json.dumps({"question": e.question, "answer": f"... #### {e.answer}"}) + "\n"
                            for e in toy.make_examples(5, seed=0)))
    out = tmp_path / "res" / "eval.json"
    args = ["--model", str(tiny_model_dir), "--data", str(data), "--samples", "2", "--max-new-tokens", "6",
            "--temperature", "1.0", "--batch-size", "3", "--output", str(out)]
    assert ev.main(args) == 0
    table = capsys.readouterr().out
    assert "toyset" in table and "eps3" in table
    res = json.loads(out.read_text())["datasets"]["toyset"]
    responses = out.with_name("eval.toyset.responses.jsonl")
    records = [json.loads(line) for line in responses.read_text().splitlines()]
    assert res["num_responses"] == len(records) == 10 and res["num_problems"] == 5
    assert res["avg_tokens"] == pytest.approx(sum(r["num_tokens"] for r in records) / 10)
    assert res["acc"] == pytest.approx(sum(r["correct"] for r in records) / 10)
    # Resume after losing the last 4 responses: only those are generated again, to the same result (per-response
    # seeds do not depend on which responses share a batch).
    responses.write_text("".join(json.dumps(r) + "\n" for r in records[:6]))
    assert ev.main([*args, "--resume"]) == 0
    again = [json.loads(line) for line in responses.read_text().splitlines()]
    key = lambda r: (r["problem"], r["sample"])  # noqa: E731
    assert sorted(again, key=key) == sorted(records, key=key)


def test_cli_bad_inputs(tiny_model_dir, tmp_path, capsys):
    import importlib.util

    from vpgea import eval as ev

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "1 +1", "answer": "2"}) + "\n")
    assert ev.main(["--model", str(tmp_path / "nope"), "--data", str(data)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert ev.main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    assert ev.main(["--model", str(no_tok), "--data", str(data)]) == 2
    assert "tokenizer" in capsys.readouterr().err
    if importlib.util.find_spec("vllm") is None:
        assert ev.main(["--model", str(tmp_path / "nope"), "--data", str(data), "--engine", "vllm"]) == 2
        assert "vllm package is not installed" in capsys.readouterr().err


# --- hard edges of the command line ------------------------------------------------------------------------------


def _toyset(path, n, seed=0):
    from vpgea import toy

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question": e.question, "answer": f"#### {e.answer}"}) + "\n"
                            for e in toy.make_examples(n, seed=seed)))
    return path


def test_cli_files_sharing_a_stem_keep_both(tiny_model_dir, tmp_path, capsys):
    from vpgea import eval as ev

    a, b = _toyset(tmp_path / "a" / "test.jsonl", 2), _toyset(tmp_path / "b" / "test.jsonl", 3, seed=1)
    out = tmp_path / "res" / "e.json"
    common = ["--model", str(tiny_model_dir), "--max-new-tokens", "4", "--output", str(out)]
    assert ev.main([*common, "--data", str(a), str(b)]) == 0
    res = json.loads(out.read_text())["datasets"]
    assert {k: v["num_problems"] for k, v in res.items()} == {"a-test": 2, "b-test": 3}
    assert out.with_name("e.a-test.responses.jsonl").is_file() and out.with_name("e.b-test.responses.jsonl").is_file()
    assert ev.main([*common, "--data", str(a), str(tmp_path / "a" / ".." / "a" / "test.jsonl")]) == 2
    assert "given twice" in capsys.readouterr().err


def test_cli_resume_refuses_other_settings(tiny_model_dir, tmp_path, capsys):
    from vpgea import eval as ev

    data = _toyset(tmp_path / "d.jsonl", 3)
    out = tmp_path / "e.json"
    common = ["--model", str(tiny_model_dir), "--data", str(data), "--max-new-tokens", "4", "--output", str(out)]
    assert ev.main([*common, "--samples", "2", "--temperature", "1"]) == 0
    before = out.with_name("e.d.responses.jsonl").read_text()
    assert ev.main([*common, "--samples", "3", "--temperature", "1", "--seed", "5", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--samples: 2 in the evaluation, 3 now" in err and "--seed: 0 in the evaluation, 5 now" in err
    assert out.with_name("e.d.responses.jsonl").read_text() == before  # nothing was touched
    assert ev.main([*common, "--samples", "2", "--temperature", "1", "--device", "cpu", "--resume"]) == 2
    assert "--allow-config-change" in capsys.readouterr().err
    # Another batch size never changes a record; another device only with the flag.
    assert ev.main([*common, "--samples", "2", "--temperature", "1", "--batch-size", "1", "--resume"]) == 0
    assert ev.main([*common, "--samples", "2", "--temperature", "1", "--device", "cpu", "--resume",
                    "--allow-config-change"]) == 0


def test_cli_defaults_output_beside_the_model_and_fits_its_context(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from vpgea import eval as ev

    data = _toyset(tmp_path / "d.jsonl", 1)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert ev.main(["--model", str(tiny_model_dir), "--data", str(data)]) == 0
    assert not list(cwd.iterdir())  # nothing written where the command ran
    out = tiny_model_dir.parent / f"eval-{tiny_model_dir.name}.json"
    res = json.loads(out.read_text())
    err = capsys.readouterr().err
    # The tiny model has 512 positions: the default 4096 new tokens would run past them.
    assert "does not fit the model's context (512 positions" in err
    assert res["max_new_tokens"] < 512 and res["datasets"]["d"]["num_responses"] == 1


@pytest.mark.parametrize("args,expected", [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0 (0: greedy), got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0 (0: greedy), got inf"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0 (0: greedy), got -1.0"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--samples", "0"], "--samples must be >= 1, got 0"),
])
def test_cli_bad_numbers(tmp_path, args, expected, capsys):
    from vpgea import eval as ev

    assert ev.main(["--model", str(tmp_path), "--data", str(tmp_path / "x.jsonl"), *args]) == 2
    assert capsys.readouterr().err.strip() == f"error: {expected}"


def test_cli_repeated_greedy_samples_warn(tiny_model_dir, tmp_path, capsys):
    from vpgea import eval as ev

    data = _toyset(tmp_path / "d.jsonl", 1)
    assert ev.main(["--model", str(tiny_model_dir), "--data", str(data), "--samples", "2", "--max-new-tokens", "3",
                    "--output", str(tmp_path / "e.json")]) == 0
    assert "greedy decoding repeats the same response" in capsys.readouterr().err
