"""Run directories: the run lock, whole-file replacement, and the settings comparison behind --resume."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from vpgea.rundir import LOCK_FILE, RunLock, RunLocked, atomic_write_text, config_differences, describe_differences

_HOLD = ("import sys, time; from vpgea.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
         "print('held', flush=True); time.sleep(600)")


def _holder(directory):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_is_refused_naming_the_holder(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(RunLocked) as e:
            RunLock(tmp_path).acquire()
        msg = str(e.value)
        assert f"pid {proc.pid}" in msg and socket.gethostname() in msg and str(tmp_path) in msg
        assert (tmp_path / LOCK_FILE).read_text().startswith(f"pid {proc.pid} ")  # the refusal did not truncate it
    finally:
        proc.kill()
        proc.wait()
    # kill -9 left the file behind, but the kernel dropped the lock: a new run proceeds and names itself.
    assert (tmp_path / LOCK_FILE).exists()
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} ")
    assert not (tmp_path / LOCK_FILE).exists()  # a clean release removes it


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()


def test_atomic_write_text_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic_write_text(path, "old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_config_differences():
    saved = {"seed": 0, "lr": 1e-4, "max_steps": 60, "output_dir": "a", "betas": [0.9, 0.99], "old_only": 1}
    new = {"seed": 1, "lr": 1e-4, "max_steps": 90, "output_dir": "b", "betas": (0.9, 0.99), "new_only": 2}
    changes, harmless = config_differences(saved, new, harmless={"max_steps"}, ignored={"output_dir"})
    assert changes == [("seed", 0, 1)] and harmless == [("max_steps", 60, 90)]
    assert describe_differences(changes) == "--seed: 0 in the checkpoint, 1 now"

