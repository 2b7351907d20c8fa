"""Experiment trackers (``--report-to tensorboard wandb``): the ``metrics.jsonl`` records, from rank 0.

Each step's record goes to every selected tracker as scalars named ``train/<key>`` at global step ``record["step"]``:
every number in the record except ``step`` (``None`` entries, such as the posterior length in grpo-lp, are left
out), so a tracker holds exactly the scalars of ``metrics.jsonl``. The run's resolved config is attached: a
``config`` text entry in TensorBoard, the run config in W&B.

- ``tensorboard``: event files in ``<run dir>/tensorboard`` (needs the ``tensorboard`` package: ``pip install
  'vpgea[tensorboard]'``). A resumed run purges the events after the checkpoint's step, which it recomputes.
- ``wandb``: a W&B run in project ``$WANDB_PROJECT`` (default ``vpgea``) with files under ``<run dir>/wandb``
  (``pip install 'vpgea[wandb]'``). ``WANDB_MODE=offline`` logs without network or account (``wandb sync`` uploads
  later). The run id is kept in ``<run dir>/wandb_run_id``, so ``--resume`` continues the same W&B run.

Trackers exist on rank 0 only; on other ranks, or with no tracker selected, :class:`Tracker` does nothing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

__all__ = ["BACKENDS", "Tracker", "check_report_to", "open_tracker", "scalars"]

BACKENDS = ("tensorboard", "wandb")
_EXTRA = {"tensorboard": "tensorboard", "wandb": "wandb"}
WANDB_ID_FILE = "wandb_run_id"


def check_report_to(report_to) -> None:
    """At start-up, before any model is loaded: ValueError for an unknown tracker or one whose package is missing."""
    for name in report_to:
        if name not in BACKENDS:
            raise ValueError(f"--report-to {name}: unknown tracker; expected 'none' or any of {BACKENDS}")
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"--report-to {name}: the {name} package is not installed "
                             f"(pip install 'vpgea[{_EXTRA[name]}]')")


def scalars(record: dict, prefix: str = "train/") -> dict[str, float]:
    """The loggable scalars of a metrics record: every finite number except ``step``, as ``prefix + key``."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[prefix + key] = float(value)
    return out


class Tracker:
    """Sends metrics records to TensorBoard and/or W&B; a context manager that closes them (W&B marks a run that
    ended by an exception as failed).

    ``report_to``: tracker names (a subset of :data:`BACKENDS`); ``run_dir``: where their files go; ``config``: the
    resolved config (plain data) to attach; ``name``: the run name; ``resume_step``: the checkpoint step a resumed run
    starts after (0 for a fresh run); ``enabled``: False on ranks other than 0.
    """

    def __init__(self, report_to=(), run_dir: str | os.PathLike = ".", *, config: dict | None = None,
                 name: str | None = None, resume_step: int = 0, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self._tb = None
        self._wandb = None
        if not enabled or not report_to:
            return
        check_report_to(report_to)
        config = config or {}
        try:
            if "tensorboard" in report_to:
                self._tb = self._open_tensorboard(config, resume_step)
            if "wandb" in report_to:
                self._wandb = self._open_wandb(config, name or self.run_dir.name, resume_step)
        except BaseException:
            self.close()
            raise

    def _open_tensorboard(self, config: dict, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops the events logged after its checkpoint (a crashed run's last steps),
        # which it is about to log again.
        writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step
                               else None)
        text = json.dumps(config, indent=2)
        writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), global_step=resume_step)
        writer.flush()
        return writer

    def _open_wandb(self, config: dict, name: str, resume_step: int):
        import wandb

        self.run_dir.mkdir(parents=True, exist_ok=True)
        id_file = self.run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume_step and id_file.is_file() else None
        try:
            run = wandb.init(project=os.environ.get("WANDB_PROJECT", "vpgea"), name=name, dir=str(self.run_dir),
                             config=config, id=run_id, resume="allow" if run_id else None)
        except Exception as e:
            raise ValueError(f"--report-to wandb: wandb.init failed ({type(e).__name__}: {e}); to log without "
                             "network or account, set WANDB_MODE=offline") from e
        id_file.write_text(run.id + "\n")
        return run

    @property
    def active(self) -> bool:
        return self._tb is not None or self._wandb is not None

    def log(self, record: dict) -> None:
        """Log one metrics record (as written to ``metrics.jsonl``) at step ``record["step"]``."""
        if not self.active:
            return
        step = int(record["step"])
        values = scalars(record)
        if self._tb is not None:
            for tag, value in values.items():
                self._tb.add_scalar(tag, value, global_step=step)
            self._tb.flush()  # a step takes seconds to minutes: keep the event file current
        if self._wandb is not None:
            self._wandb.log(values, step=step, commit=True)  # a record is a whole step: finish it now

    def close(self, failed: bool = False) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish(exit_code=1 if failed else 0)
            self._wandb = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


def open_tracker(cfg, run_dir: str | os.PathLike, *, enabled: bool = True, resume_step: int = 0) -> Tracker:
    """The trainer's tracker for one training run in ``run_dir`` (the output directory, or a toy run's
    ``<output_dir>/<mode>``): ``cfg.report_to`` with ``cfg`` attached, named ``cfg.run_name`` (default: the output
    directory's name), plus ``/<mode>`` for a toy run's sub-run."""
    from vpgea.config import config_dict

    run_dir, root = Path(run_dir), Path(cfg.output_dir)
    name = cfg.run_name or root.resolve().name
    if run_dir.resolve() != root.resolve():
        try:
            name += "/" + run_dir.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            name += "/" + run_dir.name
    return Tracker(cfg.report_to, run_dir, config=config_dict(cfg), name=name, resume_step=resume_step,
                   enabled=enabled)
