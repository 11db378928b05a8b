"""Reading weights files the way timm reads pretrained weights, with diagnostics a user can act on.

Files come from many places: timm's hub, our own runs, timm 0.6.5-era training checkpoints (the seed's zoo),
official releases in their authors' layouts (BEiT's ``{'model': ...}`` with ``relative_position_index``
buffers, Facebook's ConvNeXt-V2 keys). timm already knows how to turn each foreign layout into its own: every
model module has a checkpoint filter that its pretrained loader runs. We run that same filter, so whatever
timm's pretrained loading accepts for an architecture, ``--teacher-pretrained``, ``--initial-checkpoint``,
``validate.py --checkpoint / --zoo``, ``export`` and ``zoo fetch`` accept too.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Mapping

import torch
from timm.models import clean_state_dict
from torch import nn

from .checkpoint import load_file, mismatch_message, mismatched_keys
from .errors import UserError

log = logging.getLogger("vanillakd")

# where trained weights sit inside a checkpoint dict, in order of preference (timm's order, then others seen
# in the wild); with EMA preferred, the EMA keys come first, as timm's load_state_dict(use_ema=True) does
_STATE_KEYS = ("state_dict", "model", "module", "model_state")
EMA_STATE_KEYS = ("state_dict_ema", "model_ema")

# the names timm's model modules give the filter they pass to build_model_with_cfg, most common first
_FILTER_NAMES = ("checkpoint_filter_fn", "checkpoint_filter_fn_classifier", "_filter_fn",
                 "_filter_torchvision_pretrained")


def _holds_weights(v: object) -> bool:
    """A weights mapping: one tensor at least (an empty ``state_dict_ema: {}`` must not hide the weights)."""
    return isinstance(v, Mapping) and any(isinstance(t, torch.Tensor) for t in v.values())


def has_ema(ckpt: object) -> bool:
    return isinstance(ckpt, Mapping) and any(_holds_weights(ckpt.get(k)) for k in EMA_STATE_KEYS)


def select_state(ckpt: object, use_ema: bool = False, path: str | os.PathLike = "checkpoint") -> dict:
    """The model weights in a raw state_dict or a dict holding one, with DDP (``module.``) and
    ``torch.compile`` (``_orig_mod.``) prefixes removed by timm's ``clean_state_dict``."""
    if isinstance(ckpt, nn.Module):  # a whole pickled model, loadable only under --trust-checkpoint
        ckpt = ckpt.state_dict()
    if not isinstance(ckpt, Mapping):
        raise UserError(f"{path} does not hold a state_dict (found {type(ckpt).__name__})")
    keys = (EMA_STATE_KEYS + _STATE_KEYS) if use_ema else _STATE_KEYS + EMA_STATE_KEYS
    ckpt = {k: (v.state_dict() if isinstance(v, nn.Module) and k in keys else v) for k, v in ckpt.items()}
    state = next((ckpt[k] for k in keys if _holds_weights(ckpt.get(k))), None)
    if state is None:
        empty = next((k for k in keys if isinstance(ckpt.get(k), Mapping)), None)
        if empty is not None:
            raise UserError(f"{path} holds no tensors under its weights key {empty!r}")
        if not (ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values())):
            raise UserError(f"{path} holds no model weights (looked for a raw state_dict or the keys "
                            f"{', '.join(_STATE_KEYS + EMA_STATE_KEYS)})")
        state = ckpt
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    # timm's clean_state_dict strips the DDP / compile wrappers; before timm 1.0.31 it took them in one order
    # only, so repeat it until the keys stop changing (``torch.compile(DDP(model))`` gives _orig_mod.module.)
    while True:
        cleaned = clean_state_dict(tensors)
        if list(cleaned) == list(tensors):
            return cleaned
        tensors = cleaned


def read_state(path: str | os.PathLike, use_ema: bool = False, trust: bool = False) -> dict:
    """The cleaned state_dict of a weights file (``.pth`` / ``.pth.tar`` / ``.bin`` / ``.safetensors``)."""
    if str(path).endswith(".npz"):
        raise UserError(f"{path} is a NumPy .npz file (JAX / big_vision weights), which only timm's own pretrained "
                        "loader reads: convert it once with timm.create_model(ARCH, pretrained=True, "
                        f"pretrained_cfg_overlay=dict(file='{path}')) and save that model's state_dict")
    return select_state(load_file(path, trust=trust), use_ema=use_ema, path=path)


