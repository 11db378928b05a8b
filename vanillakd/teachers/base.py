"""``Teacher``: what the epoch loop (``engine.train_one_epoch``) asks of a teacher, live or cached."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Teacher(Protocol):
    """The teacher as the training loop sees it: ``FrozenTeacher`` (``teachers.live``) runs the model on each
    batch, ``CachedTeacher`` (``teachers.cache``) reads the same outputs from disk. Both are ``nn.Module`` s
    (``.to()`` / ``.eval()`` / a ``.train()`` that never leaves inference mode); the cache also has
    ``describe()`` and ``val_predictions(...)``, which the run wiring calls on it by name."""

    def batch_output(self, x: torch.Tensor, target: torch.Tensor, epoch: int, step: int):
        """The teacher's output (logits, or ``features.Features`` for feature methods) for the batch ``x`` /
        ``target`` at ``step`` of ``epoch``, called once per batch and shared by every student."""
        ...

    def check(self) -> None:
        """Raise ``UserError`` when the batches served so far were wrong (a cache whose fingerprints do not
        match this stream); called at log points only, as it may read from the device."""
        ...
