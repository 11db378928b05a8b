"""Evaluate a checkpoint on one split: top-1 / top-5 / loss, and top-1 agreement with a teacher when one is given.

The command line (timm validate.py's flags) is ``cli.validate``; it fills a ``ValidateConfig`` and calls
``validate``."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from .checkpoint import one_value, recorded_arch, training_flags
from .errors import UserError

log = logging.getLogger("vanillakd")


@dataclasses.dataclass(frozen=True)
class ValidateConfig:
    """What to evaluate, on which data, and how (the defaults are validate.py's)."""
    data_dir: str
    split: str = "validation"  # 'validation' also finds val/
    # the dataset flags shared with training (train_args.add_dataset_flags)
    dataset: str = ""
    class_map: str = ""
    dataset_download: bool = False
    input_img_mode: str | None = None
    # the model and its weights
    model: str | None = None  # None: the checkpoint's 'arch' (a file that names none needs it)
    checkpoint: str = ""
    zoo: str | None = None  # a published student: sets model and checkpoint (fetched if missing)
    zoo_dir: str | None = None
    pretrained: bool = False
    use_ema: bool = False
    num_classes: int | None = None
    gp: str | None = None
    # the eval transform (None: from the model's pretrained config)
    img_size: int | None = None
    in_chans: int | None = None
    input_size: Sequence[int] | None = None
    crop_pct: float | None = None
    crop_mode: str | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    interpolation: str = ""
    # the loop
    batch_size: int = 256
    workers: int = 4
    amp: bool = False
    amp_dtype: str = "auto"
    channels_last: bool = False
    pin_mem: bool = False
    device: str | None = None
    teacher: str | None = None  # also report top-1 agreement with this teacher
    teacher_pretrained: str | None = None
    trust_checkpoint: bool = False
    progress: bool | None = None


def validate(config: ValidateConfig) -> dict:
    """The metrics of ``config``'s model on its split, as one flat dict (``write_results`` stores it).

    What a flag leaves unset comes from the checkpoint when it records it (our training checkpoints: ``arch``,
    the ``data_config`` the run trained and evaluated with, ``--in-chans`` / ``--gp``); a file that does not
    (a plain state_dict, a zoo file) evaluates with timm's pretrained config of ``--model``."""
    import torch

    from .checkpoint import load_file
    from .data.loader import build_eval_loader
    from .data.sources import build_eval_split_any, image_mode
    from .engine import evaluate
    from .models import create_student
    from .precision import Precision, resolve_device
    from .teachers.live import create_teacher
    from .weights import fit_state

    c = config
    if c.zoo:
        from . import zoo
        m = zoo.get(c.zoo)
        c = dataclasses.replace(c, model=m.arch, checkpoint=str(zoo.fetch(c.zoo, c.zoo_dir)))
    if not c.checkpoint and not c.pretrained:
        raise UserError("give --checkpoint PATH (or --pretrained for timm's own weights)")

    def split_for(cfg: ValidateConfig):
        return build_eval_split_any(cfg.data_dir, cfg.dataset, cfg.split, cfg.class_map, cfg.dataset_download,
                                    image_mode(cfg.input_img_mode, cfg.in_chans, cfg.input_size), cfg.num_classes)

    split = split_for(c)  # before reading the checkpoint: a wrong data dir is reported first
    ckpt = load_file(c.checkpoint, trust=c.trust_checkpoint) if c.checkpoint else None
    filled, file_data = from_checkpoint(c, ckpt)
    if image_mode(filled.input_img_mode, filled.in_chans, filled.input_size) != \
            image_mode(c.input_img_mode, c.in_chans, c.input_size):
        split = split_for(filled)  # the checkpoint's --in-chans changes how images are read
    c = filled
    _check_classes(c, ckpt, split.classes)
    state = _checkpoint_state(c, ckpt) if ckpt is not None else None
    num_classes = _num_classes(c, state, len(split.classes))
    device = resolve_device(c.device)
    precision = Precision.create(device, c.amp, c.amp_dtype)
    model = create_student(c.model, num_classes, pretrained=c.pretrained and not c.checkpoint,
                           global_pool=c.gp, in_chans=c.in_chans)
    if state is not None:
        fit_state(model, state, c.checkpoint, what="model")
    model.to(device).eval()
    if c.channels_last:
        model.to(memory_format=torch.channels_last)
    teacher = None
    if c.teacher:
        teacher = create_teacher(c.teacher, num_classes, c.teacher_pretrained, trust=c.trust_checkpoint,
                                 in_chans=c.in_chans or 3)
        teacher.to(device)
    data_config = eval_data_config(c, file_data, model)
    loader = build_eval_loader(split.dataset, data_config, c.batch_size, c.workers, device,
                               pin_memory=c.pin_mem)
    metrics = evaluate(model, loader, precision, c.channels_last, teacher=teacher, progress=c.progress)
    return _result(c, split, num_classes, data_config, metrics)


def _result(c: ValidateConfig, split, num_classes: int, data_config: dict, metrics: dict) -> dict:
    result = {"model": c.model, "checkpoint": c.checkpoint, "split": str(split.root),
              "images": len(split.dataset), "num_classes": num_classes,
              "img_size": data_config["input_size"][-1], "crop_pct": data_config["crop_pct"],
              "top1": round(metrics["top1"], 4), "top1_err": round(100 - metrics["top1"], 4),
              "top5": round(metrics["top5"], 4), "top5_err": round(100 - metrics["top5"], 4),
              "loss": round(metrics["loss"], 6)}
    if "agreement" in metrics:
        result["teacher"] = c.teacher
        result["agreement"] = round(metrics["agreement"], 4)
    return result


# the eval transform's keys a training checkpoint records under 'data_config' (timm's resolve_data_config's)
_DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
_FLAGS = {"model": "--model", "in_chans": "--in-chans", "gp": "--gp", "input_size": "--input-size",
          "img_size": "--img-size", "interpolation": "--interpolation", "mean": "--mean", "std": "--std",
          "crop_pct": "--crop-pct", "crop_mode": "--crop-mode"}


def from_checkpoint(config: ValidateConfig, ckpt: object) -> tuple[ValidateConfig, dict]:
    """``config`` with the model, ``--in-chans`` and ``--gp`` the checkpoint records filled in where the flags
    leave them unset, and the checkpoint's eval ``data_config`` (empty for a file that records none); logs one
    warning line naming the flags that disagree with the checkpoint (the flags win)."""
    meta = ckpt if isinstance(ckpt, Mapping) else {}
    args = training_flags(meta)
    known = {"model": recorded_arch(meta), "in_chans": one_value(args.get("in_chans")),
             "gp": one_value(args.get("gp"))}
    data = meta.get("data_config")
    data = {k: v for k, v in data.items() if k in _DATA_KEYS and v not in (None, "")} \
        if isinstance(data, Mapping) else {}
    if config.model is None and not known["model"]:
        recorded = meta.get("arch")
        why = (f"{config.checkpoint} does not name its architecture" if config.checkpoint
               else "--pretrained loads timm's weights of a named architecture")
        if isinstance(recorded, str) and recorded:
            why += f" (it records {recorded!r}, not a timm model name)"
        raise UserError(f"{why}; pass --model NAME")
    differ = [f"{_FLAGS[k]} {getattr(config, k)} (checkpoint: {v})" for k, v in known.items()
              if v not in (None, "") and getattr(config, k) not in (None, "") and getattr(config, k) != v]
    differ += _data_disagreements(config, data, config.in_chans or known["in_chans"] or 3)
    if differ:
        log.warning(f"validate: flags differ from what {config.checkpoint} records: {'; '.join(differ)}; "
                    "evaluating with the flags")
    filled = {k: v for k, v in known.items() if v not in (None, "") and getattr(config, k) in (None, "")}
    return dataclasses.replace(config, **filled), data


def _same(a: object, b: object) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def _data_disagreements(c: ValidateConfig, data: dict, in_chans: int) -> list[str]:
    """'--flag value (checkpoint: value)' for each eval-transform flag given that differs from ``data``."""
    out = []
    size = data.get("input_size")
    if size and c.input_size and not _same(list(c.input_size), list(size)):
        out.append(f"--input-size {' '.join(map(str, c.input_size))} (checkpoint: {' '.join(map(str, size))})")
    elif size and not c.input_size and c.img_size and not _same([c.img_size] * 2, list(size)[1:]):
        out.append(f"--img-size {c.img_size} (checkpoint: {size[-1]})")
    for key in ("mean", "std"):
        given, theirs = getattr(c, key), data.get(key)
        if given and theirs is not None:
            given = list(given) * in_chans if len(given) == 1 else list(given)
            if not _same(given, list(theirs)):
                out.append(f"--{key} {' '.join(map(str, given))} (checkpoint: {' '.join(map(str, theirs))})")
    for key in ("interpolation", "crop_pct", "crop_mode"):
        given, theirs = getattr(c, key), data.get(key)
        if given not in (None, "") and theirs is not None and not _same(given, theirs):
            out.append(f"{_FLAGS[key]} {given} (checkpoint: {theirs})")
    return out


def eval_data_config(c: ValidateConfig, file_data: dict, model) -> dict:
    """The eval transform: the flags, else the checkpoint's ``data_config``, else the model's timm config."""
    from timm.data import resolve_data_config
    flags = {k: getattr(c, k) for k in ("input_size", "img_size", "crop_pct", "crop_mode", "mean", "std",
                                        "interpolation", "in_chans")}
    base = dict(getattr(model, "pretrained_cfg", None) or {})
    base.update({k: tuple(v) if isinstance(v, list) else v for k, v in file_data.items()})
    try:
        return resolve_data_config(flags, pretrained_cfg=base, model=model)
    except AssertionError:  # timm asserts that --mean / --std match the model's channels
        channels = getattr(model, "pretrained_cfg", {}).get("input_size", (c.in_chans or 3,))[0]
        raise UserError(f"--mean / --std must hold 1 value or one per input channel of the model ({channels})"
                        ) from None


def _check_classes(c: ValidateConfig, ckpt: object, data_classes: Sequence[str]) -> None:
    """Warn when the checkpoint was trained on other class folders than the split holds (labels by index)."""
    trained = ckpt.get("classes") if isinstance(ckpt, Mapping) else None
    if isinstance(trained, (list, tuple)) and trained and list(map(str, trained)) != list(map(str, data_classes)):
        def show(names):
            names = list(map(str, names))
            return ", ".join(names[:5]) + (f", ... ({len(names)})" if len(names) > 5 else "")
        log.warning(f"validate: {c.checkpoint} was trained on the classes [{show(trained)}] but the split holds "
                    f"[{show(data_classes)}]: labels are scored by index, so the numbers may mean nothing")


def _checkpoint_state(config: ValidateConfig, ckpt: object) -> dict:
    from .weights import has_ema, select_state
    if config.use_ema and not has_ema(ckpt):
        raise UserError(f"--use-ema: {config.checkpoint} holds no EMA weights (state_dict_ema / model_ema); "
                        "train with --model-ema, or drop --use-ema")
    return select_state(ckpt, use_ema=config.use_ema, path=config.checkpoint)


def _num_classes(config: ValidateConfig, state: dict | None, data_classes: int) -> int:
    """``--num-classes``, else the checkpoint's head size (a 1000-class ImageNet model evaluates on a folder
    of some of its classes, as timm's validate.py does), else the number of class folders."""
    if config.num_classes:
        if config.num_classes < data_classes:
            raise UserError(f"--num-classes {config.num_classes} is fewer than the {data_classes} classes in "
                            f"{config.data_dir}: their labels cannot be scored")
        return config.num_classes
    if state is None:
        return data_classes
    from .models import check_model_name
    from .weights import file_num_classes
    check_model_name(config.model)
    head = file_num_classes(config.model, state, in_chans=config.in_chans or 3)
    if head is None:
        return data_classes
    if head < data_classes:
        raise UserError(f"{config.checkpoint} has a {head}-class head but {config.data_dir} holds {data_classes} "
                        "class folders; its labels cannot be scored by this model")
    return head


def check_results_file(path: str) -> None:
    """Refuse, before the evaluation, a ``--results-file`` that ``write_results`` could not write (its folder
    missing or read-only, or the path a folder)."""
    from .checkpoint import check_writable_file
    check_writable_file(path, "--results-file")


def write_results(result: dict, path: str, fmt: str | None = None) -> None:
    """``result`` as a .json (the default) or one-row .csv file; ``fmt`` overrides the extension. A failed
    write is one UserError naming the file (see ``checkpoint.atomic_write``)."""
    from .checkpoint import atomic_write_text
    fmt = fmt or ("csv" if path.endswith(".csv") else "json")
    if fmt == "json":
        text = json.dumps(result, indent=2) + "\n"
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(result))
        writer.writeheader()
        writer.writerow(result)
        text = buf.getvalue()
    atomic_write_text(text, Path(path))
