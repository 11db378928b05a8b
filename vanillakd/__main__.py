"""``vanillakd <command> ...``: one console command for every entry point."""
from __future__ import annotations

import sys
from collections.abc import Sequence

from .errors import run_cli

COMMANDS = {
    "train-kd": ("vanillakd.cli.train_kd", "logit distillation (the repository's train-kd.py)"),
    "train-fd": ("vanillakd.cli.train_fd", "feature distillation: correlation, rkd, review (train-fd.py)"),
    "train-crd": ("vanillakd.cli.train_crd", "contrastive representation distillation (train-crd.py)"),
    "cache-teacher": ("vanillakd.cli.cache_teacher", "store the teacher's outputs over a training stream"),
    "bench": ("vanillakd.cli.bench", "img/s of the KD step and its parts, or of the data pipeline (--data)"),
    "validate": ("vanillakd.cli.validate", "evaluate a checkpoint (validate.py)"),
    "compare": ("vanillakd.cli.compare", "methods x data fractions x seeds under one recipe: tables and plots"),
    "report": ("vanillakd.cli.report", "tables and plots from finished run folders"),
    "export": ("vanillakd.cli.export", "a checkpoint as a plain timm folder (model.safetensors + config.json)"),
    "zoo": ("vanillakd.cli.zoo", "list or fetch the published VanillaKD students"),
    "check-data": ("vanillakd.cli.check_data", "list truncated or non-image files in an ImageFolder"),
    "prepare": ("vanillakd.cli.prepare", "write a dataset as an ImageFolder (fashion-mnist)"),
    "demo": ("vanillakd.cli.demo", "teacher, scratch, KD and DKD students on Fashion-MNIST, offline"),
}


def version_line() -> str:
    """``vanillakd X (torch Y, timm Z, python W)``: what a bug report needs."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:  # a checkout on the path, not installed: its own version
            return __import__(name).__version__ if name == "vanillakd" else "not installed"
    return (f"vanillakd {of('vanillakd')} (torch {of('torch')}, timm {of('timm')}, "
            f"python {platform.python_version()})")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        print(version_line())
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:<13} {help_}" for name, (_, help_) in COMMANDS.items())
        print(f"usage: vanillakd <command> [args] | --version\n\ncommands:\n{lines}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"vanillakd: error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = __import__(COMMANDS[argv[0]][0], fromlist=["main"])
    return run_cli(module.main, argv[1:], prog=f"vanillakd {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
