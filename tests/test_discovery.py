"""Discovery on tiny random models of every supported architecture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ARCHS

from cna_export.core.settings import DiscoverOptions
from cna_export.discovery.cna import RunningStats, TopKCounts, discover, run_prompts
from cna_export.model.prompts import load_prompts


def capture_per_prompt(loaded, texts, batch_size):
    """Last-token down_proj inputs per prompt, in prompt order: array [prompts, layers, neurons]."""
    out = np.zeros((len(texts), loaded.num_layers, loaded.intermediate_size))

    def sink(layer, acts, rows):
        out[list(rows), layer] = acts

    run_prompts(loaded, texts, sink, batch_size=batch_size, chat_template=True, progress=False)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_capture_equals_single_prompt_capture(arch, tiny_loaded, prompt_files):
    loaded = tiny_loaded(arch)
    pos, neg, _ = prompt_files
    texts = list(load_prompts(pos).texts + load_prompts(neg).texts)  # varied lengths -> real left padding
    single = capture_per_prompt(loaded, texts, batch_size=1)
    batched = capture_per_prompt(loaded, texts, batch_size=5)
    assert np.abs(single).max() > 1e-3, "activations should not be trivially zero"
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_discovery_yields_same_circuit_as_single(arch, tiny_loaded, prompt_files):
    loaded = tiny_loaded(arch)
    pos, neg, neu = (load_prompts(p) for p in prompt_files)
    one = discover(loaded, pos, neg, neu, DiscoverOptions(top_k=12, batch_size=1), progress=False).circuit
    many = discover(loaded, pos, neg, neu, DiscoverOptions(top_k=12, batch_size=4), progress=False).circuit
    assert [(n.layer, n.index) for n in one.neurons] == [(n.layer, n.index) for n in many.neurons]
    np.testing.assert_allclose([n.score for n in one.neurons], [n.score for n in many.neurons], rtol=1e-4, atol=1e-6)
    assert one.universal_neurons == many.universal_neurons


def test_discovery_is_deterministic(tiny_loaded, prompt_files):
    loaded = tiny_loaded("llama")
    pos, neg, neu = (load_prompts(p) for p in prompt_files)
    opts = DiscoverOptions(top_fraction=0.1, batch_size=3)
    a = discover(loaded, pos, neg, neu, opts, progress=False).circuit
    b = discover(loaded, pos, neg, neu, opts, progress=False).circuit
    assert a.neurons == b.neurons
    assert a.universal_neurons == b.universal_neurons
    assert a.model.fingerprint == b.model.fingerprint


def test_circuit_size_and_ranking(tiny_loaded, prompt_files):
    loaded = tiny_loaded("qwen2")
    pos, neg, neu = (load_prompts(p) for p in prompt_files)
    res = discover(loaded, pos, neg, None, DiscoverOptions(top_fraction=0.05, exclude_layers=[0]), progress=False)
    c = res.circuit
    total = loaded.num_layers * loaded.intermediate_size
    assert len(c.neurons) == round(0.05 * total)
    assert all(n.layer != 0 for n in c.neurons)
    mags = [abs(n.score) for n in c.neurons]
    assert mags == sorted(mags, reverse=True)
    # the circuit is the global top-|score| set among allowed neurons
    scores = res.stats.scores("mean-diff")
    scores[0] = 0
    threshold = np.sort(np.abs(scores).ravel())[-len(c.neurons)]
    assert min(mags) >= threshold - 1e-12
    for n in c.neurons:
        assert n.score == pytest.approx(n.positive_mean - n.negative_mean)
    assert c.per_layer_counts == c.layer_counts()
    assert c.prompts["positive"].count == len(pos) and c.prompts["positive"].sha256 == pos.sha256


def test_sign_restricts_the_circuit(tiny_loaded, prompt_files):
    from cna_export.discovery.cna import select

    loaded = tiny_loaded("qwen2")
    pos, neg, neu = (load_prompts(p) for p in prompt_files)
    opts = DiscoverOptions(top_k=20)
    res = discover(loaded, pos, neg, None, opts, progress=False)
    both = res.circuit
    assert {n.score > 0 for n in both.neurons} == {True, False}  # |score| ranking mixes signs here
    sets = {"positive": pos, "negative": neg}
    scores = res.stats.scores("mean-diff")
    for sign, keep in (("positive", scores > 0), ("negative", scores < 0)):
        c = select(res.stats, loaded, opts.model_copy(update={"sign": sign}), sets)
        assert len(c.neurons) == 20 and all((n.score > 0) == (sign == "positive") for n in c.neurons)
        # the top 20 by |score| among that sign, in order
        flat = np.where(keep, np.abs(scores), -1.0).ravel()
        top = np.argsort(-flat, kind="stable")[:20]
        assert [(n.layer, n.index) for n in c.neurons] == [divmod(int(f), scores.shape[1]) for f in top]
        assert c.method["sign"] == sign
        # neurons of that sign in the two-sided circuit keep their order
        same = [(n.layer, n.index) for n in both.neurons if (n.score > 0) == (sign == "positive")]
        assert [(n.layer, n.index) for n in c.neurons][: len(same)] == same


def test_standardized_score(tiny_loaded, prompt_files):
    loaded = tiny_loaded("llama")
    pos, neg, _ = (load_prompts(p) for p in prompt_files)
    res = discover(loaded, pos, neg, None, DiscoverOptions(top_k=5, score="standardized"), progress=False)
    p, n = res.stats.positive, res.stats.negative
    want = (p.mean - n.mean) / np.sqrt(0.5 * (p.var + n.var))
    for neuron in res.circuit.neurons:
        assert neuron.score == pytest.approx(want[neuron.layer, neuron.index])


def _plant_always_on(model_dir, targets):
    """Give every token embedding a shared direction e, and make the planted neurons read e strongly."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    sd = load_file(path)
    emb = sd["model.embed_tokens.weight"]
    g = torch.Generator().manual_seed(7)
    e = torch.randn(emb.shape[1], generator=g)
    e /= e.norm()
    sd["model.embed_tokens.weight"] = emb + 10.0 * e
    for layer, index in targets:
        sd[f"model.layers.{layer}.mlp.gate_proj.weight"][index] = 8.0 * e
        sd[f"model.layers.{layer}.mlp.up_proj.weight"][index] = 8.0 * e
        sd[f"model.layers.{layer}.mlp.down_proj.weight"][:, index] = 0.0  # keep the residual stream as it was
    save_file(sd, path, metadata={"format": "pt"})


