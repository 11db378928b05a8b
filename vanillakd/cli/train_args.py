"""The training scripts' command line: the seed's train-kd flags (an old timm train.py plus KD flags)
with their meaning and defaults, and timm's other usual training flags.

Flags listed in ``LIST_FLAGS`` take one or N values: N settings train N students from one teacher pass.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import UserError
from .config_file import config_values, load_yaml_mapping
from .method_flags import add_method_args

# flags that may hold one value per student (single values are shared by all students)
LIST_FLAGS = ("model", "kd_loss", "kd_loss_weight", "ori_loss_weight", "opt", "clip_grad", "lr", "weight_decay",
              "drop", "drop_path", "model_ema_decay", "smoothing", "bce_loss")


class _Parser(argparse.ArgumentParser):
    """argparse that exits with code 2 and one line, as every other user error does."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")

    def format_help(self) -> str:
        """Every flag's help ends with its allowed range and its default, so the recipe a bare command runs is
        on screen."""
        for action in self._actions:
            rule = getattr(action.type, "rule", "").removeprefix("must be ")
            if rule and f"({rule})" not in (action.help or ""):
                action.help = (action.help + " " if action.help else "") + f"({rule})"
            shown = _default_text(action.default)
            if shown is not None and "(default" not in (action.help or "") and action.help != argparse.SUPPRESS:
                action.help = (action.help + " " if action.help else "") + f"(default: {shown})"
        return super().format_help()


def _default_text(default: Any) -> str | None:
    """A default as one writes it on the command line; None for flags without a meaningful one."""
    if default is argparse.SUPPRESS or default is None or default == "" or isinstance(default, bool):
        return None  # switches, and values whose absence means "auto" or "none" (their help says which)
    def text(v: Any) -> str:
        return "none" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
    if isinstance(default, (list, tuple)):
        return " ".join(text(v) for v in default).replace("%", "%%")
    return text(default).replace("%", "%%")


