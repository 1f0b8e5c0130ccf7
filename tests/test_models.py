"""Model loading: local folders, Hub ids (offline here), device maps and dtypes."""

from __future__ import annotations

import pytest
import torch

from cna_export.core.errors import CnaError
from cna_export.core.settings import DiscoverOptions
from cna_export.discovery.cna import discover
from cna_export.model.loading import load_model, resolve_source
from cna_export.model.prompts import load_prompts


def test_hub_id_goes_through_from_pretrained(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    with pytest.raises(CnaError, match="cannot load the config of someone/not-cached-model"):
        load_model("someone/not-cached-model")


def test_device_map_and_dtype(tiny_models, prompt_files, monkeypatch):
    pytest.importorskip("accelerate")
    import transformers

    seen = {}
    original = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    loaded = load_model(str(tiny_models["llama"]), device_map="auto", dtype="bfloat16")
    assert seen["device_map"] == "auto" and seen["dtype"] == torch.bfloat16  # handed to accelerate as is
    assert loaded.dtype == torch.bfloat16
    pos, neg, _ = (load_prompts(p) for p in prompt_files)
    c = discover(loaded, pos, neg, None, DiscoverOptions(top_k=4), progress=False).circuit
    assert len(c.neurons) == 4 and c.model.dtype == "bfloat16"


def test_fingerprint_is_independent_of_lossless_dtype(tmp_path):
    from conftest import make_tiny_model

    d = make_tiny_model("qwen2", tmp_path / "bf16", dtype="bfloat16")
    as_bf16 = load_model(str(d), dtype="bfloat16").fingerprint()
    as_fp32 = load_model(str(d), dtype="float32").fingerprint()
    assert as_bf16 == as_fp32
    other = make_tiny_model("qwen2", tmp_path / "other", dtype="bfloat16", seed=1)
    assert load_model(str(other)).fingerprint() != as_fp32


def test_borrowed_pad_token_is_not_saved(tmp_path):
    """Batching borrows EOS as the pad token when a tokenizer has none; saved tokenizers must not gain it."""
    import json

    from conftest import _tokenizer, make_tiny_model

    from cna_export.model.loading import load_tokenizer, save_tokenizer

    for name in ("src", "own"):
        make_tiny_model("llama", tmp_path / name, layers=1)
    tok = _tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "src")
    loaded = load_tokenizer(resolve_source(str(tmp_path / "src")))
    assert loaded.pad_token == loaded.eos_token == "</s>"
    save_tokenizer(loaded, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()).get("pad_token") is None
    assert loaded.pad_token == "</s>"  # still usable for batching afterwards
    # a tokenizer with its own pad token keeps it
    save_tokenizer(load_tokenizer(resolve_source(str(tmp_path / "own"))), tmp_path / "own-out")
    assert json.loads((tmp_path / "own-out" / "tokenizer_config.json").read_text())["pad_token"] == "<pad>"


# -- the architecture table (core/data/architectures.json), validated by pydantic -----------------


def _shipped_table() -> dict:
    import json
    from importlib import resources

    from cna_export.core.architectures import TABLE_FILE

    return json.loads(resources.files("cna_export").joinpath(TABLE_FILE).read_text("utf-8"))


def test_shipped_architecture_table_validates():
    import json

    from cna_export.core.architectures import ArchTable, get_arch, parse_table, supported_model_types

    table = parse_table(json.dumps(_shipped_table()))
    assert isinstance(table, ArchTable) and set(table.supported) == set(supported_model_types())
    for model_type, entry in table.supported.items():
        spec = get_arch(model_type)
        assert spec.model_type == model_type and spec.checkpoint.down == entry.checkpoint.down
        assert spec.gguf.arch == entry.gguf.arch and spec.up_rows == entry.up_rows
    assert get_arch("phi3").fused_gate_up and get_arch("phi3").up_row(3, 10) == 13


@pytest.mark.parametrize("where, key, value, message", [
    (("supported", "llama"), "mlp_path", "mlp", r"supported\.llama\.mlp_path: Extra inputs are not permitted"),
    (("supported", "llama"), "gated", "yes", r"supported\.llama\.gated: Input should be a valid boolean"),
    (("supported", "llama"), "hf_classes", "LlamaForCausalLM",
         r"supported\.llama\.hf_classes: Input should be a valid"),
    (("supported", "qwen2", "gguf"), "down", "blk.ffn_down.weight", r"supported\.qwen2\.gguf\.down: .*no \{layer\}"),
    (("supported", "phi3"), "up_rows", "first_half",
         r"supported\.phi3\.up_rows: Input should be 'plain' or 'second_half'"),
    ((), "extra", {}, r"extra: Extra inputs are not permitted"),
])
def test_malformed_architecture_table_is_refused(where, key, value, message):
    import json

    from cna_export.core.architectures import parse_table

    data = _shipped_table()
    node = data
    for k in where:
        node = node[k]
    node[key] = value
    with pytest.raises(CnaError, match="architecture table .* is malformed: .*" + message):
        parse_table(json.dumps(data))
    with pytest.raises(CnaError, match="is malformed"):
        parse_table("{not json")
