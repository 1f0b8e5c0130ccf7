"""What ships beside an export: the Hugging Face model card (README.md) and the Ollama Modelfile."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..core.errors import CnaError
from ..core.manifest import (
    MANIFEST_FILE,
    SHARD_METADATA_KEY,
    ExportManifest,
)
from ..core.multipliers import describe_multipliers
from ..io import gguf as G

CARD_FILE = "README.md"
RESPONSIBLE_USE = ("Steering changes the model's behaviour (for a refusal circuit, multiplier 0 weakens refusals). "
                   "Use it responsibly and in line with the base model's licence.")


def _steering_head(c: Any, total: int, mults: Mapping[tuple[int, int], float]) -> list[str]:
    """The start of a card's "Steering" table: the circuit and its multipliers."""
    return [
        "## Steering",
        "",
        "| | |",
        "|---|---|",
        f"| circuit | {len(c.neurons)} neurons ({len(c.neurons) / total:.3%} of {total} MLP neurons), {c.kind} "
        f"on `{c.model.name}` ({c.model.architecture}, fingerprint `{(c.model.fingerprint or 'none')[:16]}`) |",
        f"| multiplier | {describe_multipliers(mults)} |",
    ]


def model_card(manifest: ExportManifest, verification: Any = None) -> str:
    """README.md with YAML front matter (base_model, tags) describing the steering and its verification."""
    from huggingface_hub import ModelCardData

    c = manifest.circuit
    mults = manifest.multiplier_map()
    counts = c.layer_counts()
    data = ModelCardData(
        base_model=manifest.source,
        library_name="transformers",
        tags=["cna-export", "steering", "contrastive-neuron-attribution", c.model.architecture, "safetensors"],
    )
    method = ", ".join(f"{k}={v}" for k, v in c.method.items()) or "n/a"
    prompts = "; ".join(f"{k}: {Path(p.path).name} ({p.count} prompts, sha256 `{p.sha256[:16]}`)"
                        for k, p in c.prompts.items()) or "n/a"
    dtypes = sorted({t.dtype for t in manifest.tensors})
    total = c.model.total_neurons
    lines = [
        f"# {Path(manifest.source).name or manifest.source}, CNA-steered",
        "",
        f"This checkpoint is `{manifest.source}` with a Contrastive Neuron Attribution (CNA) circuit folded into its "
        f"weights by cna-export {manifest.tool_version}: {len(mults)} MLP neurons in {len(counts)} layers are "
        f"multiplied by {describe_multipliers(mults)}. No hooks or custom code are needed to run it; it loads with "
        "`AutoModelForCausalLM.from_pretrained`.",
        "",
        *_steering_head(c, total, mults),
        "| fold | down_proj columns: `W[:, j] *= m` for each circuit neuron `j` (float32 arithmetic, rounded "
        f"once to {', '.join(dtypes) or 'the tensor dtype'}); equivalent to scaling the neuron's activation |",
        "| touched layers | " + ", ".join(f"L{layer}: {n}" for layer, n in counts.items()) + " |",
        f"| method | {method} |",
        f"| prompt sets | {prompts} |",
        f"| source | `{manifest.source}` ({manifest.source_format}) |",
        "",
        "## Verification",
        "",
        *_verification_lines(verification, f"cna-export verify --original {manifest.source} --exported <this folder>",
                             "these weights behave", "the original"),
        *_provenance(
            f"`{MANIFEST_FILE}` records the circuit manifest, the multiplier of every neuron and, for each touched "
            "tensor, the sha256 before and after folding; each rewritten shard carries a short summary in its "
            f"safetensors metadata under `{SHARD_METADATA_KEY}`. All other tensors are the source's, unchanged."),
    ]
    return _card(data, lines)


MODELFILE_SUFFIX = ".Modelfile"


def modelfile_path(out: str | Path) -> Path:
    """The Ollama Modelfile of GGUF ``out``: beside it, named after it (``x.gguf`` -> ``x.Modelfile``), so
    exports into one folder each have their own."""
    out = Path(out)
    name = out.name[: -len(".gguf")] if out.name.lower().endswith(".gguf") else out.name
    return out.with_name(name + MODELFILE_SUFFIX)


def stop_tokens(reader: Any) -> list[str]:
    """The EOS / end-of-turn / end-of-message token strings of the file's vocabulary, deduplicated."""
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is None:
        return []
    out: list[str] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        tid = G.field_value(reader, key)
        if not isinstance(tid, int) or not 0 <= tid < tokens.count:
            continue
        try:
            text = tokens.item(tid)
        except (CnaError, IndexError):
            continue
        if text and text not in out:
            out.append(text)
    return out


