"""YAML config files (``-c/--config``) read safely and parsed by the same argparse parser as the command line.

- ``load_yaml_mapping(path, what)``: the file's top-level mapping; files over ``MAX_CONFIG_BYTES``, anchors and
  aliases, duplicate keys and YAML errors are one-line ``UserError``s;
- ``config_values(parser, mapping, what, skip)``: dest -> value for each key, every value converted and checked
  by ``parser`` itself (types, ranges, choices, nargs) from command-line tokens built from the YAML value, so a
  file can hold exactly what the command line can.
"""
from __future__ import annotations

import argparse
import contextlib
from collections.abc import Collection, Iterator, Mapping
from decimal import Decimal
from typing import Any

import yaml

from ..errors import UserError

# a flag file is a few KiB; a cap keeps a wrong path (a dataset archive, /dev/zero) from being read whole
MAX_CONFIG_BYTES = 1 << 20


class _FlagFileLoader(yaml.SafeLoader):
    """SafeLoader without anchors and aliases (``&a`` / ``*a``, merge keys ``<<: *a``): a flag file never needs
    them, and aliases nested in aliases (a "billion laughs" file) expand exponentially in whatever walks the
    result. Refused while composing, before anything is expanded. Duplicate keys are refused too: YAML would
    silently keep the last one."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.MarkedYAMLError(problem="anchors and aliases (&name, *name) are not accepted",
                                       problem_mark=event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key fails in construct_mapping itself, as in SafeLoader
            if key in seen:
                raise yaml.MarkedYAMLError(problem=f"key {key!r} is given twice", problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error as one line: its problem and where (PyYAML's text spans several lines)."""
    problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def load_yaml_mapping(path: str, what: str) -> dict:
    """The YAML mapping in ``path`` (an empty file: ``{}``); ``what`` names the file in errors ("--config F")."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise UserError(f"cannot read {what}: {e.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise UserError(f"{what} is larger than {MAX_CONFIG_BYTES // 1024} KiB: not a flag file")
    try:
        cfg = yaml.load(data, Loader=_FlagFileLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise UserError(f"{what} is not valid YAML: {_yaml_problem(e)}") from None
    except RecursionError:  # thousands of nested brackets: no flag file nests
        raise UserError(f"{what} nests too deeply to be a flag file") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise UserError(f"{what} must be a mapping of flag names to values, got a {type(cfg).__name__}")
    bad = [k for k in cfg if not isinstance(k, str)]
    if bad:  # a list, not next(..., None): a null key is itself None
        raise UserError(f"{what}: keys are flag names, got {bad[0]!r}")
    return cfg


@contextlib.contextmanager
def _raising(parser: argparse.ArgumentParser, prefix: str) -> Iterator[None]:
    """``parser`` for one value of a file: its errors raise ``UserError(prefix + argparse's message)`` instead of
    exiting, and no argument is required (the file gives some flags; the command line gives the rest)."""
    required = [a for a in parser._actions if a.required]

    def fail(message: str):
        raise UserError(f"{prefix}{message}")
    parser.error = fail  # an instance attribute: shadows the method for this parse only
    for a in required:
        a.required = False
    try:
        yield
    finally:
        del parser.error
        for a in required:
            a.required = True


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    out: dict[str, list[argparse.Action]] = {}
    for a in parser._actions:
        if a.dest not in ("help", argparse.SUPPRESS) and not isinstance(a, argparse._SubParsersAction):
            out.setdefault(a.dest, []).append(a)
    return out


def _is_none_default(default: Any) -> bool:
    """None, or a list of None (``--clip-grad``: [None], one "no value" per student)."""
    return default is None or (isinstance(default, list) and all(v is None for v in default))


def _number_text(v: float) -> str | None:
    """A float as a token that gives the same float back, with no exponent: argparse takes '-0.5' after a flag
    as a value but '-1e-05' as an option. None for -inf / -nan (no finite flag takes them; no token reads so)."""
    if v != v or v in (float("inf"), float("-inf")):
        return None if repr(v).startswith("-") else repr(v)
    return format(Decimal(repr(v)), "f")  # repr is the shortest exact text; its plain decimal form is exact too


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _tokens(action: argparse.Action, value: Any) -> list[str] | str:
    """Command-line tokens for a typed flag's YAML value, or the problem as text."""
    if isinstance(value, list) and action.nargs in (None, "?"):
        return f"takes one value, got a list of {len(value)}"
    items = value if isinstance(value, list) else [value]
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        return f"takes {action.nargs} values, got {len(items)}"
    texts = []
    for v in items:
        if isinstance(v, bool) or v is None or isinstance(v, (dict, list)):
            kind = "true/false" if isinstance(v, bool) else "null" if v is None else "a nested " + type(v).__name__
            return f"takes {'values' if action.nargs else 'a value'}, not {kind}"
        text = _number_text(v) if isinstance(v, float) else str(v)
        if text is None:
            return f"must be a finite number, got {v}"
        if isinstance(value, list) and text.startswith("-") and not _is_number(text):
            return f"{text!r} would read as a flag"
        texts.append(text)
    option = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
    # '--flag=value': a single value starting with '-' stays a value, as on the command line
    return [f"{option}={texts[0]}"] if action.nargs is None else [option, *texts]


def _one_value(parser: argparse.ArgumentParser, actions: list[argparse.Action], key: str, value: Any,
               prefix: str) -> Any:
    """One key's value, parsed as the command line parses it."""
    action = actions[0]
    if isinstance(value, dict):
        raise UserError(f"{prefix}a nested mapping is not a flag value")
    if not action.option_strings:  # a positional (DIR): a path, given as text
        if not isinstance(value, str) or not value:
            raise UserError(f"{prefix}must be a non-empty string, got {value!r}")
        return value
    if action.nargs == 0:  # a switch: store_true / store_false / --x/--no-x
        if value is None and action.default is None:
            return None  # "auto"
        if not isinstance(value, bool):
            raise UserError(f"{prefix}a switch takes true or false, got {value!r}")
        return value
    if value is None or (isinstance(value, list) and value and all(v is None for v in value)):
        if _is_none_default(action.default):
            return action.default
        raise UserError(f"{prefix}null is only for flags whose default is none (--{key.replace('_', '-')} "
                        f"defaults to {action.default!r})")
    tokens = _tokens(action, value)
    if isinstance(tokens, str):
        raise UserError(prefix + tokens)
    with _raising(parser, prefix):
        return getattr(parser.parse_args(tokens), action.dest)


def config_values(parser: argparse.ArgumentParser, cfg: Mapping[str, Any], what: str,
                  skip: Collection[str] = ()) -> dict[str, Any]:
    """dest -> value for each key of ``cfg`` (keys: dests, '-' or '_'), each converted and checked by
    ``parser`` as that flag on the command line; ``skip``: keys left out (record-only keys); a key that is no
    flag of ``parser`` is an error."""
    actions = _actions_by_dest(parser)
    values = {}
    for key, value in cfg.items():
        dest = key.replace("-", "_")
        if dest in skip:
            continue
        if dest not in actions or dest == "config":
            raise UserError(f"{what}: unknown key {key!r}")
        if dest in values:  # 'kd-loss' and 'kd_loss' name one flag: which one would win is not for us to guess
            raise UserError(f"{what}: the flag {key!r} is given twice (as '-' and '_' spellings)")
        values[dest] = _one_value(parser, actions[dest], key, value, f"{what}: bad value for {key}: ")
    return values
