"""Circuit manifests: typed, versioned records of discovered (or recovered) neurons.

A circuit file is JSON validated by pydantic. It records everything needed to
reproduce and to trust the circuit: the tool version, the model it was found
on (with a fingerprint of its down_proj weights), the method and every
parameter, the sha256 of each prompt set, the neurons themselves, the
universal neurons that were excluded, and per-layer counts.

``Circuit.check_fits`` refuses a circuit that does not fit a model (layer or
index out of range, a different shape, or different weights without ``force``).
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from .errors import CnaError
from .experts import SHARED, Layout, describe, key_layer, make_key, parse_expert, parse_key_text
from .fingerprint import FINGERPRINT_METHOD, is_fingerprint, method_of, scheme_of
from .records import validate_record
from .text import parse_json, read_text
from .version import __version__

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)  # schema 1: dense neurons only (no expert field, no MoE model identity)

ExpertLabel = Union[int, Literal["shared"], None]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MoeIdentity(_Record):
    """The mixture-of-experts shape of a model: which layers route, how many experts of what width."""

    num_experts: int = Field(gt=0, description="routed experts per MoE layer")
    expert_intermediate_size: int = Field(gt=0, description="neurons per routed expert")
    shared_intermediate_size: int = Field(0, ge=0, description="neurons of the shared expert group (0: none)")
    moe_layers: list[int] = Field(description="the layers with experts; the others are dense MLPs")
    dense_intermediate_size: int | None = Field(None, gt=0, description="neurons of the dense layers, if any")


class ModelIdentity(_Record):
    """Which model a circuit was found on (or applies to)."""

    name: str = Field(description="model path or Hub id as given")
    architecture: str = Field(description="Hugging Face model_type")
    num_layers: int = Field(gt=0)
    intermediate_size: int = Field(gt=0, description="MLP neurons per layer (MoE: of the widest layer, all its "
                                   "experts)")
    hidden_size: int = Field(gt=0)
    fingerprint: str | None = Field(default=None, description="hash of the down_proj weights (scheme 3: "
                                    "'3:' and the BLAKE3 over the layers' BLAKE3; scheme 2: '2:' and the same "
                                    "with sha256; scheme 1: 64 hex digits)")
    fingerprint_method: str = FINGERPRINT_METHOD
    source_format: Literal["hf", "gguf", "hub"] = "hf"
    dtype: str | None = None
    moe: MoeIdentity | None = Field(default=None, description="mixture-of-experts shape (schema 2); None: dense")
    _rehash: Callable[[int], str | None] | None = PrivateAttr(default=None)  # the weights' fingerprint in a scheme

    @model_validator(mode="before")
    @classmethod
    def _method_of_fingerprint(cls, data: Any) -> Any:
        """An identity built with a fingerprint but no method gets its scheme's method text."""
        fp = data.get("fingerprint") if isinstance(data, dict) else None
        if isinstance(fp, str) and is_fingerprint(fp) and "fingerprint_method" not in data:
            data = {**data, "fingerprint_method": method_of(fp)}
        return data

    def __eq__(self, other: object) -> bool:  # the fields: how to hash the weights again is not who they are
        return type(other) is type(self) and self.__dict__ == other.__dict__  # type: ignore[union-attr]

    def __getstate__(self) -> dict[Any, Any]:  # pickled without the way to hash the weights again
        state = super().__getstate__()
        state["__pydantic_private__"] = {"_rehash": None}
        return state

    def with_fingerprint(self, fingerprint: str | None) -> "ModelIdentity":
        """This identity with ``fingerprint`` and its scheme's ``fingerprint_method``."""
        return self.model_copy(update={"fingerprint": fingerprint, "fingerprint_method": method_of(fingerprint)})

    def rehash_with(self, rehash: Callable[[int], str | None]) -> "ModelIdentity":
        """Attach how to compute these weights' fingerprint in a given scheme (None when it cannot be any more),
        for checking a circuit that carries a fingerprint of an older scheme; returns this identity."""
        self._rehash = rehash
        return self

    def fingerprint_in(self, scheme: int) -> str | None:
        """These weights' fingerprint in ``scheme``: the recorded one when it is of that scheme, else computed
        by what :meth:`rehash_with` attached (None: no fingerprint, or it cannot be computed here)."""
        if self.fingerprint is not None and scheme_of(self.fingerprint) == scheme:
            return self.fingerprint
        return self._rehash(scheme) if self._rehash is not None else None

    def differs_from(self, fingerprint: str | None) -> bool:
        """Whether these weights are known to differ from those ``fingerprint`` was taken of, compared in its
        scheme (False when either fingerprint is missing or these weights cannot be hashed in it here)."""
        if not fingerprint or not self.fingerprint:
            return False
        theirs = self.fingerprint_in(scheme_of(fingerprint))
        return theirs is not None and theirs != fingerprint

    @property
    def total_neurons(self) -> int:
        return self.layout().total

    def layout(self) -> Layout:
        """The neuron groups of every layer (one dense group per layer for dense models)."""
        if self.moe is None:
            return Layout(self.num_layers, self.intermediate_size)
        m = self.moe
        return Layout(self.num_layers, m.dense_intermediate_size or 0, m.num_experts, m.expert_intermediate_size,
                      m.shared_intermediate_size, frozenset(m.moe_layers))