def _bound(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    """"must be in [0, 1)", "must be > 0", ...: the allowed range as the error states it."""
    if low is not None and high is not None:
        return f"must be in {'(' if low_open else '['}{_bound(low)}, {_bound(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"must be {'>' if low_open else '>='} {_bound(low)}"
    if high is not None:
        return f"must be {'<' if high_open else '<='} {_bound(high)}"
    return ""


def number(kind: type = float, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind(text)`` (int or float), finite, within the bounds (inclusive unless open).
    argparse reports a failure as one line: "argument --smoothing: must be in [0, 1), got 1.5" (a list flag:
    each value)."""
    rule = _range_text(low, high, low_open, high_open)

    def convert(text: str):
        value = kind(text)  # a ValueError reads "invalid float value: 'x'"
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if (low is not None and (value <= low if low_open else value < low)) or \
                (high is not None and (value >= high if high_open else value > high)):
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return value
    convert.__name__ = kind.__name__
    convert.rule = rule  # the range, for tests and help
    return convert


# the usual kinds; a seed must leave room for the rank offset below numpy's 2**32 limit
pos_int, pos_float = number(int, 0, low_open=True), number(float, 0, low_open=True)
count, nonneg_float, finite = number(int, 0), number(float, 0), number(float)
fraction, probability = number(float, 0, 1, low_open=True), number(float, 0, 1)
below_one = number(float, 0, 1, high_open=True)  # dropout rates, label smoothing, Adam betas
seed_int = number(int, 0, 2**31 - 1)
INTERPOLATIONS = ["bilinear", "bicubic", "nearest", "box", "hamming", "lanczos"]  # timm's names
COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
SCHEDULES = ["cosine", "tanh", "step", "multistep", "plateau", "poly", "constant", "wsd", "rsqrt"]


def add_dataset_flags(g, splits: bool = True) -> None:
    """--dataset and the flags that choose a dataset's split, classes and image mode (timm's names)."""
    g.add_argument("-d", "--dataset", default="",
                   help="folder (default: DIR/train/<class>/...), torch/NAME (torchvision: cifar10, cifar100, "
                        "mnist, ...), hfds/NAME (Hugging Face hub name or save_to_disk folder), wds/NAME "
                        "(WebDataset shards in DIR with timm's _info.json)")
    g.add_argument("--dataset-download", action="store_true", help="download a torch/ dataset into DIR if missing")
    if splits:
        g.add_argument("--train-split", default="train")
        g.add_argument("--val-split", default="validation",
                       help="val split; 'validation' also finds val/, eval/ (and test where there is no val)")
    g.add_argument("--class-map", default="", help="file mapping class names to class indices (timm's format)")
    g.add_argument("--input-img-mode", default=None,
                   help="PIL mode images are converted to (RGB, L, ...); default, as timm: L for a 1-channel input "
                        "(--in-chans 1 / --input-size 1 H W), else RGB")


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Dataset")
    g.add_argument("data_dir", metavar="DIR", help="ImageFolder root with train/ and val/ class folders, or the "
                                                   "folder (or URL prefix) of the --dataset")
    add_dataset_flags(g)
    g.add_argument("--train-fraction", type=fraction, default=1.0,
                   help="train on a class-balanced, deterministic fraction of the training set")
    g.add_argument("--train-subset-seed", type=seed_int, default=0, help="which subset --train-fraction draws")
    g.add_argument("--epoch-repeats", type=nonneg_float, default=0.0,
                   help="epoch repeat multiplier: each training epoch passes over the dataset this many times "
                        "(0 = once)")
    g.add_argument("--data-pipeline", default="cpu", choices=["cpu", "gpu"],
                   help="cpu: timm's loader (workers decode and augment); gpu: workers read JPEG bytes, the "
                        "training device decodes and augments in batches (same augmentation distribution)")
    g.add_argument("--bad-images", default="fail", choices=["fail", "skip", "off"],
                   help="start-up scan for truncated / non-image files: stop listing them (fail), leave them "
                        "out (skip), or no scan (off)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Model")
    g.add_argument("--model", default=["resnet50"], nargs="+", help="student architecture(s), timm names")
    g.add_argument("--pretrained", action="store_true", help="start the student from timm's pretrained weights")
    g.add_argument("--initial-checkpoint", default="",
                   help="start the student from this checkpoint (its EMA weights when it has them, as the seed did)")
    g.add_argument("--no-ema-checkpoint", action="store_true",
                   help="with --initial-checkpoint: take the file's plain weights even when it holds EMA weights")
    g.add_argument("--num-classes", type=pos_int, default=None, help="defaults to the number of class folders")
    g.add_argument("--gp", default=None, help="global pool type override")
    g.add_argument("--img-size", type=pos_int, default=None)
    g.add_argument("--in-chans", type=pos_int, default=None)
    g.add_argument("--input-size", default=None, nargs=3, type=pos_int, metavar="N", help="C H W")
    g.add_argument("--crop-pct", type=fraction, default=None, help="validation center-crop fraction")
    g.add_argument("--mean", type=finite, nargs="+", default=None, help="1 value, or one per input channel")
    g.add_argument("--std", type=pos_float, nargs="+", default=None, help="1 value, or one per input channel")
    g.add_argument("--interpolation", default="", choices=[""] + INTERPOLATIONS,
                   help="validation resize filter (default: the model's)")
    g.add_argument("-b", "--batch-size", type=pos_int, default=128, help="per-process batch size")
    g.add_argument("-vb", "--validation-batch-size", type=pos_int, default=None)
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for conv nets on CUDA)")
    g.add_argument("--compile", "--torchcompile", dest="compile", action="store_true",
                   help="torch.compile the student(s) and the teacher")
    g.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                   help="torch.compile mode, e.g. max-autotune, reduce-overhead (default: torch's)")


def add_kd_args(p: argparse.ArgumentParser, default_loss: str = "kd") -> None:
    g = p.add_argument_group("Distillation")
    g.add_argument("--teacher", default="beitv2_base_patch16_224", help="teacher architecture (timm name)")
    g.add_argument("--teacher-pretrained", default=None,
                   help="teacher weights file; without it timm's pretrained weights are fetched")
    g.add_argument("--teacher-resize", type=pos_int, default=None, help="resize the batch to this for the teacher")
    g.add_argument("--teacher-norm", default="auto", choices=["auto", "student"],
                   help="auto: re-normalise the batch for the teacher when its mean/std differ from the student's; "
                        "student: feed the student's normalisation, as the seed did")
    g.add_argument("--teacher-cache", default=None, metavar="DIR",
                   help="read the teacher's outputs from a cache written by `vanillakd cache-teacher` with the "
                        "same data, augmentation, batch size, world size and seed (logit methods only)")
    g.add_argument("--student-resize", type=pos_int, default=None, help="resize the batch to this for the student")
    g.add_argument("--kd-loss", default=[default_loss], nargs="+", help="distillation method(s) by name")
    g.add_argument("--kd-loss-weight", type=nonneg_float, default=[1.0], nargs="+")
    g.add_argument("--ori-loss-weight", type=nonneg_float, default=[1.0], nargs="+")
    # each method's own flags (--temperature, --dkd-alpha, --nce-k, ...), as the methods declare them
    add_method_args(p)
    g = p.add_argument_group("Checkpoints")
    g.add_argument("--resume", default="", metavar="PATH",
                   help="continue a run: its last.pth.tar (or the run folder for several students), or 'auto' "
                        "for the run named by --output / --experiment")
    g.add_argument("--no-resume-opt", action="store_true", help="on --resume, start a fresh optimizer")
    g.add_argument("--save-safetensors", action="store_true",
                   help="at the end, also export the best student as export/model.safetensors + config.json")
    g.add_argument("--max-nonfinite", type=count, default=0, metavar="N",
                   help="0 (default): a non-finite loss stops the run, found at the next log line without a "
                        "per-step host sync; N > 0: check every step, skip such steps, stop after N in a row")
    g.add_argument("--recovery-interval", type=count, default=0, metavar="N",
                   help="also save recovery.pth.tar every N steps, so a kill mid-epoch loses at most N steps")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints that need pickled Python code (only for files you trust)")


def add_optim_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Optimizer")
    g.add_argument("--opt", default=["sgd"], nargs="+")
    g.add_argument("--opt-eps", type=nonneg_float, default=None)
    g.add_argument("--opt-betas", type=below_one, nargs="+", default=None)
    g.add_argument("--momentum", type=probability, default=0.9)
    g.add_argument("--weight-decay", type=nonneg_float, default=[2e-5], nargs="+")
    g.add_argument("--clip-grad", type=pos_float, default=[None], nargs="+", help="(default: no clipping)")
    g.add_argument("--clip-mode", default="norm", choices=["norm", "value", "agc"])
    g.add_argument("--grad-accum-steps", type=pos_int, default=1, metavar="N",
                   help="accumulate the gradients of N batches (one teacher pass each) per optimizer update: "
                        "the update sees N x --batch-size samples per process")
    g.add_argument("--layer-decay", type=fraction, default=None)
    g = p.add_argument_group("Learning rate schedule")
    g.add_argument("--sched", default="cosine", choices=SCHEDULES)
    g.add_argument("--sched-on-updates", action="store_true", help="step the schedule per update, not per epoch")
    g.add_argument("--lr", type=pos_float, default=[0.05], nargs="+")
    g.add_argument("--lr-noise", type=nonneg_float, nargs="+", default=None, metavar="FRACTION",
                   help="lr noise from this fraction of the epochs on, or between two (timm's rule)")
    # timm redraws the noise until |noise| < pct: 0 would never end
    g.add_argument("--lr-noise-pct", type=pos_float, default=0.67)
    g.add_argument("--lr-noise-std", type=nonneg_float, default=1.0)
    g.add_argument("--lr-cycle-mul", type=pos_float, default=1.0)
    g.add_argument("--lr-cycle-decay", type=nonneg_float, default=0.5)
    g.add_argument("--lr-cycle-limit", type=count, default=1, help="(0: no limit)")
    g.add_argument("--lr-k-decay", type=pos_float, default=1.0)
    g.add_argument("--warmup-lr", type=nonneg_float, default=1e-4)
    g.add_argument("--min-lr", type=nonneg_float, default=1e-6)
    g.add_argument("--epochs", type=pos_int, default=300)
    g.add_argument("--start-epoch", type=count, default=None)
    g.add_argument("--decay-epochs", type=pos_float, default=100)
    g.add_argument("--decay-milestones", type=count, nargs="+", default=[90, 180, 270], help="ascending epochs")
    g.add_argument("--warmup-epochs", type=count, default=3)
    g.add_argument("--warmup-prefix", action="store_true")
    g.add_argument("--cooldown-epochs", type=count, default=0,
                   help="extra epochs at --min-lr after the schedule (0, as in the seed's scripts; only timm 0.6's own "
                        "train.py defaulted to 10)")
    g.add_argument("--patience-epochs", type=count, default=10)
    g.add_argument("--decay-rate", "--dr", type=pos_float, default=0.1)


def add_aug_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Augmentation and regularization")
    g.add_argument("--no-aug", action="store_true")
    g.add_argument("--scale", type=fraction, nargs=2, default=[0.08, 1.0], help="random-resized-crop area range")
    g.add_argument("--ratio", type=pos_float, nargs=2, default=[3.0 / 4.0, 4.0 / 3.0],
                   help="random-resized-crop aspect ratio range")
    g.add_argument("--hflip", type=probability, default=0.5)
    g.add_argument("--vflip", type=probability, default=0.0)
    g.add_argument("--color-jitter", type=nonneg_float, default=0.4)
    g.add_argument("--aa", default=None, help="auto-augment policy, e.g. rand-m7-mstd0.5")
    g.add_argument("--aug-repeats", type=count, default=0, help="repeated-augmentation count (0 = off)")
    g.add_argument("--bce-loss", type=int, default=[0], nargs="+", choices=[0, 1],
                   help="1: binary cross-entropy base loss")
    g.add_argument("--bce-target-thresh", type=probability, default=None)
    g.add_argument("--reprob", type=probability, default=0.0)
    g.add_argument("--remode", default="pixel", choices=["pixel", "rand", "const"])
    g.add_argument("--recount", type=pos_int, default=1)
    g.add_argument("--mixup", type=nonneg_float, default=0.0)
    g.add_argument("--cutmix", type=nonneg_float, default=0.0)
    g.add_argument("--cutmix-minmax", type=probability, nargs=2, default=None, help="MIN < MAX, fractions of the "
                   "image side")
    g.add_argument("--mixup-prob", type=probability, default=1.0)
    g.add_argument("--mixup-switch-prob", type=probability, default=0.5)
    g.add_argument("--mixup-mode", default="batch", choices=["batch", "pair", "elem"])
    g.add_argument("--mixup-off-epoch", type=count, default=0)
    g.add_argument("--smoothing", type=below_one, default=[0.1], nargs="+")
    g.add_argument("--train-interpolation", default="random", choices=["random"] + INTERPOLATIONS)
    g.add_argument("--drop", type=below_one, default=[0.0], nargs="+")
    g.add_argument("--drop-path", type=below_one, default=[None], nargs="+")
    g.add_argument("--drop-block", type=below_one, default=None)
    g.add_argument("--bn-momentum", type=probability, default=None)
    g.add_argument("--bn-eps", type=pos_float, default=None)
    g.add_argument("--model-ema", action="store_true", help="keep an exponential moving average of the student")
    g.add_argument("--model-ema-force-cpu", action="store_true",
                   help="keep the EMA on the CPU; as in timm, it is then not evaluated on a GPU run")
    g.add_argument("--model-ema-decay", type=probability, default=[0.9998], nargs="+")


def add_misc_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Misc")
    g.add_argument("--seed", type=seed_int, default=42, help="(each process adds its rank)")
    g.add_argument("--log-interval", type=pos_int, default=50, help="steps between log lines (host syncs)")
    g.add_argument("--checkpoint-hist", type=count, default=10)
    g.add_argument("-j", "--workers", type=count, default=4)
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision: bfloat16 autocast, float16 + loss scaling where bfloat16 is unsupported "
                        "(default: on for CUDA, off on the CPU)")
    g.add_argument("--amp-dtype", default="auto", choices=["auto", "bfloat16", "float16"])
    g.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    g.add_argument("--pin-mem", action=argparse.BooleanOptionalAction, default=None,
                   help="pinned host memory for batches (default: on for CUDA)")
    g.add_argument("--fused-opt", action=argparse.BooleanOptionalAction, default=None,
                   help="fused (AdamW, SGD, ...) or foreach optimizer steps (default: on for CUDA)")
    g.add_argument("--output", default="", help="root folder of outputs (default ./output/train)")
    g.add_argument("--experiment", default="", help="name of the run's sub-folder")
    g.add_argument("--eval-metric", default="top1", choices=["top1", "top5", "loss"])
    g.add_argument("--eval-interval", type=pos_int, default=1, help="evaluate after epochs e with e %% N == 0")
    g.add_argument("--eval-interval-end", type=probability, default=0.75,
                   help="and after every epoch e > this fraction of --epochs")
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="show a progress bar (default: when stderr is a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar (for logs)")
    g.add_argument("--log-tensorboard", action="store_true", help="also log to TensorBoard (when installed)")
    g.add_argument("--log-wandb", action="store_true", help="also log to Weights & Biases (when installed)")
    g.add_argument("--max-train-steps", type=pos_int, default=None,
                   help="stop each epoch after this many steps (smoke tests, benchmarks)")
    g = p.add_argument_group("Distributed (torchrun / torch.distributed.launch)")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=count, default=0,
                   help="set by torch.distributed.launch")
    g.add_argument("--dist-bn", default="reduce", choices=["reduce", "broadcast", ""],
                   help="after each epoch, average (reduce) or copy from rank 0 (broadcast) BN statistics")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs (CUDA only)")
    g.add_argument("--no-ddp-bb", action="store_true", help="do not broadcast buffers in DDP's forward")
    g.add_argument("--dist-timeout", type=pos_int, default=1800,
                   help="seconds a rank waits in a collective before the job fails (e.g. a dead rank)")


def build_train_parser(prog: str, description: str, default_loss: str = "kd") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=description)
    p.add_argument("-c", "--config", default="", metavar="FILE",
                   help="YAML file of flag values (keys: the flags' names), parsed as the command line; flags "
                        "given win. A run's args.yaml gives that run again")
    add_data_args(p)
    add_model_args(p)
    add_kd_args(p, default_loss)
    add_optim_args(p)
    add_aug_args(p)
    add_misc_args(p)
    return p


# keys a run's args.yaml holds that record the run and are no flag to set: the file it came from, the image count
RECORD_ONLY_KEYS = ("config", "train_images")


def _apply_config(parser: argparse.ArgumentParser, path: str) -> None:
    """A YAML file's keys as flag defaults (as timm does), explicit flags still winning. Every value goes through
    ``parser`` as the command line would (types, ranges, choices); the positional DIR may come from the file
    (key ``data_dir``, as a run's args.yaml holds it) when the command line gives none."""
    what = f"--config {path}"
    values = config_values(parser, load_yaml_mapping(path, what), what, skip=RECORD_ONLY_KEYS)
    data_dir = values.pop("data_dir", None)
    parser.set_defaults(**values)
    for action in parser._actions:
        if action.dest in values:
            action.required = False  # a required flag (cache-teacher's --cache-dir) the file gives is given
        elif action.dest == "data_dir" and data_dir is not None:
            action.nargs, action.default, action.required = "?", data_dir, False


def resolve_in_chans(args: argparse.Namespace) -> None:
    """``--in-chans`` from ``--input-size`` when only that is given (as timm's train.py does), so the model, the
    image mode and the normalisation all see one channel count; two that disagree are an error."""
    size = getattr(args, "input_size", None)
    if not size:
        return
    if args.in_chans is None:
        args.in_chans = size[0]
    elif args.in_chans != size[0]:
        raise UserError(f"--in-chans {args.in_chans} and --input-size {' '.join(map(str, size))} disagree on "
                        "the number of input channels; give one of them")


def parse_train_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse argv, with ``--config`` YAML values as defaults that explicit flags override."""
    config_parser = _Parser(add_help=False)
    config_parser.add_argument("-c", "--config", default="")
    known, _ = config_parser.parse_known_args(argv)
    if known.config:
        _apply_config(parser, known.config)
    args = parser.parse_args(argv)
    resolve_in_chans(args)
    check_list_lengths(args)
    return args


def check_list_lengths(args: argparse.Namespace) -> int:
    """Number of settings N; every list-valued flag must hold 1 or N values."""
    lengths = {name: len(getattr(args, name)) for name in LIST_FLAGS if isinstance(getattr(args, name, None), list)}
    n = max(lengths.values(), default=1)
    bad = {k: v for k, v in lengths.items() if v not in (1, n)}
    if bad:
        flags = ", ".join(f"--{k.replace('_', '-')} has {v}" for k, v in sorted(lengths.items()) if v > 1)
        raise UserError(f"list-valued flags have different lengths ({flags}); give each 1 value or the same number")
    return n


def setting(args: argparse.Namespace, index: int) -> dict[str, Any]:
    """The values of the list-valued flags for setting ``index`` (single values are shared)."""
    out = {}
    for name in LIST_FLAGS:
        values = getattr(args, name, None)
        if isinstance(values, list):
            out[name] = values[index] if len(values) > 1 else values[0]
    return out
