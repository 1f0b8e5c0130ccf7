"""The ``steer`` job: discover (or take) a circuit, export it in every requested format, verify each,
push, and summarise in one table. Resumable.

Layout of the output folder ``DIR``::

    DIR/circuit.json                     the circuit (discovered with the recipe, or a copy of --circuit)
    DIR/safetensors/                     steered safetensors checkpoint (+ cna_manifest.json, README.md)
    DIR/gguf/<name>-steered.gguf         patched GGUF (+ <name>-steered.Modelfile)
    DIR/lora/                            PEFT LoRA adapter folder
    DIR/gguf-lora/<name>-steer-lora.gguf llama.cpp LoRA adapter for the GGUF base (+ its .Modelfile)
    DIR/steer.json                       the state: each step's input hash, output, time, verification, and
                                         the behaviour preview (written first: a folder whose first step
                                         failed is resumed)
    DIR/README.md                        the folder's model card, with the measured behaviour (with a preview)

One model, loaded once: discovery's transformers model is the reference of every format's verification,
and what verification computes that does not depend on the export (the reference's logits, llama.cpp's
logits of the source) is computed once (:class:`~cna_export.verification.session.VerifySession`).

Behaviour preview (``preview``, on by default with a recipe whose sets have at least twice N prompts): the
last N prompts of the recipe's positive and negative sets are held out of discovery and answered greedily
by the unsteered model and the export (:mod:`cna_export.evaluation.preview`); refusals, over-refusals,
first-token KL and one answer side by side are printed, kept in ``steer.json`` and shown on the card.

Resuming: each step's inputs (model file sizes and times, recipe and prompt-file contents, the
circuit's bytes, the export and verification settings) are hashed; a step whose hash matches the one
recorded in ``steer.json`` and whose output still exists is reused (``--fresh`` redoes everything).
A step that failed or was interrupted left no output (exports are atomic), so it runs again.

Progress: one line per step on stderr with its time and an estimate of the time left, from
per-step costs measured on SmolLM2 scaled by the model's size and corrected by the steps done.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .core.circuit import Circuit
from .core.errors import CnaError, VerificationFailed
from .core.formats import FORMATS
from .core.preview import BehaviourPreview
from .core.settings.base import ModelOptions
from .core.settings.export import ExportOptions, GGUFExportOptions
from .core.settings.verify import GGUFVerifyOptions

if TYPE_CHECKING:
    from .core.settings.discover import DiscoverOptions
    from .core.settings.export import HubOptions
    from .evaluation.preview import HeldOut
    from .export.hub import PushResult
    from .verification.session import VerifySession

STATE_FILE = "steer.json"
# seconds per GB of source weights on 2 CPU cores, from the bundled SmolLM2 (0.09 GB Q4_1 GGUF): discovery
# about a minute, then each export and its verification (sharing one loaded reference), then the preview; the
# remaining estimate is rescaled by the ratio of measured to estimated time of the steps done, so a slower or
# busier machine corrects it after one step
COST = {"discover": 650.0, "safetensors": 200.0, "gguf": 20.0, "lora": 30.0, "gguf-lora": 20.0,
        "verify safetensors": 40.0, "verify gguf": 255.0, "verify lora": 25.0, "verify gguf-lora": 27.0,
        "preview": 110.0}


@dataclass(frozen=True)
class PreviewSettings:
    """The behaviour preview of a run: ``prompts`` held out of each recipe set (0: none), ``tokens`` per answer;
    ``required``: asked for explicitly (too small a set is then an error, not a skipped preview)."""

    prompts: int = 0
    tokens: int = 32
    required: bool = False


def parse_formats(text: str) -> list[str]:
    out = []
    for f in (x.strip() for x in text.split(",")):
        if not f:
            continue
        if f not in FORMATS:
            raise CnaError(f"--format: unknown format {f!r} (choose from {', '.join(FORMATS)})")
        if f not in out:
            out.append(f)
    if not out:
        raise CnaError("--format: no format given")
    return out


def _sha(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode() if not isinstance(p, bytes) else p)
        h.update(b"\0")
    return h.hexdigest()


def _file_sha(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_key(spec: str) -> tuple[str, int]:
    """A cheap identity of a model's files (path, size, mtime of each) and its size in bytes."""
    from .io.sources import resolve_source

    src = resolve_source(spec)
    if src.path is None:
        return _sha(spec), 0
    files = [src.path] if src.path.is_file() else sorted(p for p in src.path.rglob("*") if p.is_file())
    stats = [(str(p), st.st_size, st.st_mtime_ns) for p in files for st in (p.stat(),)]
    return _sha(stats), sum(s[1] for s in stats)


