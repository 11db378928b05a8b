"""The offline demo: Fashion-MNIST, a teacher trained here (or reused), then one small student trained from
scratch, with vanilla KD and with DKD under the same recipe, from one teacher pass per batch.

It drives the same ``train-kd`` code a user runs; only the flags are chosen here.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from ..checkpoint import atomic_write_text
from ..data.fashion_mnist import is_prepared, make_subset, prepare_fashion_mnist

log = logging.getLogger("vanillakd")

# one recipe for every student; strong enough augmentation for 28 px garments
RECIPE = ["--input-size", "3", "32", "32", "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5",
          "--scale", "0.5", "1.0", "--color-jitter", "0", "--crop-pct", "1.0", "--interpolation", "bilinear",
          "--train-interpolation", "bilinear", "--opt", "adamw", "--weight-decay", "0.05", "--sched", "cosine",
          "--warmup-epochs", "1", "--warmup-lr", "1e-4", "--min-lr", "1e-5", "--smoothing", "0.0",
          "--no-progress"]


def _row(result: dict) -> tuple[str, str]:
    """(last-epoch top-1, best top-1 with its epoch) of a run's result; a teacher result.json written before
    the last epoch was kept holds its best alone."""
    last = (result.get("last") or {}).get("eval_top1")
    best = result.get("best_metric", result.get("top1"))
    epoch = result.get("best_epoch")
    return (f"{float(last):.2f}" if last not in (None, "") else "-",
            f"{float(best):.2f}" + (f" ({epoch})" if epoch is not None else "") if best is not None else "-")


def _teacher_key(args) -> dict:
    return {"model": args.teacher_model, "per_class": args.teacher_per_class, "epochs": args.teacher_epochs,
            "lr": args.teacher_lr, "seed": args.seed, "val_per_class": args.val_per_class}


def _trained_teacher(out: Path, args) -> Path | None:
    """A teacher an earlier demo trained with the same settings (``teacher/``, ``teacher-1/`` ...), or None."""
    for folder in sorted(out.glob("teacher*")):
        key = folder / "demo-teacher.json"
        if (folder / "model_best.pth.tar").is_file() and key.is_file() and \
                json.loads(key.read_text()) == _teacher_key(args):
            return folder
    return None


def run_demo(args, run_argv: Callable[[list[str]], list[dict]]) -> str:
    """Prepare the data, train (or reuse) the teacher, train the three students; return the markdown table.
    ``args``: ``cli.demo``'s flags (any object with those attributes); ``run_argv``: runs a train-kd command
    line and returns its students' results (``cli.run_config.run_train_argv``)."""
    import torch
    torch.set_num_threads(args.threads)

    if not is_prepared(args.data):
        log.info(f"preparing Fashion-MNIST in {args.data} ...")
    prepare_fashion_mnist(args.data, args.source)
    out = Path(args.output)
    common = ["--workers", str(args.workers), "--seed", str(args.seed), "-b", str(args.batch_size),
              "--output", str(out), "--log-interval", "1000"] + RECIPE

    teacher_dir = _trained_teacher(out, args)
    if teacher_dir is not None:
        log.info(f"reusing the teacher in {teacher_dir}")
        teacher_row = _row(json.loads((teacher_dir / "result.json").read_text()))
    else:
        data = make_subset(args.data, out / "data-teacher", {"train": args.teacher_per_class,
                                                             "val": args.val_per_class}, seed=args.seed)
        log.info(f"training the teacher ({args.teacher_model}, {args.teacher_per_class} images per class)")
        res = run_argv([str(data), "--model", args.teacher_model, "--kd-loss", "none", "--experiment", "teacher",
                      "--epochs", str(args.teacher_epochs), "--lr", str(args.teacher_lr),
                      "--eval-interval", str(args.teacher_epochs)] + common)[0]
        teacher_row = _row(res)
        teacher_dir = Path(res["out_dir"])  # teacher/, or teacher-N/ when teacher/ holds another demo's
        key_file = teacher_dir / "demo-teacher.json"
        atomic_write_text(json.dumps({"best_metric": res["best_metric"], "best_epoch": res["best_epoch"],
                                      "last": res["last"]}), teacher_dir / "result.json")
        atomic_write_text(json.dumps(_teacher_key(args)), key_file)

    teacher_ckpt = teacher_dir / "model_best.pth.tar"
    data = make_subset(args.data, out / "data-student", {"train": args.student_per_class,
                                                         "val": args.val_per_class}, seed=args.seed)
    log.info(f"training {args.student_model} from scratch, with KD and with DKD "
             f"({args.student_per_class} images per class, one teacher pass per batch)")
    results = run_argv([str(data), "--model", args.student_model, "--kd-loss", "none", "kd", "dkd",
                      "--teacher", args.teacher_model, "--teacher-pretrained", str(teacher_ckpt),
                      "--temperature", str(args.temperature), "--experiment", "students",
                      "--epochs", str(args.student_epochs), "--lr", str(args.student_lr),
                      "--eval-interval", str(args.student_epochs)] + common)
    rows = [("teacher", args.teacher_model, f"{args.teacher_per_class}/class", *teacher_row)]
    names = {"none": "scratch", "kd": "vanilla KD", "dkd": "DKD"}
    for r, method in zip(results, ["none", "kd", "dkd"]):
        rows.append((names[method], args.student_model, f"{args.student_per_class}/class", *_row(r)))
    table = ["| run | model | train images | top-1, last epoch (%) | best top-1 (%) (epoch) |", "|---|---|---|---|---|"]
    table += [f"| {a} | {b} | {c} | {last} | {best} |" for a, b, c, last, best in rows]
    table += ["", "Each run's own log ends with its best (`done in ...: best top1 ... at epoch ...`); the students' "
              "log also measures the teacher once on their val set with their input pipeline (`teacher: top1 ... on "
              "the val set`), which can differ a little from the teacher's own run."]
    text = "\n".join(table)
    atomic_write_text(text + "\n", out / "demo-results.md")
    return text
