"""Every flag's value is checked at start-up, before any work: finite numbers in their range, names among the
choices, and flags that must agree with each other; each failure is one line naming the flag and what it allows."""
from __future__ import annotations

import argparse
import logging
import re

import pytest

from vanillakd.cli import bench, cache_teacher, check_data, compare, demo, validate, zoo
from vanillakd.cli.run_config import parse_run_config
from vanillakd.cli.train_args import build_train_parser
from vanillakd.data.prefetch import channel_stats
from vanillakd.errors import UserError
from vanillakd.run_setup import data_config

DIR = "/nonexistent-data"  # parsing never looks at the data
BASE = [DIR, "--model", "test_resnet", "--teacher", "test_resnet"]

# flag: (values that must stay accepted, a bad value, what the error says)
TRAIN_FLAGS = {
    "--train-fraction": (["1", "0.01"], "1.5", "must be in (0, 1], got 1.5"),
    "--train-subset-seed": (["0", "7"], "-1", "must be in [0, 2147483647], got -1"),
    "--epoch-repeats": (["0", "2.5"], "inf", "must be a finite number, got inf"),
    "--crop-pct": (["1.0", "0.875"], "1.5", "must be in (0, 1], got 1.5"),
    "--mean": (["0.5", "-1", "0.4 0.5 0.6"], "nan", "must be a finite number, got nan"),
    "--std": (["0.5", "0.2 0.3 0.25"], "0", "must be > 0, got 0"),
    "--interpolation": (["bicubic", "lanczos"], "random", "invalid choice: 'random'"),
    "--compile-mode": (["max-autotune", "reduce-overhead"], "fast", "invalid choice: 'fast'"),
    "--kd-loss-weight": (["0", "1", "2.5"], "nan", "must be a finite number, got nan"),
    "--ori-loss-weight": (["0", "1"], "-1", "must be >= 0, got -1"),
    "--max-nonfinite": (["0", "5"], "-1", "must be >= 0, got -1"),
    "--recovery-interval": (["0", "100"], "-1", "must be >= 0, got -1"),
    "--opt-eps": (["1e-8", "0"], "-0.1", "must be >= 0, got -0.1"),
    "--opt-betas": (["0.9 0.999", "0.98 0.92 0.99", "0 0.5"], "1", "must be in [0, 1), got 1"),
    "--momentum": (["0", "0.9", "1"], "1.5", "must be in [0, 1], got 1.5"),
    "--weight-decay": (["0", "0.05"], "-5", "must be >= 0, got -5"),
    "--clip-grad": (["1.0", "0.01"], "-1", "must be > 0, got -1"),
    "--layer-decay": (["0.65", "1"], "0", "must be in (0, 1], got 0"),
    "--sched": (["cosine", "step", "multistep", "plateau", "poly", "tanh"], "cosin", "invalid choice: 'cosin'"),
    "--lr": (["0.05", "5e-3"], "nan", "must be a finite number, got nan"),
    "--lr-noise": (["0.5", "0.4 0.9"], "-0.5", "must be >= 0, got -0.5"),
    "--lr-noise-pct": (["0.67", "1"], "0", "must be > 0, got 0"),
    "--lr-noise-std": (["1", "0"], "-1", "must be >= 0, got -1"),
    "--lr-cycle-mul": (["1", "2"], "0", "must be > 0, got 0"),
    "--lr-cycle-decay": (["0.5", "1"], "-1", "must be >= 0, got -1"),
    "--lr-cycle-limit": (["1", "0"], "-1", "must be >= 0, got -1"),
    "--lr-k-decay": (["1", "0.5"], "0", "must be > 0, got 0"),
    "--warmup-lr": (["1e-4", "0"], "-1", "must be >= 0, got -1"),
    "--min-lr": (["1e-6", "0"], "nan", "must be a finite number, got nan"),
    "--start-epoch": (["0", "2"], "-1", "must be >= 0, got -1"),
    "--decay-epochs": (["100", "2.5"], "0", "must be > 0, got 0"),
    "--decay-milestones": (["30 60 90", "0"], "-1", "must be >= 0, got -1"),
    "--warmup-epochs": (["0", "5"], "-1", "must be >= 0, got -1"),
    "--cooldown-epochs": (["0", "10"], "-1", "must be >= 0, got -1"),
    "--patience-epochs": (["0", "10"], "-1", "must be >= 0, got -1"),
    "--decay-rate": (["0.1", "0.5"], "0", "must be > 0, got 0"),
    "--scale": (["0.08 1.0", "1 1"], "0.5 1.5", "must be in (0, 1], got 1.5"),
    "--ratio": (["0.75 1.333", "1 1"], "0 1", "must be > 0, got 0"),
    "--hflip": (["0", "0.5", "1"], "2", "must be in [0, 1], got 2"),
    "--vflip": (["0", "1"], "-0.1", "must be in [0, 1], got -0.1"),
    "--color-jitter": (["0", "0.4"], "-1", "must be >= 0, got -1"),
    "--aug-repeats": (["0", "3"], "-1", "must be >= 0, got -1"),
    "--bce-loss": (["0", "1"], "2", "invalid choice: 2"),
    "--bce-target-thresh": (["0.2", "0"], "1.5", "must be in [0, 1], got 1.5"),
    "--reprob": (["0", "0.25"], "1.5", "must be in [0, 1], got 1.5"),
    "--remode": (["pixel", "rand", "const"], "pixels", "invalid choice: 'pixels'"),
    "--recount": (["1", "3"], "0", "must be > 0, got 0"),
    "--mixup": (["0", "0.8"], "-1", "must be >= 0, got -1"),
    "--cutmix": (["0", "1.0"], "-1", "must be >= 0, got -1"),
    "--cutmix-minmax": (["0.2 0.8"], "0.2 1.5", "must be in [0, 1], got 1.5"),
    "--mixup-prob": (["1", "0.5"], "2", "must be in [0, 1], got 2"),
    "--mixup-switch-prob": (["0.5", "0"], "-1", "must be in [0, 1], got -1"),
    "--mixup-off-epoch": (["0", "100"], "-1", "must be >= 0, got -1"),
    "--smoothing": (["0", "0.1"], "1.5", "must be in [0, 1), got 1.5"),
    "--train-interpolation": (["random", "bicubic", "lanczos"], "cubic", "invalid choice: 'cubic'"),
    "--drop": (["0", "0.3"], "1", "must be in [0, 1), got 1"),
    "--drop-path": (["0", "0.05"], "1", "must be in [0, 1), got 1"),
    "--drop-block": (["0.1"], "1", "must be in [0, 1), got 1"),
    "--bn-momentum": (["0.1", "0.01"], "2", "must be in [0, 1], got 2"),
    "--bn-eps": (["1e-5"], "0", "must be > 0, got 0"),
    "--model-ema-decay": (["0.9998", "0.99 0.999"], "1.5", "must be in [0, 1], got 1.5"),
    "--seed": (["0", "42", "2147483647"], "-1", "must be in [0, 2147483647], got -1"),
    "--checkpoint-hist": (["0", "10"], "-1", "must be >= 0, got -1"),
    "--workers": (["0", "8"], "-1", "must be >= 0, got -1"),
    "--eval-interval-end": (["0", "0.75", "1"], "2", "must be in [0, 1], got 2"),
    "--max-train-steps": (["1", "10"], "0", "must be > 0, got 0"),
    "--local-rank": (["0", "3"], "-1", "must be >= 0, got -1"),
    # the KD methods' own flags
    "--temperature": (["1", "4"], "inf", "must be a finite number, got inf"),
    "--dkd-alpha": (["1", "0"], "nan", "must be a finite number, got nan"),
    "--dkd-beta": (["2", "8"], "inf", "must be a finite number, got inf"),
    "--dist-beta": (["1", "0"], "-1", "must be >= 0, got -1"),
    "--dist-gamma": (["1", "0"], "-1", "must be >= 0, got -1"),
    "--rkd-distance-weight": (["25", "0"], "-1", "must be >= 0, got -1"),
    "--rkd-angle-weight": (["50"], "nan", "must be a finite number, got nan"),
    "--nce-t": (["0.07"], "inf", "must be a finite number, got inf"),
    "--nce-mom": (["0.5", "0", "1"], "1.5", "must be in [0, 1], got 1.5"),
    "--review-warmup-epochs": (["1", "2.5"], "inf", "must be a finite number, got inf"),
}


