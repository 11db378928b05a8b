#!/usr/bin/env python3
"""Throughput of the KD training step against its parts, on synthetic data already on the device.

Prints img/s of (a) the teacher forward, (b) the student-only train step, (c) our KD step (teacher forward +
student step through the same StudentRun the training scripts use), and the KD step's overhead over a + b.
Not a test: timings on a shared machine are noisy; run it alone.

    python benchmarks/kd_step.py                       # tiny CPU pair (test_resnet <- resnet10t)
    python benchmarks/kd_step.py --student resnet50 --teacher beitv2_base_patch16_224 --img-size 224 \
        --batch-size 256 --amp --channels-last --device cuda
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vanillakd.cli.train_args import build_train_parser  # noqa: E402
from vanillakd.models import FrozenTeacher  # noqa: E402
from vanillakd.precision import Precision, resolve_device  # noqa: E402
from vanillakd.student import StudentRun, student_settings  # noqa: E402


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call, after warm-up; synchronises only around the timed region."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="test_resnet")
    p.add_argument("--teacher", default="resnet10t")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--kd-loss", default="kd")
    p.add_argument("--opt", default="lamb")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    precision = Precision.create(device, a.amp)
    tmp = Path(tempfile.mkdtemp())

    def student(kd_loss: str) -> StudentRun:
        args = build_train_parser("bench", "").parse_args(
            ["x", "--model", a.student, "--kd-loss", kd_loss, "--opt", a.opt, "--lr", "1e-3", "--mixup", "0.1",
             "--output", str(tmp)] + (["--channels-last"] if a.channels_last else []))
        st = StudentRun(0, student_settings(args)[0], args, a.num_classes, device, precision, 1000, tmp / kd_loss)
        st.train()
        return st

    import timm
    teacher = FrozenTeacher(timm.create_model(a.teacher, num_classes=a.num_classes)).to(device)
    if a.channels_last:
        teacher.to(memory_format=torch.channels_last)
    x = torch.randn(a.batch_size, 3, a.img_size, a.img_size, device=device)
    if a.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.softmax(torch.randn(a.batch_size, a.num_classes, device=device), 1)
    alone, kd = student("none"), student(a.kd_loss)

    def teacher_fwd():
        with precision.autocast():
            return teacher(x)

    def kd_step():
        kd.train_step(x, y, teacher_fwd())

    t_teacher = timed(teacher_fwd, a.steps, a.warmup, device)
    t_student = timed(lambda: alone.train_step(x, y, None), a.steps, a.warmup, device)
    t_kd = timed(kd_step, a.steps, a.warmup, device)
    n = a.batch_size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    res = {"device": str(name),
           "torch": torch.__version__, "timm": timm.__version__, "threads": torch.get_num_threads(),
           "student": a.student, "teacher": a.teacher, "img_size": a.img_size, "batch_size": n, "amp": str(precision),
           "teacher_forward_img_s": n / t_teacher, "student_step_img_s": n / t_student, "kd_step_img_s": n / t_kd,
           "kd_over_parts": t_kd / (t_teacher + t_student)}
    print(f"{'step':<28}{'img/s':>10}{'ms/batch':>10}")
    for name, t in (("teacher forward", t_teacher), ("student step", t_student), (f"KD step ({a.kd_loss})", t_kd)):
        print(f"{name:<28}{n / t:>10.1f}{1000 * t:>10.1f}")
    print(f"KD step / (teacher + student) = {res['kd_over_parts']:.3f}  "
          f"[{res['device']}, {precision}, batch {n}, {a.img_size}px, {a.student} <- {a.teacher}]")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    alone.close()
    kd.close()


if __name__ == "__main__":
    main()