class PromptSetInfo(_Record):
    path: str
    sha256: str
    count: int = Field(ge=0)
    selector: str | None = Field(default=None, description="JSONL field or CSV column used")


class Neuron(_Record):
    layer: int = Field(ge=0)
    expert: ExpertLabel = Field(default=None, description="routed expert number, \"shared\", or None (dense MLP)")
    index: int = Field(ge=0, description="input of the (expert's) down projection")
    score: float = 0.0
    positive_mean: float | None = None
    negative_mean: float | None = None
    multiplier: float | None = Field(default=None, description="per-neuron multiplier, when the circuit carries one")


class UniversalNeuron(_Record):
    layer: int = Field(ge=0)
    expert: ExpertLabel = None
    index: int = Field(ge=0)
    frequency: float = Field(ge=0.0, le=1.0,
                             description="fraction of neutral prompts with this neuron in the per-layer top-k")


class Circuit(_Record):
    """A CNA circuit manifest (schema version 2; version 1 files, dense only, still read)."""

    schema_version: Literal[1, 2] = SCHEMA_VERSION
    kind: Literal["discovered", "recovered", "manual"] = "discovered"
    tool: str = "cna-export"
    tool_version: str = __version__
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    model: ModelIdentity
    method: dict = Field(default_factory=dict, description="method name and every parameter")
    prompts: dict[str, PromptSetInfo] = Field(default_factory=dict)
    neurons: list[Neuron]
    universal_neurons: list[UniversalNeuron] = Field(default_factory=list)
    per_layer_counts: dict[int, int] = Field(default_factory=dict)
    routing_frequency: dict[int, list[float]] = Field(
        default_factory=dict,
        description="MoE layer -> per routed expert, the share of positive and negative prompts routed to it "
                    "at the captured position",
    )
    notes: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> "Circuit":
        if self.schema_version == 1 and (self.model.moe is not None or any(n.expert is not None for n in self.neurons)):
            raise ValueError("expert neurons need circuit schema version 2")
        seen: set[tuple[int, ...]] = set()
        for n in self.neurons:
            key = neuron_key(n)
            if key in seen:
                raise ValueError(f"neuron {describe(key)} is listed twice")
            seen.add(key)
        counts = Counter(n.layer for n in self.neurons)
        if self.per_layer_counts and dict(counts) != {k: v for k, v in self.per_layer_counts.items() if v}:
            raise ValueError("per_layer_counts does not match the neurons listed")
        return self

    # -- derived views ---------------------------------------------------
    def by_layer(self) -> dict[int, list[Neuron]]:
        out: dict[int, list[Neuron]] = {}
        for n in self.neurons:
            out.setdefault(n.layer, []).append(n)
        return dict(sorted(out.items()))

    def layer_counts(self) -> dict[int, int]:
        return {layer: len(ns) for layer, ns in self.by_layer().items()}

    def multipliers(self, multiplier: float | None = None) -> dict[tuple[int, ...], float]:
        """Neuron key -> multiplier: ``multiplier`` for all, else each neuron's own. Keys are
        (layer, index), or (layer, expert, index) for expert neurons (see :mod:`cna_export.core.experts`)."""
        out: dict[tuple[int, ...], float] = {}
        for n in self.neurons:
            m = multiplier if multiplier is not None else n.multiplier
            if m is None:
                raise CnaError(
                    f"no multiplier for neuron {describe(neuron_key(n))}: pass --multiplier "
                    "or use a circuit with per-neuron multipliers"
                )
            out[neuron_key(n)] = check_multiplier(m)
        return out

    def keys(self) -> list[tuple[int, ...]]:
        return [neuron_key(n) for n in self.neurons]

    @property
    def has_experts(self) -> bool:
        return any(n.expert is not None for n in self.neurons)

    # -- checks ------------------------------------------------------------
    def check_fits(self, model: ModelIdentity, force: bool = False) -> list[str]:
        """Refuse a circuit that does not fit ``model``; return warnings that ``force`` overrode."""
        if model.moe is not None or self.model.moe is not None or self.has_experts:
            return self._check_fits_moe(model, force)
        for n in self.neurons:
            if n.layer >= model.num_layers:
                raise CnaError(
                    f"circuit does not fit the model: neuron layer {n.layer} is out of range "
                    f"(model has {model.num_layers} layers)"
                )
            if n.index >= model.intermediate_size:
                raise CnaError(
                    f"circuit does not fit the model: neuron index {n.index} in layer {n.layer} is out of "
                    f"range (model has {model.intermediate_size} neurons per layer)"
                )
        mine = self.model
        if (mine.num_layers, mine.intermediate_size, mine.hidden_size) != (
            model.num_layers,
            model.intermediate_size,
            model.hidden_size,
        ):
            raise CnaError(
                "circuit does not fit the model: it was found on a model with "
                f"{mine.num_layers} layers x {mine.intermediate_size} neurons (hidden {mine.hidden_size}), "
                f"this one has {model.num_layers} x {model.intermediate_size} (hidden {model.hidden_size})"
            )
        return self._check_fingerprint(model, force)

    def _check_fits_moe(self, model: ModelIdentity, force: bool) -> list[str]:
        layout = model.layout()
        for n in self.neurons:
            layout.check(neuron_key(n))
        mine = self.model
        if (mine.num_layers, mine.hidden_size, mine.moe) != (model.num_layers, model.hidden_size, model.moe):
            raise CnaError(
                "circuit does not fit the model: it was found on a model with a different expert layout "
                f"({_shape(mine)}); this one has {_shape(model)}"
            )
        return self._check_fingerprint(model, force)

    def _check_fingerprint(self, model: ModelIdentity, force: bool) -> list[str]:
        """Refuse other weights (without ``force``): the fingerprints are compared in the circuit's scheme, never
        across schemes (a circuit with a scheme-1 fingerprint is checked against the model's scheme-1 one)."""
        mine = self.model
        notes: list[str] = []
        if not (mine.fingerprint and model.fingerprint):
            return notes
        scheme = scheme_of(mine.fingerprint)
        theirs = model.fingerprint_in(scheme)
        if theirs is None:
            return [f"the circuit's fingerprint (scheme {scheme}) was not checked: this model's weights could not "
                    f"be hashed in that scheme here"]
        if mine.fingerprint != theirs:
            msg = (
                f"circuit was found on different weights ({mine.name}, fingerprint {mine.fingerprint[:12]}) "
                f"than this model ({model.name}, fingerprint {theirs[:12]})"
            )
            if not force:
                raise CnaError(msg + "; pass --force to apply it anyway (e.g. another quantisation of the same model)")
            notes.append(msg + "; applied anyway (--force)")
        return notes

    # -- I/O ------------------------------------------------------------------
    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        from .atomic import atomic_write_text

        atomic_write_text(Path(path), self.to_json() + "\n", overwrite=overwrite)

    @classmethod
    def from_json(cls, text: str, source: str = "circuit") -> "Circuit":
        data = parse_json(text, source)
        if not isinstance(data, dict):
            raise CnaError(f"{source} is not a circuit manifest (expected a JSON object)")
        if "circuit" in data and "neurons" not in data:  # an export manifest embeds the circuit
            data = data["circuit"]
            if not isinstance(data, dict):
                raise CnaError(f"{source} is not a circuit manifest (its 'circuit' is not a JSON object)")
        return validate_record(cls, data, source, "circuit", SCHEMA_VERSION, readable=READABLE_SCHEMAS)

    @classmethod
    def load(cls, path: str | Path) -> "Circuit":
        p = Path(path)
        if not p.is_file():
            raise CnaError(f"circuit file not found: {p}")
        return cls.from_json(read_text(p, "circuit file"), source=str(p))