def test_universal_filter_removes_planted_always_on_neurons(tmp_path, prompt_files):
    from conftest import make_tiny_model

    from cna_export.model.loading import load_model

    planted = [(0, 5), (1, 17), (2, 40)]
    d = make_tiny_model("llama", tmp_path / "planted", seed=3)
    _plant_always_on(d, planted)
    loaded = load_model(str(d))
    pos, neg, neu = (load_prompts(p) for p in prompt_files)

    # the planted neurons dominate |activation| on every prompt ...
    acts = capture_per_prompt(loaded, neu.texts, batch_size=4)
    for layer, index in planted:
        assert (np.abs(acts[:, layer]).argmax(axis=1) == index).all()

    # ... and, unfiltered, their large magnitudes put them in the circuit
    unfiltered = discover(loaded, pos, neg, None, DiscoverOptions(top_k=20), progress=False).circuit
    assert {(n.layer, n.index) for n in unfiltered.neurons} & set(planted)

    filtered = discover(loaded, pos, neg, neu, DiscoverOptions(top_k=20, universal_top_k=3), progress=False).circuit
    chosen = {(n.layer, n.index) for n in filtered.neurons}
    universal = {(u.layer, u.index) for u in filtered.universal_neurons}
    assert set(planted) <= universal
    assert not chosen & universal
    assert all(u.frequency >= 0.8 for u in filtered.universal_neurons)


def test_running_stats_match_numpy():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(37, 2, 9))
    st = RunningStats(2, 9)
    for start in range(0, 37, 5):
        for layer in range(2):
            st.add(layer, data[start : start + 5, layer])
    st.count = 37
    np.testing.assert_allclose(st.mean, data.mean(axis=0))
    np.testing.assert_allclose(st.var, data.var(axis=0), atol=1e-12)


def test_topk_counts():
    tk = TopKCounts(1, 6, k=2)
    tk.add(0, np.array([[0.1, -5.0, 3.0, 0.0, 0.2, 0.3], [9.0, -5.0, 0.0, 0.0, 0.2, 0.3]]))
    tk.count = 2
    assert tk.hits[0].tolist() == [1, 2, 1, 0, 0, 0]
    assert tk.frequency[0, 1] == 1.0
