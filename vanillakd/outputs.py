"""A run's output folder, laid out as timm's: args.yaml, summary.csv, log.txt, last / model_best checkpoints."""
from __future__ import annotations

import csv
import io
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import atomic_save, atomic_write_text, copy_file, os_reason, plain
from .errors import UserError

LOG_FORMAT = "%(asctime)s %(message)s"
_EPOCH_FILE = re.compile(r"checkpoint-(\d+)\.pth\.tar")


def writes_to(logger: logging.Logger, path: Path) -> bool:
    """Whether ``logger`` already has a file handler on ``path`` (one handler per destination)."""
    target = os.path.abspath(path)
    return any(isinstance(h, logging.FileHandler) and h.baseFilename == target for h in logger.handlers)


def add_log_file(logger: logging.Logger, path: Path) -> logging.Handler:
    """Append ``logger``'s lines to ``path``. A log that has other names (hard links, e.g. a ``cp -al``
    backup of the run) is first replaced by a copy of its own, so the appends never reach the backup."""
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_nlink > 1:
            copy_file(path, path)
        handler = _LogFile(path)
    except OSError as e:
        raise UserError(f"could not open the log file {path}: {os_reason(e, path.parent)}") from None
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger.addHandler(handler)
    return handler


class _LogFile(logging.FileHandler):
    """A log file whose failed write (a full disk) is one line on stderr, once, not a traceback per record:
    the run goes on, and the checkpoint it writes next reports the disk's state as an error."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if self.failed:
            return
        self.failed = True
        e = sys.exc_info()[1]
        reason = os_reason(e, Path(self.baseFilename).parent) if isinstance(e, OSError) else repr(e)
        print(f"vanillakd: warning: could not write the log file {self.baseFilename}: {reason}; its later lines "
              "are lost", file=sys.stderr)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (it may be replaced, e.g. by a notebook or pytest),
    through tqdm while a progress bar is on screen, so a log line never lands inside the bar."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass

    def emit(self, record: logging.LogRecord) -> None:
        bars = sys.modules.get("tqdm")
        if bars is None or not getattr(bars.tqdm, "_instances", None):
            return super().emit(record)
        try:
            bars.tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # as logging does: a failed write never stops the run
            self.handleError(record)


def setup_console_logging(level: int = logging.INFO) -> logging.Logger:
    logger = logging.getLogger("vanillakd")
    logger.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        logger.addHandler(handler)
    logger.propagate = False
    return logger


def write_args(path: Path, args: Mapping[str, Any]) -> None:
    atomic_write_text(yaml.safe_dump(plain(dict(args)), sort_keys=False), path / "args.yaml")


class Summary:
    """summary.csv, one row per epoch; rewritten whole (atomically) so a crash never leaves half a row."""

    def __init__(self, path: Path, write: bool = True):
        self.path = path
        self.write = write
        self.rows: list[dict[str, Any]] = []

    def load(self, keep: Callable[[dict[str, str]], bool] = lambda row: True) -> None:
        """Take up the rows already on disk (on resume), dropping those ``keep`` rejects."""
        if self.path.is_file():
            self.rows = [r for r in read_summary(self.path) if keep(r)]

    def add(self, row: Mapping[str, Any]) -> None:
        self.rows.append(dict(row))
        self._write()

    def _write(self) -> None:
        if not self.write:
            return
        fields: list[str] = []
        for r in self.rows:
            fields.extend(k for k in r if k not in fields)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows({k: readable(v) for k, v in r.items()} for r in self.rows)
        atomic_write_text(buf.getvalue(), self.path)


def readable(value: Any) -> Any:
    """A float as a person reads it: 6 significant digits (0.00039999999999999996 -> 0.0004); full precision
    stays in the checkpoints."""
    return float(f"{value:.6g}") if isinstance(value, float) else value


def read_summary(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class CheckpointWriter:
    """Tracks the best eval metric and writes the best checkpoint when it improves."""

    def __init__(self, out_dir: Path, higher_is_better: bool = True, write: bool = True):
        self.out_dir = out_dir
        self.higher_is_better = higher_is_better
        self.write = write
        self.best: float | None = None
        self.best_epoch: int | None = None

    def save_last(self, state: dict[str, Any], epoch: int, history: int = 0) -> None:
        """``last.pth.tar``, plus ``checkpoint-<epoch>.pth.tar`` (a copy of it) keeping the newest ``history`` of
        them; older ones are removed only once the new one is safely on disk."""
        last = self.out_dir / "last.pth.tar"
        if not self.write:
            return
        atomic_save(state, last)
        if history <= 0:
            return
        # an independent copy, not a hard link: damage to one name (an in-place write, a truncation, bit rot)
        # must not reach the backup the other is
        copy_file(last, self.out_dir / f"checkpoint-{epoch}.pth.tar")
        # only our checkpoint-<epoch> files: a user's checkpoint-final.pth.tar is neither sorted nor pruned
        numbered = [p for p in self.out_dir.glob("checkpoint-*.pth.tar") if _EPOCH_FILE.fullmatch(p.name)]
        kept = sorted(numbered, key=lambda p: int(_EPOCH_FILE.fullmatch(p.name).group(1)))
        for old in kept[:-history]:
            old.unlink(missing_ok=True)

    def is_better(self, metric: float | None) -> bool:
        if metric is None:
            return False
        if self.best is None:
            return True
        return metric > self.best if self.higher_is_better else metric < self.best

    def save_best(self, make_state: Callable[[], dict[str, Any]], epoch: int, metric: float | None,
                  name: str = "model_best") -> bool:
        """Write ``name.pth.tar`` when ``metric`` improves on the best so far; return whether it did."""
        if not self.is_better(metric):
            return False
        # the best is this epoch's before the state is made: the file records itself as the best
        self.best, self.best_epoch = metric, epoch
        if self.write:
            atomic_save(make_state(), self.out_dir / f"{name}.pth.tar")
        return True
