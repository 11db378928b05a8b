"""Export a trained student as a plain timm model folder: ``model.safetensors`` + ``config.json`` in timm's
pretrained-config form, loadable without vanillakd:

    timm.create_model("local-dir:OUT", pretrained=True)                  # timm >= 1.0.23
    timm.create_model(arch, pretrained=True, num_classes=N,
                      pretrained_cfg_overlay=dict(file="OUT/model.safetensors", num_classes=N))
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import timm

from .checkpoint import atomic_write_many, load_file, training_flags, writable_folder
from .errors import UserError
from .weights import file_num_classes, fit_state, has_ema, select_state

# what a user needs to build and feed the model; everything else in timm's cfg is informational
_CFG_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "classifier", "first_conv",
             "fixed_input_size", "pool_size", "min_input_size", "license")


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, model: str | None = None,
                      use_ema: bool = False, trust: bool = False) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json`` from a vanillakd (or timm) checkpoint."""
    from safetensors.torch import save as save_safetensors
    out = Path(out_dir)
    existed = out.exists()
    writable_folder(out, "export folder")  # before the work: a folder it cannot write fails at once
    try:
        config, tensors = _export_contents(checkpoint, model, use_ema, trust)
    except BaseException:
        if not existed:
            _remove_if_empty(out)  # a refused export leaves no empty folder behind
        raise
    weights = save_safetensors(tensors, metadata={"format": "pt"})
    # weights and config belong together: neither replaces an older export's unless both are written
    atomic_write_many({out / "model.safetensors": lambda f: f.write(weights),
                       out / "config.json": lambda f: f.write((json.dumps(config, indent=2) + "\n").encode())})
    return out


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _export_contents(checkpoint: str | os.PathLike, model: str | None, use_ema: bool,
                     trust: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The export's config.json contents and its tensors."""
    ckpt = load_file(checkpoint, trust=trust)
    arch = model or (ckpt.get("arch") if isinstance(ckpt, dict) else None)
    if not arch:
        raise UserError(f"{checkpoint} does not name its architecture; pass --model NAME")
    if not timm.is_model(arch):
        hint = "" if model else "; pass --model NAME"  # timm 0.6.5's saver stores the class name, e.g. 'resnet'
        raise UserError(f"unknown model {arch!r}: not a timm model{hint}")
    if use_ema and not has_ema(ckpt):
        raise UserError(f"{checkpoint} holds no EMA weights (train with --model-ema)")
    state = select_state(ckpt, use_ema=use_ema, path=checkpoint)
    build = _build_args(ckpt)
    num_classes = file_num_classes(arch, state, **build)
    if num_classes is None:
        raise UserError(f"cannot find the classifier of {arch} in {checkpoint}")
    net = timm.create_model(arch, num_classes=num_classes, **build)
    fit_state(net, state, checkpoint, "model")
    data_config = ckpt.get("data_config", {}) if isinstance(ckpt, dict) else {}
    cfg = {k: v for k, v in net.pretrained_cfg.items() if k in _CFG_KEYS and v is not None}
    cfg.update({k: v for k, v in data_config.items() if k in _CFG_KEYS and v is not None})
    cfg["num_classes"] = num_classes
    model_args = dict(build)  # timm rebuilds the model with these before loading the weights
    if getattr(net, "dynamic_img_size", False) and hasattr(getattr(net, "patch_embed", None), "img_size"):
        # the model ran at the recorded input size without being built for it: timm must build it at its
        # own size (building it at the input size would resample its position embedding on load)
        cfg["fixed_input_size"] = False
        model_args = {"img_size": list(net.patch_embed.img_size), "dynamic_img_size": True}
    config: dict[str, Any] = {"architecture": arch, "num_classes": num_classes,
                              "num_features": getattr(net, "num_features", None), "pretrained_cfg": cfg}
    if model_args:
        config["model_args"] = model_args
    classes = ckpt.get("classes") if isinstance(ckpt, dict) else None
    if classes:
        config["label_names"] = list(classes)
    return config, {k: v.contiguous() for k, v in net.state_dict().items()}


def _build_args(ckpt: object) -> dict[str, Any]:
    """The model options the run built the student with (``--in-chans``, ``--gp``): without them the weights
    would not fit (another first conv) or would silently compute something else (another pooling)."""
    args = training_flags(ckpt)
    build = {"in_chans": args.get("in_chans"), "global_pool": args.get("gp")}
    return {k: v for k, v in build.items() if v not in (None, "")}
