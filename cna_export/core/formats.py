"""Export formats and the options each one takes: the one place that says which flag applies to which format.

The four formats (:data:`Format`) each have a typed options model; :data:`FormatOptions` is their
pydantic discriminated union (on ``format``). :func:`format_options` builds the model of one format
from the export job's settings (``ExportOptions``, ``GGUFExportOptions``, ``ModelOptions``) through
:data:`FLAG_RULES`, the table of flags and the formats they do not apply to: ``export`` refuses such a
flag with one line (``strict``), ``steer``, which exports several formats from one set of flags, leaves
it out of the formats it does not name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field

from .errors import CnaError
from .settings.base import ModelOptions
from .settings.export import ExportOptions, GGUFExportOptions

Format = Literal["safetensors", "gguf", "lora", "gguf-lora"]
FORMATS: tuple[Format, ...] = get_args(Format)
LORA_FORMATS: tuple[Format, ...] = ("lora", "gguf-lora")
GGUF_LORA_DTYPES = {"auto": "F32", "float32": "F32", "float16": "F16"}
"""``--adapter-dtype`` -> the tensor type of a llama.cpp LoRA adapter (it holds F32 or F16)."""


class _FormatOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SafetensorsFormat(_FormatOptions):
    """A steered safetensors checkpoint folder (``export.safetensors``)."""

    format: Literal["safetensors"] = "safetensors"
    fold: Literal["up", "down"] = Field(
        "down", description="scale down_proj columns (the tensor is rewritten) or up_proj rows (a kernel copy and "
                            "the touched rows; dense gated MLPs with their own up_proj)")
    link: bool = Field(False, description="hard-link untouched shards instead of copying them")
    dtype: str = Field("auto", description="dtype of a converted GGUF or pickled source")
    max_shard_size: str | None = Field(None, description="shard size of a converted source")
    allow_pickle: bool = Field(False, description="load pickled weights (and convert them)")
    trust_remote_code: bool = False


class GGUFFormat(_FormatOptions):
    """A steered GGUF file (``export.gguf``)."""

    format: Literal["gguf"] = "gguf"
    fold: Literal["up", "down"] = Field("up", description="scale ffn_up rows or ffn_down columns")
    fast_copy: bool = Field(False, description="copy the file and patch it in place; manifest in a side file")
    modelfile: bool = Field(True, description="write an Ollama Modelfile beside the output")


class LoraFormat(_FormatOptions):
    """A PEFT LoRA adapter folder (``export.lora``)."""

    format: Literal["lora"] = "lora"
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = Field(
        "float32", description="dtype of the factors (auto: the base's)")
    base_model_name_or_path: str | None = Field(None, description="the base named in adapter_config.json "
                                                "(default: the model as given)")
    trust_remote_code: bool = False


class GGUFLoraFormat(_FormatOptions):
    """A llama.cpp LoRA adapter GGUF for a GGUF base (``export.gguf_lora``)."""

    format: Literal["gguf-lora"] = "gguf-lora"
    dtype: Literal["F32", "F16"] = Field("F32", description="tensor type of the factors")
    modelfile: bool = Field(True, description="write an Ollama Modelfile (FROM the base, ADAPTER this file)")


FormatOptions = Annotated[Union[SafetensorsFormat, GGUFFormat, LoraFormat, GGUFLoraFormat],
                          Field(discriminator="format")]
FORMAT_OPTIONS: dict[Format, type[_FormatOptions]] = {
    "safetensors": SafetensorsFormat, "gguf": GGUFFormat, "lora": LoraFormat, "gguf-lora": GGUFLoraFormat}


def export_format(out: str | Path, format: Format | None = None) -> Format:
    """The output format: as given, else GGUF when ``out`` ends in ``.gguf``, else safetensors."""
    if format is not None:
        return format
    return "gguf" if str(out).lower().endswith(".gguf") else "safetensors"


@dataclass(frozen=True)
class FlagRule:
    """Flags that do not apply to ``refused_for``: ``given`` says whether the settings set them."""

    given: Callable[[ExportOptions, GGUFExportOptions, ModelOptions], bool]
    refused_for: tuple[Format, ...]
    message: str


FLAG_RULES: tuple[FlagRule, ...] = (
    FlagRule(lambda e, g, m: g.adapter_dtype != "auto", ("safetensors", "gguf"),
             "--adapter-dtype applies to LoRA exports (--format lora or gguf-lora)"),
    FlagRule(lambda e, g, m: bool(e.link or e.max_shard_size or e.convert_dtype != "auto"), LORA_FORMATS,
             "--link, --max-shard-size and --dtype apply to safetensors exports, not a LoRA adapter "
             "(--adapter-dtype sets the adapter's dtype)"),
    FlagRule(lambda e, g, m: g.fold == "up" or g.fast_copy, LORA_FORMATS,
             "--fold up and --fast-copy apply to GGUF exports; a LoRA adapter always acts on down_proj"),
    FlagRule(lambda e, g, m: m.allow_pickle, LORA_FORMATS,
             "a LoRA adapter is computed from safetensors or GGUF weights; --allow-pickle does not apply "
             "(convert the checkpoint with a safetensors export first)"),
    FlagRule(lambda e, g, m: not g.modelfile, ("lora",), "--no-modelfile applies to GGUF exports"),
    FlagRule(lambda e, g, m: bool(e.link or e.max_shard_size), ("gguf",),
             "--link and --max-shard-size apply to safetensors exports, not GGUF"),
    FlagRule(lambda e, g, m: g.fast_copy or not g.modelfile, ("safetensors",),
             "--fast-copy and --no-modelfile apply to GGUF exports (--format gguf)"),
)
"""Which flags do not apply to which format, in the order ``export`` reports them. A flag not refused
for a format it does not use is ignored there (``--dtype`` for a GGUF export, ``--fold down`` for a
LoRA adapter, which acts on down_proj anyway)."""


def _check_out(fmt: Format, out: str | Path) -> None:
    """The output name must fit the format: a ``.gguf`` file or a folder."""
    gguf_name = str(out).lower().endswith(".gguf")
    if fmt == "lora" and gguf_name:
        raise CnaError(f"--format lora writes a PEFT adapter folder, not {out}; use --format gguf-lora for a "
                       "llama.cpp adapter")
    if fmt == "safetensors" and gguf_name:
        raise CnaError(f"--format safetensors writes a folder, not {out}; use --format gguf for a .gguf file")
    if fmt == "gguf-lora" and not gguf_name:
        raise CnaError(f"--format gguf-lora writes a .gguf adapter file; --out {out} does not end in .gguf")


def format_options(fmt: Format, out: str | Path, export: ExportOptions, gguf: GGUFExportOptions,
                   model: ModelOptions, strict: bool = True) -> FormatOptions:
    """The options of format ``fmt`` from the job's settings. ``strict``: a flag that does not apply to
    ``fmt`` (:data:`FLAG_RULES`) and an output name that does not fit it are one-line errors; otherwise
    such flags are left out."""
    if strict:
        for rule in FLAG_RULES:
            if fmt in rule.refused_for and rule.given(export, gguf, model):
                raise CnaError(rule.message)
        _check_out(fmt, out)
    if fmt == "safetensors":
        return SafetensorsFormat(fold=gguf.fold or "down", link=export.link, dtype=export.convert_dtype,
                                 max_shard_size=export.max_shard_size,
                                 allow_pickle=model.allow_pickle, trust_remote_code=model.trust_remote_code)
    if fmt == "gguf":
        return GGUFFormat(fold=gguf.fold or "up", fast_copy=gguf.fast_copy, modelfile=gguf.modelfile)
    if fmt == "lora":
        dtype = "float32" if gguf.adapter_dtype == "auto" else gguf.adapter_dtype
        return LoraFormat(dtype=dtype, trust_remote_code=model.trust_remote_code)
    if gguf.adapter_dtype not in GGUF_LORA_DTYPES and strict:
        raise CnaError("a llama.cpp LoRA adapter is float32 or float16 (--adapter-dtype)")
    return GGUFLoraFormat(dtype=GGUF_LORA_DTYPES.get(gguf.adapter_dtype, "F32"), modelfile=gguf.modelfile)
