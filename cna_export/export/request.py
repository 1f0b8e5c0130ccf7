"""One export's inputs, resolved once: :class:`ExportRequest`, what every exporter takes.

The pipeline (or a library call, through :func:`request_for`) builds the request at its boundary:
the circuit loaded, its multipliers resolved (one value, a per-neuron map or file, or the circuit's
own: :func:`cna_export.export.plan.resolve_export_multipliers`), the source resolved, and every
input file collected (the source, the circuit file, the multipliers file) so that no output may
land on one. Each exporter then takes the request and its format's options
(:mod:`cna_export.core.formats`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar, Union

from pydantic import BaseModel, ValidationError

from ..core.atomic import check_output_path
from ..core.circuit import Circuit
from ..core.errors import CnaError
from ..io.sources import ModelSource, resolve_source
from .plan import ExportCheck, resolve_export_multipliers

O = TypeVar("O", bound=BaseModel)
MultiplierSpec = Union[Mapping[tuple[int, ...], float], str, Path, None]
"""Per-neuron multipliers: a map (neuron key -> multiplier) or a JSON file (``core.circuit.load_multipliers_file``)."""


@dataclass(frozen=True)
class ExportRequest:
    """What to export and where: the same for every format."""

    model: str  # the source as given
    source: ModelSource
    circuit: Circuit
    multipliers: dict[tuple[int, ...], float]  # neuron key -> multiplier, resolved
    out: Path
    inputs: tuple[Path, ...] = ()  # every input file or folder: no output may be, hold or sit in one
    overwrite: bool = False
    force: bool = False  # apply a circuit found on other weights
    check: ExportCheck | None = None  # run on the staged output before it is published
    progress: bool = False
    started: float = field(default_factory=time.perf_counter)
    # the source already loaded by the caller, by dtype name (``steer``'s verification session): a conversion
    # that needs the source in transformers takes it instead of loading the model again
    reference: Callable[[str], Any] | None = None

    @classmethod
    def build(
        cls, model: str | Path, circuit: Circuit | str | Path, out: str | Path, *, multiplier: float | None = None,
        multipliers: MultiplierSpec = None, overwrite: bool = False,
        force: bool = False, check: ExportCheck | None = None, progress: bool = False,
        reference: Callable[[str], Any] | None = None,
    ) -> ExportRequest:
        """Load ``circuit`` (a :class:`Circuit` or its file), resolve its multipliers (``multiplier`` for
        every neuron, per-neuron ``multipliers`` as a map or a JSON file, or the circuit's own) and the source."""
        started = time.perf_counter()
        circuit_file = None if isinstance(circuit, Circuit) else Path(circuit)
        circ = circuit if isinstance(circuit, Circuit) else Circuit.load(circuit)
        mults = resolve_export_multipliers(circ, multiplier, multipliers)
        if not mults:
            raise CnaError("the circuit has no neurons; nothing to export")
        source = resolve_source(model)
        multipliers_file = Path(multipliers) if isinstance(multipliers, (str, Path)) else None
        inputs = tuple(p for p in (source.path, circuit_file, multipliers_file) if p is not None)
        return cls(str(model), source, circ, mults, Path(out), inputs, overwrite, force, check, progress, started,
                   reference)

    def claim(self, path: Path | None = None) -> Path:
        """Refuse (one line) an output that may not be written: the request's ``out``, or ``path`` written
        beside it. Returns it resolved."""
        return check_output_path(Path(path if path is not None else self.out), self.overwrite, inputs=self.inputs)

    @property
    def seconds(self) -> float:
        """Seconds since the request was built."""
        return time.perf_counter() - self.started


_REQUEST_KEYS = ("multiplier", "multipliers", "overwrite", "force", "check", "progress")


def request_for(options_cls: type[O], model: str | Path, circuit: Circuit | str | Path, out: str | Path,
                settings: Mapping[str, Any]) -> tuple[ExportRequest, O]:
    """A library call's keyword ``settings`` as a request and ``options_cls`` options: the request's keys
    (:meth:`ExportRequest.build`) and the format's fields. A bad value is a one-line :class:`CnaError`."""
    fields = {k: v for k, v in settings.items() if k not in _REQUEST_KEYS}
    try:
        options = options_cls(**fields)
    except ValidationError as e:
        first = e.errors()[0]
        name = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise TypeError(f"unexpected keyword argument {name!r} for a {options_cls.__name__} export") from None
        raise CnaError(f"{name}: {first['msg']} (got {first['input']!r})") from None
    request = ExportRequest.build(model, circuit, out, **{k: v for k, v in settings.items() if k in _REQUEST_KEYS})
    return request, options
