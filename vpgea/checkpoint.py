"""Atomic checkpoints: ``checkpoint-<step>/`` = a Hugging Face model directory (+ tokenizer) and ``trainer_state.pt``
(optimizer, scheduler, RNG states, data position, config), so ``--resume`` continues exactly where it stopped.

A checkpoint is written into a temporary sibling directory, every file fsynced, then moved into place with
``os.replace``: a crash mid-save leaves the previous checkpoint intact and at worst a ``.tmp-*`` directory behind.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import torch

__all__ = ["capture_rng", "latest_checkpoint", "list_checkpoints", "load_trainer_state", "restore_rng", "save_checkpoint"]

STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def capture_rng() -> dict:
    """Python, torch CPU and CUDA RNG states."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest step first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    model,
    tokenizer,
    trainer_state: dict,
    keep_last: int = 1,
) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically; keep the newest ``keep_last`` checkpoints.

    model: anything with ``save_pretrained(dir)`` (``PolicyModel`` or a transformers model).
    trainer_state: picklable dict (optimizer/scheduler state dicts, RNG states, data position, config, ...).
    """
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save({**trainer_state, "step": step}, tmp / STATE_FILE)
    _fsync_tree(tmp)
    if final.exists():  # re-saving the same step: move the old one aside first (os.replace needs an empty target)
        old = root / f".old-checkpoint-{step}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    for stale in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        if stale != final:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load_trainer_state(checkpoint_dir: str | os.PathLike) -> dict:
    """The ``trainer_state.pt`` of a checkpoint, with a clear error when the directory is not one."""
    path = Path(checkpoint_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume: checkpoint directory {str(path)!r} does not exist")
    state_file = path / STATE_FILE
    if not state_file.is_file():
        latest = latest_checkpoint(path)  # an output dir was given: take its newest checkpoint
        if latest is None:
            raise FileNotFoundError(f"--resume: {str(path)!r} holds no {STATE_FILE} and no checkpoint-<step>/")
        state_file = latest / STATE_FILE
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    state["_dir"] = str(state_file.parent)
    return state
