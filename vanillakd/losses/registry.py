"""Name -> KD method registry: each method is declared once, where its class is, and nothing else needs to know it.

Declaring a method (one file in ``vanillakd/losses/``, found by the package's auto-discovery)::

    @register_kd_loss("dkd", needs={"logits"}, flags=(
        TEMPERATURE,                                   # shared flags are declared by each method using them
        MethodFlag("--dkd-alpha", "alpha", float, 1.0),
        MethodFlag("--dkd-beta", "beta", float, 2.0)))
    class DKD(nn.Module):
        def __init__(self, alpha=1.0, beta=2.0, temperature=1.0): ...
        def forward(self, z_s, z_t, target, **kwargs): ...

The entry states everything a training script needs:

- ``needs``: a frozenset over ``{"logits", "features", "contrast"}``: the models' logits only (train-kd), their
  stage features too (train-fd / train-crd; the class must then be a ``FeatureKDLoss``, built by its
  ``from_shapes`` hook from the two models' ``features.FeatureShapes`` and the training-set size), and
  ``contrast``: the loader must give each sample's ``index`` and its ``contrastive_index`` draws (CRD);
- ``flags``: ``MethodFlag`` declarations (option, the constructor keyword it feeds, type, default, help, an
  optional positivity / range check, or a ``bool`` store_true switch). ``vanillakd.cli.method_flags`` turns
  them into argparse flags; their values reach the code as ``method_args``, a plain mapping keyed by the flags'
  argparse dests (``{"temperature": 4.0, "dkd_alpha": 1.0, "review_preact": False, ...}``);
- ``preact``: the option of one of its switches that makes it take a ResNet's pre-activation stage maps
  (ReviewKD: ``--review-preact``); the feature wrappers, built before the loss, ask ``wants_preact``.

Declarations are checked when the method registers (so at import time): a method name registered twice, a flag
declared twice by one method, two flags feeding one keyword, a keyword that is not a parameter of the class's
``__init__`` (or of its ``from_shapes``), a flag that several methods declare differently (option, dest, type,
default, check; help may be left empty by all but one), a feature method that is no ``FeatureKDLoss``, all
raise ``MethodDeclarationError``. (Options are ``--lower-case-words``, so two options never share a dest.)

API:

- ``register_kd_loss(name, needs={"logits"}, flags=(), preact=None)``: the class decorator;
- ``get_kd_loss_entry(name) -> KDLossEntry`` (``UserError`` naming the choices for an unknown name);
- ``list_kd_losses(needs=None) -> list[str]``: sorted names; ``needs`` "logits" / "features" filters by
  ``entry.kind``, "contrast" by ``entry.uses_contrast``;
- ``method_flags() -> list[MethodFlag]``: every registered method's flags, merged (one per option), logit
  methods' flags first, then the feature methods', each by method name then declaration order;
- ``create_kd_loss(name, **kwargs)``: the class called with constructor keywords;
- ``create_kd_loss_for(name, method_args, student_shapes=None, teacher_shapes=None, num_data=0, **overrides)``:
  the module built from flag values (a missing or None value: the flag's default); feature methods through
  ``from_shapes`` (a missing shape is a ``ValueError``);
- ``KDLossEntry``: ``name``, ``cls``, ``needs`` (frozenset), ``flags``, ``preact``, ``kind`` ("logits" /
  "features"), ``uses_features``, ``uses_contrast``, ``wants_preact(method_args)``, ``kwargs(method_args)``,
  ``build(kwargs, ...)``.

Flag values always come as ``method_args``, the mapping by dest; ``needs`` is a plain frozenset (compare the
method's kind as ``entry.kind``).
"""
from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from ..errors import UserError

NEEDS = frozenset({"logits", "features", "contrast"})
_OPTION = re.compile(r"--[a-z][a-z0-9]*(-[a-z0-9]+)*")
_TYPES = (int, float, str, bool)


class MethodDeclarationError(ValueError):
    """A KD method's declaration is inconsistent (raised when it registers, i.e. when its module is imported)."""


