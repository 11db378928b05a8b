"""``vanillakd bench``: img/s of the KD training step and of its parts, or of the input pipeline (``--data``).

Step mode (synthetic data already on the device) measures, for one student <- teacher pair:
  (a) the teacher forward, (b) the student train step alone, (c) our KD step (teacher + student step through
  the same ``StudentRun.train_step`` the training scripts use), (d) an original-style KD step written here as
  the seed's loop runs it (float16 autocast + GradScaler on CUDA, NCHW, teacher under no_grad, ``loss.item()``
  every step, no compile, the optimizer's default kernels), and (e) our KD step reading the teacher's logits
  from a teacher cache on disk. Each is timed in several interleaved rounds and the median round kept, so a
  passing load on a shared machine hits all of them alike.

Not a test: timings are noisy on shared machines; run it alone and compare numbers from one run only.
"""
from __future__ import annotations

import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..config import RunConfig, SpeedConfig

# a train-kd command line -> its checked RunConfig (``cli.run_config.parse_run_config``): the benchmarks build
# students and loaders exactly as training runs do, from the flags a user would pass
Configure = Callable[[Sequence[str]], RunConfig]

STEP_KEYS = ("teacher_forward", "student_step", "kd_step", "original_kd_step", "cached_kd_step")
LABELS = {"teacher_forward": "(a) teacher forward", "student_step": "(b) student step",
          "kd_step": "(c) our KD step", "original_kd_step": "(d) original-style KD step",
          "cached_kd_step": "(e) KD step, teacher cache"}


