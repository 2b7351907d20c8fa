"""Atomic checkpoints, one format for one process and for FSDP2 under ``torchrun``.

``checkpoint-<step>/`` holds:

- the model in Hugging Face format (+ tokenizer), fp32 master weights, loadable by ``from_pretrained`` without vpgea;
  under FSDP2 the shards are gathered and rank 0 writes it once;
- ``optimizer/``: the optimizer state as a ``torch.distributed.checkpoint`` (DCP) directory, each rank writing its own
  shards; DCP reshards on load, so a checkpoint saved on N ranks resumes on M (one process included);
- ``trainer_state.pt`` (rank 0): scheduler, RNG states, step, data position, config.

Resuming loads the model from the Hugging Face files (before sharding), then the optimizer state with
:func:`load_optimizer_state` (after), so ``--resume`` continues exactly where it stopped.

A checkpoint is written into a temporary sibling directory, every file fsynced, then moved into place with
``os.replace``: a crash mid-save leaves the previous checkpoint intact and at worst a ``.tmp-*`` directory behind.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import torch

__all__ = [
    "capture_rng",
    "latest_checkpoint",
    "list_checkpoints",
    "load_optimizer_state",
    "load_trainer_state",
    "restore_rng",
    "save_checkpoint",
]

STATE_FILE = "trainer_state.pt"
OPTIM_DIR = "optimizer"
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
        # This process's device only: under torchrun every rank sees every GPU, and a state per visible device
        # could not be restored where fewer are visible. (Rollouts draw from their own seeds, never from it.)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    cuda = state.get("cuda")
    if isinstance(cuda, torch.Tensor) and torch.cuda.is_available():  # (a list: an older per-device format, skipped)
        torch.cuda.set_rng_state(cuda)


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


@contextlib.contextmanager
def _single_process_dcp():
    """DCP warns on every save/load without a process group ("assuming single process"): that is our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*assuming the intent is to (save|load) in a single process")
        yield


def _hf_state_dict(model, full: dict) -> dict:
    """A gathered ``PolicyModel`` state dict (``model.<hf name>``) as the wrapped Hugging Face model's
    ``save_pretrained`` writes it on its own: its names, and tied parameters (the head tied to the embeddings) once."""
    hf = getattr(model, "model", model)
    if hf is not model and all(k.startswith("model.") for k in full):
        full = {k[len("model."):]: v for k, v in full.items()}
    first: dict[int, str] = {}
    tied = set()
    for name, p in hf.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied.add(name)
        else:
            first[id(p)] = name
    return {k: v for k, v in full.items() if k not in tied}


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    model,
    tokenizer,
    trainer_state: dict,
    optimizer: torch.optim.Optimizer | None = None,
    keep_last: int = 1,
    info=None,
) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically; keep the newest ``keep_last`` checkpoints.

    model: a ``PolicyModel`` (or anything with ``save_pretrained(dir, state_dict=...)``), FSDP2-sharded or not.
    trainer_state: picklable dict (scheduler state, RNG states, data position, config, ...), written by rank 0.
    optimizer: saved with DCP (sharded under FSDP2). info: ``vpgea.distributed.DistInfo``; with several ranks this
    is a collective, every rank must call it.
    """
    from vpgea.distributed import DistInfo, barrier, full_state_dict

    info = info or DistInfo()
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"  # the same name on every rank: DCP writes each rank's shards into it
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(info)
    if info.enabled:
        full = full_state_dict(model, info)  # collective; the full CPU state on rank 0 only
        if info.is_main:
            model.save_pretrained(tmp, state_dict=_hf_state_dict(model, full))
        del full
    else:
        model.save_pretrained(tmp)
    if optimizer is not None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        with _single_process_dcp():
            dcp.save({"optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(tmp / OPTIM_DIR))
    barrier(info)  # every shard is written before rank 0 publishes the directory
    if info.is_main:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save({**trainer_state, "step": step, "world_size": info.world_size}, tmp / STATE_FILE)
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same step: move the old one aside first (os.replace needs an empty target)
            old = root / f".old-checkpoint-{step}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        for stale in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            if stale != final:
                shutil.rmtree(stale, ignore_errors=True)
    barrier(info)
    return final


def load_optimizer_state(checkpoint_dir: str | os.PathLike, model, optimizer: torch.optim.Optimizer) -> None:
    """Load the DCP optimizer state of a checkpoint into ``optimizer`` (of ``model``, sharded as it is now: the
    checkpoint may come from another number of ranks). A collective under FSDP2."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    path = Path(checkpoint_dir) / OPTIM_DIR
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"--resume: {str(path)!r} holds no optimizer state (a DCP '.metadata' file)")
    state = {"optim": get_optimizer_state_dict(model, optimizer)}  # initialises the state tensors DCP loads into
    with _single_process_dcp():
        dcp.load(state, checkpoint_id=str(path))
    set_optimizer_state_dict(model, optimizer, state["optim"])


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