def _modelfile_quote(text: str) -> str | None:
    """Quote a value the way Ollama's Modelfile parser reads it back (no escapes); None if impossible."""
    if not text.isprintable() or '"""' in text or text.endswith('"'):
        return None
    return f'"""{text}"""' if '"' in text else f'"{text}"'


# Ollama (Go template) renderings of the common chat formats, with their stop strings. Ollama's own
# template detection fails for some imported GGUFs, so the Modelfile always carries one.
CHAT_TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "chatml": ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n",
               ("<|im_start|>", "<|im_end|>")),
    "llama3": ("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
               "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
               ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "gemma": ("{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}user{{ end }}\n"
              "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n", ("<start_of_turn>", "<end_of_turn>")),
    "mistral": ("{{- range $i, $_ := .Messages }}{{- if eq .Role \"user\" }}[INST] "
                "{{ if and (eq (len (slice $.Messages $i)) 1) $.System }}{{ $.System }}\n\n{{ end }}"
                "{{ .Content }}[/INST]"
                "{{- else if eq .Role \"assistant\" }} {{ .Content }}</s>{{ end }}{{ end }}", ("[INST]", "[/INST]")),
    "phi3": ("{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
             ("<|end|>", "<|user|>", "<|assistant|>", "<|endoftext|>")),
}
RAW_TEMPLATE = "{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}"


def chat_family(template: str | None) -> str | None:
    """Which of :data:`CHAT_TEMPLATES` a GGUF's ``tokenizer.chat_template`` (Jinja) is, or None."""
    if not template:
        return None
    for family, marker in (("chatml", "<|im_start|>"), ("llama3", "<|start_header_id|>"), ("gemma", "<start_of_turn>"),
                           ("mistral", "[INST]")):
        if marker in template:
            return family
    if "<|end|>" in template and "<|assistant|>" in template:
        return "phi3"
    return None


def template_lines(reader: Any) -> list[str]:
    """``TEMPLATE`` (converted from the GGUF's chat template) and ``PARAMETER stop`` lines for a Modelfile."""
    jinja = G.field_value(reader, "tokenizer.chat_template")
    family = chat_family(jinja if isinstance(jinja, str) else None)
    if family is None:
        why = ("the GGUF's chat template is not one of " + ", ".join(CHAT_TEMPLATES) if jinja
               else "the GGUF has no chat template")
        lines = [f"# {why}: raw prompts (edit TEMPLATE for chat use)", f'TEMPLATE """{RAW_TEMPLATE}"""']
        stops: list[str] = []
    else:
        lines = [f"# chat template: {family} (converted from tokenizer.chat_template)",
                 f'TEMPLATE """{CHAT_TEMPLATES[family][0]}"""']
        stops = list(CHAT_TEMPLATES[family][1])
    for tok in stop_tokens(reader):
        if tok not in stops:
            stops.append(tok)
    for tok in stops:
        q = _modelfile_quote(tok)
        lines.append(f"# stop token {tok!r} cannot be quoted for Ollama; left out" if q is None
                     else f"PARAMETER stop {q}")
    return lines


def _modelfile_header(out: Path, manifest: ExportManifest, what: str, how: str, manifest_where: str) -> list[str]:
    """The comment lines that open every Modelfile: provenance, circuit, manifest, how to create it."""
    mults = manifest.multiplier_map()
    layers = sorted({layer for layer, _ in mults})
    name = re.sub(r"[^a-z0-9._-]+", "-", out.stem.lower()).strip("-.") or "cna-steered"
    return [
        f"# Ollama Modelfile written by cna-export {manifest.tool_version} ({manifest.created})",
        f"# {out.name}: {what}",
        f"# circuit: {len(mults)} neurons in {len(layers)} layers, {describe_multipliers(mults, 'times')}, {how}",
        f"# circuit found on: {manifest.circuit.model.name} ({manifest.circuit.kind})",
        f"# manifest: {manifest_where}",
        f"# create with: ollama create {name} -f {modelfile_path(out).name}",
    ]


def render_modelfile(out: Path, reader: Any, manifest: ExportManifest, manifest_where: str) -> str:
    """An Ollama Modelfile for the steered file: FROM, stop parameters, and a comment header."""
    lines = _modelfile_header(out, manifest, f"CNA-steered copy of {manifest.source}",
                              f"folded into {'ffn_up rows' if manifest.fold == 'up' else 'ffn_down columns'}",
                              manifest_where)
    lines.append(_directive("FROM", f"./{out.name}", "output name"))
    lines += template_lines(reader)
    return "\n".join(lines) + "\n"