def neuron_key(n: Neuron | UniversalNeuron) -> tuple[int, ...]:
    """(layer, index) for a dense neuron, (layer, expert, index) for an expert neuron (shared: -1)."""
    return make_key(n.layer, n.index, parse_expert(n.expert))


def neuron_fields(key: tuple[int, ...]) -> dict:
    """The ``layer``/``expert``/``index`` fields of a :class:`Neuron` for ``key`` (no expert field when dense)."""
    out: dict = {"layer": key_layer(key), "index": int(key[-1])}
    if len(key) == 3:
        out["expert"] = "shared" if key[1] == SHARED else int(key[1])
    return out


def _shape(m: ModelIdentity) -> str:
    if m.moe is None:
        return f"{m.num_layers} dense layers x {m.intermediate_size} neurons, hidden {m.hidden_size}"
    e = m.moe
    shared = f" + shared {e.shared_intermediate_size}" if e.shared_intermediate_size else ""
    return (f"{m.num_layers} layers, experts in layers {e.moe_layers}: {e.num_experts} x "
            f"{e.expert_intermediate_size}{shared}, hidden {m.hidden_size}")


def check_multiplier(m: float) -> float:
    m = float(m)
    if m != m or m in (float("inf"), float("-inf")):
        raise CnaError(f"multiplier must be a finite number, got {m}")
    return m


