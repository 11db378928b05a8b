"""validate: top-1 / top-5 / loss of a checkpoint on an ImageFolder split (timm validate.py's flags)."""
from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import Sequence

from ..errors import UserError, run_cli
from .train_args import _Parser, add_dataset_flags, pos_float, pos_int


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="validate.py", description="Evaluate a checkpoint on DIR/val (or --split).")
    p.add_argument("data_dir", metavar="DIR")
    p.add_argument("--split", default="validation", help="split folder; 'validation' also finds val/")
    add_dataset_flags(p, splits=False)
    p.add_argument("--model", "-m", default="resnet50", help="timm architecture")
    p.add_argument("--checkpoint", default="", help="weights file (state_dict, or dict with state_dict / model ...)")
    p.add_argument("--zoo", default=None, metavar="NAME",
                   help="a published VanillaKD student: sets --model and --checkpoint (fetched if missing)")
    p.add_argument("--zoo-dir", default=None, help="where zoo files live (default ~/.cache/vanillakd/zoo)")
    p.add_argument("--pretrained", action="store_true", help="timm's pretrained weights when no --checkpoint")
    p.add_argument("--use-ema", action="store_true", help="take the EMA weights from the checkpoint")
    p.add_argument("--num-classes", type=pos_int, default=None, help="defaults to the number of class folders")
    p.add_argument("--gp", default=None)
    p.add_argument("--img-size", type=pos_int, default=None)
    p.add_argument("--in-chans", type=pos_int, default=None)
    p.add_argument("--input-size", default=None, nargs=3, type=pos_int, metavar="N")
    p.add_argument("--crop-pct", type=pos_float, default=None)
    p.add_argument("--crop-mode", default=None)
    p.add_argument("--mean", type=float, nargs="+", default=None)
    p.add_argument("--std", type=float, nargs="+", default=None)
    p.add_argument("--interpolation", default="")
    p.add_argument("-b", "--batch-size", type=pos_int, default=256)
    p.add_argument("-j", "--workers", type=int, default=4)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--amp-dtype", default="auto", choices=["auto", "bfloat16", "float16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--pin-mem", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--teacher", default=None, help="also report top-1 agreement with this teacher")
    p.add_argument("--teacher-pretrained", default=None, help="weights file of --teacher")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow pickled-code checkpoints you trust")
    p.add_argument("--results-file", default="", help="write the metrics to this .json or .csv file")
    p.add_argument("--results-format", default=None, choices=["json", "csv"], help="default: from the extension")
    p.add_argument("--progress", dest="progress", action="store_true", default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def validate(args: argparse.Namespace) -> dict:
    import torch
    from timm.data import resolve_data_config

    from ..data.sources import build_eval_split_any, image_mode
    from ..data.loader import build_eval_loader
    from ..engine import evaluate
    from ..models import create_student, create_teacher
    from ..precision import Precision, resolve_device
    from ..weights import fit_state

    if args.zoo:
        from .. import zoo
        m = zoo.get(args.zoo)
        args.model, args.checkpoint = m.arch, str(zoo.fetch(args.zoo, args.zoo_dir))
    if not args.checkpoint and not args.pretrained:
        raise UserError("give --checkpoint PATH (or --pretrained for timm's own weights)")
    split = build_eval_split_any(args.data_dir, args.dataset, args.split, args.class_map, args.dataset_download,
                                 image_mode(args.input_img_mode, args.in_chans, args.input_size), args.num_classes)
    state = _checkpoint_state(args) if args.checkpoint else None
    num_classes = _num_classes(args, state, len(split.classes))
    device = resolve_device(args.device)
    precision = Precision.create(device, args.amp, args.amp_dtype)
    model = create_student(args.model, num_classes, pretrained=args.pretrained and not args.checkpoint,
                           global_pool=args.gp, in_chans=args.in_chans)
    if state is not None:
        fit_state(model, state, args.checkpoint, what="model")
    model.to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    teacher = None
    if args.teacher:
        teacher = create_teacher(args.teacher, num_classes, args.teacher_pretrained, trust=args.trust_checkpoint,
                                 in_chans=args.in_chans or 3)
        teacher.to(device)
    flags = {k: getattr(args, k) for k in ("input_size", "img_size", "crop_pct", "crop_mode", "mean", "std",
                                           "interpolation", "in_chans")}
    data_config = resolve_data_config(flags, model=model)
    loader = build_eval_loader(split.dataset, data_config, args.batch_size, args.workers, device,
                               pin_memory=args.pin_mem)
    metrics = evaluate(model, loader, precision, args.channels_last, teacher=teacher, progress=args.progress)
    result = {"model": args.model, "checkpoint": args.checkpoint, "split": str(split.root),
              "images": len(split.dataset), "num_classes": num_classes,
              "img_size": data_config["input_size"][-1], "crop_pct": data_config["crop_pct"],
              "top1": round(metrics["top1"], 4), "top1_err": round(100 - metrics["top1"], 4),
              "top5": round(metrics["top5"], 4), "top5_err": round(100 - metrics["top5"], 4),
              "loss": round(metrics["loss"], 6)}
    if "agreement" in metrics:
        result["teacher"] = args.teacher
        result["agreement"] = round(metrics["agreement"], 4)
    return result


def _checkpoint_state(args: argparse.Namespace) -> dict:
    from ..checkpoint import load_file
    from ..weights import has_ema, select_state
    ckpt = load_file(args.checkpoint, trust=args.trust_checkpoint)
    if args.use_ema and not has_ema(ckpt):
        raise UserError(f"--use-ema: {args.checkpoint} holds no EMA weights (state_dict_ema / model_ema)")
    return select_state(ckpt, use_ema=args.use_ema, path=args.checkpoint)


def _num_classes(args: argparse.Namespace, state: dict | None, data_classes: int) -> int:
    """``--num-classes``, else the checkpoint's head size (a 1000-class ImageNet model evaluates on a folder
    of some of its classes, as timm's validate.py does), else the number of class folders."""
    if args.num_classes:
        if args.num_classes < data_classes:
            raise UserError(f"--num-classes {args.num_classes} is fewer than the {data_classes} classes in "
                            f"{args.data_dir}: their labels cannot be scored")
        return args.num_classes
    if state is None:
        return data_classes
    from ..models import check_model_name
    from ..weights import file_num_classes
    check_model_name(args.model)
    head = file_num_classes(args.model, state, in_chans=args.in_chans or 3)
    if head is None:
        return data_classes
    if head < data_classes:
        raise UserError(f"{args.checkpoint} has a {head}-class head but {args.data_dir} holds {data_classes} "
                        "class folders; its labels cannot be scored by this model")
    return head


def write_results(result: dict, path: str, fmt: str | None = None) -> None:
    from ..checkpoint import atomic_write_text
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..outputs import setup_console_logging
    log = setup_console_logging()
    result = validate(args)
    agreement = f" agreement {result['agreement']:.2f}" if "agreement" in result else ""
    log.info(f"* top1 {result['top1']:.3f} ({result['top1_err']:.3f} err) top5 {result['top5']:.3f} "
             f"({result['top5_err']:.3f} err) loss {result['loss']:.4f}{agreement} on {result['images']} images")
    if args.results_file:
        write_results(result, args.results_file, args.results_format)
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    return run_cli(main, argv, prog="validate.py")