@dataclass
class StepResult:
    name: str
    output: str
    status: str  # done | reused
    seconds: float
    bytes: int = 0
    verification: dict | None = None


@dataclass
class SteerResult:
    out: Path
    circuit: Path
    steps: list[StepResult] = field(default_factory=list)
    pushed: PushResult | None = None
    seconds: float = 0.0
    preview: BehaviourPreview | None = None

    def table(self) -> str:
        """The summary table ``steer`` prints."""
        rows = [("step", "output", "size", "verify", "time")]
        for s in self.steps:
            v = s.verification
            if s.name in ("discover", "preview"):
                verdict = "-"
            elif v is None:
                verdict = "not run"
            else:
                verdict = ("PASSED" if v.get("passed") else "INCONCLUSIVE" if v.get("verdict") == "inconclusive"
                           else "FAILED") + _key_metric(v)
            size = _size(s.bytes) if s.bytes else "-"
            took = f"{s.seconds:.1f}s" + (" (reused)" if s.status == "reused" else "")
            rows.append((s.name, s.output, size, verdict, took))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _key_metric(v: dict) -> str:
    m = v.get("metrics") or {}
    if "kl_ratio" in m:
        return f" (KL {m['kl_ratio']:.2f}x floor, slope {m.get('steering_reproduced', float('nan')):.1%})"
    if "max_abs_logit_delta" in m:
        return f" (max |dlogit| {m['max_abs_logit_delta']:.1e})"
    return ""


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


class _Progress:
    """Step lines with time estimates on stderr."""

    def __init__(self, est: dict[str, float], show: bool, say: Callable[[str], None] | None = None):
        self.est, self.show = est, show
        self.steps = list(est)
        self.done: list[str] = []
        self.ran: list[str] = []
        self.spent = 0.0
        self.factor = 1.0
        self.t0 = time.perf_counter()
        self.say = say or (lambda text: print(text, file=sys.stderr, flush=True))

    def drop(self, step: str) -> None:
        """A planned step that will not run."""
        if step in self.steps:
            self.steps.remove(step)

    def left(self) -> float:
        return self.factor * sum(self.est[s] for s in self.steps if s not in self.done)

    def start(self, step: str) -> None:
        if self.show:
            self.say(f"[{len(self.done) + 1}/{len(self.steps)}] {step}: about {_eta(self.factor * self.est[step])} "
                     f"(all steps: about {_eta(self.left())} left)")

    def finish(self, step: str, seconds: float, reused: bool) -> None:
        self.done.append(step)
        if not reused:  # correct the remaining estimates by what this machine measures
            self.ran.append(step)
            self.spent += seconds
            self.factor = max(self.spent / max(sum(self.est[s] for s in self.ran), 1e-9), 0.05)
        if self.show:
            what = "reused (inputs unchanged)" if reused else f"done in {_eta(seconds)}"
            self.say(f"      {step}: {what}; elapsed {_eta(time.perf_counter() - self.t0)}, "
                     f"about {_eta(self.left())} left")


def _eta(s: float) -> str:
    return f"{s:.0f}s" if s < 90 else f"{s / 60:.1f} min"


@dataclass
class _Job:
    """One ``steer`` run: its settings, the folder's recorded steps and the summary being built."""

    model: str
    out: Path
    recipe: str | None
    formats: list[str]
    export: ExportOptions
    gguf: GGUFExportOptions
    verify: GGUFVerifyOptions
    model_options: ModelOptions
    fresh: bool
    progress: bool
    mkey: str  # the model files' identity (model_key)
    targets: dict[str, Path]
    prog: _Progress
    result: SteerResult
    state: dict[str, Any] = field(default_factory=dict)  # step -> what steer.json records of it
    session: VerifySession | None = None  # the reference model and shared verification work
    preview: PreviewSettings = field(default_factory=PreviewSettings)
    held: HeldOut | None = None  # the preview's prompts, held out of discovery
    dopts: DiscoverOptions | None = None
    keys: dict[str, str] = field(default_factory=dict)  # format -> its export step's input hash
    preview_record: dict[str, Any] | None = None  # what steer.json records of the preview
    prior_preview: Any = None  # the preview the folder's steer.json held when the run started (JSON)

    def save(self) -> None:
        """Write ``steer.json``: the folder is a steer folder from its first step on, so a retry continues."""
        from .core.atomic import atomic_write_text

        doc: dict[str, Any] = {"tool": "cna-export steer", "model": self.model, "recipe": self.recipe,
                               "formats": self.formats, "steps": self.state}
        if self.preview_record is not None:
            doc["preview"] = self.preview_record
        atomic_write_text(self.out / STATE_FILE, json.dumps(doc, indent=2) + "\n", overwrite=True)


