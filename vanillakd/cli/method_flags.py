"""The KD methods' own flags (--temperature, --dkd-alpha, --nce-k, ...) on the command line, as the methods
declare them (``vanillakd.losses.registry.MethodFlag``): a new method's flags appear here with no edit.

- ``add_method_args(parser_or_group)`` adds every declared flag to argparse;
- ``method_args_from(namespace)`` collects their values into the ``method_args`` mapping (dest -> value) that
  ``losses.create_kd_loss_for`` and ``KDLossEntry.wants_preact`` take.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

LOGIT_TITLE = "Distillation method flags"
FEATURE_TITLE = "Feature and contrastive distillation method flags (train-fd / train-crd)"


def _argparse_type(flag) -> Callable[[str], Any]:
    """``flag.type`` then its check: a bad number reads "invalid float value: 'x'", a failed check
    "must be > 0, got 0", in argparse's usual one-line error."""
    def convert(text: str):
        value = flag.type(text)
        try:
            return flag.check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{e}, got {text}") from None
    convert.__name__ = flag.type.__name__
    convert.rule = _rule(flag)  # shown in --help, as train_args.number's
    return convert


def _rule(flag) -> str:
    """The flag's check as --help shows it: "> 0", "in [0, 1]", ... ("" for none)."""
    low, high = flag.minimum, flag.maximum
    if low is not None and high is not None and not flag.positive:
        return f"in [{low:g}, {high:g}]"
    bounds = ["> 0" if flag.positive else "", f">= {low:g}" if low is not None else "",
              f"<= {high:g}" if high is not None else ""]
    return " and ".join(b for b in bounds if b)


def _add(group, flag) -> argparse.Action:
    kwargs: dict[str, Any] = {"dest": flag.dest}
    if flag.help:
        kwargs["help"] = flag.help
    if flag.is_switch:
        return group.add_argument(flag.option, action="store_true", **kwargs)
    return group.add_argument(flag.option, type=_argparse_type(flag), default=flag.default, **kwargs)


def add_method_args(parser_or_group, title: str | None = None) -> list:
    """Add every registered method's flags (``losses.method_flags()``); returns the ``MethodFlag`` list.

    Given an argument group, all flags go into it. Given a parser: with ``title``, one group of that title;
    without, two groups, "Distillation method flags" (those of the logit methods) and "Feature and contrastive
    distillation method flags (train-fd / train-crd)" (the rest).
    """
    from ..losses import get_kd_loss_entry, list_kd_losses, method_flags
    flags = method_flags()
    if not isinstance(parser_or_group, argparse.ArgumentParser):
        for f in flags:
            _add(parser_or_group, f)
        return flags
    if title is not None:
        group = parser_or_group.add_argument_group(title)
        for f in flags:
            _add(group, f)
        return flags
    logit_options = {f.option for name in list_kd_losses("logits") for f in get_kd_loss_entry(name).flags}
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in flags:
        t = LOGIT_TITLE if f.option in logit_options else FEATURE_TITLE
        if t not in groups:
            groups[t] = parser_or_group.add_argument_group(t)
        _add(groups[t], f)
    return flags


def method_args_from(namespace: argparse.Namespace | Any) -> dict[str, Any]:
    """The declared flags' values by dest, from a parsed namespace (a flag it lacks gets its default)."""
    from ..losses import method_flags
    return {f.dest: getattr(namespace, f.dest, f.default) for f in method_flags()}
