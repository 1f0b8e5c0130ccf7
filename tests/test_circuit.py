"""Circuit manifests: schema, round trip, and refusal of circuits that do not fit."""

from __future__ import annotations

import json

import pytest

from cna_export.core.circuit import Circuit, ModelIdentity, Neuron, load_multipliers_file
from cna_export.core.errors import CnaError


def ident(**kw):
    base = dict(name="m", architecture="llama", num_layers=4, intermediate_size=16, hidden_size=8,
                    fingerprint="ab" * 32)
    base.update(kw)
    return ModelIdentity(**base)


def circ(neurons=((1, 2), (3, 15)), **kw):
    return Circuit(model=ident(**kw), neurons=[Neuron(layer=l, index=i, score=0.5) for l, i in neurons],
                   per_layer_counts={1: 1, 3: 1})


def test_round_trip(tmp_path):
    c = circ()
    p = tmp_path / "c.json"
    c.save(p)
    back = Circuit.load(p)
    assert back == c
    assert json.loads(p.read_text())["schema_version"] == 2
    with pytest.raises(CnaError, match="already exists"):
        c.save(p)
    c.save(p, overwrite=True)


def test_fits_same_model():
    assert circ().check_fits(ident()) == []


@pytest.mark.parametrize(
    "neurons, model, message",
    [
        (((4, 0),), ident(), "layer 4 is out of range"),
        (((0, 16),), ident(), "index 16 in layer 0 is out of range"),
        (((0, 1),), ident(num_layers=5), "4 layers x 16 neurons"),
        (((0, 1),), ident(intermediate_size=32), "4 layers x 16 neurons"),
        (((0, 1),), ident(hidden_size=16), "hidden 8"),
    ],
)
def test_mismatched_circuit_is_refused(neurons, model, message):
    c = Circuit(model=ident(), neurons=[Neuron(layer=l, index=i) for l, i in neurons])
    with pytest.raises(CnaError, match=message):
        c.check_fits(model)
    with pytest.raises(CnaError, match=message):  # --force does not override a shape mismatch
        c.check_fits(model, force=True)


def test_fingerprint_mismatch_needs_force():
    c = circ()
    other = ident(fingerprint="cd" * 32)
    with pytest.raises(CnaError, match="different weights.*--force"):
        c.check_fits(other)
    notes = c.check_fits(other, force=True)
    assert len(notes) == 1 and "applied anyway" in notes[0]


def test_invalid_manifests(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(CnaError, match="not valid JSON"):
        Circuit.load(p)
    data = json.loads(circ().to_json())
    data["schema_version"] = 99
    p.write_text(json.dumps(data))
    with pytest.raises(CnaError, match="schema version 99"):
        Circuit.load(p)
    data["schema_version"] = 1
    data["neurons"][0]["layer"] = -1
    p.write_text(json.dumps(data))
    with pytest.raises(CnaError, match="neurons.0.layer"):
        Circuit.load(p)
    data["neurons"][0]["layer"] = 3
    data["neurons"][0]["index"] = 15
    p.write_text(json.dumps(data))
    with pytest.raises(CnaError, match="listed twice"):
        Circuit.load(p)
    with pytest.raises(CnaError, match="not found"):
        Circuit.load(tmp_path / "missing.json")


def test_multipliers():
    c = circ()
    assert c.multipliers(0.0) == {(1, 2): 0.0, (3, 15): 0.0}
    with pytest.raises(CnaError, match="no multiplier"):
        c.multipliers()
    with pytest.raises(CnaError, match="finite"):
        c.multipliers(float("nan"))


def test_multipliers_file(tmp_path):
    c = circ()
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"1:2": 0.5, "3:15": -1}))
    assert load_multipliers_file(p, c) == {(1, 2): 0.5, (3, 15): -1.0}
    p.write_text(json.dumps([{"layer": 1, "index": 2, "multiplier": 2}]))
    with pytest.raises(CnaError, match="layer 3, index 15"):
        load_multipliers_file(p, c)
    p.write_text(json.dumps({"1:2": "inf", "3:15": 1}))
    with pytest.raises(CnaError, match="finite"):
        load_multipliers_file(p, c)