def parse_exit(parser: argparse.ArgumentParser, argv: list[str], capsys) -> str:
    """argparse's one-line error for ``argv`` (exit code 2)."""
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("flag", sorted(TRAIN_FLAGS))
def test_training_flag_range(flag, capsys):
    good, bad, message = TRAIN_FLAGS[flag]
    parser = build_train_parser("train-kd.py", "")
    for value in good:
        parser.parse_args(BASE + [flag, *value.split()])
    err = parse_exit(parser, BASE + [flag, *bad.split()], capsys)
    assert err.startswith("train-kd.py: error: argument ") and flag in err and message in err, err


def numeric_flags_without_check(parser: argparse.ArgumentParser) -> list[str]:
    """Flags whose values are plain int() / float(): nan, inf and any sign get through."""
    return [a.option_strings[-1] for a in parser._actions if a.type in (int, float) and not a.choices]


@pytest.mark.parametrize("name,build", [
    ("train", lambda: build_train_parser("train-kd.py", "")), ("validate", validate.build_parser),
    ("bench", bench.build_parser), ("compare", compare.build_parser), ("demo", demo.build_parser)])
def test_every_numeric_flag_is_checked_and_defaults_pass(name, build):
    parser = build()
    assert numeric_flags_without_check(parser) == [], name
    for a in parser._actions:
        rule = getattr(a.type, "rule", None)
        defaults = a.default if isinstance(a.default, list) else [a.default]
        for d in defaults:
            if rule is not None and d is not None:
                assert a.type(repr(d)) == d, (a.option_strings, d)  # every default stays what it was


