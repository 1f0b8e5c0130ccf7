"""Publish an export on the Hugging Face Hub: create the repo and upload everything in one commit.

:func:`push_export` takes what an export wrote (a safetensors or PEFT adapter folder, a GGUF file or
LoRA adapter GGUF with its ``<name>.Modelfile``, or a ``steer`` output folder holding several) and uploads it
with a model card whose metadata says what it is:

* ``base_model``: the Hub id of the model the export was made from (a Hub id as given, the bundled
  models' upstream ids; omitted for a local checkpoint with no known id);
* ``base_model_relation``: ``adapter`` (LoRA), ``finetune`` (a merged safetensors checkpoint) or
  ``quantized`` (a GGUF);
* ``library_name``: ``peft``, ``transformers`` or ``gguf``;
* ``tags``: ``cna-export``, ``steering`` and the recipe's name (plus the format).

The card body keeps what the export wrote: the manifest summary and the verification table (a folder's
``README.md`` keeps its body; a GGUF gets one rendered from its manifest). The token is
huggingface_hub's (``HF_TOKEN``, else the cached login); :func:`hub_token` fails with a one-line
error, which callers run before any work. ``HF_ENDPOINT`` points the client at another server.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import CnaError
from ..core.manifest import MANIFEST_FILE, SIDE_MANIFEST_SUFFIX, ExportManifest
from .card import CARD_FILE, export_summary_lines, modelfile_path

HUB_IDS = {
    "bundled:smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "bundled:qwen2.5-coder-0.5b": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
    "bundled:gemma3-270m": "google/gemma-3-270m",
}
"""Upstream Hub ids of the bundled models (the GGUFs are conversions of these)."""

RELATIONS = {"lora": "adapter", "gguf_lora": "adapter", "safetensors": "finetune", "gguf": "quantized"}
LIBRARIES = {"lora": "peft", "gguf_lora": "gguf", "safetensors": "transformers", "gguf": "gguf"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def hub_token() -> str:
    """The Hub token (``HF_TOKEN`` or the cached login); a missing one is a one-line error."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise CnaError("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login`")
    return token


def check_repo_id(repo_id: str) -> str:
    if not _REPO_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise CnaError(f"not a Hub repo id: {repo_id!r} (expected OWNER/NAME)")
    return repo_id


def base_model_id(source: str) -> str | None:
    """The Hub id of an export's source, when there is one."""
    if source in HUB_IDS:
        return HUB_IDS[source]
    if _REPO_ID.match(source) and not Path(source).exists():
        return source
    return None


@dataclass
class Upload:
    """What :func:`collect` found to upload: repo path -> local file, the manifests, the card text."""

    files: dict[str, Path] = field(default_factory=dict)
    manifests: list[tuple[str, ExportManifest]] = field(default_factory=list)  # (path in repo, manifest)
    card_body: str | None = None  # an existing README body to keep


def _gguf_manifest(path: Path) -> ExportManifest | None:
    from ..core.manifest import GGUF_KEY
    from ..io import gguf as G

    side = path.with_name(path.name + SIDE_MANIFEST_SUFFIX)
    if side.is_file():
        return ExportManifest.load(side)
    try:
        text = G.field_value(G.open_gguf(path), GGUF_KEY)
    except CnaError:
        return None
    return ExportManifest.from_json(text, source=f"{path} ({GGUF_KEY})") if text else None


def _split_card(text: str) -> str:
    """A README's body without its YAML front matter."""
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end >= 0:
            return text[end + 4 :].lstrip("\n")
    return text


def collect(path: str | Path) -> Upload:
    """The files of an export (see the module docstring) and the manifests found in it."""
    p = Path(path)
    up = Upload()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise CnaError(f"cannot push {p}: expected an export folder or a .gguf file")
        m = _gguf_manifest(p)
        if m is None:
            raise CnaError(f"{p} is not a cna-export GGUF export (no cna.manifest KV or side manifest)")
        up.files[p.name] = p
        up.manifests.append((p.name, m))
        side = p.with_name(p.name + SIDE_MANIFEST_SUFFIX)
        if side.is_file():
            up.files[side.name] = side
        mf = modelfile_path(p)
        if mf.is_file() and f"./{p.name}" in mf.read_text("utf-8", "replace"):
            up.files[mf.name] = mf
        return up
    if not p.is_dir():
        raise CnaError(f"cannot push {p}: no such file or folder")
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p).as_posix()
        if not f.is_file() or any(part.startswith(".") for part in f.relative_to(p).parts):
            continue  # staging leftovers, caches
        up.files[rel] = f
        if f.name == MANIFEST_FILE:
            up.manifests.append((f.parent.relative_to(p).as_posix(), ExportManifest.load(f)))
        elif f.suffix.lower() == ".gguf":
            m = _gguf_manifest(f)
            if m is not None:
                up.manifests.append((rel, m))
    if not up.manifests:
        raise CnaError(f"{p} holds no cna-export export (no {MANIFEST_FILE} or steered GGUF)")
    card = p / CARD_FILE
    if card.is_file() and ((len(up.manifests) == 1 and up.manifests[0][0] == ".") or (p / "steer.json").is_file()):
        up.card_body = _split_card(card.read_text("utf-8"))
    return up


def card_metadata(manifests: Sequence[tuple[str, ExportManifest]], recipe: str | None = None) -> dict[str, Any]:
    """The card's front matter: base_model, base_model_relation, library_name, tags (see the module docstring).
    With several exports (a ``steer`` folder) the first one decides the relation and the library."""
    first = manifests[0][1]
    fmt = first.format
    tags = ["cna-export", "steering"]
    name = recipe or first.circuit.method.get("recipe")
    if name:
        tags.append(str(name))
    for _, m in manifests:
        t = {"gguf_lora": "gguf"}.get(m.format, m.format)
        if t not in tags:
            tags.append(t)
        if m.format in ("lora", "gguf_lora") and "lora" not in tags:
            tags.append("lora")
    meta: dict[str, Any] = {}
    base = base_model_id(first.source)
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = RELATIONS[fmt]
    meta["library_name"] = LIBRARIES[fmt]
    meta["tags"] = tags
    return meta


def render_card(up: Upload, recipe: str | None = None) -> str:
    """The README.md uploaded: metadata from :func:`card_metadata` and the export's own body (or one rendered
    from the manifests: the summary and verification table of each export)."""
    from huggingface_hub import ModelCardData

    meta = card_metadata(up.manifests, recipe)
    data = ModelCardData(**meta)
    if up.card_body is not None:
        body = up.card_body
    else:
        lines: list[str] = []
        first = up.manifests[0][1]
        lines += [f"# {Path(first.source).name or first.source}, CNA-steered", ""]
        for where, m in up.manifests:
            lines += export_summary_lines(m, where)
        body = "\n".join(lines) + "\n"
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def _network_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises when the network is down: OSError (requests' connection errors, the
    offline mode) and httpx's transport errors (huggingface_hub 1.x)."""
    try:
        import httpx
    except ImportError:
        return (OSError,)
    return (OSError, httpx.HTTPError)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


@dataclass
class PushResult:
    repo_id: str
    url: str
    files: list[str]
    card: str
    commit: str | None = None


def push_export(path: str | Path, repo_id: str, private: bool = False, token: str | None = None,
                recipe: str | None = None, commit_message: str | None = None) -> PushResult:
    """Create ``repo_id`` (if missing) and upload the export at ``path`` with its card in one commit."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    check_repo_id(repo_id)
    token = token or hub_token()
    up = collect(path)
    card = render_card(up, recipe)
    ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(f)) for rel, f in up.files.items()
           if rel != CARD_FILE]
    ops.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card.encode("utf-8")))
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, ops, commit_message=commit_message or
                                 f"cna-export: {', '.join(sorted({m.format for _, m in up.manifests}))} export")
    except HfHubHTTPError as e:
        raise CnaError(f"Hub upload to {repo_id} failed: {_first_line(e)}") from None
    except _network_errors() as e:
        raise CnaError(f"Hub upload to {repo_id} failed: cannot reach the Hub ({_first_line(e)})") from None
    return PushResult(repo_id=repo_id, url=str(url), files=sorted([*up.files, CARD_FILE]), card=card,
                      commit=getattr(info, "oid", None))