def run_steer(
    model: str, out: str | Path, *, recipe: str | None = None, circuit: str | None = None, formats: str = "auto",
    export_options: ExportOptions | None = None, gguf_options: GGUFExportOptions | None = None,
    verify_options: GGUFVerifyOptions | None = None, model_options: ModelOptions | None = None,
    discover_options: DiscoverOptions | None = None, hub: HubOptions | None = None, fresh: bool = False,
    progress: bool = False, say: Callable[[str], None] | None = None, preview: PreviewSettings | None = None,
) -> SteerResult:
    """See the module docstring. ``export_options``: ``verify`` verifies every export; ``gguf_options``: its
    ``format`` is ignored; ``discover_options``: default from ``recipe``; ``preview``: the behaviour preview
    (default: none; the CLI's default holds out 8 prompts of each set)."""
    from .pipeline import hub_token_for, push

    t_start = time.perf_counter()
    fmts = None if formats.strip() == "auto" else parse_formats(formats)
    token = hub_token_for(hub)  # before any work
    if (recipe is None) == (circuit is None):
        raise CnaError("steer needs --recipe (to discover the circuit) or --circuit (an existing one), not both")
    job = _open(model, Path(out), recipe, fmts, export_options or ExportOptions(), gguf_options or GGUFExportOptions(),
                verify_options or GGUFVerifyOptions(), model_options or ModelOptions(), fresh, progress, say,
                preview or PreviewSettings())
    if recipe is not None:
        _discover(job, recipe, discover_options)
    else:
        assert circuit is not None
        _copy_circuit(job, circuit)
    circ = _export_all(job, say)
    if job.session is not None:
        job.session.forget()  # every verification is done: its cached logits are not needed any more
    if job.held is not None:
        _preview(job)
    elif job.state.pop("preview", None) is not None:  # a preview of an earlier run no longer describes this one
        from .export.card import CARD_FILE

        (job.out / CARD_FILE).unlink(missing_ok=True)
        job.save()
    if hub is not None and hub.push_to_hub:
        name = circ.method.get("recipe")
        job.result.pushed = push(job.out, hub, token, recipe=str(name) if name else None)
    job.result.seconds = time.perf_counter() - t_start
    return job.result


def _open(model: str, out: Path, recipe: str | None, fmts: list[str] | None, eo: ExportOptions, go: GGUFExportOptions,
          vo: GGUFVerifyOptions, mo: ModelOptions, fresh: bool, progress: bool,
          say: Callable[[str], None] | None, preview: PreviewSettings) -> _Job:
    """Check the model and the folder, read its recorded steps, and mark it as a steer folder."""
    from .io.sources import resolve_source

    src = resolve_source(model)
    if fmts is None:
        fmts = list(FORMATS) if src.kind == "gguf" else ["safetensors", "lora"]
    if src.kind != "gguf" and any(f in ("gguf", "gguf-lora") for f in fmts):
        raise CnaError(f"--format gguf and gguf-lora need a GGUF model (a .gguf file or bundled:NAME); {model} is "
                       "not one")
    state_path = out / STATE_FILE
    if out.exists() and not (out.is_dir() and (state_path.is_file() or not any(out.iterdir()))) and not eo.overwrite:
        raise CnaError(f"{out} already exists and is not a steer folder (no {STATE_FILE}); pass --overwrite "
                       "or another --out")
    state: dict[str, Any] = {}
    prior = None
    if state_path.is_file() and not fresh:
        try:
            doc = json.loads(state_path.read_text("utf-8"))
            state, prior = doc.get("steps", {}), doc.get("preview")
        except (json.JSONDecodeError, AttributeError):
            state = {}
    out.mkdir(parents=True, exist_ok=True)
    mkey, mbytes = model_key(model)
    stem = (src.path.stem if src.path is not None and src.path.is_file() else Path(model.rstrip("/")).name) or "model"
    stem = stem.replace(" ", "-")
    targets = {"safetensors": out / "safetensors", "gguf": out / "gguf" / f"{stem}-steered.gguf",
               "lora": out / "lora", "gguf-lora": out / "gguf-lora" / f"{stem}-steer-lora.gguf"}
    gb = max(mbytes / 1e9, 0.02)
    est = {"discover": COST["discover"] * gb} if recipe else {}
    for f in fmts:
        est[f] = (COST[f] + (COST[f"verify {f}"] if eo.verify else 0.0)) * gb
    if recipe and preview.prompts:
        est["preview"] = COST["preview"] * gb
    job = _Job(model, out, recipe, fmts, eo, go.model_copy(update={"format": None}), vo, mo, fresh, progress, mkey,
               targets, _Progress(est, say is not None, say), SteerResult(out=out, circuit=out / "circuit.json"),
               state, _session(model, mo), preview)
    job.prior_preview = prior
    if not state_path.is_file():
        job.save()  # before anything else is written: a failed first step leaves a folder the retry continues
    return job