def load_multipliers_file(path: str | Path, circuit: Circuit) -> dict[tuple[int, int], float]:
    """Per-neuron multipliers from a JSON file ``[{"layer":L,"index":i,"multiplier":m}, ...]`` or ``{"L:i": m}``
    (expert neurons: an ``expert`` field, or ``"L:e:i"`` / ``"L:shared:i"``).

    Neurons of the circuit not named in the file are refused, so nothing is left silently unscaled, and so
    are neurons the circuit does not have (a file written for another circuit).
    """
    p = Path(path)
    if not p.is_file():
        raise CnaError(f"multipliers file not found: {p}")
    data = parse_json(read_text(p, "multipliers file"), f"multipliers file {p}")
    out: dict[tuple[int, ...], float] = {}
    try:
        if isinstance(data, Mapping):
            for key, m in data.items():
                out[parse_key_text(str(key))] = check_multiplier(m)
        else:
            for row in data:
                key = make_key(int(row["layer"]), int(row["index"]), parse_expert(row.get("expert")))
                out[key] = check_multiplier(row["multiplier"])
    except (ValueError, KeyError, TypeError, OverflowError, AttributeError):
        raise CnaError(
            f"multipliers file {p} must be {{\"layer:index\": m}} (experts: \"layer:expert:index\") or a list of "
            "{layer, index, multiplier} (+ expert)"
        ) from None
    wanted = set(circuit.keys())
    missing = wanted - out.keys()
    extra = out.keys() - wanted
    if missing:
        raise CnaError(f"multipliers file {p} has no multiplier for circuit neuron {describe(sorted(missing)[0])}")
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CnaError(f"multipliers file {p} names neuron {describe(sorted(extra)[0])}{more}, which is not in the "
                       "circuit; a multipliers file is for the circuit's own neurons")
    return {k: out[k] for k in sorted(wanted)}
