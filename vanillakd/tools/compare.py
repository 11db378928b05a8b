"""``vanillakd compare``: KD methods x training-set fractions x seeds under ONE recipe and ONE teacher.

Each (fraction, seed) cell is one train-kd run training every method's student from one teacher pass per
batch (the multi-student path), so all methods see the same batches. A cell is identified by everything that
decides its result: the data (a digest of the data folder's file list), the fraction, the seed, the student
model, the methods in order, the whole recipe and the teacher with a digest of its weights file. The identity's
hash names the cell's folder (``cells/frac<F>-seed<S>-<id>``, the values in its ``identity.json``): a finished
cell with the same identity is reused, an interrupted one resumes from its checkpoints, and a changed one runs
into a new folder (old folders are never overwritten nor deleted, only left out of the tables and plots). The
methods are one training run per cell, so adding or removing a method reruns every cell.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..checkpoint import atomic_write_text, writable_folder
from ..config import NO_KD
from ..errors import UserError
from ..teachers.cache import file_digest as bytes_digest
from .report import (
    PLOTS_HINT,
    RESULT_FIELDS,
    canonical_hash,
    has_gap,
    pct,
    plot_curves,
    plot_fraction,
    plot_gap,
    plots_available,
    report_tables,
    run_result,
    write_results_csv,
)

log = logging.getLogger("vanillakd")

GRID_KEYS = {"data_dir", "model", "methods", "fractions", "seeds", "teacher", "teacher_pretrained", "output",
             "train_teacher_epochs", "train_teacher_fraction", "recipe", "dataset", "train_split", "val_split",
             "class_map", "input_img_mode", "dataset_download"}
# grid keys that are train-kd's dataset flags, passed to every run (the teacher's and every cell's)
DATASET_KEYS = ("dataset", "train_split", "val_split", "class_map", "input_img_mode")
# results.csv: each run's result and the values that identify its cell
COMPARE_FIELDS = RESULT_FIELDS + ["cell_id", "teacher_sha256", "data_digest", "recipe"]
IDENTITY_VERSION = 1


def compare_methods() -> list[str]:
    """What compare can run: the student without KD and the logit methods (feature methods need train-fd /
    train-crd)."""
    from ..losses import list_kd_losses
    return [NO_KD] + list_kd_losses("logits")


def dataset_flags(grid: dict) -> list[str]:
    """The grid's dataset keys as train-kd flags."""
    flags = [f"--{k.replace('_', '-')}={grid[k]}" for k in DATASET_KEYS if grid.get(k) not in (None, "")]
    return flags + (["--dataset-download"] if grid.get("dataset_download") else [])


def _check_grid(grid: dict) -> None:
    for key in ("data_dir", "model", "teacher"):
        if not grid.get(key):
            raise UserError(f"compare needs {key.replace('_', '-') if key != 'data_dir' else 'DIR'}")
    if not grid.get("teacher_pretrained") and not grid.get("train_teacher_epochs"):
        raise UserError("compare needs --teacher-pretrained FILE or --train-teacher-epochs N")
    if any(not 0 < f <= 1 for f in grid["fractions"]):
        raise UserError(f"fractions must be in (0, 1]: {grid['fractions']}")
    allowed = compare_methods()
    unknown = [m for m in grid["methods"] if m not in allowed]
    if unknown:
        raise UserError(f"compare cannot run the methods {unknown}: it runs {', '.join(allowed)} (feature methods "
                        "train with train-fd / train-crd)")
    for key in ("methods", "fractions", "seeds"):
        if len(set(grid[key])) != len(grid[key]):
            raise UserError(f"{key} repeat a value: {grid[key]}")