def median_round_time(fns: dict[str, Callable[[], None]], steps: int, rounds: int, warmup: int,
                      device: torch.device) -> dict[str, float]:
    """Seconds per call of each function: warm-up, then ``rounds`` interleaved rounds of ``steps`` calls;
    the device is synchronised only around each timed round."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            times[key].append((time.perf_counter() - t0) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def in_temp_dir(fn: Callable, a: Any, command: str, configure: Configure) -> dict:
    """``fn(a, folder, command, configure)`` with a scratch folder that is removed afterwards (students'
    outputs, JPEGs)."""
    with tempfile.TemporaryDirectory(prefix="vanillakd-bench-") as tmp:
        return fn(a, Path(tmp), command, configure)


def bench_device(a: Any):
    """The device and precision of a benchmark, and the bench's flags with the auto speed switches resolved
    as a training run resolves them (``a``: the bench's parsed flags, left as they are)."""
    from ..precision import Precision, resolve_device
    from ..speed import resolve_speed
    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    asked = SpeedConfig(device=a.device, amp=a.amp, amp_dtype="auto", pin_mem=None, fused_opt=None,
                        channels_last=a.channels_last, compile=a.compile, compile_mode=None)
    speed, _ = resolve_speed(asked, device, [a.student])
    a = SimpleNamespace(**{**vars(a), "amp": speed.amp, "channels_last": speed.channels_last})
    return device, Precision.create(device, bool(speed.amp)), a


def bench_student(a: Any, kd_loss: str, device: torch.device, precision, out_dir: Path, configure: Configure):
    """A student through the same ``StudentRun`` the training scripts build (mixup targets, --opt, speed flags)."""
    from ..student import StudentContext, StudentRun
    flags = ["x", "--model", a.student, "--kd-loss", kd_loss, "--opt", a.opt, "--lr", "1e-3", "--mixup", "0.1",
             "--output", str(out_dir), "--channels-last" if a.channels_last else "--no-channels-last"]
    cfg = configure(flags + (["--compile"] if a.compile else []))
    st = StudentRun(0, cfg.students[0], cfg, StudentContext(device, precision, a.num_classes, 1000), out_dir / kd_loss)
    st.train()
    return st


def bench_teacher(a: Any, device: torch.device):
    import timm

    from ..teachers.live import FrozenTeacher
    teacher = FrozenTeacher(timm.create_model(a.teacher, num_classes=a.num_classes)).to(device)
    if a.channels_last:
        teacher.to(memory_format=torch.channels_last)
    if a.compile:
        teacher.compile_forward()
    return teacher


def step_bench(a: Any, tmp: Path, command: str, configure: Configure) -> dict:
    import timm

    from ..precision import Precision
    device, precision, a = bench_device(a)
    n, c = a.batch_size, a.num_classes
    # the seed's recipe: float16 autocast + GradScaler on CUDA; on the CPU the same precision as ours
    original_precision = Precision(device.type, torch.float16) if device.type == "cuda" else precision
    teacher = bench_teacher(a, device)
    x = torch.randn(n, 3, a.img_size, a.img_size, device=device)
    x_fast = x.contiguous(memory_format=torch.channels_last) if a.channels_last else x
    y = torch.softmax(torch.randn(n, c, device=device), 1)
    only = set(a.only or STEP_KEYS)
    fns: dict[str, Callable[[], None]] = {}
    runs = []

    def teacher_fwd():
        with precision.autocast():
            return teacher.batch_output(x_fast, y, 0, 0)

    if "teacher_forward" in only:
        fns["teacher_forward"] = teacher_fwd
    if "student_step" in only:
        alone = bench_student(a, "none", device, precision, tmp / "alone", configure)
        runs.append(alone)
        fns["student_step"] = lambda: alone.train_step(x_fast, y, None)
    if "kd_step" in only:
        kd = bench_student(a, a.kd_loss, device, precision, tmp / "kd", configure)
        runs.append(kd)
        fns["kd_step"] = lambda: kd.train_step(x_fast, y, teacher_fwd())
    if "original_kd_step" in only:
        fns["original_kd_step"] = original_style_step(a, device, original_precision, x, y, teacher.model)
    if "cached_kd_step" in only:
        cached = bench_student(a, a.kd_loss, device, precision, tmp / "cached", configure)
        runs.append(cached)
        cache = _synthetic_cache(tmp / "cache", teacher_fwd, x_fast, y, a.cache_topk, c, device)
        counter = iter(range(10 ** 9))
        fns["cached_kd_step"] = lambda: cached.train_step(
            x_fast, y, cache.batch_output(x_fast, y, 0, next(counter) % 4))
    t = median_round_time(fns, a.steps, a.rounds, a.warmup, device)
    for st in runs:
        st.close()
    res = {"mode": "step", "device": _device_name(device), "device_type": device.type, "torch": torch.__version__,
           "timm": timm.__version__, "threads": torch.get_num_threads(), "student": a.student, "teacher": a.teacher,
           "img_size": a.img_size, "batch_size": n, "precision": str(precision),
           "original_precision": str(original_precision), "channels_last": bool(a.channels_last),
           "compile": a.compile, "kd_loss": a.kd_loss, "opt": a.opt, "cache_topk": a.cache_topk,
           "steps": a.steps, "rounds": a.rounds, "command": command}
    for key, sec in t.items():
        res[f"{key}_img_s"] = n / sec
        res[f"{key}_ms"] = 1000 * sec
    if {"kd_step", "teacher_forward", "student_step"} <= t.keys():
        res["kd_over_teacher_plus_student"] = t["kd_step"] / (t["teacher_forward"] + t["student_step"])
    if {"cached_kd_step", "student_step"} <= t.keys():
        res["cached_over_student"] = t["cached_kd_step"] / t["student_step"]
    if {"kd_step", "original_kd_step"} <= t.keys():
        res["speedup_over_original"] = t["original_kd_step"] / t["kd_step"]
    return res


def kd_step_fn(a: Any, device: torch.device, precision, out_dir: Path,
               configure: Configure) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """Our KD step (teacher forward + student step) as ``step(x, target)``, for the data bench."""
    st = bench_student(a, a.kd_loss, device, precision, out_dir, configure)
    teacher = bench_teacher(a, device)

    def step(x: torch.Tensor, target: torch.Tensor) -> None:
        if a.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision.autocast():
            t = teacher.batch_output(x, target, 0, 0)
        st.train_step(x, target, t)
    return step


def original_style_step(a, device, precision, x, y, teacher_model) -> Callable[[], None]:
    """The seed's train loop step, reproduced: its own student and optimizer, NCHW, float16 + GradScaler on
    CUDA, the teacher under no_grad in the same autocast, ``loss.item()`` (a host sync) every step."""
    import timm
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2

    from ..losses import create_kd_loss
    model = timm.create_model(a.student, num_classes=a.num_classes).to(device).train()
    teacher_model = teacher_model.eval()
    opt = create_optimizer_v2(model, opt=a.opt, lr=1e-3, weight_decay=0.01)
    scaler = precision.grad_scaler()
    base, kd_loss = SoftTargetCrossEntropy(), create_kd_loss(a.kd_loss)
    seen = []

    def step():
        with precision.autocast():
            out = model(x)
            with torch.no_grad():
                t_out = teacher_model(x)
            loss = base(out, y) + kd_loss(z_s=out, z_t=t_out, target=y)
        opt.zero_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        seen.append(loss.item())
    return step


def _synthetic_cache(root: Path, teacher_fwd, x, y, topk: int, num_classes: int, device):
    """A 4-step cache of the teacher's real outputs on the synthetic batch, read back through CachedTeacher."""
    from ..teachers.cache import CachedTeacher, EpochWriter, Storage, input_fingerprint
    full = topk == 0 or topk >= num_classes
    storage = Storage(topk=0 if full else topk, dtype="float32" if full else "float16", num_classes=num_classes,
                      batch_size=x.shape[0], steps=4)
    writer = EpochWriter(root, 0, 0, storage)
    logits = teacher_fwd()
    for step in range(4):
        writer.add(step, logits, input_fingerprint(x, y))
    writer.commit()
    manifest = {"stream": {"num_classes": num_classes},
                "storage": {"topk": storage.topk, "dtype": storage.dtype}, "teacher": {}}
    return CachedTeacher(root, manifest, 0, device)


def print_step_table(res: dict) -> None:
    print(f"{'step':<32}{'img/s':>10}{'ms/batch':>10}")
    for key in STEP_KEYS:
        if f"{key}_img_s" in res:
            print(f"{LABELS[key]:<32}{res[f'{key}_img_s']:>10.1f}{res[f'{key}_ms']:>10.2f}")
    for key, text in (("kd_over_teacher_plus_student", "our KD step / (teacher + student)"),
                      ("cached_over_student", "cached KD step / student step"),
                      ("speedup_over_original", "our KD step speed-up over original")):
        if key in res:
            print(f"{text:<42}{res[key]:.3f}")
    print(f"[{res['device']}, {res['precision']}, batch {res['batch_size']}, {res['img_size']}px, "
          f"{res['student']} <- {res['teacher']}, channels_last {res['channels_last']}, compile {res['compile']}]")
