"""The offline demo: Fashion-MNIST, a teacher trained here (or reused), then one small student trained from
scratch, with vanilla KD and with DKD under the same recipe, from one teacher pass per batch.

It drives the same ``train-kd`` code a user runs; only the flags are chosen here.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from .cli.train_args import _Parser
from .data.fashion_mnist import is_prepared, make_subset, prepare_fashion_mnist
from .train import run_argv

log = logging.getLogger("vanillakd")

# one recipe for every student; strong enough augmentation for 28 px garments
RECIPE = ["--input-size", "3", "32", "32", "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5",
          "--scale", "0.5", "1.0", "--color-jitter", "0", "--crop-pct", "1.0", "--interpolation", "bilinear",
          "--train-interpolation", "bilinear", "--opt", "adamw", "--weight-decay", "0.05", "--sched", "cosine",
          "--warmup-epochs", "1", "--warmup-lr", "1e-4", "--min-lr", "1e-5", "--smoothing", "0.0",
          "--no-progress"]


def _teacher_key(args) -> dict:
    return {"model": args.teacher_model, "per_class": args.teacher_per_class, "epochs": args.teacher_epochs,
            "lr": args.teacher_lr, "seed": args.seed, "val_per_class": args.val_per_class}


def main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="vanillakd demo", description=__doc__)
    p.add_argument("--data", default="data/fashion-mnist", help="Fashion-MNIST ImageFolder (prepared if missing)")
    p.add_argument("--source", default=None, help="folder with the idx files (default: Debian's package)")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--teacher-model", default="test_resnet")
    p.add_argument("--teacher-per-class", type=int, default=2000)
    p.add_argument("--teacher-epochs", type=int, default=4)
    p.add_argument("--teacher-lr", type=float, default=3e-3)
    p.add_argument("--student-model", default="test_resnet")
    p.add_argument("--student-per-class", type=int, default=200)
    p.add_argument("--student-epochs", type=int, default=15)
    p.add_argument("--student-lr", type=float, default=3e-3)
    p.add_argument("--val-per-class", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (tiny models on 2 cores: one thread and one loader worker are fastest)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from .outputs import setup_console_logging
    setup_console_logging()
    import torch
    torch.set_num_threads(args.threads)

    if not is_prepared(args.data):
        log.info(f"preparing Fashion-MNIST in {args.data} ...")
    prepare_fashion_mnist(args.data, args.source)
    out = Path(args.output)
    common = ["--workers", str(args.workers), "--seed", str(args.seed), "-b", str(args.batch_size),
              "--output", str(out), "--log-interval", "1000"] + RECIPE

    teacher_dir, key_file = out / "teacher", out / "teacher" / "demo-teacher.json"
    teacher_ckpt = teacher_dir / "model_best.pth.tar"
    if teacher_ckpt.is_file() and key_file.is_file() and json.loads(key_file.read_text()) == _teacher_key(args):
        log.info(f"reusing the teacher in {teacher_dir}")
        teacher_top1 = float(json.loads((teacher_dir / "result.json").read_text())["top1"])
    else:
        data = make_subset(args.data, out / "data-teacher", {"train": args.teacher_per_class,
                                                             "val": args.val_per_class}, seed=args.seed)
        log.info(f"training the teacher ({args.teacher_model}, {args.teacher_per_class} images per class)")
        res = run_argv([str(data), "--model", args.teacher_model, "--kd-loss", "none", "--experiment", "teacher",
                      "--epochs", str(args.teacher_epochs), "--lr", str(args.teacher_lr),
                      "--eval-interval", str(args.teacher_epochs)] + common)[0]
        teacher_top1 = res["best_metric"]
        (teacher_dir / "result.json").write_text(json.dumps({"top1": teacher_top1}))
        key_file.write_text(json.dumps(_teacher_key(args)))

    data = make_subset(args.data, out / "data-student", {"train": args.student_per_class,
                                                         "val": args.val_per_class}, seed=args.seed)
    log.info(f"training {args.student_model} from scratch, with KD and with DKD "
             f"({args.student_per_class} images per class, one teacher pass per batch)")
    results = run_argv([str(data), "--model", args.student_model, "--kd-loss", "none", "kd", "dkd",
                      "--teacher", args.teacher_model, "--teacher-pretrained", str(teacher_ckpt),
                      "--temperature", str(args.temperature), "--experiment", "students",
                      "--epochs", str(args.student_epochs), "--lr", str(args.student_lr),
                      "--eval-interval", str(args.student_epochs)] + common)
    rows = [("teacher", args.teacher_model, f"{args.teacher_per_class}/class", teacher_top1)]
    names = {"none": "scratch", "kd": "vanilla KD", "dkd": "DKD"}
    for r, method in zip(results, ["none", "kd", "dkd"]):
        rows.append((names[method], args.student_model, f"{args.student_per_class}/class",
                     float(r["last"]["eval_top1"])))
    table = ["| run | model | train images | top-1 (%) |", "|---|---|---|---|"]
    table += [f"| {a} | {b} | {c} | {d:.2f} |" for a, b, c, d in rows]
    text = "\n".join(table)
    (out / "demo-results.md").write_text(text + "\n")
    print("\nFashion-MNIST, val " + f"{args.val_per_class}/class:\n" + text)
    return 0
