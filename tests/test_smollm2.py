"""Discovery and steering on the real SmolLM2-135M-Instruct GGUF (dequantised by transformers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_discovery import capture_per_prompt

from cna_export.core.circuit import Circuit, Neuron
from cna_export.core.errors import CnaError
from cna_export.core.recipe import load_recipe
from cna_export.core.settings import DiscoverOptions
from cna_export.discovery.cna import discover
from cna_export.model.prompts import load_prompts, render
from cna_export.model.steering import steer_circuit

pytestmark = pytest.mark.slow

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "refusal.yaml"


@pytest.fixture(scope="module")
def recipe_sets():
    r = load_recipe(RECIPE)
    return (
        load_prompts(r["positive"], limit=8),
        load_prompts(r["negative"], limit=8),
        load_prompts(r["neutral"], limit=10),
    )


def test_identity(smollm2):
    ident = smollm2.identity()
    shape = (ident.architecture, ident.num_layers, ident.intermediate_size, ident.hidden_size)
    assert shape == ("llama", 30, 1536, 576)
    assert ident.source_format == "gguf" and len(ident.fingerprint) == 66 and ident.fingerprint.startswith("3:")


def test_batched_capture_equals_single_on_smollm2(smollm2, recipe_sets):
    pos, neg, _ = recipe_sets
    texts = list(pos.texts[:6] + neg.texts[:6])
    single = capture_per_prompt(smollm2, texts, batch_size=1)
    batched = capture_per_prompt(smollm2, texts, batch_size=6)
    scale = np.abs(single).max()
    np.testing.assert_allclose(batched, single, rtol=1e-3, atol=1e-4 * scale)


def test_batched_discovery_same_circuit_on_smollm2(smollm2, recipe_sets):
    pos, neg, neu = recipe_sets
    one = discover(smollm2, pos, neg, neu, DiscoverOptions(batch_size=1), progress=False).circuit
    many = discover(smollm2, pos, neg, neu, DiscoverOptions(batch_size=8), progress=False).circuit
    assert len(one.neurons) == round(0.001 * 30 * 1536) == 46
    assert [(n.layer, n.index) for n in one.neurons] == [(n.layer, n.index) for n in many.neurons]
    assert one.universal_neurons == many.universal_neurons
    assert one.universal_neurons, "the neutral set should flag some universal neurons on a real model"
    again = discover(smollm2, pos, neg, neu, DiscoverOptions(batch_size=8), progress=False).circuit
    assert again.neurons == many.neurons  # deterministic


def test_steering_on_smollm2(smollm2, recipe_sets):
    pos, _, _ = recipe_sets
    tok = smollm2.tokenizer
    tok.padding_side = "left"
    enc = tok(render(tok, pos.texts[:2]), return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        base = smollm2.model(**enc).logits
    neurons = [Neuron(layer=l, index=i) for l in (20, 29) for i in range(0, 1536, 97)]
    c = Circuit(model=smollm2.identity(), neurons=neurons)
    with steer_circuit(smollm2, c, 1.0), torch.no_grad():
        same = smollm2.model(**enc).logits
    with steer_circuit(smollm2, c, 0.0), torch.no_grad():
        ablated = smollm2.model(**enc).logits
    assert torch.equal(base, same)
    assert (ablated - base).abs().max() > 1e-2


def test_circuit_from_other_weights_is_refused(smollm2):
    ident = smollm2.identity()
    other = ident.model_copy(update={"fingerprint": "3:" + "0" * 64, "name": "elsewhere"})
    c = Circuit(model=other, neurons=[Neuron(layer=3, index=4)])
    with pytest.raises(CnaError, match="different weights"):
        c.check_fits(ident)
    wrong_shape = other.model_copy(update={"intermediate_size": 2048})
    with pytest.raises(CnaError, match="does not fit"):
        Circuit(model=wrong_shape, neurons=[Neuron(layer=3, index=4)]).check_fits(ident)