def _directive(keyword: str, value: str, what: str) -> str:
    """``KEYWORD value``, the value quoted where Ollama needs it; one it cannot read back is an error."""
    quoted = value if " " not in value and '"' not in value else _modelfile_quote(value)
    if quoted is None:
        raise CnaError(f"{what} {value} cannot be written in an Ollama Modelfile; choose a simpler name")
    return f"{keyword} {quoted}"


# -- LoRA adapters ------------------------------------------------------------------------------


def _verification_lines(verification: Any, command: str, what: str, reference: str) -> list[str]:
    """A card's verification section: how to verify (``what`` behaves like hook steering of ``reference``),
    or the report's table."""
    if verification is None:
        return [f"Not verified. To check that {what} like hook steering of {reference}, run:", "",
                "```bash", command, "```"]
    m = verification.metrics
    status = verification.status
    lines = [f"Verified at export time against hook steering of {reference} ({verification.dtype}, "
             f"{int(m.get('prompts', 0))} prompts, every prompt position): **{status}**.", "",
             "| metric | value | tolerance |", "|---|---|---|"]
    t = verification.tolerances
    for label, key, fmt in (("max abs delta logit", "max_abs_logit_delta", "{:.3e}"), ("mean KL", "mean_kl", "{:.3e}"),
                            ("top-1 agreement", "top1_agreement", "{:.2%}"),
                            ("identical greedy continuations", "greedy_identical", "{:.2%}")):
        if key in m:
            lines.append(f"| {label} | {fmt.format(m[key])} | {t.describe(key)} |")
    return lines


def _provenance(text: str) -> list[str]:
    """A card's closing lines: the provenance paragraph and the responsible-use note."""
    return ["", "## Provenance", "", text, "", RESPONSIBLE_USE, ""]


def _card(data: Any, lines: list[str]) -> str:
    """The card text: ``data`` as YAML front matter, then ``lines``."""
    from huggingface_hub import ModelCard

    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def lora_model_card(manifest: ExportManifest, verification: Any = None, ranks: dict[int, int] | None = None) -> str:
    """README.md for a PEFT LoRA adapter export (``manifest.format == "lora"``)."""
    from huggingface_hub import ModelCardData

    c = manifest.circuit
    mults = manifest.multiplier_map()
    counts = c.layer_counts()
    ranks = ranks or counts
    data = ModelCardData(
        base_model=manifest.source,
        library_name="peft",
        tags=["cna-export", "steering", "contrastive-neuron-attribution", c.model.architecture, "lora", "peft"],
    )
    method = ", ".join(f"{k}={v}" for k, v in c.method.items()) or "n/a"
    total = c.model.total_neurons
    lines = [
        f"# {Path(manifest.source).name or manifest.source}, CNA steering LoRA adapter",
        "",
        f"A LoRA adapter for `{manifest.source}` that applies a Contrastive Neuron Attribution (CNA) circuit, "
        f"written by cna-export {manifest.tool_version}: {len(mults)} MLP neurons in {len(counts)} layers are "
        f"multiplied by {describe_multipliers(mults)}. It is exact, not trained: on each steered layer's down_proj, "
        "A selects the circuit neurons (one one-hot row each) and B holds the change of their columns, with scale "
        "alpha / rank = 1, so the base plus this adapter (or its `merge_and_unload()`) is the steered model.",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        f"base = AutoModelForCausalLM.from_pretrained({manifest.source!r}, dtype='float32')",
        "model = PeftModel.from_pretrained(base, '<this folder>')",
        "```",
        "",
        *_steering_head(c, total, mults),
        "| adapter | LoRA on down_proj: `W + B A`, `A[i, j] = 1` for the i-th circuit neuron `j` of the layer, "
        "`B[:, i] = W[:, j] * m - W[:, j]` (the folded column minus the original, rounded once to the adapter "
        "dtype); equivalent to scaling the neuron's activation |",
        "| ranks | " + ", ".join(f"L{layer}: {n}" for layer, n in sorted(ranks.items())) + " |",
        f"| method | {method} |",
        f"| source | `{manifest.source}` ({manifest.source_format}) |",
        "",
        "## Verification",
        "",
        *_verification_lines(verification, f"cna-export verify --original {manifest.source} --exported <this folder>",
                             "the adapter behaves", "the base"),
        *_provenance(
            f"`{MANIFEST_FILE}` records the circuit manifest, the multiplier of every neuron and, for each base tensor "
            "the adapter applies to, its sha256 and that of the merged weight; the adapter's safetensors metadata "
            f"carries a short summary under `{SHARD_METADATA_KEY}`."),
    ]
    return _card(data, lines)


