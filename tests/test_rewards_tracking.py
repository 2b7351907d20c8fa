"""The --reward hook (loading, signature check, return values) and the --report-to trackers (TensorBoard read back,
W&B offline, missing packages)."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types

import pytest

from vpgea import train
from vpgea.data import Example
from vpgea.rewards import load_reward, math_correct
from vpgea.tracking import Tracker, check_report_to, open_tracker, scalars

HOOKS = '''
import numpy as np

def exact(response, answer):
    return response.strip() == answer

def with_record(response, answer, record):
    return record["k"] == response

def kwargs(response, answer, **kw):
    return "record" in kw

def score(response, answer):
    return {"yes": 1.0, "no": 0, "np": np.bool_(True)}.get(response, 0.5)

def boom(response, answer):
    raise KeyError("tests")

def three(response, answer, tests):
    return True

not_callable = 3
'''


@pytest.fixture
def hooks(tmp_path):
    f = tmp_path / "hooks.py"
    f.write_text(HOOKS)
    return f


def test_reward_hooks(hooks):
    ex = Example("q", "7", "d.jsonl:3", record={"k": "v"})
    assert load_reward()(r"so \boxed{7}", ex) is True and load_reward().fn is math_correct
    assert load_reward(f"{hooks}:exact")(" 7 ", ex) is True
    r = load_reward(f"{hooks}:with_record")
    assert r.wants_record and r("v", ex) and not r("w", ex)
    assert load_reward(f"{hooks}:kwargs")("x", ex) is True
    s = load_reward(f"{hooks}:score")
    assert (s("yes", ex), s("no", ex), s("np", ex)) == (True, False, True)
    with pytest.raises(ValueError, match=r"returned 0.5 \(float\) for d.jsonl:3; expected True or False"):
        s("maybe", ex)
    with pytest.raises(RuntimeError, match=r"raised KeyError on d.jsonl:3"):
        load_reward(f"{hooks}:boom")("x", ex)
    assert load_reward("vpgea.grading:is_correct")("7", ex) is True  # an importable module: is_correct(pred, gold)
    with pytest.raises(ValueError, match=r"too many positional arguments \(its signature: extract_answer\(text"):
        load_reward("vpgea.grading:extract_answer")


@pytest.mark.parametrize("spec,match", [
    ("{hooks}:three", r"cannot be called as fn\(response, answer\).*missing a required argument: 'tests'"),
    ("{hooks}:nope", r"has no 'nope' \(callables there: \[.*'exact'"),
    ("{hooks}:not_callable", "is a int, not a function"),
    ("no_such_module_xyz:f", "module 'no_such_module_xyz' not found"),
    ("missing/file.py:f", "file missing/file.py not found"),
    (":f", "expected 'module:function'"),
])
def test_bad_reward_specs(hooks, spec, match):
    with pytest.raises(ValueError, match=match):
        load_reward(spec.format(hooks=hooks))


def test_bad_reward_exits_2_before_loading(tmp_path, hooks, capsys):
    assert train.main(["--reward", f"{hooks}:three", "--output-dir", str(tmp_path)]) == 2
    assert "missing a required argument" in capsys.readouterr().err
    assert train.main(["--reward", "nocolon"]) == 2
    assert "reward must be 'module:function'" in capsys.readouterr().err


# --- trackers -------------------------------------------------------------------------------------------------------

RECORDS = [{"step": 1, "loss": 0.5, "posterior_len": None, "gen_tokens": 12, "lr": 1e-5},
           {"step": 2, "loss": -0.25, "posterior_len": None, "gen_tokens": 10, "lr": 2e-5}]


def test_scalars_are_the_numbers_of_a_record():
    assert scalars(RECORDS[0]) == {"train/loss": 0.5, "train/gen_tokens": 12.0, "train/lr": 1e-5}


def test_missing_tracker_package_is_a_start_up_error(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"the wandb package is not installed \(pip install 'vpgea\[wandb\]'\)"):
        check_report_to(("wandb",))
    assert train.main(["--report-to", "wandb", "--output-dir", str(tmp_path)]) == 2
    assert "pip install 'vpgea[wandb]'" in capsys.readouterr().err


def test_tensorboard_tracker_and_resume_purge(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with Tracker(("tensorboard",), tmp_path, config={"lr": 1e-5}, name="t") as tr:
        for r in RECORDS:
            tr.log(r)
    # A resumed run from the step-1 checkpoint: step 2 is logged again, the earlier step-2 event is purged.
    with Tracker(("tensorboard",), tmp_path, config={"lr": 1e-5}, resume_step=1) as tr:
        tr.log({"step": 2, "loss": 9.0})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["train/gen_tokens", "train/loss", "train/lr"]
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 0.5), (2, 9.0)]
    assert [e.step for e in acc.Scalars("train/gen_tokens")] == [1]
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.replace("\n    ", "\n")) == {"lr": 1e-5}


def test_tracker_is_a_no_op_off_rank_0(tmp_path):
    with Tracker(("tensorboard", "wandb"), tmp_path, enabled=False) as tr:
        tr.log(RECORDS[0])
        assert not tr.active
    assert not list(tmp_path.iterdir())


class _FakeRun:
    def __init__(self, **kw):
        self.kw, self.logged, self.exit_code, self.id = kw, [], None, kw.get("id") or "abc123"

    def log(self, values, step, commit=None):
        self.logged.append((step, values))

    def finish(self, exit_code=0):
        self.exit_code = exit_code


def test_wandb_calls(tmp_path, monkeypatch):
    """What the W&B tracker asks of wandb (a stand-in module: runs without the package)."""
    runs = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: runs.append(_FakeRun(**kw)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    cfg = train.parse_args(["--output-dir", str(tmp_path / "toy"), "--report-to", "wandb", "--run-name", "exp"])
    with open_tracker(cfg, tmp_path / "toy" / "vpgea") as tr:
        for r in RECORDS:
            tr.log(r)
    run = runs[0]
    assert run.kw["project"] == "proj" and run.kw["name"] == "exp/vpgea" and run.kw["resume"] is None
    assert run.kw["config"]["report_to"] == ["wandb"] and run.kw["dir"] == str(tmp_path / "toy" / "vpgea")
    assert run.logged == [(1, scalars(RECORDS[0])), (2, scalars(RECORDS[1]))] and run.exit_code == 0
    assert (tmp_path / "toy" / "vpgea" / "wandb_run_id").read_text().strip() == "abc123"
    with pytest.raises(RuntimeError), open_tracker(cfg, tmp_path / "toy" / "vpgea", resume_step=1):
        raise RuntimeError("crash")
    assert runs[1].kw["id"] == "abc123" and runs[1].kw["resume"] == "allow" and runs[1].exit_code == 1


def test_wandb_offline(tmp_path, monkeypatch):
    """The real package, offline: no network, no account."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tr = Tracker(("wandb",), tmp_path, config={"lr": 1e-5, "report_to": ["wandb"]}, name="offline-test")
    run = tr._wandb
    for r in RECORDS:
        tr.log(r)
    assert run.summary["train/loss"] == -0.25 and run.config["lr"] == 1e-5
    tr.close()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run.id}/run-{run.id}.wandb"))