def _discover(job: _Job, recipe: str, discover_options: DiscoverOptions | None) -> None:
    """The circuit step with a recipe: discovery, reused when its inputs are unchanged."""
    from .core.recipe import load_recipe, read_recipe
    from .core.settings.base import build
    from .core.settings.discover import DiscoverOptions
    from .pipeline import run_discover

    circuit_path, mo = job.result.circuit, job.model_options
    dopts = discover_options or build(DiscoverOptions, load_recipe(recipe))
    job.dopts = dopts
    name = read_recipe(recipe)[1].get("name") or Path(recipe).stem
    prompt_hashes = {k: _file_sha(getattr(dopts, k)) for k in ("positive", "negative", "neutral") if getattr(dopts, k)}
    hold = _hold_out(job, dopts)
    ckey = _sha("discover", job.mkey, dopts.model_dump(), prompt_hashes, mo.model_dump(), *([hold] if hold else []))
    job.prog.start("discover")
    t0 = time.perf_counter()
    prev = job.state.get("discover")
    if prev and prev.get("key") == ckey and circuit_path.is_file():
        job.result.steps.append(StepResult("discover", str(circuit_path), "reused", prev.get("seconds", 0.0),
                                           _bytes(circuit_path)))
        job.prog.finish("discover", 0.0, True)
        return
    run = run_discover(job.model, circuit_path, dopts, mo, overwrite=True, progress=job.progress, hold_back=hold)
    if job.session is not None and mo.device_map is None and mo.dtype == "auto":
        job.session.adopt(run.loaded)  # discovery's model is the verification's and the preview's reference
    c = run.result.circuit
    c.method["recipe"] = str(name)
    if hold:
        c.method["preview_held_out"] = hold
    c.save(circuit_path, overwrite=True)
    secs = time.perf_counter() - t0
    job.state["discover"] = {"key": ckey, "output": str(circuit_path), "seconds": secs, "neurons": len(c.neurons)}
    job.save()
    job.result.steps.append(StepResult("discover", str(circuit_path), "done", secs, _bytes(circuit_path)))
    job.prog.finish("discover", secs, False)


def _session(model: str, mo: ModelOptions) -> VerifySession:
    """The verification session of ``model``, loaded as the export checks load it."""
    from .verification.session import VerifySession

    return VerifySession(model, {"allow_pickle": mo.allow_pickle, "trust_remote_code": mo.trust_remote_code})


def _hold_out(job: _Job, dopts: DiscoverOptions) -> int:
    """The prompts held out of each recipe set for the preview (0: no preview); sets ``job.held``. A default
    preview that the sets are too small for is skipped with a note; one asked for is an error."""
    from .pipeline import preview_prompts

    if not job.preview.prompts:
        return 0
    job.held, why_not = preview_prompts(dopts, job.preview.prompts, job.preview.required)
    if job.held is None:
        job.prog.drop("preview")
        if job.prog.show:
            job.prog.say(f"note: no behaviour preview: {why_not} (pass --preview N with a smaller N)")
        return 0
    return job.preview.prompts


def _copy_circuit(job: _Job, circuit: str) -> None:
    """The circuit step with ``--circuit``: its bytes copied into the folder (when they changed)."""
    circuit_path = job.result.circuit
    data = Path(circuit).read_bytes() if Path(circuit).is_file() else None
    if data is None:
        raise CnaError(f"circuit not found: {circuit}")
    if not circuit_path.is_file() or circuit_path.read_bytes() != data:
        from .core.atomic import atomic_file

        with atomic_file(circuit_path, overwrite=True) as fh:
            fh.write(data)


