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
Parameters are checked finite before anything is written. A failed save (a full disk, say) removes its temporary
directory and raises :class:`CheckpointError` naming the path and, when the disk is full, the bytes it needs. A
checkpoint dropped by ``keep_last`` is first renamed to ``.deleting-checkpoint-<step>`` and then deleted, so a crash
mid-delete never leaves a partial directory under a ``checkpoint-<step>`` name. :func:`recover_leftovers`, called
when a run starts, removes what interrupted saves and deletions left and puts back a checkpoint that a crash caught
between the two renames of a re-save.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from vpgea.rng import capture_rng, restore_rng  # noqa: F401  (re-exported)

__all__ = [
    "CheckpointError",
    "NonFiniteParameters",
    "capture_rng",
    "latest_checkpoint",
    "list_checkpoints",
    "load_optimizer_state",
    "load_trainer_state",
    "recover_leftovers",
    "restore_rng",
    "save_checkpoint",
]

STATE_FILE = "trainer_state.pt"
OPTIM_DIR = "optimizer"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_LEFTOVER = re.compile(r"^\.(tmp|old|deleting)-checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous one is intact."""


class NonFiniteParameters(FloatingPointError):
    """A parameter holds NaN or inf: the run diverged, and saving it would overwrite good checkpoints."""


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


def _first_non_finite(model) -> str | None:
    """The name of the first parameter (this rank's shard of it under FSDP2) holding NaN or inf, else None."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = p.to_local() if hasattr(p, "to_local") else p
            if not bool(torch.isfinite(t).all()):
                return name
    return None


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _disk_full(exc: BaseException) -> bool:
    """Whether a failed write ran out of space. The writers report it differently: an ``OSError`` with ENOSPC or
    EDQUOT (Python files), safetensors' ``SafetensorError`` with only the OS message, DCP's ``CheckpointException``
    holding the ranks' ``OSError`` s, torch.save's ``RuntimeError`` with neither (the caller then compares free space
    with what the save needs)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = repr(e)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def recover_leftovers(output_dir: str | os.PathLike) -> list[str]:
    """Clean what interrupted saves and deletions left in ``output_dir``; call it only while holding the run lock
    (another run's save in progress looks the same). A ``.old-checkpoint-N`` whose ``checkpoint-N`` is missing is
    the only copy of that step (a crash between the two renames of a re-save): it is renamed back. Everything else
    (``.tmp-checkpoint-*``, ``.deleting-checkpoint-*``, a redundant ``.old-*``) is deleted. Returns what was done,
    one line per directory."""
    root = Path(output_dir)
    done: list[str] = []
    if not root.is_dir():
        return done
    for p in sorted(root.iterdir()):
        m = _LEFTOVER.match(p.name)
        if not m or not p.is_dir():
            continue
        final = root / f"checkpoint-{m.group(2)}"
        if m.group(1) == "old" and not final.exists() and (p / STATE_FILE).is_file():
            os.replace(p, final)
            done.append(f"restored {final.name} from {p.name}")
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name} (left by an interrupted save or delete)")
    if done:
        _fsync_dir(root)
    return done


def _drop(path: Path) -> None:
    """Delete a checkpoint directory: rename it out of the ``checkpoint-N`` namespace first, then delete it."""
    aside = path.with_name(f".deleting-{path.name}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    _fsync_dir(path.parent)
    shutil.rmtree(aside, ignore_errors=True)


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
    from vpgea.distributed import DistInfo, all_ranks_agree, barrier

    info = info or DistInfo()
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"  # the same name on every rank: DCP writes each rank's shards into it
    bad = _first_non_finite(model)
    if not all_ranks_agree(bad is None, info):
        where = f"parameter {bad}" if bad else "a parameter on another rank"
        last = latest_checkpoint(root)
        raise NonFiniteParameters(f"step {step}: {where} is NaN or inf; not saving it over good checkpoints (the "
                                  f"newest is {last if last else 'none'}); lower --lr or --grad-clip and resume")
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(info)
    try:
        _write(tmp, model, tokenizer, trainer_state, optimizer, step, info)
    except BaseException as e:  # a full disk, an interrupt, ...: roll back to the previous checkpoint
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise _write_error(e, final, root, model, optimizer) from e  # (DCP's CheckpointException is a BaseException)
    if info.is_main:
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
                _drop(stale)
    barrier(info)
    return final


def _write_error(e: BaseException, final: Path, root: Path, model, optimizer) -> CheckpointError:
    """The error for a failed save of ``final``: a full disk named as such, with the bytes the save needs (the
    newest checkpoint's size, else the parameters' bytes, three times over with Adam's two moments)."""
    prev = latest_checkpoint(root)
    if prev is not None:
        need = _tree_bytes(prev)
    else:
        n = sum(p.numel() * p.element_size() for p in model.parameters())
        need = n * (3 if optimizer is not None else 1)
    free = shutil.disk_usage(root).free
    keep = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
    if _disk_full(e) or free < need:
        return CheckpointError(f"no space left on the device of {root} while writing {final.name}: it needs about "
                               f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free; {keep}, and the partial "
                               "save was removed. Free some space and resume.")
    return CheckpointError(f"writing {final} failed ({type(e).__name__}: {e}); {keep}, and the partial save was "
                           "removed")


def _write(tmp: Path, model, tokenizer, trainer_state: dict, optimizer, step: int, info) -> None:
    from vpgea.distributed import barrier, full_state_dict

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
