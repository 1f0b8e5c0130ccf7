"""Hook steering: multiplier 1 is the identity, 0 zeroes the neurons' down_proj input, others scale."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS

from cna_export.core.circuit import Circuit, Neuron
from cna_export.model.prompts import render
from cna_export.model.steering import steer, steer_circuit


def _circuit(loaded, neurons):
    return Circuit(model=loaded.identity(), neurons=[Neuron(layer=l, index=i) for l, i in neurons])


def _inputs(loaded, prompts=("How do I bake a cake?", "Write code to sort a list in Python quickly.")):
    tok = loaded.tokenizer
    tok.padding_side = "left"
    texts = render(tok, prompts)
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _logits(loaded, enc):
    with torch.no_grad():
        return loaded.model(**enc).logits


def _capture_after_steering(loaded, enc, layer):
    seen = {}

    def hook(module, args):
        seen["x"] = args[0].detach().clone()

    h = loaded.down_proj(layer).register_forward_pre_hook(hook)  # registered after steering: sees its output
    try:
        _logits(loaded, enc)
    finally:
        h.remove()
    return seen["x"]


@pytest.mark.parametrize("arch", ARCHS)
def test_multiplier_one_leaves_logits_unchanged(arch, tiny_loaded):
    loaded = tiny_loaded(arch)
    enc = _inputs(loaded)
    base = _logits(loaded, enc)
    c = _circuit(loaded, [(0, 1), (1, 7), (2, 63)])
    with steer_circuit(loaded, c, 1.0):
        steered = _logits(loaded, enc)
    assert torch.equal(base, steered)


@pytest.mark.parametrize("arch", ARCHS)
def test_multiplier_zero_zeroes_down_proj_input(arch, tiny_loaded):
    loaded = tiny_loaded(arch)
    enc = _inputs(loaded)
    idx = [3, 10, 42]
    before = _capture_after_steering(loaded, enc, 1)
    c = _circuit(loaded, [(1, i) for i in idx])
    with steer_circuit(loaded, c, 0.0):
        after = _capture_after_steering(loaded, enc, 1)
        logits = _logits(loaded, enc)
    assert before[..., idx].abs().max() > 0
    assert torch.count_nonzero(after[..., idx]) == 0  # at every position, prompt tokens included
    others = [j for j in range(loaded.intermediate_size) if j not in idx]
    torch.testing.assert_close(after[..., others], before[..., others])  # layer 1 input unaffected elsewhere
    assert not torch.equal(logits, _logits(loaded, enc))
    # hooks are removed on exit
    torch.testing.assert_close(_capture_after_steering(loaded, enc, 1), before)


def test_per_neuron_and_negative_multipliers(tiny_loaded):
    loaded = tiny_loaded("llama")
    enc = _inputs(loaded)
    before = _capture_after_steering(loaded, enc, 2)
    mult = {(2, 4): 2.0, (2, 9): -1.0, (2, 11): 0.5}
    with steer(loaded.model, loaded.arch, mult):
        after = _capture_after_steering(loaded, enc, 2)
    for (_, j), m in mult.items():
        torch.testing.assert_close(after[..., j], before[..., j] * m)


def test_circuit_multipliers_are_used(tiny_loaded):
    loaded = tiny_loaded("qwen2")
    enc = _inputs(loaded)
    before = _capture_after_steering(loaded, enc, 0)
    c = Circuit(model=loaded.identity(), neurons=[Neuron(layer=0, index=5, multiplier=3.0)])
    with steer_circuit(loaded, c):
        after = _capture_after_steering(loaded, enc, 0)
    torch.testing.assert_close(after[..., 5], before[..., 5] * 3.0)


def test_steering_generation_changes_with_ablation(tiny_loaded):
    from cna_export.model.generation import generate

    loaded = tiny_loaded("llama")
    prompts = ["How do I bake a cake?"]
    base = generate(loaded, prompts, max_new_tokens=8)
    again = generate(loaded, prompts, max_new_tokens=8)
    assert base == again
    c = _circuit(loaded, [(layer, j) for layer in range(3) for j in range(0, 64, 2)])
    with steer_circuit(loaded, c, 0.0):
        steered = generate(loaded, prompts, max_new_tokens=8)
    assert steered != base
