"""--config FILE (YAML / JSON), precedence, the resolved config.json, and --help's real defaults."""

from __future__ import annotations

import dataclasses
import json

import pytest

from vpgea import train
from vpgea.config import PRESETS, TrainConfig, load_config_file, parse_args, save_config


def test_precedence_defaults_preset_file_flags(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("preset: r1-7b\nmodel: /m\ntrain_data: t.jsonl\ngroup-size: 4\nlr: 2e-6\nadam_betas: [0.8, 0.9]\n"
                 "report_to: wandb\ncross_view: false\n")
    cfg = parse_args(["--config", str(f), "--group-size", "6"])
    r1 = PRESETS["r1-7b"]()
    assert cfg.group_size == 6  # flag over file
    assert cfg.lr == 2e-6 and cfg.adam_betas == (0.8, 0.9) and cfg.report_to == ("wandb",) and not cfg.cross_view
    assert cfg.max_new_tokens == r1.max_new_tokens == 8192  # from the file's preset
    assert parse_args(["--config", str(f), "--preset", "r1-1.5b"]).max_tokens_per_micro_batch == 32768  # flag's
    # No model anywhere: the toy preset, then the file.
    f.write_text("max_steps: 3\n")
    cfg = parse_args(["--config", str(f)])
    assert cfg.is_toy and cfg.max_steps == 3 and cfg.lr == PRESETS["toy"]().lr
    # JSON, with a null and a list for report_to.
    j = tmp_path / "run.json"
    j.write_text(json.dumps({"eval_limit": None, "report_to": ["tensorboard", "wandb"], "lr": 3e-5}))
    cfg = parse_args(["--config", str(j)])
    assert cfg.eval_limit is None and cfg.report_to == ("tensorboard", "wandb") and cfg.lr == 3e-5
    assert parse_args(["--report-to", "none"]).report_to == ()
    f.write_text("report_to: null\n")
    assert parse_args(["--config", str(f)]).report_to == ()


@pytest.mark.parametrize("text,match", [
    ("group_sz: 4\n", r"run\.yaml: unknown setting 'group_sz' \(did you mean 'group_size'\?\)"),
    ("group_size: '8'\n", r"run\.yaml: group_size: expected an integer, got '8' \(str\)"),
    ("group_size: 8.0\n", "expected an integer"),
    ("lr: fast\n", r"lr: expected a number, got 'fast'"),
    ("lr: .nan\n", "expected a finite number"),
    ("cross_view: 1\n", "expected true or false"),
    ("instruction: 7\n", r"instruction: expected a string, got 7 \(int\)"),
    ("adam_betas: 0.9\n", "expected a list of 2 numbers"),
    ("report_to: [tensorboard, 3]\n", "expected a string"),
    ("preset: huge\n", "preset: expected one of"),
    ("group_size: 4\ngroup-size: 5\n", "given twice"),
    ("- a\n- b\n", "expected a mapping"),
    ("a: [1, 2\n", r"run\.yaml:2: not valid YAML"),
])
def test_bad_config_files(tmp_path, text, match):
    f = tmp_path / "run.yaml"
    f.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config_file(f)


def test_bad_config_exits_2(tmp_path, capsys):
    assert train.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: file not found" in capsys.readouterr().err
    f = tmp_path / "run.toml"
    f.write_text("x = 1\n")
    assert train.main(["--config", str(f)]) == 2
    assert "expected a .yaml, .yml or .json file" in capsys.readouterr().err
    j = tmp_path / "run.json"
    j.write_text('{"lr": 1e-4,\n "group_size": }')
    assert train.main(["--config", str(j)]) == 2
    assert "run.json:2: not valid JSON" in capsys.readouterr().err
    j.write_text('{"group_size": 0}')
    assert train.main(["--config", str(j)]) == 2
    assert f"group_size must be >= 1, got 0 (settings from --config {j}" in capsys.readouterr().err
    assert train.main(["--report-to", "tensorboard", "none"]) == 2
    assert "cannot be combined" in capsys.readouterr().err


def test_resolved_config_round_trips(tmp_path):
    for argv in ([], ["--model", "/m", "--train-data", "d.parquet", "--report-to", "tensorboard", "--adam-betas",
                      "0.8", "0.95", "--eval-limit", "5", "--reward", "x.py:f"]):
        cfg = parse_args(argv)
        path = save_config(cfg, tmp_path / "out")
        assert path.name == "config.json" and not list(path.parent.glob(".config.json.tmp-*"))
        assert set(json.loads(path.read_text())) == {f.name for f in dataclasses.fields(TrainConfig)}
        assert parse_args(["--config", str(path)]) == cfg


def test_help_shows_real_defaults(capsys):
    from vpgea.config import _parser, _show

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--lr LR Peak AdamW learning rate. (default: 1e-06; presets: toy 0.0001, r1-7b 5e-07)" in text
    assert "--adam-betas X X AdamW betas. (default: 0.9 0.99)" in text
    assert "(default: '{question}\\n{instruction}'; presets: toy '{question}')" in text
    assert "--report-to {none,tensorboard,wandb} [{none,tensorboard,wandb} ...]" in text
    base = TrainConfig()
    helps = {a.dest: " ".join(a.help.split()) for a in _parser()._actions}
    for f in dataclasses.fields(TrainConfig):  # every field's flag states its real default
        shown = _show(getattr(base, f.name)).replace("%", "%%")
        assert f"(default: {' '.join(shown.split())}" in helps[f.name], f.name