def timm_filter_fn(model: nn.Module) -> Callable | None:
    """The checkpoint filter timm's pretrained loader runs for this model's family (None for families that
    load timm's layout as it is, such as ResNet): the one the architecture's builder registers (a variant may
    bind options, e.g. deit3's ``adapt_layer_scale``, or define its own, e.g. crossvit's), else the filter named
    in the model class's module."""
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if arch:
        found, fn = _builder_filter(arch)
        if found:
            return fn
    module = sys.modules.get(type(model).__module__)
    for name in _FILTER_NAMES:
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    return None


class _Captured(Exception):
    pass


_CAPTURE_LOCK = threading.Lock()


@functools.cache
def _builder_filter(arch: str) -> tuple[bool, Callable | None]:
    """(found, filter): the ``pretrained_filter_fn`` that ``arch``'s entrypoint hands timm's
    ``build_model_with_cfg``, read by calling the entrypoint with that builder replaced by one that stops
    before building anything."""
    import timm.models
    from timm.models import _builder
    try:
        entrypoint = timm.models.model_entrypoint(arch)
    except Exception:  # noqa: BLE001 - not a registered name (hf-hub models, a user's own class)
        return False, None
    original = _builder.build_model_with_cfg

    def capture(*args, **kwargs):
        raise _Captured(kwargs.get("pretrained_filter_fn"))

    with _CAPTURE_LOCK:
        patched = [m for name, m in list(sys.modules.items())
                   if name.startswith("timm.models.") and getattr(m, "build_model_with_cfg", None) is original]
        for m in patched:
            m.build_model_with_cfg = capture
        try:
            with torch.device("meta"):  # an entrypoint that builds without timm's builder builds nothing real
                entrypoint(pretrained=False)
        except _Captured as c:
            return True, c.args[0]
        except Exception:  # noqa: BLE001
            return False, None
        finally:
            for m in patched:
                m.build_model_with_cfg = original
    return False, None


def _call_filter(fn: Callable, state: dict, model: nn.Module) -> dict:
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    # filters mutate or wrap their input: give them a shallow copy, keep ours for the diagnostics
    return fn(dict(state), model) if len(params) >= 2 else fn(dict(state))


def adapt_state(model: nn.Module, state: dict, notes: list[str] | None = None) -> dict:
    """``state`` in the model's own layout: as it is when it already fits, else through timm's filter for
    the model's family (which maps foreign layouts, drops derived buffers, resamples position tables), then
    what timm's pretrained loader and torch's strict load also do: the first conv adapted to the model's
    input channels, BatchNorm counters the file predates filled in. ``notes`` collects what changed a tensor."""
    notes = [] if notes is None else notes
    if not any(mismatched_keys(model, state)):
        return state
    state = _finish(model, _filtered(model, state, notes), notes)
    return state


def _filtered(model: nn.Module, state: dict, notes: list[str]) -> dict:
    fn = timm_filter_fn(model)
    if fn is None:
        return state
    try:
        filtered = _call_filter(fn, state, model)
    except Exception:  # noqa: BLE001 - a filter meeting a layout it does not know can fail anywhere
        return state
    if not isinstance(filtered, Mapping):
        return state
    filtered = dict(filtered)
    # a filter may keep keys of wrappers it does not know about (e.g. timm's convnext returns non-FB files
    # untouched): pick whichever fits better, so the diagnostics name the real problem
    if _score(model, filtered) > _score(model, state):
        return state
    # a resampled table is a new tensor of another size under its old name; a renamed key keeps its tensor
    # (Swin's original layout moves every downsample to the next stage: same names, other shapes, no resampling)
    kept = {id(t) for t in state.values()}
    resampled: dict[tuple, int] = {}  # one entry per key pattern: 24 blocks' tables make one note
    for k, v in filtered.items():
        old = state.get(k)
        if isinstance(old, torch.Tensor) and isinstance(v, torch.Tensor) and id(v) not in kept \
                and old.numel() != v.numel():
            key = (re.sub(r"\.\d+\.", ".*.", k), tuple(old.shape), tuple(v.shape))
            resampled[key] = resampled.get(key, 0) + 1
    for (k, before, after), n in resampled.items():
        notes.append(f"resampled {k} {before} -> {after}" + (f" ({n} tensors)" if n > 1 else ""))
    return filtered


