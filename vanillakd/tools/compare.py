"""``vanillakd compare``: KD methods x training-set fractions x seeds under ONE recipe and ONE teacher.

Each (fraction, seed) cell is one train-kd run training every method's student from one teacher pass per
batch (the multi-student path), so all methods see the same batches. A finished cell leaves ``cell.json``
and is skipped on the next invocation; an interrupted one resumes from its checkpoints.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..checkpoint import atomic_write_text
from ..errors import UserError
from .report import markdown_table, plot_curves, plot_fraction, run_result, write_results_csv

log = logging.getLogger("vanillakd")

GRID_KEYS = {"data_dir", "model", "methods", "fractions", "seeds", "teacher", "teacher_pretrained", "output",
             "train_teacher_epochs", "train_teacher_fraction", "recipe", "dataset", "train_split", "val_split",
             "class_map", "input_img_mode", "dataset_download"}
# grid keys that are train-kd's dataset flags, passed to every run (the teacher's and every cell's)
DATASET_KEYS = ("dataset", "train_split", "val_split", "class_map", "input_img_mode")


def dataset_flags(grid: dict) -> list[str]:
    """The grid's dataset keys as train-kd flags."""
    flags = [f"--{k.replace('_', '-')}={grid[k]}" for k in DATASET_KEYS if grid.get(k) not in (None, "")]
    return flags + (["--dataset-download"] if grid.get("dataset_download") else [])


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
    for key in ("data_dir", "model", "teacher"):
        if not grid.get(key):
            raise UserError(f"compare needs {key.replace('_', '-') if key != 'data_dir' else 'DIR'}")
    if not grid.get("teacher_pretrained") and not grid.get("train_teacher_epochs"):
        raise UserError("compare needs --teacher-pretrained FILE or --train-teacher-epochs N")
    if any(not 0 < f <= 1 for f in grid["fractions"]):
        raise UserError(f"fractions must be in (0, 1]: {grid['fractions']}")
    return grid, grid["recipe"] + dataset_flags(grid)


def _cell_name(fraction: float, seed: int) -> str:
    return f"frac{fraction:g}-seed{seed}"


# runs ``train-kd.py`` with a command line, returns each student's result (``cli.run_config.run_train_argv``)
TrainRunner = Callable[[list[str]], list[dict]]


def ensure_teacher(grid: dict, recipe: list[str], out: Path, run_argv: TrainRunner) -> str:
    """The teacher's weights: given, or trained here once with the shared recipe."""
    if grid.get("teacher_pretrained"):
        return str(grid["teacher_pretrained"])
    teacher_dir = out / "teacher"
    best = teacher_dir / "model_best.pth.tar"
    if (teacher_dir / "done.json").is_file() and best.is_file():
        log.info(f"reusing the teacher in {teacher_dir}")
        return str(best)
    log.info(f"training the teacher {grid['teacher']} for {grid['train_teacher_epochs']} epochs")
    resume = ["--resume", "auto"] if (teacher_dir / "last.pth.tar").is_file() else []
    # the recipe first: the teacher's own flags after it win
    run_argv([str(grid["data_dir"])] + recipe + ["--model", grid["teacher"], "--kd-loss", "none", "--output", str(out),
           "--experiment", "teacher", "--epochs", str(grid["train_teacher_epochs"]),
           "--train-fraction", str(grid["train_teacher_fraction"])] + resume)
    atomic_write_text(json.dumps({"teacher": grid["teacher"]}), teacher_dir / "done.json")
    return str(best)


def compare(grid: dict, recipe: list[str], run_argv: TrainRunner) -> tuple[list[dict], Path]:
    """Run (or take up) the grid (``build_grid``'s grid and full recipe); return the result rows and the
    comparison's folder."""
    out = Path(grid["output"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(yaml.safe_dump(dict(grid), sort_keys=False), out / "grid.yaml")
    teacher_weights = ensure_teacher(grid, recipe, out, run_argv)
    methods = list(grid["methods"])
    results: list[dict] = []
    for fraction in grid["fractions"]:
        for seed in grid["seeds"]:
            name = _cell_name(fraction, seed)
            cell = out / "cells" / name
            done = cell / "cell.json"
            if done.is_file():
                log.info(f"{name}: finished earlier, skipped")
                results.extend(json.loads(done.read_text()))
                continue
            resume = ["--resume", "auto"] if any(cell.rglob("last.pth.tar")) else []
            start = time.time()
            log.info(f"{name}: {len(methods)} students ({', '.join(methods)}) from one teacher pass")
            runs = run_argv([str(grid["data_dir"])] + recipe + [
                "--model", *([grid["model"]] * len(methods)), "--kd-loss", *methods,
                "--teacher", grid["teacher"], "--teacher-pretrained", teacher_weights,
                "--train-fraction", str(fraction), "--train-subset-seed", str(seed), "--seed", str(seed),
                "--output", str(out / "cells"), "--experiment", name] + resume)
            dirs = [Path(r["out_dir"]) for r in runs]
            cell_results = [run_result(d) for d in dirs]
            for r in cell_results:
                r.update(fraction=fraction, seed=seed, wall_time_s=round(time.time() - start, 1))
            plot_curves(dirs, out / f"curves-{name}.png", name)
            atomic_write_text(json.dumps(cell_results, indent=2), done)
            results.extend(cell_results)
            _write_outputs(results, methods, out)
    _write_outputs(results, methods, out)
    return results, out


def _write_outputs(results: list[dict], methods: list[str], out: Path) -> None:
    write_results_csv(results, out / "results.csv")
    table = "### top-1 (%), mean ± std over seeds\n\n" + markdown_table(results, "top1", methods)
    if any(r.get("agreement") is not None for r in results):
        table += "\n### teacher-student top-1 agreement (%)\n\n" + markdown_table(results, "agreement", methods)
    atomic_write_text(table, out / "results.md")
    if len({float(r["fraction"]) for r in results}) > 1:
        plot_fraction(results, out / "top1_vs_fraction.png")
