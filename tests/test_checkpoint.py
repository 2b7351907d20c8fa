"""Checkpoint faults: non-finite parameters, a full disk, a crash during keep-last deletion, leftovers of interrupted
saves. Each leaves the previous checkpoint intact and loadable."""

from __future__ import annotations

import collections
import errno
import shutil
from pathlib import Path

import pytest
import torch

from vpgea import checkpoint as ck
from vpgea import toy


@pytest.fixture
def model_and_tok():
    tok = toy.build_tokenizer()
    return toy.build_model(toy.ToyTask(hidden_size=16, num_layers=1, num_heads=2), tok), tok


def _save(root, step, model, tok, keep_last=1, opt=None):
    return ck.save_checkpoint(root, step, model=model, tokenizer=tok, trainer_state={"x": step}, optimizer=opt,
                              keep_last=keep_last)


def _loadable(path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(path)
    assert ck.load_trainer_state(path)["step"] == int(path.name.split("-")[1])


def test_non_finite_parameters_are_never_saved(tmp_path, model_and_tok):
    model, tok = model_and_tok
    first = _save(tmp_path, 1, model, tok)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(ck.NonFiniteParameters, match=r"step 2: parameter .* is NaN or inf.*checkpoint-1"):
        _save(tmp_path, 2, model, tok)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]
    _loadable(first)


@pytest.mark.parametrize("where", ["torch.save", "tokenizer"])
def test_full_disk_names_path_and_bytes_and_keeps_previous(tmp_path, model_and_tok, monkeypatch, where):
    model, tok = model_and_tok
    opt = torch.optim.AdamW(model.parameters())
    model(torch.tensor([[3, 4]])).logits.sum().backward()
    opt.step()
    _save(tmp_path, 1, model, tok, opt=opt)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "torch.save":  # torch.save's own failure carries no errno: free space decides
        monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("file write failed")))
        usage = collections.namedtuple("usage", "total used free")(10**6, 10**6 - 1000, 1000)
        monkeypatch.setattr(shutil, "disk_usage", lambda p: usage)
    else:
        monkeypatch.setattr(type(tok), "save_pretrained", full)
    with pytest.raises(ck.CheckpointError) as e:
        _save(tmp_path, 2, model, tok, opt=opt)
    monkeypatch.undo()
    msg = str(e.value)
    assert "no space left" in msg and str(tmp_path) in msg and "checkpoint-2" in msg and "MiB" in msg
    assert "checkpoint-1 is intact" in msg
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]  # the partial save is gone
    _loadable(tmp_path / "checkpoint-1")


def test_other_save_failure_is_named_and_rolled_back(tmp_path, model_and_tok, monkeypatch):
    model, tok = model_and_tok
    _save(tmp_path, 1, model, tok)
    monkeypatch.setattr(type(tok), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "no")))
    with pytest.raises(ck.CheckpointError, match=r"writing .*checkpoint-2 failed \(PermissionError"):
        _save(tmp_path, 2, model, tok)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]


def test_crash_during_keep_last_delete_leaves_no_partial_checkpoint(tmp_path, model_and_tok, monkeypatch):
    model, tok = model_and_tok
    _save(tmp_path, 1, model, tok)
    real_rmtree = shutil.rmtree

    def crash_midway(path, *a, **k):  # delete one file of checkpoint-1, then "crash"
        if "checkpoint-1" in str(path) and Path(path).exists():
            next(p for p in sorted(Path(path).rglob("*")) if p.is_file()).unlink()
            raise KeyboardInterrupt
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, model, tok)
    monkeypatch.undo()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".deleting-checkpoint-1", "checkpoint-2"]  # the half-deleted one is out of the namespace
    assert ck.list_checkpoints(tmp_path) == [tmp_path / "checkpoint-2"]
    _loadable(tmp_path / "checkpoint-2")
    assert ck.recover_leftovers(tmp_path) == ["removed .deleting-checkpoint-1 (left by an interrupted save or delete)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


def test_recover_leftovers(tmp_path, model_and_tok):
    model, tok = model_and_tok
    _save(tmp_path, 3, model, tok)
    (tmp_path / ".tmp-checkpoint-4").mkdir()  # a save killed mid-write
    (tmp_path / ".tmp-checkpoint-4" / "model.safetensors").write_bytes(b"partial")
    shutil.copytree(tmp_path / "checkpoint-3", tmp_path / ".old-checkpoint-3")  # a re-save that finished
    _save(tmp_path, 5, model, tok, keep_last=2)
    (tmp_path / "checkpoint-5").rename(tmp_path / ".old-checkpoint-5")  # a re-save killed between its two renames
    done = ck.recover_leftovers(tmp_path)
    assert "restored checkpoint-5 from .old-checkpoint-5" in done and len(done) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-5"]
    _loadable(tmp_path / "checkpoint-5")