def render_adapter_modelfile(out: Path, base: Path, reader: Any, manifest: ExportManifest) -> str:
    """An Ollama Modelfile for a GGUF LoRA adapter: ``FROM <base>``, ``ADAPTER ./<adapter>``, stop parameters."""
    lines = _modelfile_header(out, manifest, f"CNA steering LoRA adapter for {manifest.source}",
                              "as a LoRA on ffn_down", f"the cna.manifest KV in {out.name}")
    lines += [_directive("FROM", str(Path(base).resolve()), "base model path"),
              _directive("ADAPTER", f"./{out.name}", "adapter name")]
    lines += template_lines(reader)
    return "\n".join(lines) + "\n"


# -- Hub cards -----------------------------------------------------------------------------------

FORMAT_TITLES = {"safetensors": "steered safetensors checkpoint", "gguf": "steered GGUF",
                 "lora": "PEFT LoRA adapter", "gguf_lora": "llama.cpp LoRA adapter GGUF"}


def verification_table(summary: dict | None) -> list[str]:
    """Markdown lines for a verification summary as the manifest stores it (``VerifyReport.summary()``)."""
    if not summary:
        return ["Not verified (run `cna-export verify`)."]
    status = "passed" if summary.get("passed") else "FAILED: " + "; ".join(summary.get("reasons") or [])
    if summary.get("verdict") == "inconclusive":
        status = "INCONCLUSIVE (not a failure): " + "; ".join(summary.get("undecided") or [])
    m = summary.get("metrics") or {}
    lines = [f"Verified against hook steering of the base ({summary.get('method', '')}; "
             f"{int(m.get('prompts', 0))} prompts, dtype {summary.get('dtype', '?')}): **{status}**.", "",
             "| check | value | tolerance |", "|---|---|---|"]
    tol = summary.get("tolerances") or {}
    for label, key, tkey, fmt, rel in (
            ("max abs delta logit", "max_abs_logit_delta", "max_abs_logit_delta", "{:.3e}", "<="),
            ("mean KL", "mean_kl", "max_mean_kl", "{:.3e}", "<="),
            ("top-1 agreement", "top1_agreement", "min_top1_agreement", "{:.2%}", ">=")):
        if key in m:
            want = tol.get(tkey)
            lines.append(f"| {label} | {fmt.format(m[key])} | {'-' if want is None else f'{rel} {want:g}'} |")
    for c in summary.get("checks") or []:
        ok = "" if c.get("ok") is None else (" ok" if c["ok"] else " FAILED")
        lines.append(f"| {c.get('label')} | {c.get('value')}{ok} | {c.get('tolerance')} |")
    return lines


def export_summary_lines(manifest: ExportManifest, where: str = ".") -> list[str]:
    """A card section for one export: what it is, the steering, the verification table."""
    c = manifest.circuit
    mults = manifest.multiplier_map()
    counts = c.layer_counts()
    title = FORMAT_TITLES.get(manifest.format, manifest.format)
    where_text = "" if where in (".", "") else f" (`{where}`)"
    lines = [
        f"## {title}{where_text}", "",
        "| | |", "|---|---|",
        f"| base | `{manifest.source}` ({manifest.source_format}) |",
        f"| circuit | {len(c.neurons)} neurons ({len(c.neurons) / max(c.model.total_neurons, 1):.3%} of "
        f"{c.model.total_neurons} MLP neurons) on `{c.model.name}` ({c.model.architecture}) |",
        f"| multiplier | {describe_multipliers(mults)} |",
        "| touched layers | " + ", ".join(f"L{layer}: {n}" for layer, n in counts.items()) + " |",
        f"| written by | cna-export {manifest.tool_version}, {manifest.created} |",
        "",
        "### Verification", "",
        *verification_table(manifest.verification),
        "",
    ]
    return lines


def steer_card_body(model: str, preview: Any, manifests: Sequence[tuple[str, ExportManifest]]) -> str:
    """The body of a ``steer`` folder's model card: the behaviour the preview measured
    (:class:`~cna_export.core.preview.BehaviourPreview`), then each export's summary and verification."""
    kinds = ", ".join(FORMAT_TITLES.get(m.format, m.format) for _, m in manifests)
    lines = [f"# {Path(model).name or model}, CNA-steered", "",
             f"One CNA circuit, exported by `cna-export steer` as: {kinds or 'nothing yet'}. Every export applies the "
             "same circuit and multipliers.", ""]
    if preview is not None:
        lines += preview.card_lines()
    for where, m in manifests:
        lines += export_summary_lines(m, where)
    lines += _provenance("Each export's manifest records the circuit, the multiplier of every neuron and the sha256 "
                         "of each touched tensor before and after; `steer.json` records each step and the preview.")
    return "\n".join(lines)