@dataclass(frozen=True)
class MethodFlag:
    """One command-line flag of a KD method: ``option`` (``"--dkd-alpha"``, argparse dest ``dkd_alpha``) feeds
    the constructor keyword ``keyword``.

    ``type``: int, float or str; ``bool`` makes a store_true switch (default False, no check). ``positive``: the
    value must be > 0; ``minimum`` / ``maximum``: inclusive bounds; a float value must be finite. ``help``: may
    be left empty by all but one of the methods sharing a flag.
    """
    option: str
    keyword: str
    type: type = float
    default: Any = None
    help: str = ""
    positive: bool = False
    minimum: float | None = None
    maximum: float | None = None

    def __post_init__(self):
        if not isinstance(self.option, str) or not _OPTION.fullmatch(self.option):
            raise MethodDeclarationError(f"flag {self.option!r}: an option is '--lower-case-words'")
        if not isinstance(self.keyword, str) or not self.keyword.isidentifier():
            raise MethodDeclarationError(f"flag {self.option}: keyword {self.keyword!r} is not an identifier")
        if self.type not in _TYPES:
            raise MethodDeclarationError(f"flag {self.option}: type must be int, float, str or bool, "
                                         f"not {self.type!r}")
        if self.type is bool:
            if self.default is not False or self.positive or self.minimum is not None or self.maximum is not None:
                raise MethodDeclarationError(f"flag {self.option}: a bool flag is a store_true switch: default "
                                             "False and no check")
        elif self.default is not None:
            try:
                self.check(self.default)
            except ValueError as e:
                raise MethodDeclarationError(f"flag {self.option}: default {self.default!r} {e}") from None

    @property
    def dest(self) -> str:
        """The argparse dest, the key of the flag's value in ``method_args``."""
        return self.option[2:].replace("-", "_")

    @property
    def is_switch(self) -> bool:
        return self.type is bool

    def check(self, value: Any) -> Any:
        """``value`` if it passes the flag's check, else ``ValueError("must be > 0")`` (and the like). A float
        must be finite too: a nan or inf weight or temperature only makes the loss non-finite."""
        if self.type is float and not math.isfinite(value):
            raise ValueError("must be a finite number")
        if self.positive and not value > 0:
            raise ValueError("must be > 0")
        low, high = self.minimum, self.maximum
        if low is not None and high is not None and not low <= value <= high:
            raise ValueError(f"must be in [{low:g}, {high:g}]")
        if low is not None and not value >= low:
            raise ValueError(f"must be >= {low:g}")
        if high is not None and not value <= high:
            raise ValueError(f"must be <= {high:g}")
        return value

    def parse(self, text: str) -> Any:
        """The value of a command-line string: ``type(text)``, then the check (``ValueError`` either way)."""
        if self.is_switch:
            raise ValueError(f"{self.option} is a switch and takes no value")
        return self.check(self.type(text))

    def feeding(self, keyword: str) -> MethodFlag:
        """The same flag feeding another constructor keyword (DIST's ``tau`` from ``--temperature``)."""
        return replace(self, keyword=keyword)

    def _spec(self) -> tuple:
        """What methods sharing the flag must agree on (all but keyword and help)."""
        return self.option, self.type, self.default, self.positive, self.minimum, self.maximum


class FeatureKDLoss(nn.Module):
    """Base class of the methods that take the models' features (``needs`` holds "features").

    Such a loss is sized by the two models, known only at run time: ``from_shapes`` gets the student's and the
    teacher's ``features.FeatureShapes``, the training-set size and the method's constructor keywords (from its
    flags). The default passes the keywords alone; override it to derive channel counts and map sizes.
    ``forward`` gets ``feature_student`` / ``feature_teacher``: each model's stage maps shallow to deep (NCHW),
    then its pooled (B, C) feature last (``Features.as_list``), besides the logit keywords.
    """

    @classmethod
    def from_shapes(cls, student_shapes: Any, teacher_shapes: Any, num_data: int, **kwargs: Any) -> FeatureKDLoss:
        return cls(**kwargs)