def build_grid(flags: Mapping[str, Any], recipe: Sequence[str] = ()) -> tuple[dict, list[str]]:
    """The grid from the YAML file ``flags['config']`` (if any) overridden by the other ``flags`` that are not
    None (grid keys, as ``cli.compare`` parses them); ``recipe``: train-kd flags for every run, after the grid's.
    Returns the grid and the full recipe (with the dataset flags)."""
    config = flags.get("config") or ""
    recipe = list(recipe)
    grid = {"methods": ["none", "kd", "dkd", "dist"], "fractions": [1.0], "seeds": [0], "output": "runs/compare",
            "train_teacher_fraction": 1.0, "recipe": []}
    if config:
        try:
            cfg = yaml.safe_load(Path(config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"cannot read the grid {config}: {e}") from None
        unknown = set(cfg) - GRID_KEYS
        if unknown:
            raise UserError(f"grid {config}: unknown keys {sorted(unknown)}; known: {sorted(GRID_KEYS)}")
        grid.update(cfg)
    for key in GRID_KEYS - {"recipe"}:
        value = flags.get(key)
        if value is not None:
            grid[key] = value
    grid["recipe"] = [str(x) for x in grid.get("recipe") or []] + recipe
    grid["fractions"] = [float(f) for f in grid["fractions"]]
    grid["seeds"] = [int(s) for s in grid["seeds"]]
    _check_grid(grid)
    return grid, grid["recipe"] + dataset_flags(grid)


# ---- identities: what decides a result, hashed

def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (of the text itself where ``path`` is not a file)."""
    try:
        return bytes_digest(path)
    except OSError:
        return "not-a-file:" + hashlib.sha256(str(path).encode()).hexdigest()


def folder_digest(root: str | os.PathLike) -> dict:
    """The data folder's file list (relative paths and sizes, sorted) as a count and a sha256."""
    h, n = hashlib.sha256(), 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            try:
                size = os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                size = -1
            h.update(f"{rel}/{name}\t{size}\n".encode())
            n += 1
    return {"files": n, "sha256": h.hexdigest()}


def data_identity(grid: dict) -> dict:
    """The data as it decides results: the folder's file list (fetched first with ``dataset_download``) and the
    class map's bytes; the dataset flags are in the recipe."""
    if grid.get("dataset_download") and str(grid.get("dataset") or "").startswith("torch/"):
        from ..data.sources import build_train_val_any
        build_train_val_any(str(grid["data_dir"]), grid.get("dataset") or "", grid.get("train_split") or "train",
                            grid.get("val_split") or "validation", grid.get("class_map") or "", download=True)
    out = {"folder": folder_digest(grid["data_dir"])}
    if grid.get("class_map"):
        out["class_map_sha256"] = file_digest(grid["class_map"])
    return out


def _stored_id(folder: Path) -> str | None:
    try:
        return json.loads((folder / "identity.json").read_text())["id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _claim(folder: Path, identity: dict, ident: str) -> None:
    """Record ``identity`` in ``folder`` (before anything trains there)."""
    writable_folder(folder, "compare folder")
    atomic_write_text(json.dumps({"id": ident, "identity": identity}, indent=2), folder / "identity.json")


def _cell_name(fraction: float, seed: int) -> str:
    return f"frac{fraction:g}-seed{seed}"


# runs ``train-kd.py`` with a command line, returns each student's result (``cli.run_config.run_train_argv``)
TrainRunner = Callable[[list[str]], list[dict]]


def teacher_identity(grid: dict, recipe: list[str], data: dict) -> dict:
    return {"version": IDENTITY_VERSION, "teacher": grid["teacher"], "epochs": int(grid["train_teacher_epochs"]),
            "fraction": float(grid["train_teacher_fraction"]), "recipe": list(recipe), "data": data}


def ensure_teacher(grid: dict, recipe: list[str], out: Path, run_argv: TrainRunner, data: dict) -> str:
    """The teacher's weights: given, or trained here once with the shared recipe (in ``teacher/``, or in
    ``teacher-<id>/`` when ``teacher/`` holds a teacher trained otherwise)."""
    if grid.get("teacher_pretrained"):
        return str(grid["teacher_pretrained"])
    identity = teacher_identity(grid, recipe, data)
    ident = canonical_hash(identity)
    teacher_dir = next((d for d in (out / "teacher", out / f"teacher-{ident[:12]}")
                        if not d.exists() or _stored_id(d) == ident), out / f"teacher-{ident[:12]}")
    best = teacher_dir / "model_best.pth.tar"
    if (teacher_dir / "done.json").is_file() and best.is_file() and _stored_id(teacher_dir) == ident:
        log.info(f"reusing the teacher in {teacher_dir} (same identity {ident[:12]})")
        return str(best)
    log.info(f"training the teacher {grid['teacher']} for {grid['train_teacher_epochs']} epochs in {teacher_dir}")
    resume = ["--resume", "auto"]  # continues an interrupted teacher, and starts one that has no checkpoint yet
    _claim(teacher_dir, identity, ident)
    # the recipe first: the teacher's own flags after it win
    run_argv([str(grid["data_dir"])] + recipe + ["--model", grid["teacher"], "--kd-loss", "none", "--output", str(out),
             "--experiment", teacher_dir.name, "--epochs", str(grid["train_teacher_epochs"]),
             "--train-fraction", str(grid["train_teacher_fraction"])] + resume)
    atomic_write_text(json.dumps({"teacher": grid["teacher"], "id": ident}), teacher_dir / "done.json")
    return str(best)


def cell_identity(grid: dict, recipe: list[str], data: dict, teacher_sha256: str, fraction: float,
                  seed: int) -> dict:
    """Everything that decides a cell's results (and nothing that does not, like the output folder)."""
    return {"version": IDENTITY_VERSION, "data": data, "fraction": float(fraction), "seed": int(seed),
            "model": grid["model"], "methods": list(grid["methods"]), "recipe": list(recipe),
            "teacher": grid["teacher"], "teacher_sha256": teacher_sha256}


def run_cell(grid: dict, recipe: list[str], out: Path, run_argv: TrainRunner, teacher_weights: str,
             identity: dict) -> tuple[list[dict], Path, bool]:
    """One cell's result rows, its folder and whether it trained now (False: reused from an earlier run)."""
    fraction, seed, methods = identity["fraction"], identity["seed"], list(grid["methods"])
    ident = canonical_hash(identity)
    name = f"{_cell_name(fraction, seed)}-{ident[:12]}"
    cell = out / "cells" / name
    done = cell / "cell.json"
    if done.is_file() and _stored_id(cell) == ident:
        log.info(f"{name}: finished earlier with the same identity, reused")
        return json.loads(done.read_text())["results"], cell, False
    resume = ["--resume", "auto"]  # continues an interrupted cell, and starts one that has no checkpoint yet
    _claim(cell, identity, ident)
    start = time.time()
    log.info(f"{name}: training {len(methods)} students ({', '.join(methods)}) from one teacher pass")
    runs = run_argv([str(grid["data_dir"])] + recipe + [
        "--model", *([grid["model"]] * len(methods)), "--kd-loss", *methods,
        "--teacher", grid["teacher"], "--teacher-pretrained", teacher_weights,
        "--train-fraction", str(fraction), "--train-subset-seed", str(seed), "--seed", str(seed),
        "--output", str(out / "cells"), "--experiment", name] + resume)
    rows = [run_result(Path(r["out_dir"])) for r in runs]
    for r in rows:
        r.update(fraction=fraction, seed=seed, wall_time_s=round(time.time() - start, 1), cell_id=ident[:12],
                 teacher_sha256=identity["teacher_sha256"][:16], data_digest=identity["data"]["folder"]["sha256"][:16],
                 recipe=" ".join(recipe))
    atomic_write_text(json.dumps({"id": ident, "results": rows}, indent=2), done)
    return rows, cell, True


def _cell_title(rows: list[dict], fraction: float, seed: int) -> str:
    images = {r.get("train_images") for r in rows} - {None}
    return f"{pct(fraction)} of train" + (f" ({images.pop():,} images)" if len(images) == 1 else "") + f", seed {seed}"


def compare(grid: dict, recipe: list[str], run_argv: TrainRunner) -> tuple[list[dict], Path]:
    """Run (or take up) the grid (``build_grid``'s grid and full recipe); return the current grid's result rows
    and the comparison's folder."""
    out = writable_folder(grid["output"], "compare --output")  # before any training
    atomic_write_text(yaml.safe_dump(dict(grid), sort_keys=False), out / "grid.yaml")
    data = data_identity(grid)
    teacher_weights = ensure_teacher(grid, recipe, out, run_argv, data)
    teacher_sha256 = file_digest(teacher_weights)
    plots = plots_available(say=False)
    results: list[dict] = []
    folders, trained = set(), 0
    for fraction in grid["fractions"]:
        for seed in grid["seeds"]:
            identity = cell_identity(grid, recipe, data, teacher_sha256, fraction, seed)
            rows, cell, ran = run_cell(grid, recipe, out, run_argv, teacher_weights, identity)
            results.extend(rows)
            folders.add(cell.name)
            trained += ran
            _write_tables(results, grid, out)
            if plots:
                plot_curves([Path(r["run_dir"]) for r in rows], out / f"curves-{_cell_name(fraction, seed)}.png",
                            _cell_title(rows, fraction, seed))
    log.info(f"{trained} of {len(folders)} cells trained now, {len(folders) - trained} reused")
    _note_other_cells(out, folders)
    if plots:
        _write_plots(results, grid, out)
    else:
        log.info(PLOTS_HINT + f"; {out / 'results.csv'} and {out / 'results.md'} are written")
    return results, out


def _write_tables(results: list[dict], grid: dict, out: Path) -> None:
    write_results_csv(results, out / "results.csv", COMPARE_FIELDS)
    atomic_write_text(report_tables(results, grid["methods"]), out / "results.md")


def _write_plots(results: list[dict], grid: dict, out: Path) -> None:
    """The grid's figures; a figure this grid does not make (or a cell's curves from another grid) is removed,
    so the folder's plots always describe the current grid."""
    plot_fraction(results, out / "top1_vs_fraction.png", method_order=grid["methods"])
    gap = out / "kd_gap_vs_fraction.png"
    if has_gap(results):
        plot_gap(results, gap)
    elif gap.is_file():
        gap.unlink()
    current = {f"curves-{_cell_name(f, s)}.png" for f in grid["fractions"] for s in grid["seeds"]}
    for png in out.glob("curves-frac*-seed*.png"):
        if png.name not in current and re.fullmatch(r"curves-frac[0-9.e-]+-seed\d+\.png", png.name):
            png.unlink()


def _note_other_cells(out: Path, current: set[str]) -> None:
    others = sorted(d.name for d in (out / "cells").iterdir() if d.is_dir() and d.name not in current)
    if others:
        log.info(f"{len(others)} cell folder(s) in {out / 'cells'} from other grids are kept and not reported: "
                 + ", ".join(others[:4]) + (", ..." if len(others) > 4 else ""))
