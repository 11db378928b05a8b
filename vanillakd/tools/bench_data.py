"""``vanillakd bench --data``: img/s of the training input pipeline, per worker, the loader, and with the KD step.

'per worker': one process decodes and augments samples one by one (what each DataLoader worker does).
'loader': the training loader alone (sampler, workers, collate with mixup / cutmix, the device prefetcher)
delivering normalised batches on the device, for each requested worker count and pipeline.
'with KD step' (``--with-kd``): the same loader with every batch also going through the KD training step.
Without ``--data-dir`` it writes ``--num-images`` ImageNet-like JPEGs (500x375, smooth content plus noise) to a
temporary folder; with it, ``--num-images`` takes that many images of the folder, spread over its classes.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import RunConfig
from .bench import Configure, bench_device, kd_step_fn

A2_FLAGS = ["--aa", "rand-m7-mstd0.5-inc1", "--mixup", "0.1", "--cutmix", "1.0", "--smoothing", "0.0"]


def write_jpegs(root: Path, n: int, size: tuple[int, int] = (500, 375), classes: int = 4, seed: int = 0,
                processes: int | None = None) -> Path:
    """``n`` JPEGs of ImageNet-like size and file size (~80 KB at quality 90): smooth colour fields plus noise."""
    import os
    from concurrent.futures import ProcessPoolExecutor
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    jobs = [(root / f"class{i % classes}" / f"{i:06d}.jpg", size, seed * 1_000_003 + i) for i in range(n)]
    processes = processes or min(8, os.cpu_count() or 1)
    if processes > 1 and n >= 64:
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(_write_jpeg, jobs, chunksize=32))
    else:
        for job in jobs:
            _write_jpeg(job)
    return root


def _write_jpeg(job) -> None:
    from PIL import Image
    path, (w, h), seed = job
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, (h // 25 + 1, w // 25 + 1, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.float32)
    img += rng.normal(0, 12, img.shape)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=90)


SYNTHETIC_IMAGES = 512  # JPEGs written without --data-dir and --num-images


def spread(samples: list, n: int) -> list:
    """``n`` of ``samples`` (all when fewer), evenly spaced so that a class-sorted folder keeps all its classes."""
    if n >= len(samples):
        return list(samples)
    return [samples[i * len(samples) // n] for i in range(n)]


def _train_config(a: Any, workers: int, pipeline: str, device: torch.device, configure: Configure) -> RunConfig:
    """The loaders are built from a train-kd command line, exactly as a training run builds them."""
    flags = a.recipe_flags if a.recipe_flags is not None else A2_FLAGS
    pin = "--pin-mem" if device.type == "cuda" else "--no-pin-mem"
    return configure(["x", "--img-size", str(a.data_img_size), "-b", str(a.data_batch_size), "--workers",
                      str(workers), "--data-pipeline", pipeline, pin, *flags])


def per_worker_rate(dataset, cfg: RunConfig, data_config: dict, pipeline: str, n: int) -> float:
    """img/s of one process producing samples for ``pipeline`` (what one loader worker does)."""
    from ..data.loader import train_dataset_view
    view = train_dataset_view(dataset, data_config, cfg, pipeline)
    keys = [(0, i, i % len(dataset)) for i in range(n)]
    view[keys[0]]  # imports, first-call set-up
    t0 = time.perf_counter()
    for k in keys:
        view[k]
    return n / (time.perf_counter() - t0)


def end_to_end_rate(dataset, cfg: RunConfig, data_config: dict, num_classes: int,
                    device: torch.device, epochs: int = 2, step=None) -> float:
    """img/s of the training loader delivering normalised, mixed batches on ``device`` (second epoch timed, so
    worker start-up is excluded); with ``step(x, target)`` each batch also goes through it (the KD step)."""
    from ..data.loader import build_train_loader, set_epoch
    loader = build_train_loader(dataset, data_config, cfg, num_classes, device)
    rate = 0.0
    for epoch in range(epochs):
        set_epoch(loader, epoch)
        t0, seen = time.perf_counter(), 0
        for batch in loader:
            if step is not None:
                step(batch[0], batch[1])
            seen += batch[0].shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rate = seen / (time.perf_counter() - t0)
    return rate


def data_bench(a: Any, tmp: Path, command: str, configure: Configure) -> dict:
    """The pipelines' rates; JPEGs are written under ``tmp`` unless ``--data-dir`` is given."""
    from timm.data import create_dataset, resolve_data_config

    device, precision, a = bench_device(a)
    root = Path(a.data_dir) if a.data_dir else write_jpegs(tmp / "jpegs", a.num_images or SYNTHETIC_IMAGES)
    dataset = create_dataset("", root=str(root), is_training=True)
    folder_classes = len(dataset.reader.class_to_idx) or len({t for _, t in dataset.reader.samples})
    if a.data_dir and a.num_images:
        dataset.reader.samples = spread(dataset.reader.samples, a.num_images)
    # with the KD step, the models keep --num-classes (the same compiled graphs as the step bench)
    num_classes = max(folder_classes, a.num_classes if a.with_kd else 0)
    kd_step = None
    if a.with_kd:
        a.img_size, a.batch_size, a.num_classes = a.data_img_size, a.data_batch_size, num_classes
        kd_step = kd_step_fn(a, device, precision, tmp / "student", configure)
        res_kd = {"student": a.student, "teacher": a.teacher, "compile": a.compile, "amp": a.amp}
    res = {"mode": "data", "device_type": device.type, "images": len(dataset), "img_size": a.data_img_size,
           "batch_size": a.data_batch_size, "recipe": a.recipe_flags or A2_FLAGS, "rows": [],
           "command": command, **(res_kd if kd_step is not None else {})}
    if device.type == "cuda":
        res["device"] = torch.cuda.get_device_name(device)
    for pipeline in a.pipelines:
        cfg = _train_config(a, 0, pipeline, device, configure)
        data_config = resolve_data_config({"img_size": a.data_img_size})
        n = min(len(dataset), 128)
        res["rows"].append({"pipeline": pipeline, "stage": "per worker", "workers": 1,
                            "img_s": per_worker_rate(dataset, cfg, data_config, pipeline, n)})
        for workers in a.data_workers:
            cfg = _train_config(a, workers, pipeline, device, configure)
            res["rows"].append({"pipeline": pipeline, "stage": "loader", "workers": workers,
                                "img_s": end_to_end_rate(dataset, cfg, data_config, num_classes, device)})
            if kd_step is not None:
                res["rows"].append({"pipeline": pipeline, "stage": "with KD step", "workers": workers,
                                    "img_s": end_to_end_rate(dataset, cfg, data_config, num_classes, device,
                                                             step=kd_step)})
    return res


def print_data_table(res: dict) -> None:
    print(f"{'pipeline':<10}{'stage':<14}{'workers':>8}{'img/s':>10}")
    for r in res["rows"]:
        print(f"{r['pipeline']:<10}{r['stage']:<14}{r['workers']:>8}{r['img_s']:>10.1f}")
    print("(per worker: one process decoding + augmenting; loader: the training loader alone; with KD step: "
          "the loader feeding the KD training step)")
    print(f"[{res.get('device', res['device_type'])}, {res['images']} images, {res['img_size']}px, batch "
          f"{res['batch_size']}, {' '.join(res['recipe'])}]")