@dataclass(frozen=True)
class KDLossEntry:
    name: str
    cls: type[nn.Module]
    needs: frozenset[str] = frozenset({"logits"})
    flags: tuple[MethodFlag, ...] = ()
    # the option of a switch in ``flags`` that makes the method take pre-activation stage maps, or None
    preact: str | None = None

    @property
    def kind(self) -> str:
        """'features' when the method takes the models' features (train-fd / train-crd), else 'logits'."""
        return "features" if "features" in self.needs else "logits"

    @property
    def uses_features(self) -> bool:
        return "features" in self.needs

    @property
    def uses_contrast(self) -> bool:
        """Whether the loader must give each sample's ``index`` and ``contrastive_index`` draws."""
        return "contrast" in self.needs

    def wants_preact(self, method_args: Mapping[str, Any]) -> bool:
        """Whether, with these flag values (``method_args``: the mapping by dest), the loss takes a ResNet's
        pre-activation stage maps."""
        if self.preact is None:
            return False
        flag = next(f for f in self.flags if f.option == self.preact)
        value = method_args.get(flag.dest)
        return bool(flag.default if value is None else value)

    def kwargs(self, method_args: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor keywords from flag values by dest; a missing or None value gives the flag's default
        (None defaults are left out, so the class's own default applies). Checked as the flag checks."""
        out = {}
        for f in self.flags:
            value = method_args.get(f.dest)
            if value is None:
                value = f.default
            if value is None:
                continue
            try:
                f.check(value)
            except ValueError as e:
                raise UserError(f"{f.option} {e}, got {value!r}") from None
            out[f.keyword] = value
        return out

    def build(self, kwargs: Mapping[str, Any], student_shapes: Any = None, teacher_shapes: Any = None,
              num_data: int = 0) -> nn.Module:
        """The module from constructor keywords; feature methods through ``from_shapes``."""
        if self.uses_features:
            if student_shapes is None or teacher_shapes is None:
                raise ValueError(f"kd loss {self.name!r} needs the student's and teacher's feature shapes "
                                 "(features.FeatureShapes)")
            return self.cls.from_shapes(student_shapes, teacher_shapes, num_data, **kwargs)
        return self.cls(**kwargs)


_REGISTRY: dict[str, KDLossEntry] = {}


def _parameters(fn: Callable, skip: int = 0) -> set[str]:
    """Names ``fn`` takes as keywords (not *args / **kwargs), after its first ``skip`` parameters."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _check(entry: KDLossEntry) -> None:
    name, cls = entry.name, entry.cls
    where = f"kd loss {name!r} ({cls.__qualname__})"
    if not isinstance(name, str) or not name or name != name.strip() or name == "none":
        raise MethodDeclarationError(f"kd loss name {name!r}: a non-empty word other than 'none'")
    if name in _REGISTRY:
        raise MethodDeclarationError(f"kd loss {name!r} is registered twice ({_REGISTRY[name].cls.__qualname__} "
                                     f"and {cls.__qualname__})")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise MethodDeclarationError(f"{where}: register an nn.Module class")
    if not entry.needs or not entry.needs <= NEEDS or not entry.needs & {"logits", "features"}:
        raise MethodDeclarationError(f"{where}: needs must hold 'logits' or 'features' (and maybe 'contrast'), "
                                     f"got {sorted(entry.needs)}")
    if entry.uses_features and not issubclass(cls, FeatureKDLoss):
        raise MethodDeclarationError(f"{where} needs features: derive it from registry.FeatureKDLoss, whose "
                                     "from_shapes(student_shapes, teacher_shapes, num_data, **kwargs) builds it")
    takes = _parameters(cls.__init__, skip=1)
    if entry.uses_features:
        takes |= _parameters(cls.from_shapes, skip=3)
    options, keywords = set(), set()
    for f in entry.flags:
        if not isinstance(f, MethodFlag):
            raise MethodDeclarationError(f"{where}: flags must be MethodFlag declarations, got {f!r}")
        if f.option in options:
            raise MethodDeclarationError(f"{where} declares {f.option} twice")
        if f.keyword in keywords:
            raise MethodDeclarationError(f"{where}: two flags feed the keyword {f.keyword!r}")
        if f.keyword not in takes:
            hook = " or its from_shapes" if entry.uses_features else ""
            raise MethodDeclarationError(f"{where}: flag {f.option} feeds keyword {f.keyword!r}, which "
                                         f"{cls.__qualname__}.__init__{hook} does not take (it takes: "
                                         f"{', '.join(sorted(takes)) or 'nothing'})")
        options.add(f.option)
        keywords.add(f.keyword)
        for other in _REGISTRY.values():
            for g in other.flags:
                if g.option == f.option and g._spec() != f._spec():
                    raise MethodDeclarationError(
                        f"{where} declares {f.option} as {_describe(f)}, but kd loss {other.name!r} declares it "
                        f"as {_describe(g)}: methods sharing a flag must declare it alike")
                if g.option == f.option and f.help and g.help and f.help != g.help:
                    raise MethodDeclarationError(
                        f"{where} and kd loss {other.name!r} give {f.option} different help texts; give it once "
                        "(or import the other's MethodFlag)")
    if entry.preact is not None:
        switch = next((f for f in entry.flags if f.option == entry.preact), None)
        if switch is None or not switch.is_switch:
            raise MethodDeclarationError(f"{where}: preact={entry.preact!r} must name one of its bool flags")


def _describe(f: MethodFlag) -> str:
    check = "".join([" > 0" if f.positive else "", f" >= {f.minimum:g}" if f.minimum is not None else "",
                     f" <= {f.maximum:g}" if f.maximum is not None else ""])
    return f"{f.type.__name__}{check}, default {f.default!r}"


def register_kd_loss(name: str, needs: Iterable[str] | str = ("logits",), flags: Iterable[MethodFlag] = (),
                     preact: str | None = None) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a method available as ``--kd-loss name`` and to ``create_kd_loss*(name)``.

    ``needs``: a set over ``{"logits", "features", "contrast"}`` (a single kind as a string is accepted);
    ``flags``: its ``MethodFlag`` declarations; ``preact``: the option of its switch asking for pre-activation
    stage maps. Inconsistent declarations raise ``MethodDeclarationError`` here, at import time.
    """
    need_set = frozenset({needs} if isinstance(needs, str) else needs)

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        entry = KDLossEntry(name, cls, need_set, tuple(flags), preact)
        _check(entry)
        _REGISTRY[name] = entry
        return cls
    return wrap


def list_kd_losses(needs: str | None = None) -> list[str]:
    """Registered names, sorted; ``needs``: "logits" / "features" keeps that kind, "contrast" the methods whose
    loader draws contrast samples."""
    if needs is not None and needs not in NEEDS:
        raise ValueError(f"needs must be one of {sorted(NEEDS)}, got {needs!r}")
    return sorted(n for n, e in _REGISTRY.items()
                  if needs is None or (e.uses_contrast if needs == "contrast" else e.kind == needs))


def get_kd_loss_entry(name: str) -> KDLossEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown kd loss {name!r}; choose one of: {', '.join(list_kd_losses())}") from None


def method_flags() -> list[MethodFlag]:
    """Every registered method's flags, one per option: the logit methods' first, then the feature methods',
    each by method name, then in declaration order. A shared flag is its first declaration, with the help text
    of whichever declaration gives one (its ``keyword`` is the first method's)."""
    order = sorted(_REGISTRY.values(), key=lambda e: (e.kind != "logits", e.name))
    merged: dict[str, MethodFlag] = {}
    for entry in order:
        for f in entry.flags:
            first = merged.get(f.option)
            if first is None:
                merged[f.option] = f
            elif not first.help and f.help:
                merged[f.option] = replace(first, help=f.help)
    return list(merged.values())


def create_kd_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered loss by name with constructor keyword arguments."""
    return get_kd_loss_entry(name).cls(**kwargs)


def create_kd_loss_for(name: str, method_args: Mapping[str, Any], student_shapes: Any = None,
                       teacher_shapes: Any = None, num_data: int = 0, **overrides: Any) -> nn.Module:
    """Build a registered method from its flag values (``method_args``: dest -> value, other methods' values are
    ignored; a missing or None value gives the flag's default). Feature methods also get the two models'
    ``features.FeatureShapes`` and the training-set size, through ``from_shapes``; ``overrides``: constructor
    keywords that win over the flags."""
    entry = get_kd_loss_entry(name)
    return entry.build({**entry.kwargs(method_args), **overrides}, student_shapes, teacher_shapes, num_data)

