"""What ``--resume`` compares between a checkpoint and the run continuing it.

The exact-replay guarantee (a resumed run ends where the uninterrupted one does) holds only when the
recipe, the data and the launch are the ones the checkpoint was trained with. So every flag must match
except an allowed few, which are logged: the run's length (a later ``--epochs``), where outputs go, logging
and checkpoint cadence, and settings of the machine it continues on (workers, precision, device, compile,
data pipeline). The last group keeps the recipe but changes rounding or augmentation draws, so the log says
that the continued run will no longer repeat the original bit for bit. The class list, the training files'
digest, the teacher's weights and the world size are compared too.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from .checkpoint import plain, training_flags
from .errors import UserError

log = logging.getLogger("vanillakd")

# flags that may change on resume (said in the log): run length, where outputs go, logging and checkpoint
# cadence, and speed settings of the machine the run continues on
MAY_CHANGE = frozenset({
    "epochs", "cooldown_epochs", "workers", "log_interval", "progress", "output", "experiment", "data_dir",
    "no_resume_opt", "trust_checkpoint", "checkpoint_hist", "recovery_interval", "eval_interval",
    "eval_interval_end", "validation_batch_size", "device", "amp", "amp_dtype", "pin_mem", "fused_opt",
    "channels_last", "compile", "compile_mode", "log_tensorboard", "log_wandb", "dist_timeout", "max_train_steps",
    "save_safetensors", "max_nonfinite", "teacher_pretrained", "teacher_cache", "bad_images", "data_pipeline",
    "dataset_download", "start_epoch",
})
# of those, the ones that change rounding (precision, kernels) or the augmentation draws (the pipeline)
NOT_EXACT = frozenset({"amp", "amp_dtype", "device", "compile", "compile_mode", "channels_last", "fused_opt",
                       "data_pipeline"})
# records, not settings
IGNORED = frozenset({"resume", "config", "local_rank", "train_images"})


def run_record(classes: Sequence[str], data_digest: str, world_size: int,
               teacher_sha256: str | None = None) -> dict[str, Any]:
    """What a checkpoint records about its data, teacher and launch, for this comparison (``teacher_sha256``:
    the digest of the ``--teacher-pretrained`` file, whose path may move)."""
    record = {"classes": list(classes), "data_digest": data_digest, "world_size": world_size}
    if teacher_sha256:
        record["teacher_sha256"] = teacher_sha256
    return record


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value)) if value else "[]"
    return str(value)


def flag_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, allowed) changes between a checkpoint's flags and this run's, as ``--flag old -> new``.
    A flag one of the two lacks (another version's) is not compared."""
    refused, allowed = [], []
    for name in sorted(set(saved) & set(now) - IGNORED):
        old, new = plain(saved[name]), plain(now[name])
        if old == new:
            continue
        text = f"{_flag(name)} {_shown(old)} -> {_shown(new)}"
        (allowed if name in MAY_CHANGE else refused).append(text)
    return refused, allowed


def class_change(saved: Sequence[str], now: Sequence[str]) -> str | None:
    """How two class lists differ, in words (None when they are the same list)."""
    saved, now = list(saved), list(now)
    if saved == now:
        return None
    if sorted(saved) == sorted(now):
        return "the same classes in another order (every label would change meaning)"
    gone, new = [c for c in saved if c not in now], [c for c in now if c not in saved]
    parts = [f"{len(saved)} -> {len(now)} classes"]
    if gone:
        parts.append(f"not in the data: {', '.join(gone[:3])}" + (" ..." if len(gone) > 3 else ""))
    if new:
        parts.append(f"new: {', '.join(new[:3])}" + (" ..." if len(new) > 3 else ""))
    return "classes differ (" + "; ".join(parts) + ")"


def record_changes(ckpt: Mapping[str, Any], record: Mapping[str, Any]) -> list[str]:
    """Differences in classes, training files and world size (what the checkpoint does not record is skipped)."""
    out = []
    classes = class_change(ckpt["classes"], record["classes"]) if "classes" in ckpt else None
    if classes:
        out.append(classes)
    elif "data_digest" in ckpt and ckpt["data_digest"] != record["data_digest"]:
        out.append("the training files or their labels differ (data digest)")
    if "teacher_sha256" in ckpt and "teacher_sha256" in record and ckpt["teacher_sha256"] != record["teacher_sha256"]:
        out.append("the teacher's weights differ (the --teacher-pretrained file's digest)")
    if "world_size" in ckpt and int(ckpt["world_size"]) != int(record["world_size"]):
        out.append(f"world size {ckpt['world_size']} -> {record['world_size']} processes")
    return out


def check_resume(ckpt: Mapping[str, Any], path: str, flags: Mapping[str, Any], record: Mapping[str, Any],
                 say_allowed: bool = True) -> None:
    """Refuse, in one line listing every difference, a checkpoint this run may not continue; log the allowed
    changes. Checkpoints of other tools (timm's, the seed's: no ``setting``) are compared by architecture only,
    elsewhere: their flags are another program's."""
    if "setting" not in ckpt:
        return
    refused, allowed = flag_changes(training_flags(ckpt), flags)
    refused = record_changes(ckpt, record) + refused
    if refused:
        raise UserError(f"--resume {path}: this run differs from the one it would continue: {'; '.join(refused)}. "
                        "Continue it with its own settings, or start a new run (--initial-checkpoint starts "
                        "from its weights)")
    if allowed and say_allowed:
        inexact = [a for a in allowed if a.split()[0].removeprefix("--").replace("-", "_") in NOT_EXACT]
        log.info(f"--resume: changed since the checkpoint: {'; '.join(allowed)}" + (
            f" ({', '.join(a.split()[0] for a in inexact)}: the continued run will not repeat the original bit for "
            "bit)" if inexact else ""))
