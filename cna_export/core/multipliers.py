"""One formatter for a set of neuron multipliers as text (model card, Modelfile, diff, audit, CLI).

``values`` is any iterable of multipliers, or a mapping (neuron -> multiplier) whose values are
used. Each value is written with ``:g`` (``0``, ``-1``, ``0.5``). The styles, for one value
``0`` and for several (here -1 x1, 0 x5, 0.5 x2):

========== ======================== ===================================================
style      one value                several values
========== ======================== ===================================================
value      ``0``                    ``per-neuron (3 values, -1 .. 0.5)`` (model card)
times      ``x0``                   ``per-neuron multipliers from x-1 to x0.5`` (Modelfile)
counts     ``x0``                   ``x0 (5), x0.5 (2), x-1 (1)``; more than ``limit``
                                    distinct values: ``x-1 .. x0.5 (3 values)`` (diff)
phrase     ``multiplier 0``         ``multipliers`` + the counts style (diff, audit)
tally      ``x0 (6)``               ``x0 (5), x0.5 (2), x-1 (1)``, every value (records)
action     ``ablated``              what the multipliers do: ``ablated`` (all 0),
                                    ``inverted`` (all < 0), ``dampened`` (all in (0, 1)),
                                    ``amplified`` (all > 1), else ``steered``
========== ======================== ===================================================

Counts list the most frequent value first (ties: the smaller value first).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Union

Multipliers = Union[Iterable[float], Mapping[object, float]]
STYLES = ("value", "times", "counts", "phrase", "tally", "action")


def _values(values: Multipliers) -> list[float]:
    if isinstance(values, Mapping):
        values = values.values()
    return [float(v) for v in values]


def multiplier_counts(values: Multipliers) -> dict[str, int]:
    """``{"0": 5, "0.5": 2}``: how many neurons carry each multiplier (``:g``), most frequent first."""
    out: dict[str, int] = {}
    for v in _values(values):
        out[f"{v:g}"] = out.get(f"{v:g}", 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], float(kv[0]))))


def multiplier_action(values: Multipliers) -> str:
    """What the multipliers do to their neurons: ablated, inverted, dampened, amplified or steered."""
    vs = _values(values)
    if all(v == 0 for v in vs):
        return "ablated"
    if all(v < 0 for v in vs):
        return "inverted"
    if all(0 < v < 1 for v in vs):
        return "dampened"
    if all(v > 1 for v in vs):
        return "amplified"
    return "steered"


def describe_multipliers(values: Multipliers, style: str = "value", limit: int = 4) -> str:
    """A set of multipliers as text, in one of :data:`STYLES` (see the module docstring).

    ``limit``: the most distinct values the ``counts``/``phrase`` styles list one by one.
    """
    if style not in STYLES:
        raise ValueError(f"unknown multiplier style '{style}' (choose: {', '.join(STYLES)})")
    vs = _values(values)
    if style == "action":
        return multiplier_action(vs)
    counts = multiplier_counts(vs)
    if style == "tally":
        return ", ".join(f"x{k} ({n})" for k, n in counts.items())
    if not counts:
        return "no multipliers"
    distinct = sorted(set(vs))
    lo, hi = distinct[0], distinct[-1]
    if style == "value":
        return f"{lo:g}" if len(distinct) == 1 else f"per-neuron ({len(distinct)} values, {lo:g} .. {hi:g})"
    if style == "times":
        return f"x{lo:g}" if len(distinct) == 1 else f"per-neuron multipliers from x{lo:g} to x{hi:g}"
    if len(counts) == 1:
        one = next(iter(counts))
        return f"multiplier {one}" if style == "phrase" else f"x{one}"
    if len(counts) <= limit:
        listed = ", ".join(f"x{k} ({n})" for k, n in counts.items())
    else:
        listed = f"x{lo:g} .. x{hi:g} ({len(counts)} values)"
    return f"multipliers {listed}" if style == "phrase" else listed
