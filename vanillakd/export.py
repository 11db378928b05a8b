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
import torch

from .checkpoint import atomic_write, atomic_write_text, extract_state_dict, load_file, load_state_strict
from .errors import UserError

# what a user needs to build and feed the model; everything else in timm's cfg is informational
_CFG_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "classifier", "first_conv",
             "fixed_input_size", "pool_size", "min_input_size", "license")


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, model: str | None = None,
                      use_ema: bool = False, trust: bool = False) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json`` from a vanillakd (or timm) checkpoint."""
    from safetensors.torch import save as save_safetensors
    ckpt = load_file(checkpoint, trust=trust)
    arch = model or (ckpt.get("arch") if isinstance(ckpt, dict) else None)
    if not arch:
        raise UserError(f"{checkpoint} does not name its architecture; pass --model NAME")
    if not timm.is_model(arch):
        raise UserError(f"unknown model {arch!r}: not a timm model")
    if use_ema and not (isinstance(ckpt, dict) and ("state_dict_ema" in ckpt or "model_ema" in ckpt)):
        raise UserError(f"{checkpoint} holds no EMA weights (train with --model-ema)")
    state = extract_state_dict(ckpt, use_ema=use_ema, path=checkpoint)
    num_classes = _num_classes(arch, state)
    net = timm.create_model(arch, num_classes=num_classes)
    load_state_strict(net, state, checkpoint, "model")
    data_config = ckpt.get("data_config", {}) if isinstance(ckpt, dict) else {}
    cfg = {k: v for k, v in net.pretrained_cfg.items() if k in _CFG_KEYS and v is not None}
    cfg.update({k: v for k, v in data_config.items() if k in _CFG_KEYS and v is not None})
    cfg["num_classes"] = num_classes
    model_args = {}
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
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out}: {e.strerror}") from None
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    atomic_write(out / "model.safetensors", lambda f: f.write(save_safetensors(tensors, metadata={"format": "pt"})))
    atomic_write_text(json.dumps(config, indent=2) + "\n", out / "config.json")
    return out


def _num_classes(arch: str, state: dict[str, torch.Tensor]) -> int:
    cfg = timm.models.get_pretrained_cfg(arch)
    classifier = (cfg.classifier if cfg is not None else None) or "fc"
    names = [classifier] if isinstance(classifier, str) else list(classifier)
    for name in names:
        if f"{name}.weight" in state:
            return int(state[f"{name}.weight"].shape[0])
    raise UserError(f"cannot find the classifier ({', '.join(names)}) of {arch} in the checkpoint")