def _export_all(job: _Job, say: Callable[[str], None] | None) -> Circuit:
    """Every format's export (each verified before its rename when asked); returns the circuit."""
    circ = Circuit.load(job.result.circuit)
    eo = job.export
    multiplier = eo.multiplier
    if multiplier is None and not eo.multipliers and any(n.multiplier is None for n in circ.neurons):
        multiplier = 0.0
        (say or (lambda t: print(t, file=sys.stderr)))(
            "note: no multiplier in the recipe, the circuit or --multiplier: exporting multiplier 0 (ablation)")
    settings = {"export": eo.model_dump(exclude={"overwrite"}), "gguf": job.gguf.model_dump(), "multiplier": multiplier,
                "verify": job.verify.model_dump() if eo.verify else None,
                "model_options": job.model_options.model_dump()}
    circuit_sha = _file_sha(job.result.circuit)
    for f in job.formats:
        key = job.keys[f] = _sha("export", f, job.mkey, circuit_sha, settings)
        _export_step(job, f, key, eo.model_copy(update={"overwrite": True, "multiplier": multiplier}))
    return circ


def _export_step(job: _Job, f: str, key: str, eo: ExportOptions) -> None:
    """One format's export, reused when its inputs are unchanged and its output still exists. Flags that do
    not apply to ``f`` are left out (``format_options`` without ``strict``)."""
    from .pipeline import run_export

    target, prev = job.targets[f], job.state.get(f)
    job.prog.start(f)
    if prev and prev.get("key") == key and target.exists() and not job.fresh:
        job.result.steps.append(StepResult(f, str(target), "reused", prev.get("seconds", 0.0), _bytes(target),
                                           prev.get("verification")))
        job.prog.finish(f, 0.0, True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        _, r = run_export(job.model, job.result.circuit, target, eo, job.gguf.model_copy(update={"format": f}),
                          job.verify, job.model_options, progress=job.progress, strict=False, session=job.session)
    except VerificationFailed:
        job.state.pop(f, None)
        job.save()
        raise
    finally:
        if target.parent != job.out and target.parent.is_dir() and not any(target.parent.iterdir()):
            target.parent.rmdir()  # a format folder the failed export left empty
    secs = time.perf_counter() - t0
    v = r.verification.summary() if r.verification is not None else None
    job.state[f] = {"key": key, "output": str(target), "seconds": secs, "verification": v}
    job.save()
    job.result.steps.append(StepResult(f, str(target), "done", secs, _bytes(target), v))
    job.prog.finish(f, secs, False)


def _preview(job: _Job) -> None:
    """The behaviour preview step: the held-out prompts answered by the unsteered model and the export; reused
    when the export that answers and the prompts are unchanged. Writes the folder's model card."""
    from .evaluation.preview import PreviewRun, choose_target, run_preview
    from .pipeline import write_steer_card

    assert job.held is not None and job.dopts is not None and job.session is not None
    target, path = choose_target({f: job.targets[f] for f in job.formats if job.targets[f].exists()})
    p = job.preview
    key = _sha("preview", p.prompts, p.tokens, target, job.keys.get(target), job.held.positive, job.held.negative,
               job.dopts.chat_template, job.dopts.system_prompt)
    job.prog.start("preview")
    t0 = time.perf_counter()
    prev, record = job.state.get("preview"), None
    if prev and prev.get("key") == key and not job.fresh:
        record = _stored_preview(job.prior_preview)
    reused = record is not None
    if record is None:
        run = PreviewRun(job.model, target, path, p.tokens, job.dopts.chat_template, job.dopts.system_prompt,
                         job.verify.threads)
        record = run_preview(run, job.held, job.session.reference)
    secs = prev.get("seconds", 0.0) if reused and prev else time.perf_counter() - t0
    job.result.preview, job.preview_record = record, record.model_dump(mode="json")
    card = write_steer_card(job.out, job.model, record)
    job.state["preview"] = {"key": key, "output": str(card), "seconds": secs}
    job.save()
    job.result.steps.append(StepResult("preview", str(card), "reused" if reused else "done", secs, _bytes(card)))
    job.prog.finish("preview", 0.0 if reused else secs, reused)


def _stored_preview(data: Any) -> BehaviourPreview | None:
    """The preview ``steer.json`` recorded (its JSON), or None when it has none or it does not validate."""
    from pydantic import ValidationError

    try:
        return BehaviourPreview.model_validate(data) if data is not None else None
    except ValidationError:
        return None
