"""A run as TRL / verl users describe one: a YAML config file, a verl-style parquet file (nested fields, chat-message
prompts), TensorBoard logging, a pluggable reward; the resolved config.json; evaluation with the same hook."""

from __future__ import annotations

import dataclasses
import json

import pytest

from vpgea import train
from vpgea.config import parse_args

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """`datasets` caches what it reads under ~/.cache; tests keep it in their temp dir."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def verl_rows():
    """verl's preprocessed layout: `prompt` (chat messages), `reward_model.ground_truth`, `extra_info`. Toy-vocabulary
    words only (the tiny tokenizer maps anything else to <unk>)."""
    qs = [("3 +4", "7"), ("5 -2 +1", "4"), ("2 +2", "4"), ("9 -1", "8")]
    return [{"data_source": "toy", "prompt": [{"role": "system", "content": "check"}, {"role": "user", "content": q}],
             "reward_model": {"style": "rule", "ground_truth": a},
             "extra_info": {"index": i, "question": q, "tests": f"expect {a}"}} for i, (q, a) in enumerate(qs)]


def write_yaml(path, model_dir, data, out, *extra_lines):
    lines = [
        f"model: {model_dir}",
        f"train_data: {data}",
        "question_field: prompt",
        "answer_field: reward_model.ground_truth",
        f"output_dir: {out}",
        "report_to: tensorboard",
        "max_steps: 2",
        "questions_per_step: 2",
        "group_size: 2",
        "prior_samples: 1",
        "max_new_tokens: 8",
        "lr: 1e-4  # YAML 1.1 reads this as a string; a float field takes it",
        "instruction: ''",
        "student_template: '{question}'",
        "teacher_template: '{question} hint {answer}'",
        "answer_tail: '\\boxed{{ {answer} }}'",
        "save_every: 10",
        *extra_lines,
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def tb_scalars(log_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}, acc


def test_yaml_parquet_chat_tensorboard_two_steps(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    data = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(verl_rows()), data)
    out = tmp_path / "out"
    cfg_file = write_yaml(tmp_path / "run.yaml", tiny_model_dir, data, out)
    assert train.main(["--config", str(cfg_file)]) == 0

    # The resolved config: written at the start, and --config reads it back to the same config.
    cfg = parse_args(["--config", str(cfg_file)])
    assert cfg.lr == 1e-4 and cfg.report_to == ("tensorboard",) and cfg.question_field == "prompt"
    assert json.loads((out / "config.json").read_text())["answer_field"] == "reward_model.ground_truth"
    assert parse_args(["--config", str(out / "config.json")]) == cfg

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    scalars, acc = tb_scalars(out / "tensorboard")
    # The event files hold exactly the numeric entries of metrics.jsonl (None ones left out), at their steps.
    expected = {f"train/{k}" for r in rows for k, v in r.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert set(scalars) == expected
    for r in rows:
        for k, v in r.items():
            if f"train/{k}" in scalars:
                assert scalars[f"train/{k}"][r["step"]] == pytest.approx(v, rel=1e-6, abs=1e-30), k
    assert "config/text_summary" in acc.Tags()["tensors"]  # the run's config is attached


def test_chat_prompts_use_the_chat_template(tiny_model_dir, tmp_path):
    """A chat-message question: the templates format the last user message's content; the earlier messages come
    first, unchanged, through the tokenizer's chat template."""
    from transformers import AutoTokenizer

    from vpgea.data import load_dataset

    data = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(verl_rows()), data)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ex = load_dataset(data)[0]  # auto-detected: prompt + reward_model.ground_truth
    assert (ex.question, ex.answer, ex.history) == ("3 +4", "7", ({"role": "system", "content": "check"},))
    assert ex.source == f"{data}:row 0" and ex.record["extra_info"]["tests"] == "expect 7"
    cfg = parse_args(["--model", str(tiny_model_dir), "--train-data", str(data), "--instruction", "",
                      "--student-template", "{question}", "--teacher-template", "{question} hint {answer}"])
    [item], _ = train.prepare(cfg, tok, [ex])

    def chat(user):
        text = tok.apply_chat_template([{"role": "system", "content": "check"}, {"role": "user", "content": user}],
                                       tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]

    assert item.student == chat("3 +4")
    assert item.teacher == chat("3 +4 hint 7")
    # A method that builds its own prompt (L1's length target line) keeps the earlier messages too.
    from vpgea.methods import Group, make_method

    l1 = make_method(dataclasses.replace(cfg, mode="l1-exact", l1_prompt="check {target}", l1_range=(3, 3)), tok)
    assert l1.prompt(Group(index=0, item=item), l1.draws()[0]) == chat("3 +4\ncheck 3")
    tok.chat_template = None  # no template: a conversation with a system message cannot be rendered
    with pytest.raises(ValueError, match="no chat template"):
        train.prepare(cfg, tok, [ex])


REWARD_FILE = '''
calls = []

def always(response, answer):
    return True

def from_record(response, answer, *, record):
    calls.append(record["extra_info"]["tests"])
    return record["extra_info"]["tests"] == "expect " + answer
'''


def test_reward_hook_grades_training_and_evaluation(tiny_model_dir, tmp_path):
    data = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(verl_rows()), data)
    hook = tmp_path / "my_rewards.py"
    hook.write_text(REWARD_FILE)
    out = tmp_path / "out"
    cfg_file = write_yaml(tmp_path / "run.yaml", tiny_model_dir, data, out, "report_to: none", "max_steps: 1",
                          "mode: grpo-lp", f"eval_data: {data}", "eval_limit: 2")
    # CLI flags override the file.
    assert train.main(["--config", str(cfg_file), "--reward", f"{hook}:from_record"]) == 0
    m = json.loads((out / "metrics.jsonl").read_text())
    assert m["acc_prior"] == 1.0  # every response "passes" its record's tests, whatever it says
    summary = json.loads((out / "summary.json").read_text())
    assert summary["before"]["acc"] == 1.0 and summary["after"]["acc"] == 1.0
    assert not (out / "tensorboard").exists()

    from vpgea.rewards import load_reward

    assert load_reward(f"{hook}:from_record").fn.__globals__["calls"][0].startswith("expect ")


def test_eval_cli_reads_parquet_with_reward(tiny_model_dir, tmp_path, capsys):
    from vpgea import eval as ev

    data = tmp_path / "set.parquet"
    pq.write_table(pa.Table.from_pylist(verl_rows()), data)
    hook = tmp_path / "my_rewards.py"
    hook.write_text(REWARD_FILE)
    out = tmp_path / "eval.json"
    assert ev.main(["--model", str(tiny_model_dir), "--data", str(data), "--max-new-tokens", "4", "--limit", "3",
                    "--reward", f"{hook}:always", "--output", str(out), "--device", "cpu"]) == 0
    res = json.loads(out.read_text())["datasets"]["set"]
    assert res["acc"] == 1.0 and res["num_problems"] == 3
    assert ev.main(["--model", str(tiny_model_dir), "--data", str(data), "--reward", f"{hook}:nope",
                    "--output", str(out)]) == 2
    assert "has no 'nope'" in capsys.readouterr().err
