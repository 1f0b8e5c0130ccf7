"""Settings of export and steer: :class:`ExportOptions`, :class:`GGUFExportOptions`, :class:`HubOptions`
and :class:`SteerOptions` (``export`` also takes ``verify.GGUFVerifyOptions`` and ``base.ModelOptions``)."""

from __future__ import annotations

from typing import Literal

from ..outputs import InputFile, InputFiles
from .base import Force, Multiplier, Overwrite, _Switches, opt


class ExportOptions(Multiplier, Force, Overwrite):
    """Export"""

    multipliers: InputFile = opt(None, 'per-neuron multipliers: {"layer:index": m} or [{layer, index, multiplier}]',
                                  metavar="FILE")
    link: bool = opt(False, "hard-link untouched shards instead of copying them (same filesystem)")
    verify: bool = opt(False, "verify against hook steering before writing (exit 3 and no output if it fails)")
    prompts: InputFiles = opt(None, "verification prompts (repeatable; default: the refusal recipe's)",
                                    metavar="FILE")
    convert_dtype: str = opt("auto", "dtype of a converted GGUF/pickled source: auto (float32 for GGUF), float32, "
                             "bfloat16, float16", flag="--dtype")
    max_shard_size: str | None = opt(None, "shard size of a converted source, e.g. 2GB (default: transformers')")


EXPORT_FORMATS = ("safetensors", "gguf", "lora", "gguf-lora")
"""What ``export --format`` and ``steer --format`` write: a steered checkpoint (safetensors folder, GGUF
file), a PEFT LoRA adapter folder, or a llama.cpp LoRA adapter GGUF."""


class GGUFExportOptions(_Switches):
    """GGUF export"""

    format: Literal["safetensors", "gguf", "lora", "gguf-lora"] | None = opt(
        None, "output format: safetensors or gguf (a steered checkpoint), lora (a PEFT adapter folder) or gguf-lora "
        "(a llama.cpp LoRA adapter GGUF for a GGUF base) (default: gguf when --out ends in .gguf, else safetensors)")
    adapter_dtype: Literal["auto", "float32", "float16", "bfloat16"] = opt(
        "auto", "LoRA: dtype of the adapter factors (auto: float32; gguf-lora takes float32 or float16)")
    fold: Literal["up", "down"] | None = opt(
        None, "GGUF: scale ffn_up rows (default; any supported quant type) or ffn_down columns (float only); "
        "safetensors: down_proj columns (default) or up_proj rows (a copy and the touched rows)")
    fast_copy: bool = opt(False, "GGUF: copy the file and patch the touched rows in place; header unchanged, manifest "
                          "in <out>.cna_manifest.json")
    modelfile: bool = opt(True, "GGUF: do not write an Ollama Modelfile beside the output", flag="--no-modelfile")


class HubOptions(_Switches):
    """Hugging Face Hub"""

    push_to_hub: str | None = opt(None, "after writing (and verifying), upload the export to this Hub repo "
                                  "(created if missing) in one commit; token from HF_TOKEN or the cached login",
                                  metavar="REPO_ID")
    private: bool = opt(False, "create the Hub repo private")


class SteerOptions(_Switches):
    """Steer job"""

    formats: str = opt("auto", "formats to export, comma-separated: safetensors, gguf, lora, gguf-lora (gguf and "
                       "gguf-lora need a GGUF model); auto: every format that applies to the model",
                       flag="--format", dest="steer_formats", metavar="F,F,...")
    fresh: bool = opt(False, "redo every step, even those whose inputs are unchanged")
    preview: int = opt(8, "behaviour preview: hold back the last N prompts of each recipe set from discovery and "
                       "answer them greedily with the unsteered and the exported model (refusals and over-refusals "
                       "before -> after, first-token KL, one answer side by side; printed, in steer.json and the "
                       "model card)", ge=1, le=10000, metavar="N")
    preview_on: bool = opt(True, "no behaviour preview (discovery uses every prompt)", flag="--no-preview")
    preview_tokens: int = opt(32, "greedy tokens per preview answer", ge=1, le=4096)
