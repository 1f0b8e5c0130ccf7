"""Settings models: recipes validated by the models, flags generated from them, --help without torch."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from cna_export.cli import build_parser, main
from cna_export.cli.flags import add_flags, flags_of
from cna_export.core.errors import CnaError
from cna_export.core.recipe import load_recipe, recipe_section
from cna_export.core.settings import AuditSettings, DiscoverOptions, EvalJob, EvalSettings, TuneJob, build

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
COMMANDS = ["discover", "generate", "show", "export", "verify", "steer", "push", "eval", "tune", "diff", "audit"]


def _discover(tmp_path: Path, recipe: Path, capsys) -> tuple[int, str]:
    code = main(["discover", "--model", "bundled:none", "--recipe", str(recipe), "--out", str(tmp_path / "c.json")])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("text, key, near", [
    ("positive: p.txt\nnegative: n.txt\ntop_fration: 0.5\n", "top_fration", "top_fraction"),
    ("positive: p.txt\neval:\n  max_new_token: 3\n", "max_new_token", "max_new_tokens"),
    ("positive: p.txt\ntune:\n  fractons: [0.01]\n", "fractons", "fractions"),
    ("positive: p.txt\naudit:\n  zero_treshold: 0.1\n", "zero_treshold", "zero_threshold"),
    ("positive: p.txt\nexport:\n  max_kl_ration: 2\n", "max_kl_ration", "max_kl_ratio"),
])
def test_typo_is_a_one_line_error_with_a_suggestion(tmp_path, capsys, text, key, near):
    recipe = tmp_path / "x.yaml"
    recipe.write_text(text)
    code, err = _discover(tmp_path, recipe, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"cna-export: error: recipe {recipe}")
    assert f"unknown key '{key}' (did you mean '{near}'?)" in lines[0]
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("text, message", [
    ("top_fraction: lots\n", "top_fraction"),  # wrong type
    ("top_fraction: 2\n", "less than or equal to 1"),  # out of range
    ("eval:\n  max_new_tokens: many\n", "eval: max_new_tokens"),
    ("tune:\n  kl_metric: kl_first\n", "tune: kl_metric"),
    ("tune:\n  benign_weights: [2, 1]\n", "tune: benign_weights: .*lowest must not exceed highest"),
    ("tune:\n  benign_weights: [0, 1]\n", "tune: benign_weights"),
    ("audit:\n  prompts: [1]\n", "audit: prompts"),
    ("eval: 3\n", "section 'eval' must be a mapping"),
])
def test_bad_values_are_refused(tmp_path, text, message):
    recipe = tmp_path / "x.yaml"
    recipe.write_text(text)
    with pytest.raises(CnaError, match=message):
        load_recipe(recipe)


@pytest.mark.parametrize("text, message", [
    ("top_k: true\n", "top_k: Input should be a number, not a boolean"),  # not a 1-neuron circuit
    ("top_fraction: false\n", "top_fraction: Input should be a number, not a boolean"),
    ("discover:\n  batch_size: true\n", "discover: batch_size"),
    ("exclude_layers: [1, true]\n", "exclude_layers: Input should be a number, not a boolean"),
    ("mean_match_range: [true, 1]\n", "mean_match_range: Input should be a number, not a boolean"),
    ("eval:\n  max_new_tokens: true\n", "eval: max_new_tokens: Input should be a number, not a boolean"),
    ("tune:\n  multipliers: [0.5, false]\n", "tune: multipliers: Input should be a number, not a boolean"),
    ("audit:\n  zero_threshold: true\n", "audit: zero_threshold: Input should be a number, not a boolean"),
])
def test_bool_is_not_a_number(tmp_path, text, message):
    recipe = tmp_path / "x.yaml"
    recipe.write_text(text)
    with pytest.raises(CnaError, match=f"^recipe {recipe}: {message}"):
        load_recipe(recipe)


def test_bool_is_not_a_number_in_the_library_and_the_cli(tmp_path, capsys):
    with pytest.raises(CnaError, match="^--top-k: Input should be a number, not a boolean$"):
        build(DiscoverOptions, {"top_k": True})
    assert build(DiscoverOptions, {"top_k": 1, "top_fraction": 1}).top_k == 1  # ints stay numbers
    recipe = tmp_path / "x.yaml"
    recipe.write_text("positive: p.txt\ntop_k: true\n")
    code, err = _discover(tmp_path, recipe, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "top_k: Input should be a number" in err


@pytest.mark.parametrize("text, message", [
    ("mean_match_range: [0.5]\n", "mean_match_range: List should have at least 2 items"),  # min_length
    ("mean_match_range: [0, 0.5, 1]\n", "mean_match_range: List should have at most 2 items"),  # max_length
    ("mean_match_range: [1, -1]\n", "mean_match_range: lowest must not exceed highest"),  # a field validator
    ("direction_layer: first\n", "direction_layer: expected 'own' or a layer number"),
    ("discover:\n  batch_size: 0\n", "discover: batch_size: expected a positive integer or 'auto'"),
    ("audit:\n  rank_k: 65\n", "audit: rank_k: Input should be less than or equal to 64"),
    ("eval:\n  max_new_tokens: 0\n", "eval: max_new_tokens: Input should be greater than or equal to 1"),
    ("export:\n  max_kl_ratio: 0\n", "export: max_kl_ratio: Input should be greater than 0"),
])
def test_every_field_constraint_applies_to_recipes(tmp_path, text, message):
    recipe = tmp_path / "x.yaml"
    recipe.write_text(text)
    with pytest.raises(CnaError, match=f"^recipe {recipe}: {message}"):
        load_recipe(recipe)


def test_cross_field_checks_see_every_layer(tmp_path):
    """A recipe section is one layer: a check across fields is judged when the flags complete it."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("eval:\n  kl_tokens: 5\n  benign_max_new_tokens: 2\n")
    section = recipe_section(recipe, "eval")
    with pytest.raises(CnaError, match="^--benign-max-new-tokens must be at least --kl-tokens$"):
        build(EvalSettings, section)
    assert build(EvalSettings, section, {"kl_tokens": 1}).benign_max_new_tokens == 2
    with pytest.raises(CnaError, match="^--max-new-tokens: Input should be greater than or equal to 1$"):
        build(EvalSettings, {"max_new_tokens": 0})


