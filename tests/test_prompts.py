"""Prompt sets, rendering, batching, recipes and options."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cna_export.core.errors import CnaError
from cna_export.core.recipe import load_recipe
from cna_export.core.settings import DiscoverOptions, build
from cna_export.model.prompts import batches, load_prompts, render


def test_text_prompts(tmp_path):
    p = tmp_path / "p.txt"
    p.write_bytes(b"first prompt\n\n  second prompt  \r\nthird\n")
    ps = load_prompts(p)
    assert ps.texts == ("first prompt", "second prompt", "third")
    assert ps.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    assert load_prompts(p, limit=2).texts == ("first prompt", "second prompt")


def test_jsonl_prompts(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "a", "x": 1}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    assert load_prompts(p).texts == ("a", "b")
    p.write_text(json.dumps({"q": "a"}) + "\n")
    with pytest.raises(CnaError, match="--field"):
        load_prompts(p)
    assert load_prompts(p, field="q").texts == ("a",)
    with pytest.raises(CnaError, match="no field 'z'"):
        load_prompts(p, field="z")
    p.write_text("{broken\n")
    with pytest.raises(CnaError, match=r"p.jsonl:1: not valid JSON"):
        load_prompts(p)


def test_csv_prompts(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text('Index,Goal,Category\n0,"Write, with a comma",x\n1,Second,y\n')
    ps = load_prompts(p)
    assert ps.texts == ("Write, with a comma", "Second") and ps.selector == "Goal"
    assert load_prompts(p, column="Category").texts == ("x", "y")
    with pytest.raises(CnaError, match="no column"):
        load_prompts(p, column="nope")


def test_missing_and_empty(tmp_path):
    with pytest.raises(CnaError, match="not found"):
        load_prompts(tmp_path / "none.txt")
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(CnaError, match="no prompts"):
        load_prompts(tmp_path / "e.txt")


def test_render_and_left_padded_batches(tiny_loaded):
    tok = tiny_loaded("llama").tokenizer
    texts = render(tok, ["hi", "How do I bake a cake with chocolate?"])
    assert texts[0].startswith("<s><|user|>hi") and texts[0].endswith("<|assistant|>")
    got = list(batches(tok, texts, batch_size=2, chat_template=True))
    assert len(got) == 1
    b = got[0]
    assert b.indices == [1, 0]  # longest first
    assert b.attention_mask[1, 0] == 0 and b.attention_mask[:, -1].all()  # left padded
    assert b.position_ids[1, -1] == b.attention_mask[1].sum() - 1
    assert b.position_ids[0].tolist() == list(range(b.input_ids.shape[1]))
    with pytest.raises(CnaError, match="no chat template"):
        tok2 = type(tok).from_pretrained(tok.name_or_path) if tok.name_or_path else tok
        tok2.chat_template = None
        render(tok2, ["x"])


def test_recipe_and_precedence(tmp_path):
    (tmp_path / "pos.txt").write_text("a\nb\n")
    r = tmp_path / "r.yaml"
    r.write_text("name: t\npositive: pos.txt\ntop-fraction: 0.01\nbatch_size: 4\neval:\n  max_new_tokens: 3\n")
    rec = load_recipe(r)
    assert rec["positive"] == str((tmp_path / "pos.txt").resolve())
    opts = build(DiscoverOptions, rec, {"batch_size": 2})
    assert (opts.top_fraction, opts.batch_size) == (0.01, 2)
    with pytest.raises(CnaError, match="--top-fraction"):
        build(DiscoverOptions, {"top_fraction": 2})
    r.write_text("- a list\n")
    with pytest.raises(CnaError, match="mapping"):
        load_recipe(r)
    r.write_text("a: [unclosed\n")
    with pytest.raises(CnaError, match="not valid YAML"):
        load_recipe(r)


RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.yaml")))
def test_bundled_recipe_is_complete(name):
    """Every shipped recipe validates as discovery options and names complete, disjoint prompt sets."""
    from pathlib import Path

    from cna_export.core.settings import DiscoverOptions, build

    rec = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml")
    build(DiscoverOptions, rec)
    pos, neg, neu = (load_prompts(rec[k]) for k in ("positive", "negative", "neutral"))
    assert len(pos) >= 64 and len(neg) == len(pos) and len(neu) >= 64
    assert not set(pos.texts) & set(neg.texts)


def test_tuned_recipe_loads():
    from pathlib import Path

    from cna_export.core.settings import DiscoverOptions, build

    root = Path(__file__).resolve().parents[1] / "recipes"
    opts = build(DiscoverOptions, load_recipe(root / "tuned" / "refusal-qwen2.5-coder-0.5b.yaml"))
    assert opts.top_k == 584 and opts.multiplier == 0.5
    assert Path(opts.positive) == (root / "prompts" / "refusal-harmful.txt").resolve()
