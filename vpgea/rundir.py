"""What a run directory needs besides checkpoints: one run at a time, files replaced whole, resumed settings checked.

- :class:`RunLock`: ``run.lock`` in the output directory, held (``flock``) for the whole run and naming its holder
  (pid, host, start time); a second run on the same directory refuses with that name instead of both writing into
  it. The kernel drops the lock when its holder dies, even by ``kill -9``, so a stale file never blocks a new run.
- :func:`atomic_write_text`: write a sibling temporary file, fsync it, rename it over the target.
- :func:`config_differences`: the settings a resumed run would change, split into those that change what is
  trained (always refused) and the harmless ones (accepted with an explicit flag).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

__all__ = ["LOCK_FILE", "RunLock", "RunLocked", "atomic_write_text", "config_differences", "describe_differences"]

LOCK_FILE = "run.lock"


class RunLocked(RuntimeError):
    """Another process holds the output directory's run lock."""


class RunLock:
    """An exclusive ``flock`` on ``directory/run.lock`` whose text names the holder. Use as a context manager, or
    :meth:`acquire` / :meth:`release`. Advisory: it excludes other vpgea runs, nothing else. Needs a filesystem with
    working ``flock`` (local disks, and NFSv4 and Lustre as configured on most clusters)."""

    def __init__(self, directory: str | os.PathLike, what: str = "run") -> None:
        self.path = Path(directory) / LOCK_FILE
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's text must survive us
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            try:
                holder = self.path.read_text().strip() or "a process that has not written its name yet"
            except OSError:
                holder = "unknown"
            raise RunLocked(f"{self.path.parent} is in use by another {self.what} ({holder}); wait for it to finish, "
                            f"stop it, or choose another output directory ({self.path} is its lock)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            # Remove the file while still holding the lock: a process that opened it in the meantime fails to lock it
            # and names us (we are still running); one that opens it afterwards creates a new file and proceeds.
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` by a file holding ``text`` so that a crash leaves either the old file or the new one whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def config_differences(saved: dict, new: dict, *, harmless: set[str], ignored: set[str]) -> tuple[list, list]:
    """Compare two settings dicts (``dataclasses.asdict`` of a config, or any flat dict). Returns
    ``(changes, harmless_changes)``: lists of ``(name, saved value, new value)``, sorted by name. Names in
    ``ignored`` are never compared (where the output goes, the resume flag itself), nor names only one side has (a
    setting added since the checkpoint was written had its default there)."""
    changes, soft = [], []
    for name in sorted((set(saved) & set(new)) - ignored):
        a, b = saved[name], new[name]
        if isinstance(a, list):  # tuples come back as lists from JSON
            a = tuple(a)
        if isinstance(b, list):
            b = tuple(b)
        if a != b:
            (soft if name in harmless else changes).append((name, a, b))
    return changes, soft


def describe_differences(diffs: list, saved_in: str = "the checkpoint") -> str:
    """``--seed: 0 in the checkpoint, 1 now; --lr: ...`` for a list of ``(name, saved, new)`` (names as flags)."""
    return "; ".join(f"--{n.replace('_', '-')}: {a!r} in {saved_in}, {b!r} now" for n, a, b in diffs)
