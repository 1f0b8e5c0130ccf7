"""Discovery strategies (cna_export.discovery.scores): each score, ranking, multiplier mode and capture
position checked on tiny random models, with planted neurons where a score must find them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cna_export.core.recipe import load_recipe
from cna_export.core.settings import DiscoverOptions, build
from cna_export.discovery.cna import ContrastStats, RunningStats, collect, discover, run_prompts, select
from cna_export.discovery.scores import (
    behaviour_score,
    benign_drift,
    neuron_multipliers,
    opening_token_ids,
    rank_key,
)
from cna_export.model.loading import load_model
from cna_export.model.prompts import load_prompts, render
from cna_export.model.steering import steer

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture()
def fresh(tiny_models):
    """A private copy of a tiny model (tests plant weights in it)."""
    return lambda arch="llama": load_model(str(tiny_models[arch]))


def _sets(prompt_files):
    return tuple(load_prompts(p) for p in prompt_files)


def _stats(loaded, prompt_files, gradients=False, **kw):
    pos, neg, neu = _sets(prompt_files)
    return collect(loaded, pos, neg, neu, DiscoverOptions(batch_size=3, **kw), progress=False, gradients=gradients)


def _order(stats, opts):
    key = rank_key(stats, stats.scores(opts.score, opts), opts)
    return [divmod(int(f), key.shape[1]) for f in np.argsort(-key.ravel(), kind="stable")]


def _mid_positive(diff: np.ndarray, layer: int) -> int:
    """A neuron of ``layer`` with a positive but unremarkable mean difference (median of the positives)."""
    row = diff[layer]
    pos = np.nonzero(row > 0)[0]
    return int(pos[np.argsort(row[pos])[len(pos) // 2]])


# -- direction ------------------------------------------------------------------------------


@pytest.mark.parametrize("direction_layer", ["own", "-1"])
def test_direction_score_ranks_a_neuron_writing_along_the_behaviour_direction_first(fresh, prompt_files,
                                                                                    direction_layer):
    loaded = fresh("llama")
    L = loaded.num_layers
    before = _stats(loaded, prompt_files)
    last = L - 1
    j = _mid_positive(before.positive.mean - before.negative.mean, last)
    r_hat = before.residual_directions()[last]
    down = loaded.down_proj(last).weight
    with torch.no_grad():  # plant: neuron j of the last layer writes a large vector along r̂
        down[:, j] = torch.tensor(r_hat * 50 * down.norm(dim=0).max().item(), dtype=down.dtype)
    stats = _stats(loaded, prompt_files)
    opts = DiscoverOptions(score="direction", direction_layer=direction_layer)
    assert _order(stats, opts)[0] == (last, j)
    assert _order(stats, DiscoverOptions())[0] != (last, j)  # mean-diff alone does not find it
    # the formula: Δ_j (w_j · r̂)
    d = stats.residual_directions()[last]
    w = loaded.down_proj(last).weight[:, j].double().numpy()
    diff = stats.positive.mean[last, j] - stats.negative.mean[last, j]
    assert stats.scores("direction", opts)[last, j] == pytest.approx(diff * (w @ d), rel=1e-6)


def test_residual_capture_is_the_layer_output_at_the_last_token(fresh, prompt_files):
    loaded = fresh("qwen2")
    pos, neg, neu = _sets(prompt_files)
    stats = _stats(loaded, prompt_files)
    rendered = render(loaded.tokenizer, pos.texts, True)
    outs = []
    for text in rendered:
        ids = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hs = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states
        outs.append(np.stack([hs[i + 1][0, -1].double().numpy() for i in range(loaded.num_layers - 1)]))
    # hidden_states[i + 1] is layer i's output (the last one is after the final norm: skip it)
    np.testing.assert_allclose(stats.residual_positive.mean[:-1], np.mean(outs, axis=0), rtol=1e-4, atol=1e-5)


# -- attribution ----------------------------------------------------------------------------


def test_attribution_gradient_matches_finite_difference(fresh, prompt_files):
    loaded = fresh("llama")
    pos = load_prompts(prompt_files[0])
    stats = _stats(loaded, prompt_files, gradients=True, limit=None)
    assert stats.grad_positive is not None and stats.reports["gradients_positive"].seconds > 0
    refusal, compliance = opening_token_ids(loaded.tokenizer)
    layer, j = 1, 7
    eps = 1e-2

    def mean_b(m: float) -> float:
        vals = []
        with steer(loaded.model, loaded.arch, {(layer, j): m}), torch.no_grad():
            for text in render(loaded.tokenizer, pos.texts, True):
                ids = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
                vals.append(float(behaviour_score(loaded.model(input_ids=ids).logits[:, -1], refusal, compliance)[0]))
        return float(np.mean(vals))

    # scaling a_j by (1 + eps) at every position changes B by eps * sum_positions a_j g_j; at the last
    # position alone: check the gradient with a hook that scales only the last token instead
    acts = {}

    def capture(texts):
        out = np.zeros((len(texts), loaded.num_layers, loaded.intermediate_size))

        def sink(l, a, rows):
            out[list(rows), l] = a

        run_prompts(loaded, texts, sink, batch_size=1, chat_template=True, progress=False)
        return out

    acts = capture(pos.texts)[:, layer, j]
    handle = None

    def last_only(m):
        def pre(module, args):
            x = args[0].clone()
            x[:, -1, j] = x[:, -1, j] * m
            return (x,)
        return pre

    def b_last(m):
        h = loaded.down_proj(layer).register_forward_pre_hook(last_only(m))
        try:
            vals = []
            with torch.no_grad():
                for text in render(loaded.tokenizer, pos.texts, True):
                    ids = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
                    vals.append(float(behaviour_score(loaded.model(input_ids=ids).logits[:, -1], refusal,
                                                      compliance)[0]))
            return np.array(vals)
        finally:
            h.remove()

    fd = (b_last(1 + eps) - b_last(1 - eps)) / (2 * eps)  # = a_j * g_j per prompt
    per_prompt_grad = np.zeros(len(pos.texts))
    grads = np.zeros((len(pos.texts), loaded.num_layers, loaded.intermediate_size))

    from cna_export.discovery.cna import run_gradients

    def gsink(l, g, rows):
        grads[list(rows), l] = g

    run_gradients(loaded, pos.texts, gsink, batch_size=2, chat_template=True, progress=False)
    per_prompt_grad = grads[:, layer, j]
    np.testing.assert_allclose(acts * per_prompt_grad, fd, rtol=2e-2, atol=1e-5)
    np.testing.assert_allclose(stats.grad_positive.mean, grads.mean(axis=0), rtol=1e-4, atol=1e-7)
    del mean_b, handle


def test_attribution_ranks_a_neuron_writing_refusal_logits_first(fresh, prompt_files):
    loaded = fresh("llama")
    before = _stats(loaded, prompt_files)
    last = loaded.num_layers - 1
    j = _mid_positive(before.positive.mean - before.negative.mean, last)
    refusal, compliance = opening_token_ids(loaded.tokenizer)
    head = loaded.model.get_output_embeddings().weight.detach().double()
    push = (head[refusal].mean(0) - head[compliance].mean(0)).numpy()
    down = loaded.down_proj(last).weight
    with torch.no_grad():  # plant: neuron j writes towards the refusal openings' logits
        down[:, j] = torch.tensor(push / np.linalg.norm(push) * 50 * down.norm(dim=0).max().item(), dtype=down.dtype)
    stats = _stats(loaded, prompt_files, gradients=True)
    assert _order(stats, DiscoverOptions(score="attribution"))[0] == (last, j)
    assert stats.scores("attribution")[last, j] > 0  # ablating it lowers the refusal score
    assert _order(stats, DiscoverOptions())[0] != (last, j)


def test_attribution_without_gradients_is_a_clear_error(tiny_loaded, prompt_files):
    from cna_export.core.errors import CnaError

    stats = _stats(tiny_loaded("llama"), prompt_files)
    with pytest.raises(CnaError, match="attribution"):
        stats.scores("attribution")


def test_discover_with_attribution_collects_gradients(tiny_loaded, prompt_files):
    pos, neg, neu = _sets(prompt_files)
    res = discover(tiny_loaded("qwen2"), pos, neg, neu, DiscoverOptions(score="attribution", top_k=5), progress=False)
    assert "gradients_positive" in res.stats.reports
    assert res.circuit.method["score"] == "attribution"


# -- drift-aware ranking ----------------------------------------------------------------------


def _synthetic(diff, benign_sq, norms):
    L, W = np.asarray(diff).shape
    pos, neg = RunningStats(L, W), RunningStats(L, W)
    pos.count = neg.count = 1
    pos.total = np.asarray(diff, float)
    neg.total = np.zeros((L, W))
    neg.total_sq = np.asarray(benign_sq, float)
    return ContrastStats(pos, neg, None, {}, write_norm_sq=np.asarray(norms, float))


def test_per_drift_ranks_neurons_silent_on_benign_prompts_first():
    diff = [[2.0, 1.0, 0.5, -1.5]]
    benign_sq = [[4.0, 0.0, 1.0, 9.0]]  # neuron 1 is silent on the benign prompts
    stats = _synthetic(diff, benign_sq, [[1.0, 1.0, 1.0, 1.0]])
    opts = DiscoverOptions(rank="per-drift", drift_floor=0.1)
    assert [j for _, j in _order(stats, opts)][:2] == [1, 0]
    assert [j for _, j in _order(stats, DiscoverOptions())] == [0, 3, 1, 2]
    drift = benign_drift(stats)
    floor = 0.1 * np.median(drift)
    np.testing.assert_allclose(rank_key(stats, np.array(diff), opts), np.abs(diff) / np.sqrt(drift + floor))


def test_per_drift_on_a_model_uses_negative_and_neutral_activations(tiny_loaded, prompt_files):
    loaded = tiny_loaded("qwen2")
    stats = _stats(loaded, prompt_files)
    expected = ((stats.negative.total_sq + stats.neutral_acts.total_sq)
                / (stats.negative.count + stats.neutral_acts.count)) * stats.write_norm_sq
    np.testing.assert_allclose(benign_drift(stats), expected)
    w = loaded.down_proj(1).weight.detach().double().numpy()
    np.testing.assert_allclose(stats.write_norm_sq[1], (w ** 2).sum(0))
    pos, neg, neu = _sets(prompt_files)
    c = select(stats, loaded, DiscoverOptions(rank="per-drift", top_k=10), {"positive": pos})
    assert c.method["rank"] == "per-drift"


# -- multipliers --------------------------------------------------------------------------------


def test_mean_match_multipliers_land_the_positive_mean_on_the_negative_mean(fresh, prompt_files):
    loaded = fresh("llama")
    pos, neg, neu = _sets(prompt_files)
    opts = DiscoverOptions(top_k=12, multiplier_mode="mean-match", mean_match_range=[-100.0, 100.0],
                           exclude_layers=[1, 2], batch_size=3)  # one layer: edits do not feed each other
    res = discover(loaded, pos, neg, neu, opts, progress=False)
    mults = res.circuit.multipliers()
    assert len(set(mults.values())) > 1  # one scalar per neuron
    after = np.zeros((len(pos), loaded.num_layers, loaded.intermediate_size))

    def sink(layer, acts, rows):
        after[list(rows), layer] = acts

    with steer(loaded.model, loaded.arch, mults):
        run_prompts(loaded, pos.texts, sink, batch_size=3, chat_template=True, progress=False)
    steered = after.mean(axis=0)
    for n in res.circuit.neurons:
        assert steered[n.layer, n.index] == pytest.approx(n.negative_mean, rel=1e-4, abs=1e-6)


def test_mean_match_range_and_strength():
    stats = _synthetic([[1.0, 1.0, 1.0]], [[0, 0, 0]], [[1, 1, 1]])
    stats.positive.total = np.array([[2.0, 1.0, 0.5]])
    stats.negative.total = np.array([[1.0, -3.0, 2.0]])  # ratios 0.5, -3, 4
    m = neuron_multipliers(stats, DiscoverOptions(multiplier_mode="mean-match"))
    np.testing.assert_allclose(m, [[0.5, -1.0, 1.0]])  # clipped to [-1, 1]
    half = neuron_multipliers(stats, DiscoverOptions(multiplier_mode="mean-match", multiplier_strength=0.5))
    np.testing.assert_allclose(half, [[0.75, 0.0, 1.0]])
    assert neuron_multipliers(stats, DiscoverOptions()) is None


# -- capture position ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mean_last_k_capture_equals_manual_mean(tiny_loaded, prompt_files, arch):
    loaded = tiny_loaded(arch)
    texts = list(load_prompts(prompt_files[0]).texts + load_prompts(prompt_files[1]).texts)
    k = 3
    got = np.zeros((len(texts), loaded.num_layers, loaded.intermediate_size))

    def sink(layer, acts, rows):
        got[list(rows), layer] = acts

    run_prompts(loaded, texts, sink, batch_size=4, chat_template=True, progress=False, capture="mean-last-k",
                capture_k=k)
    manual = np.zeros_like(got)
    for i, text in enumerate(render(loaded.tokenizer, texts, True)):
        ids = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        full = {}
        hs = [loaded.down_proj(l).register_forward_pre_hook(
            lambda m, a, l=l, full=full: full.__setitem__(l, a[0][0].double().numpy()))
            for l in range(loaded.num_layers)]
        with torch.no_grad():
            loaded.model(input_ids=ids)
        for h in hs:
            h.remove()
        for l in range(loaded.num_layers):
            manual[i, l] = full[l][-k:].mean(axis=0)
    np.testing.assert_allclose(got, manual, rtol=1e-4, atol=1e-5)


def test_capture_is_recorded_in_the_circuit(tiny_loaded, prompt_files):
    pos, neg, neu = _sets(prompt_files)
    c = discover(tiny_loaded("llama"), pos, neg, neu, DiscoverOptions(top_k=4, capture="mean-last-k", capture_k=2),
                 progress=False).circuit
    assert c.method["capture"] == "mean-last-k" and c.method["capture_k"] == 2
    assert "last 2 prompt tokens" in c.method["activation"]


# -- recipes and the paper's method ---------------------------------------------------------------


def test_recipes_with_strategy_keys_validate():
    for path in sorted(RECIPES.glob("*.yaml")) + sorted((RECIPES / "tuned").glob("*.yaml")):
        build(DiscoverOptions, {k: v for k, v in load_recipe(path).items()})
    paper = build(DiscoverOptions, load_recipe(RECIPES / "paper-refusal.yaml"))
    assert (paper.score, paper.sign, paper.top_fraction, paper.rank, paper.multiplier_mode, paper.capture) == (
        "mean-diff", "both", 0.001, "score", "constant", "last")


def test_bad_strategy_values_are_refused(tmp_path):
    from cna_export.core.errors import CnaError

    for text in ("score: gradient\n", "direction_layer: top\n", "mean_match_range: [1, 0]\n", "capture_k: 0\n",
                 "rank: drift\n"):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(text)
        with pytest.raises((CnaError, ValueError)):
            build(DiscoverOptions, load_recipe(recipe))


def test_paper_recipe_reproduces_the_reference_circuit(tiny_loaded, prompt_files):
    """The paper's method: rank |mean_pos - mean_neg| over all layers, drop universal neurons, top fraction."""
    loaded = tiny_loaded("qwen2")
    pos, neg, neu = _sets(prompt_files)
    rec = load_recipe(RECIPES / "paper-refusal.yaml")
    opts = build(DiscoverOptions, {k: v for k, v in rec.items() if k not in ("positive", "negative", "neutral")},
                 {"top_fraction": 0.05})
    res = discover(loaded, pos, neg, neu, opts, progress=False)
    s = res.stats
    diff = s.positive.mean - s.negative.mean
    allowed = ~(s.neutral.frequency >= opts.universal_threshold)
    flat = np.where(allowed, np.abs(diff), -1.0).ravel()
    k = round(0.05 * diff.size)
    ref = [divmod(int(f), diff.shape[1]) for f in np.argsort(-flat, kind="stable")[:k]]
    assert [(n.layer, n.index) for n in res.circuit.neurons] == ref
    assert all(n.multiplier is None for n in res.circuit.neurons)
    new_keys = {"direction_layer", "rank", "drift_floor", "multiplier_mode", "mean_match_range",
                "multiplier_strength", "capture", "capture_k"}
    assert not new_keys & set(res.circuit.method)  # the paper's manifests are unchanged


def test_saved_stats_reselect_every_strategy_identically(tiny_loaded, prompt_files, tmp_path):
    from cna_export.evaluation.saved_stats import compute_stats, load_stats, save_stats

    loaded = tiny_loaded("llama")
    pos, neg, neu = prompt_files
    opts = DiscoverOptions(positive=str(pos), negative=str(neg), neutral=str(neu), batch_size=3)
    saved = compute_stats(loaded, opts, progress=False, gradients=True)
    save_stats(tmp_path / "s.npz", saved)
    back = load_stats(tmp_path / "s.npz")
    for strategy in ({}, {"score": "direction", "sign": "positive"}, {"score": "direction", "direction_layer": "0"},
                     {"score": "attribution"}, {"rank": "per-drift"}, {"multiplier_mode": "mean-match"}):
        a = [(n.layer, n.index, n.multiplier) for n in saved.circuit(8, **strategy).neurons]
        b = [(n.layer, n.index, n.multiplier) for n in back.circuit(8, **strategy).neurons]
        assert a == b, strategy