@pytest.mark.parametrize("build,argv,flag,message", [
    (validate.build_parser, [DIR, "--workers", "-1"], "--workers", "must be >= 0"),
    (validate.build_parser, [DIR, "--crop-pct", "1.5"], "--crop-pct", "must be in (0, 1]"),
    (validate.build_parser, [DIR, "--std", "0"], "--std", "must be > 0"),
    (validate.build_parser, [DIR, "--mean", "nan"], "--mean", "finite"),
    (validate.build_parser, [DIR, "--crop-mode", "middle"], "--crop-mode", "invalid choice"),
    (validate.build_parser, [DIR, "--interpolation", "cubic"], "--interpolation", "invalid choice"),
    (bench.build_parser, ["--steps", "0"], "--steps", "must be > 0"),
    (bench.build_parser, ["--rounds", "0"], "--rounds", "must be > 0"),
    (bench.build_parser, ["--warmup", "-1"], "--warmup", "must be >= 0"),
    (bench.build_parser, ["--threads", "0"], "--threads", "must be > 0"),
    (bench.build_parser, ["--cache-topk", "-1"], "--cache-topk", "must be >= 0"),
    (bench.build_parser, ["--data-workers", "0", "-1"], "--data-workers", "must be >= 0"),
    (bench.build_parser, ["--img-size", "0"], "--img-size", "must be > 0"),
    (compare.build_parser, ["--fractions", "0.5", "1.5"], "--fractions", "must be in (0, 1]"),
    (compare.build_parser, ["--seeds", "-1"], "--seeds", "must be in [0, 2147483647]"),
    (compare.build_parser, ["--train-teacher-epochs", "0"], "--train-teacher-epochs", "must be > 0"),
    (compare.build_parser, ["--train-teacher-fraction", "0"], "--train-teacher-fraction", "must be in (0, 1]"),
    (demo.build_parser, ["--teacher-lr", "nan"], "--teacher-lr", "finite"),
    (demo.build_parser, ["--seed", "-1"], "--seed", "must be in [0, 2147483647]"),
    (demo.build_parser, ["--workers", "-1"], "--workers", "must be >= 0"),
    (demo.build_parser, ["--temperature", "0"], "--temperature", "must be > 0"),
    (demo.build_parser, ["--student-per-class", "0"], "--student-per-class", "must be > 0"),
])
def test_other_entry_points_flag_ranges(build, argv, flag, message, capsys):
    err = parse_exit(build(), argv, capsys)
    assert f"argument {flag}" in err or f"/{flag}:" in err, err
    assert message in err, err


