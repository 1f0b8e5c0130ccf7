"""Options objects: one pydantic model per job, feeding CLI flags, YAML recipes and the library API.

Each field's name, type and description generate its CLI flag (``top_fraction``
becomes ``--top-fraction``), a recipe may set the same fields, and the library
takes the model directly. Precedence: defaults < recipe < CLI flags.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import CnaError


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelOptions(_Options):
    """How to load a model."""

    dtype: str = Field("auto", description="auto (float32 on CPU, checkpoint dtype with a device map), float32, bfloat16, float16")
    device_map: str | None = Field(None, description="passed to accelerate, e.g. auto to spread a large model over GPUs and CPU")
    allow_pickle: bool = Field(False, description="allow loading pickled .bin/.pt weights (can run arbitrary code)")
    trust_remote_code: bool = Field(False, description="allow model code from the checkpoint (transformers trust_remote_code)")


class PromptOptions(_Options):
    """How prompts are read and rendered."""

    field: str | None = Field(None, description="JSONL field holding the prompt (default: prompt/goal/text/...)")
    column: str | None = Field(None, description="CSV column holding the prompt (default: prompt/Goal/text/...)")
    chat_template: bool = Field(True, description="render prompts as one user turn with the chat template (off for base models)")
    system_prompt: str | None = Field(None, description="optional system message placed before the user turn")
    max_length: int | None = Field(None, gt=0, description="keep at most this many tokens of each prompt (from the end)")
    batch_size: int = Field(8, gt=0, description="prompts per forward pass")


class DiscoverOptions(PromptOptions):
    """CNA discovery settings (the fields a recipe may set)."""

    positive: str | None = Field(None, description="prompt set showing the behaviour (text, JSONL or CSV)")
    negative: str | None = Field(None, description="matched prompt set without it")
    neutral: str | None = Field(None, description="diverse neutral prompts for the universal-neuron filter")
    top_fraction: float = Field(0.001, gt=0, le=1, description="circuit size as a fraction of all MLP neurons")
    top_k: int | None = Field(None, gt=0, description="circuit size in neurons (overrides --top-fraction)")
    score: Literal["mean-diff", "standardized"] = Field("mean-diff", description="per-neuron score")
    sign: Literal["both", "positive", "negative"] = Field(
        "both",
        description="which scores may enter the circuit: both (ranked by |score|, the paper), positive (more active "
        "on the positive set) or negative",
    )  # fmt: skip
    exclude_layers: list[int] = Field(default_factory=list, description="layers never included (comma-separated)")
    universal_threshold: float = Field(0.8, gt=0, le=1, description="share of neutral prompts a universal neuron is top-k on")
    universal_top_k: int = Field(50, gt=0, description="per-layer top-k (by |activation|) for the universal filter")
    limit: int | None = Field(None, gt=0, description="use at most this many prompts of each set")
    multiplier: float | None = Field(
        None, allow_inf_nan=False,
        description="store this multiplier with every circuit neuron (export and eval use it when not given one; "
        "a tuned recipe sets it)",
    )  # fmt: skip

    def method_params(self) -> dict[str, Any]:
        """The parameters that define the method (paths are recorded separately, with hashes)."""
        keep = (
            "score sign top_fraction top_k exclude_layers universal_threshold universal_top_k "
            "batch_size max_length chat_template system_prompt limit"
        ).split()
        return {k: getattr(self, k) for k in keep}


RECIPE_PATH_FIELDS = ("positive", "negative", "neutral")
RECIPE_META_FIELDS = ("name", "description")


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe; relative prompt paths are resolved against the recipe's folder."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CnaError(f"recipe not found: {p}")
    try:
        data = yaml.safe_load(p.read_text("utf-8")) or {}
    except yaml.YAMLError as e:
        raise CnaError(f"recipe {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CnaError(f"recipe {p} must be a mapping of settings")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    section = data.pop("discover", None)
    if isinstance(section, dict):
        data.update({str(k).replace("-", "_"): v for k, v in section.items()})
    for meta in RECIPE_META_FIELDS:
        data.pop(meta, None)
    for key in list(data):
        if key not in DiscoverOptions.model_fields and key not in ModelOptions.model_fields:
            data.pop(key)  # sections for other jobs (eval, export) are theirs to read
    for key in RECIPE_PATH_FIELDS:
        if isinstance(data.get(key), str):
            data[key] = str((p.parent / data[key]).resolve())
    return data


def build(cls: type[_Options], *layers: dict[str, Any]) -> Any:
    """Validate merged settings into ``cls`` with a one-line error naming the bad setting."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if k in cls.model_fields})
    try:
        return cls.model_validate(merged)
    except ValidationError as e:
        err = e.errors()[0]
        name = "--" + "-".join(str(p) for p in err["loc"][:1]).replace("_", "-")
        raise CnaError(f"{name}: {err['msg']}") from None


# -- CLI flag generation ----------------------------------------------------------


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


def add_flags(parser: argparse.ArgumentParser, cls: type[_Options], skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of ``cls``; unset flags stay absent so recipes and defaults apply."""
    group = parser.add_argument_group(cls.__doc__.strip().splitlines()[0] if cls.__doc__ else cls.__name__)
    for name, f in cls.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        tp = _unwrap_optional(f.annotation)
        default = f.get_default(call_default_factory=True)
        help_text = f"{f.description} (default: {default})" if f.description else None
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is Literal:
            kwargs["choices"] = list(typing.get_args(tp))
        elif typing.get_origin(tp) is list:
            kwargs["type"] = _int_list
            kwargs["metavar"] = "N,N,..."
        elif tp in (int, float, str):
            kwargs["type"] = tp
        group.add_argument(flag, **kwargs)


def flags_of(ns: argparse.Namespace, cls: type[_Options]) -> dict[str, Any]:
    """The settings of ``cls`` that were given on the command line."""
    return {k: v for k, v in vars(ns).items() if k in cls.model_fields}