def test_benign_file_and_benign_switch_are_two_keys(tmp_path):
    """eval's benign prompt file (--benign FILE) and the switch that skips the benign set (--no-benign)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("eval:\n  benign: b.txt\n  benign_set: false\n")
    section = recipe_section(recipe, "eval")
    assert build(EvalJob, section).benign == "b.txt" and build(EvalSettings, section).benign_set is False
    recipe.write_text("eval:\n  benign: false\n")
    with pytest.raises(CnaError, match="eval: benign: Input should be a valid string"):
        recipe_section(recipe, "eval")


def test_recipe_only_and_library_only_fields(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("tune:\n  custom_strategies: {mine: {score: direction, sign: positive}}\n")
    tune = build(TuneJob, recipe_section(recipe, "tune"))
    assert tune.custom_strategies == {"mine": {"score": "direction", "sign": "positive"}}
    assert "--custom-strategies" not in " ".join(a for x in build_parser()._actions for a in x.option_strings)
    recipe.write_text("eval:\n  score_chunk: 2\n")  # a library-only setting
    with pytest.raises(CnaError, match="eval: unknown key 'score_chunk'"):
        recipe_section(recipe, "eval")


def test_strategy_settings_recorded_only_when_not_their_default():
    assert not set(DiscoverOptions().method_params()) & set(DiscoverOptions.STRATEGY_FIELDS)
    opts = DiscoverOptions(rank="per-drift", drift_floor=0.2, capture_k=8, multiplier_strength=0.5)
    params = opts.method_params()
    assert (params["rank"], params["drift_floor"]) == ("per-drift", 0.2)
    assert "capture_k" not in params and "multiplier_strength" not in params  # irrelevant: capture last, constant
    for name in DiscoverOptions.STRATEGY_FIELDS:
        assert name in DiscoverOptions.model_fields


def test_valid_recipe_with_sections(tmp_path):
    (tmp_path / "pos.txt").write_text("a\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: t\ndescription: d\npositive: pos.txt\ntop-fraction: 0.01\n"
        "discover:\n  batch_size: 4\n"
        "export:\n  link: true\n  fold: down\n  max_kl_ratio: 1.5\n"
        "eval:\n  max_new_tokens: 3\n  kl-tokens: 2\n  limit: 5\n"
        "tune:\n  fractions: [0.01, 0.02]\n  max_kl: -1\n  heldout: false\n  benign_weights: [0.5, 4]\n"
        "audit:\n  prompts: 4\n  generate: false\n"
    )
    rec = load_recipe(recipe)
    opts = build(DiscoverOptions, rec)
    assert (opts.top_fraction, opts.batch_size) == (0.01, 4)
    assert opts.positive == str((tmp_path / "pos.txt").resolve())
    ev = recipe_section(recipe, "eval")
    assert build(EvalSettings, ev).kl_tokens == 2 and build(EvalJob, ev).limit == 5
    tune = build(TuneJob, recipe_section(recipe, "tune"))
    assert tune.fractions == [0.01, 0.02] and tune.max_kl is None and not tune.heldout
    assert tune.benign_weights == [0.5, 4] and build(TuneJob, {}).benign_weights is None  # default: not searched
    audit = build(AuditSettings, recipe_section(recipe, "audit"))
    assert audit.prompts == 4 and not audit.generate
    assert recipe_section(None, "eval") == {} and recipe_section(recipe, "verify") == {}


def test_recipe_sections_feed_the_cli_below_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("eval:\n  max_new_tokens: 3\n  judge: phrases\n")
    ns = build_parser().parse_args(["eval", "--model", "m", "--out", "o", "--recipe", str(recipe),
                                    "--judge", "keyword"])
    s = build(EvalSettings, recipe_section(ns.recipe, "eval"), flags_of(ns, EvalSettings))
    assert (s.max_new_tokens, s.judge) == (3, "keyword")


@pytest.mark.parametrize("recipe", sorted(RECIPES.rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe):
    opts = build(DiscoverOptions, load_recipe(recipe))
    assert opts.positive and Path(opts.positive).is_file()
    for job in ("discover", "export", "verify", "eval", "tune", "audit"):
        recipe_section(recipe, job)


def test_tuned_recipe_written_by_tune_validates(tmp_path):
    from types import SimpleNamespace

    from cna_export.evaluation.sweep import tuned_recipe_yaml

    saved = SimpleNamespace(total_neurons=1000, options=DiscoverOptions())
    text = tuned_recipe_yaml(RECIPES / "refusal.yaml", tmp_path, {"fraction": 0.005, "neurons": 5, "multiplier": 0.5},
                             saved, {"objective": "fewest refusals"})
    (tmp_path / "recipe.yaml").write_text(text)
    opts = build(DiscoverOptions, load_recipe(tmp_path / "recipe.yaml"))
    assert (opts.top_k, opts.multiplier) == (5, 0.5)


@pytest.mark.parametrize("cls", [DiscoverOptions, EvalSettings, EvalJob, TuneJob, AuditSettings])
def test_flags_are_generated_from_the_fields(cls):
    parser = argparse.ArgumentParser()
    add_flags(parser, cls)
    by_dest = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    for name, f in cls.model_fields.items():
        extra = (f.json_schema_extra or {}).get("cli", {}) if isinstance(f.json_schema_extra, dict) else {}
        if extra.get("cli") is False:
            assert name not in by_dest
            continue
        action = by_dest[extra.get("dest", name)]
        assert action.default is argparse.SUPPRESS  # unset flags leave the recipe and the default in charge
        flag = extra.get("flag", "--" + name.replace("_", "-"))
        assert flag in action.option_strings
        if f.description and action.help and "default" not in (f.description or "") and not flag.startswith("--no-") \
                and flag != "--benign-kl-only":
            assert "(default: " in action.help
    assert flags_of(parser.parse_args([]), cls) == {}


def test_defaults_shown_in_help(capsys):
    for argv, text in ((["tune", "--help"], "(default: 0.001,0.0025,0.005)"), (["audit", "--help"], "(default: 40)"),
                       (["eval", "--help"], "(default: 150)"), (["diff", "--help"], "(default: 0.95)")):
        with pytest.raises(SystemExit):
            main(argv)
        assert text in " ".join(capsys.readouterr().out.split())


def test_negated_switches_set_the_field():
    ns = build_parser().parse_args(["tune", "--model", "m", "--out", "o", "--no-heldout", "--no-benign",
                                    "--max-kl", "-1", "--benign", "b.txt"])
    assert build(TuneJob, flags_of(ns, TuneJob)).heldout is False
    assert build(TuneJob, flags_of(ns, TuneJob)).max_kl is None
    assert build(EvalSettings, flags_of(ns, EvalSettings)).benign_set is False
    assert build(EvalJob, flags_of(ns, EvalJob)).benign == "b.txt"


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_does_not_import_torch(command):
    argv = [command, "--help"] if command else ["--help"]
    code = (
        "import sys\nfrom cna_export.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "usage: cna-export" in r.stdout