def _finish(model: nn.Module, state: dict, notes: list[str]) -> dict:
    model_state = model.state_dict()
    state = dict(state)
    # torch's BatchNorm fills a missing num_batches_tracked (files saved before torch 0.4.1, e.g. torchvision's
    # original ResNets); our key check runs before torch's load, so fill it the same way
    for k, v in model_state.items():
        if k.endswith(".num_batches_tracked") and k not in state \
                and k[: -len("num_batches_tracked")] + "running_mean" in state:
            state[k] = v.detach().clone()
    # timm's pretrained loader adapts an RGB first conv to the model's input channels
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv") or ()
    for name in ([first] if isinstance(first, str) else list(first)):
        k = f"{name}.weight"
        w, target = state.get(k), model_state.get(k)
        if isinstance(w, torch.Tensor) and isinstance(target, torch.Tensor) and w.ndim == target.ndim >= 2 \
                and w.shape[1] == 3 and target.shape[1] != 3 and w.shape[0] == target.shape[0] \
                and w.shape[2:] == target.shape[2:]:
            from timm.models import adapt_input_conv
            state[k] = adapt_input_conv(target.shape[1], w)
            notes.append(f"adapted {k} from 3 to {target.shape[1]} input channels")
    return state


def _score(model: nn.Module, state: Mapping) -> int:
    return sum(len(x) for x in mismatched_keys(model, state))


def classifier_names(model_or_cfg) -> list[str]:
    cfg = getattr(model_or_cfg, "pretrained_cfg", model_or_cfg) or {}
    classifier = (cfg.get("classifier") if isinstance(cfg, Mapping) else getattr(cfg, "classifier", None)) or ""
    return [classifier] if isinstance(classifier, str) else list(classifier)


def state_num_classes(model_or_cfg, state: Mapping[str, torch.Tensor]) -> int | None:
    """The size of the classifier head stored in an (adapted) state, if it has one; the classifier's name
    comes from the model's (or a pretrained config's) ``classifier``."""
    for name in classifier_names(model_or_cfg):
        w = state.get(f"{name}.weight")
        if isinstance(w, torch.Tensor) and w.ndim >= 1:
            return int(w.shape[0])
    return None


def fit_state(model: nn.Module, state: dict, path: str | os.PathLike, what: str = "model") -> None:
    """Load an already-read ``state`` into ``model`` strictly, after timm's filter for the architecture,
    explaining a head-size mismatch or missing / unexpected / mis-shaped keys in one line."""
    notes: list[str] = []
    state = adapt_state(model, state, notes)
    file_classes, model_classes = state_num_classes(model, state), state_num_classes(model, model.state_dict())
    if file_classes is not None and model_classes is not None and file_classes != model_classes:
        raise UserError(f"{what} checkpoint {path} has a {file_classes}-class head but the {what} is built with "
                        f"{model_classes} classes (--num-classes / the dataset)")
    problem = mismatch_message(model, state)
    if problem:
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise UserError(f"{what} checkpoint {path} does not fit architecture {arch}: {problem}")
    model.load_state_dict(state, strict=True)
    if notes:  # timm's loader does these silently; a user who built the model at another size should know
        log.warning(f"{what} checkpoint {path}: timm's loader {'; '.join(notes)} to fit the {what} as built")


def load_weights(model: nn.Module, path: str | os.PathLike, what: str = "model", use_ema: bool = False,
                 trust: bool = False) -> None:
    """Read a weights file and load it into ``model`` (see ``fit_state``)."""
    fit_state(model, read_state(path, use_ema=use_ema, trust=trust), path, what)


def file_num_classes(arch: str, state: dict, **model_kwargs) -> int | None:
    """The head size of ``state`` for architecture ``arch``, read after timm's filter (a foreign layout may
    name its head differently, e.g. Facebook's ConvNeXt ``head.weight`` for timm's ``head.fc.weight``)."""
    import timm
    cfg = timm.models.get_pretrained_cfg(arch)
    known = state_num_classes(cfg.to_dict() if cfg is not None else {}, state)
    if known is not None:
        return known  # timm's own layout: no model needs building to know
    probe = timm.create_model(arch, **model_kwargs)
    return state_num_classes(probe, adapt_state(probe, state))
