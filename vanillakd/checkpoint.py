"""Checkpoint files: crash-safe writes and safe, explained loading.

Every file we write holds only tensors and plain containers, so it loads with ``weights_only=True``;
files from elsewhere that need pickled code are refused with a one-line explanation.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError


def atomic_write(path: str | os.PathLike, write_fn) -> None:
    """Write through ``write_fn(file)`` into a temp file beside ``path``, fsync, then rename over it.

    A crash or a full disk leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise UserError(f"could not write {path}: {e.strerror or e}") from None
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` made crash-safe (see ``atomic_write``)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def load_file(path: str | os.PathLike, trust: bool = False) -> Any:
    """Load a checkpoint file (PyTorch or safetensors) on the CPU, refusing pickled code unless ``trust``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist" if not path.exists()
                        else f"checkpoint {path} is not a file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors
        try:
            return load_safetensors(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"checkpoint {path} is not a valid safetensors file: {e}") from None
    try:
        # timm-style training checkpoints (the seed's among them) store their flags as an argparse.Namespace:
        # a plain attribute bag, safe to rebuild, so it is the one class allowed beyond tensors and containers
        with _allow_namespace():
            return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UserError(f"checkpoint {path} contains pickled Python objects that could run code; refusing to "
                            "load it (re-save it as a plain state_dict, or pass --trust-checkpoint if you trust "
                            "its source)") from None
        raise UserError(f"checkpoint {path} is corrupt or not a PyTorch file ({e})") from None
    except Exception as e:  # noqa: BLE001 - a damaged file can fail anywhere inside the unpickler
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is corrupt or truncated ({first})") from None


def _allow_namespace():
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch 2.4: only the process-wide list exists
        torch.serialization.add_safe_globals([argparse.Namespace])
        return contextlib.nullcontext()
    return safe_globals([argparse.Namespace])


def mismatched_keys(module: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list, list, list]:
    """(missing, unexpected, mis-shaped) keys of ``state`` against ``module``."""
    model_state = module.state_dict()
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    wrong = [k for k in state if k in model_state and state[k].shape != model_state[k].shape]
    return missing, unexpected, wrong


def mismatch_message(module: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """Missing / unexpected / mis-shaped keys of ``state`` against ``module``, in one line (None if it fits)."""
    missing, unexpected, wrong = mismatched_keys(module, state)
    model_state = module.state_dict()
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)} vs "
                     f"model {tuple(model_state[k].shape)})")
    return "; ".join(parts) or None


def load_state_strict(module: nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                      what: str = "model") -> None:
    """``module.load_state_dict(state)``, with missing / unexpected / mis-shaped keys named in one line."""
    problem = mismatch_message(module, state)
    if problem:
        arch = getattr(module, "pretrained_cfg", {}).get("architecture", type(module).__name__)
        raise UserError(f"{what} checkpoint {path} does not fit architecture {arch}: {problem}")
    module.load_state_dict(state, strict=True)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors and plain containers (weights_only-loadable)."""
    import random

    import numpy as np
    np_state = np.random.get_state()
    state = {"python": plain(random.getstate()), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    import random

    import numpy as np
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain(obj: Any) -> Any:
    """Args and metrics as plain Python containers, so checkpoints load with ``weights_only=True``."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def training_flags(ckpt: object) -> dict[str, Any]:
    """The training flags a checkpoint stores: a dict (ours) or an argparse.Namespace (timm's, the seed's)."""
    args = ckpt.get("args") if isinstance(ckpt, Mapping) else None
    if hasattr(args, "__dict__") and not isinstance(args, Mapping):
        args = vars(args)
    return dict(args) if isinstance(args, Mapping) else {}


def one_value(value: object) -> object:
    """One student's value of a training flag (a multi-student run stores lists of one value per student)."""
    if isinstance(value, (list, tuple)):
        return value[0] if len(value) == 1 else None
    return value


def recorded_arch(ckpt: object) -> str | None:
    """The timm architecture a checkpoint records: ``arch`` (ours), else timm's ``args.model`` (timm's saver
    stores the model's class name as ``arch``, e.g. 'resnet')."""
    import timm
    meta = ckpt if isinstance(ckpt, Mapping) else {}
    for name in (meta.get("arch"), one_value(training_flags(meta).get("model"))):
        if isinstance(name, str) and name and timm.is_model(name):
            return name
    return None
