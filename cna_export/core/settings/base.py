"""Settings machinery and the flags every job shares.

:func:`opt` is a pydantic ``Field`` with what a CLI flag needs beyond the field's name, type and default
(another name, a metavar, a negated switch; ``cli.flags`` reads it back with :func:`cli_spec`).
``_Options`` is the base of every settings model: unknown keys are refused, and an int or float field
refuses a bool (``top_k: true`` is not one neuron); ``_Switches`` is its variant whose bool fields are
plain ``--x`` switches. The shared flags (``--overwrite``, ``--force``, ``--multiplier``, model loading,
prompt reading) are declared once, here, in :class:`Overwrite`, :class:`Force`, :class:`Multiplier`,
:class:`ModelOptions` and :class:`PromptOptions`; :func:`build` validates merged settings into a model
with a one-line error that names the bad setting by its flag.

The models of each job live beside this module (``discover``, ``verify``, ``export``, ``evaluate``,
``audit``); each imports this one and no other job's.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from ..errors import CnaError


def opt(default: Any = ..., description: str | None = None, *, flag: str | None = None, dest: str | None = None,
        metavar: str | None = None, nargs: str | None = None, const: Any = None, cli: bool = True,
        recipe: bool | None = None, **constraints: Any) -> Any:
    """A pydantic ``Field`` with what its CLI flag needs beyond name, type and default.

    ``flag``: the flag's name when it is not ``--field-name`` (a ``--no-x`` switch for a field
    that defaults to true); ``dest``: the namespace attribute (when two models share a name);
    ``cli=False``: a library-only setting with no flag; ``recipe``: whether a recipe may set it
    (default: when it has a flag).
    """
    extra = {k: v for k, v in dict(flag=flag, dest=dest, metavar=metavar, nargs=nargs, const=const,
                                   recipe=recipe).items() if v is not None}
    if not cli:
        extra["cli"] = False
    return Field(default, description=description, json_schema_extra={"cli": extra} if extra else None,
                 **constraints)


def cli_spec(f: Any) -> dict[str, Any]:
    """What :func:`opt` recorded for a field's flag and recipe key ({} for a plain ``Field``)."""
    extra = f.json_schema_extra
    return dict(extra.get("cli", {})) if isinstance(extra, dict) else {}


def _numeric(tp: Any) -> bool:
    """Whether a field of type ``tp`` takes numbers: int or float, alone, optional, in a union or a list."""
    if tp is int or tp is float:
        return True
    origin = typing.get_origin(tp)
    return origin in (typing.Union, types.UnionType, list, Annotated) and any(_numeric(a) for a in typing.get_args(tp))


def _has_bool(value: Any) -> bool:
    return isinstance(value, bool) or (isinstance(value, (list, tuple)) and any(isinstance(x, bool) for x in value))


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)  # schemas built on first use: faster start-up

    negatable: ClassVar[bool] = True
    """True: a bool field gets ``--x/--no-x``; False: a plain ``--x`` switch (or its ``flag``)."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        """pydantic reads true as 1: a bool given for a number is a mistake (``top_k: true``), not 1."""
        if info.field_name is not None and _numeric(cls.model_fields[info.field_name].annotation) and _has_bool(v):
            raise PydanticCustomError("bool_not_number", "Input should be a number, not a boolean")
        return v


class _Switches(_Options):
    negatable: ClassVar[bool] = False


# -- shared flags ----------------------------------------------------------------------------


class Overwrite(_Switches):
    """Output"""

    overwrite: bool = opt(False, "replace existing output files")


class Force(_Switches):
    """Circuit fit"""

    force: bool = opt(False, "apply a circuit found on different weights")


class Multiplier(_Switches):
    """Steering strength"""

    multiplier: float | None = opt(None, "multiplier for every circuit neuron (default: the circuit's own)",
                                   allow_inf_nan=False)


class ModelOptions(_Options):
    """How to load a model."""

    dtype: str = Field(
        "auto", description="auto (float32 on CPU, checkpoint dtype with a device map), float32, bfloat16, float16")
    device_map: str | None = Field(
        None, description="passed to accelerate, e.g. auto to spread a large model over GPUs and CPU")
    allow_pickle: bool = Field(False, description="allow loading pickled .bin/.pt weights (can run arbitrary code)")
    trust_remote_code: bool = Field(
        False, description="allow model code from the checkpoint (transformers trust_remote_code)")


class PromptOptions(_Options):
    """How prompts are read and rendered."""

    field: str | None = Field(None, description="JSONL field holding the prompt (default: prompt/goal/text/...)")
    column: str | None = Field(None, description="CSV column holding the prompt (default: prompt/Goal/text/...)")
    chat_template: bool = Field(
        True, description="render prompts as one user turn with the chat template (off for base models)")
    system_prompt: str | None = Field(None, description="optional system message placed before the user turn")
    max_length: int | None = Field(
        None, gt=0, description="keep at most this many tokens of each prompt (from the end)")
    batch_size: int | Literal["auto"] = Field(
        "auto", description="prompts per forward pass, or auto: the largest batch whose forward pass fits in half "
        "the memory free on the device (sized per batch, longest prompts first)",
        json_schema_extra={"cli": {"metavar": "N|auto"}},
    )  # fmt: skip

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        try:
            n = int(v)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite float
            raise ValueError("expected a positive integer or 'auto'") from None
        if n < 1 or (isinstance(v, float) and v != n) or isinstance(v, bool):
            raise ValueError("expected a positive integer or 'auto'")
        return n


# -- building ------------------------------------------------------------------------------


def error_text(err: Any) -> str:
    """One pydantic error's message; a validator's own ``ValueError`` text without pydantic's prefix."""
    if err["type"] == "value_error" and "error" in err.get("ctx", {}):
        return str(err["ctx"]["error"])
    return err["msg"]


def build(cls: type[_Options], *layers: dict[str, Any]) -> Any:
    """Validate merged settings into ``cls`` with a one-line error naming the bad setting by its flag."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if k in cls.model_fields})
    try:
        return cls.model_validate(merged)
    except ValidationError as e:
        err = e.errors()[0]
        if not err["loc"]:  # a check across fields: its message names them
            raise CnaError(error_text(err)) from None
        name = str(err["loc"][0])
        f = cls.model_fields.get(name)
        flag = cli_spec(f).get("flag") if f is not None else None
        raise CnaError(f"{flag or '--' + name.replace('_', '-')}: {error_text(err)}") from None
