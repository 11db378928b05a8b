"""A run's folder: chosen so that no earlier run is ever written into (except by ``--resume``), and locked
so that two live processes never write into one folder.

- A new run takes ``--output/--experiment``; when that folder already holds something, it takes the first
  free ``NAME-1``, ``NAME-2`` ... instead (timm's suffix convention) and says so.
- ``--resume auto`` continues the run in ``--output/--experiment``, and starts it there when it has no
  checkpoint yet: one command line can be requeued for ever.
- The lock is ``.lock`` in the folder, a POSIX record lock (``lockf``) held by rank 0 for the whole run. The
  kernel drops it when the process dies, so a lock file left by a killed run is stale and taken over. A
  ``flock`` would not do: forked DataLoader workers share it and keep a killed run's folder locked until
  they notice their parent is gone; record locks belong to one process and work on NFS.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import socket
import time
from datetime import datetime
from pathlib import Path

from .checkpoint import os_reason, remove_stale_temps, writable_folder
from .config import RunConfig
from .errors import UserError

log = logging.getLogger("vanillakd")

LOCK_NAME = ".lock"
NAME_BYTES = 240
CHECKPOINT_GLOBS = ("last.pth.tar", "recovery.pth.tar", "checkpoint-*.pth.tar")


class RunLock:
    """An exclusive record lock on ``folder/.lock``; the file says who holds it (pid, host, start time)."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock; False when a live process holds it. A lock file nobody holds is taken over."""
        if self.path.is_symlink() or self.path.is_dir():
            raise UserError(f"{self.path} is not a lock file but a {'link' if self.path.is_symlink() else 'folder'}"
                            ": remove it, then start again")
        try:  # O_NOFOLLOW: a link planted at .lock is never followed (its target would be overwritten)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as e:
            raise UserError(f"run folder {self.path.parent} is not writable: {os_reason(e, self.path.parent)}"
                            ) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EACCES, errno.EAGAIN):
                return False
            # a filesystem without locks: no guard, but the run goes on
            log.warning(f"cannot lock {self.path} on this filesystem: nothing stops a second run in this folder")
            return True
        try:
            previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.ftruncate(fd, 0)
            os.pwrite(fd, _holder().encode(), 0)
        except OSError as e:  # a full disk: say so, and hold nothing
            os.close(fd)
            raise UserError(f"cannot write the lock file {self.path}: {os_reason(e, self.path.parent)}") from None
        if previous:
            log.warning(f"taking over the stale lock of a run that ended without releasing it ({previous})")
        self._fd = fd
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown process"
        except OSError:
            return "unknown process"

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in this order, so no one takes over a file being removed)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def _holder() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"


def output_root(cfg: RunConfig) -> Path:
    return Path(cfg.loop.output or "./output/train")


def experiment_folder(root: Path, experiment: str) -> Path:
    """``root/experiment``, refusing names that lead outside ``root`` (absolute, ``..``)."""
    parts = Path(experiment).parts
    if Path(experiment).is_absolute() or ".." in parts or not parts:
        raise UserError(f"--experiment {experiment!r} must name a folder inside --output (a relative name, without "
                        "'..')")
    # room for a '-N' suffix within the usual 255-byte limit of a file name
    long = next((p for p in parts if len(os.fsencode(p)) > NAME_BYTES), None)
    if long is not None:
        raise UserError(f"--experiment: the name {long[:40]!r}... is {len(os.fsencode(long))} bytes long; at most "
                        f"{NAME_BYTES} are allowed")
    return root / experiment


def has_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` (or a student's folder in it) holds a checkpoint to continue from."""
    for base in [folder, *(p for p in folder.iterdir() if p.is_dir())] if folder.is_dir() else []:
        if any(any(base.glob(g)) for g in CHECKPOINT_GLOBS):
            return True
    return False


def _is_free(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def _make_dir(path: Path) -> None:
    writable_folder(path, "output dir")  # made, and probed: one line if it cannot take files


def _claim_new(root: Path, name: str) -> tuple[Path, RunLock]:
    """The first of ``root/name``, ``root/name-1`` ... that is free (absent or empty), made and locked."""
    for i in range(10_000):
        path = root / (name if i == 0 else f"{name}-{i}")
        if not _is_free(path):
            continue
        created = not path.exists()
        _make_dir(path)
        lock = RunLock(path)
        try:
            acquired = lock.acquire()
        except UserError:
            if created:  # leave no empty folder (or lock file) behind for the next run to skip
                shutil.rmtree(path, ignore_errors=True)
            raise
        if not acquired:
            continue  # another run claimed this one a moment ago
        if any(p.name != LOCK_NAME for p in path.iterdir()):
            lock.release()  # another run wrote here between our checks: not ours
            continue
        return path, lock
    raise UserError(f"no free run folder name for {root / name}: remove some of the old ones")


def _lock_existing(path: Path) -> RunLock:
    lock = RunLock(path)
    if not lock.acquire():
        raise UserError(f"run folder {path} is in use by another live process ({lock.holder()}); wait for it to "
                        "end, or start a new run with another --experiment")
    return lock


def default_name(cfg: RunConfig) -> str:
    methods = "+".join(dict.fromkeys(s.kd_loss for s in cfg.students))
    return "-".join([datetime.now().strftime("%Y%m%d-%H%M%S"), cfg.students[0].model, methods])


def open_run_folder(cfg: RunConfig) -> tuple[Path, RunLock, bool, bool]:
    """Choose, make and lock the run's folder (rank 0 only). Returns (folder, lock, created, resume): whether
    this run created the folder, and whether there is a checkpoint to resume from."""
    root, resume, experiment = output_root(cfg), cfg.checkpoint.resume, cfg.loop.experiment
    if resume == "auto":
        if not experiment:
            raise UserError("--resume auto needs --experiment NAME to find the run to continue")
        path = experiment_folder(root, experiment)
        created = not path.exists()
        _make_dir(path)
        lock = _lock_existing(path)
        resumable = has_checkpoint(path)
        if not resumable:
            log.info(f"--resume auto: {path} has no checkpoint yet, so the run starts there")
        _remove_stale(path)
        return path, lock, created, resumable
    if resume:
        path = Path(resume)
        if not path.exists():
            raise UserError(f"--resume {path} does not exist")
        folder = path if path.is_dir() else path.parent
        lock = _lock_existing(folder)
        _remove_stale(folder)
        return folder, lock, False, True
    name = default_name(cfg)
    if experiment:
        wanted = experiment_folder(root, experiment)
        root, name = wanted.parent, wanted.name
    path, lock = _claim_new(root, name)
    if experiment and path.name != name:
        log.warning(f"--experiment {experiment}: {root / name} holds an earlier run, which is left as it is; this "
                    f"run writes to {path} (continue the earlier one with --resume auto)")
    return path, lock, True, False


def _remove_stale(folder: Path) -> None:
    """Temp files of saves a killed run left behind (the lock is held: nobody is saving here)."""
    removed = [p for base in [folder, *(p for p in folder.iterdir() if p.is_dir())]
               for p in remove_stale_temps(base)]
    if removed:
        log.info(f"removed {len(removed)} unfinished temp file(s) a killed run left in {folder}")
