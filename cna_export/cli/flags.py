"""CLI flags generated from the settings models of :mod:`cna_export.core.settings`.

Each field's name, type, default and description make its flag (``top_fraction`` becomes
``--top-fraction``; :func:`~cna_export.core.settings.opt` adds another name, a metavar, a negated
switch). Unset flags stay absent from the namespace, so the recipe and the defaults apply:
defaults < recipe < the flags given.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel

from ..core.settings.base import build, cli_spec


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def _shown(default: Any) -> str:
    if isinstance(default, list):
        return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in default) or "none"
    return str(default)


def _negatable(cls: type[BaseModel], name: str, negatable: bool | None) -> bool:
    """Whether the bool field ``name`` gets ``--x/--no-x`` (its declaring model's ``negatable``) or a plain ``--x``."""
    if negatable is not None:
        return negatable
    owner = next((c for c in cls.__mro__ if name in getattr(c, "__annotations__", {})), cls)
    return bool(getattr(owner, "negatable", True))


def _kind(cls: type[BaseModel], name: str, tp: Any, switch: bool, default: Any,
          negatable: bool | None) -> dict[str, Any]:
    """The argparse action, type or choices of a field of type ``tp``."""
    if switch:  # --no-x: stores the opposite of the default
        return dict(action="store_const", const=not default)
    if tp is bool:
        return dict(action=argparse.BooleanOptionalAction if _negatable(cls, name, negatable) else "store_true")
    if typing.get_origin(tp) is Literal:
        return dict(choices=list(typing.get_args(tp)))
    if typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        if item is str:
            return dict(action="append")
        return dict(type=_int_list if item is int else _float_list, metavar="N,N,...")
    if tp in (int, float, str):
        return dict(type=tp)
    return {}


def add_flags(parser: argparse.ArgumentParser, cls: type[BaseModel], skip: tuple[str, ...] = (),
              only: tuple[str, ...] | None = None, negatable: bool | None = None) -> None:
    """Add one flag per field of ``cls``; unset flags stay absent so recipes and defaults apply."""
    title = cls.__doc__.strip().splitlines()[0] if cls.__doc__ else cls.__name__
    group = parser.add_argument_group(title)
    for name, f in cls.model_fields.items():
        spec = cli_spec(f)
        if name in skip or (only is not None and name not in only) or spec.get("cli") is False:
            continue
        flag = spec.get("flag", "--" + name.replace("_", "-"))
        tp = _unwrap_optional(f.annotation)
        default = f.get_default(call_default_factory=True)
        switch = tp is bool and flag != "--" + name.replace("_", "-")
        help_text = f.description or ""
        if help_text and not switch and "default" not in help_text:
            help_text += f" (default: {_shown(default)})"
        kwargs: dict[str, Any] = {"dest": spec.get("dest", name), "default": argparse.SUPPRESS,
                                  "help": help_text.replace("%", "%%") or None}
        kwargs.update(_kind(cls, name, tp, switch, default, negatable))
        for key in ("metavar", "nargs", "const"):
            if key in spec:
                kwargs[key] = spec[key]
        group.add_argument(flag, **kwargs)


def flags_of(ns: argparse.Namespace, cls: type[BaseModel]) -> dict[str, Any]:
    """The settings of ``cls`` that were given on the command line."""
    given = vars(ns)
    out = {}
    for name, f in cls.model_fields.items():
        dest = cli_spec(f).get("dest", name)
        if dest in given:
            out[name] = given[dest]
    return out


def settings_of(ns: argparse.Namespace, cls: type[BaseModel], *recipe: dict[str, Any], **fixed: Any) -> Any:
    """``cls`` built from defaults < recipe layers < the flags given < ``fixed``."""
    return build(cls, *recipe, flags_of(ns, cls), fixed)
