"""Evaluate a checkpoint on one split: top-1 / top-5 / loss, and top-1 agreement with a teacher when one is given.

The command line (timm validate.py's flags) is ``cli.validate``; it fills a ``ValidateConfig`` and calls
``validate``."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Sequence
from pathlib import Path

from .errors import UserError


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
    model: str = "resnet50"
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
    """The metrics of ``config``'s model on its split, as one flat dict (``write_results`` stores it)."""
    import torch
    from timm.data import resolve_data_config

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
    split = build_eval_split_any(c.data_dir, c.dataset, c.split, c.class_map, c.dataset_download,
                                 image_mode(c.input_img_mode, c.in_chans, c.input_size), c.num_classes)
    state = _checkpoint_state(c) if c.checkpoint else None
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
    flags = {k: getattr(c, k) for k in ("input_size", "img_size", "crop_pct", "crop_mode", "mean", "std",
                                        "interpolation", "in_chans")}
    data_config = resolve_data_config(flags, model=model)
    loader = build_eval_loader(split.dataset, data_config, c.batch_size, c.workers, device,
                               pin_memory=c.pin_mem)
    metrics = evaluate(model, loader, precision, c.channels_last, teacher=teacher, progress=c.progress)
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


def _checkpoint_state(config: ValidateConfig) -> dict:
    from .checkpoint import load_file
    from .weights import has_ema, select_state
    ckpt = load_file(config.checkpoint, trust=config.trust_checkpoint)
    if config.use_ema and not has_ema(ckpt):
        raise UserError(f"--use-ema: {config.checkpoint} holds no EMA weights (state_dict_ema / model_ema)")
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


def write_results(result: dict, path: str, fmt: str | None = None) -> None:
    """``result`` as a .json (the default) or one-row .csv file; ``fmt`` overrides the extension."""
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