@pytest.mark.parametrize("main,argv,message", [
    (cache_teacher.main, [DIR, "--cache-dir", DIR, "--cache-topk", "-1"], "argument --cache-topk: must be >= 0"),
    (check_data.main, [DIR, "-j", "-1"], "argument -j/--workers: must be >= 0"),
    (zoo.main, ["fetch", "x", "--timeout", "0"], "argument --timeout: must be > 0"),
])
def test_inline_parsers_flag_ranges(main, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("extra,message", [
    ("--scale 0.9 0.1", "--scale 0.9 0.1: the first value must be <= the second"),
    ("--ratio 2 1", "--ratio 2 1: the first value must be <= the second"),
    ("--cutmix-minmax 0.5 0.5", "--cutmix-minmax 0.5 0.5: the first value must be < the second"),
    ("--lr-noise 0.5 0.2", "--lr-noise 0.5 0.2: the first value must be <= the second"),
    ("--lr-noise 0.1 0.2 0.3", "--lr-noise takes 1 value"),
    ("--decay-milestones 60 30", "--decay-milestones must be ascending, got 60 30"),
    ("--sched plateau --decay-rate 1", "--sched plateau needs --decay-rate < 1"),
    ("--input-size 1 32 32 --in-chans 3", "--in-chans 3 and --input-size 1 32 32 disagree"),
    ("--in-chans 1 --mean 0.4 0.5 0.6", "--mean has 3 values but the input has 1 channel(s) (--in-chans 1)"),
    ("--input-size 1 32 32 --std 0.2 0.2 0.2", "--std has 3 values but the input has 1 channel(s) (--input-size"),
    ("--mean 0.5 0.5", "--mean has 2 values but the input has 3 channel(s)"),
    ("--in-chans 4", "--input-img-mode RGB gives 3 channel(s) but the input has 4"),
    ("--in-chans 1 --input-img-mode RGB", "--input-img-mode RGB gives 3 channel(s) but the input has 1"),
    ("--input-img-mode XYZ", "--input-img-mode XYZ: not a PIL image mode"),
])
def test_flags_that_must_agree(extra, message):
    with pytest.raises(UserError) as exc:
        parse_run_config(BASE + extra.split())
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_one_input_channel_gets_a_one_channel_data_config(caplog):
    # timm keeps (3, H, W) and the RGB mean / std when only --in-chans changes, though the images are read as L
    # (and RandAugment then fills greyscale images with a 3-value colour, which PIL refuses)
    with caplog.at_level(logging.INFO, logger="vanillakd"):
        cfg = parse_run_config(BASE + ["--in-chans", "1"])
        d = data_config(cfg, "resnet18")
    assert d["input_size"] == (1, 224, 224)
    # the values timm's loaders normalise a 1-channel batch with (the average), now recorded as such
    assert d["mean"] == channel_stats((0.485, 0.456, 0.406), 1) and d["std"] == channel_stats((0.229, 0.224, 0.225), 1)
    assert "1-channel input: mean (0.449)" in caplog.text
    # --input-size alone sets the model's channels too (as timm's train.py does), and a 1-value --mean stays
    cfg = parse_run_config(BASE + ["--input-size", "1", "32", "32", "--mean", "0.3", "--std", "0.2"])
    assert cfg.data.in_chans == 1 and data_config(cfg, "test_resnet")["mean"] == (0.3,)
    assert data_config(parse_run_config(BASE + ["--in-chans", "4", "--input-img-mode", "RGBA", "--mean", "0.5",
                                                "--std", "0.25"]), "test_resnet")["std"] == (0.25,) * 4


@pytest.mark.parametrize("extra,message", [
    (["--aa", "bogus"], "--aa bogus: not an augmentation policy timm reads"),
    (["--aa", "rand-m9-w0"], "not an augmentation policy"),
    (["--opt", "bogus"], "--opt bogus: not an optimizer timm knows"),
    (["--opt", "adamw", "--opt-betas", "0.9"], "--opt-betas takes 2 values"),
    (["--in-chans", "1", "--input-img-mode", "P"], "--input-img-mode P: images in this mode cannot be augmented"),
    (["--initial-checkpoint", "/nonexistent.pth"], "--initial-checkpoint /nonexistent.pth does not exist"),
    (["--teacher-pretrained", "/nonexistent.pth"], "--teacher-pretrained: teacher checkpoint /nonexistent.pth does "
                                                   "not exist"),
])
def test_names_and_files_are_checked_before_the_data_is_read(extra, message):
    """The data folder does not exist: these errors come first, before minutes of listing and scanning."""
    with pytest.raises(UserError, match=re.escape(message)):
        parse_run_config(["/nonexistent-data", "--model", "test_resnet", "--teacher", "test_resnet", *extra])


def test_legitimate_names_still_parse():
    for extra in (["--opt", "lookahead_adamw"], ["--opt", "AdamW"], ["--aa", "rand-m9-mstd0.5-inc1"],
                  ["--aa", "augmix-m5-w4-d2"], ["--opt", "adan", "--opt-betas", "0.98", "0.92", "0.99"]):
        parse_run_config(["/nonexistent-data", "--model", "test_resnet", *extra])


@pytest.mark.parametrize("extra,message", [
    (["--mean", "0.5", "0.5"], "--mean / --std must hold 1 value or one per input channel"),
    (["--in-chans", "1", "--input-size", "3", "32", "32"], "disagree on the number of input channels"),
    (["--in-chans", "3", "--input-img-mode", "L"], "--input-img-mode L gives 1 channel(s) but the input has 3"),
])
def test_validate_checks_channels_as_training_does(tiny_data, teacher_ckpt, capsys, extra, message):
    from conftest import run_cli
    code = run_cli(validate.cli, [tiny_data, "--model", "test_resnet", "--checkpoint", teacher_ckpt,
                                  "--num-classes", "3", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and "Traceback" not in "\n".join(err), err[-3:]
