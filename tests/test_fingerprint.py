"""The model fingerprint's schemes (issue 23): schemes 2 and 3 hash each layer on its own (on several threads) and
the layer digests after, scheme 3 with BLAKE3; every reader (transformers, safetensors, GGUF) gives the same value
whatever the number of threads; the cache never returns one scheme's value for another; and a circuit written before
(scheme 1 or 2) is still checked exactly, in its own scheme."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from blake3 import blake3
from conftest import fused_twin, make_tiny_model

from cna_export.core.circuit import Circuit, ModelIdentity, Neuron
from cna_export.core.errors import CnaError
from cna_export.core.fingerprint import (
    FINGERPRINT_METHOD,
    FINGERPRINT_METHODS,
    fingerprint_layers,
    method_of,
    other_than,
    scheme_of,
)
from cna_export.io import fpcache
from cna_export.io import safetensors as st_io
from cna_export.io.identity import checkpoint_fingerprint, checkpoint_identity, gguf_fingerprint, gguf_identity
from cna_export.model.loading import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _layers(seed: int = 0, n: int = 5) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal((7, 11)).astype(np.float32) for _ in range(1 + i % 2)] for i in range(n)]


def _by_hand(layers: list[list[np.ndarray]]) -> tuple[str, str, str]:
    """Schemes 1, 2 and 3 of the layers, from their definitions (hashlib or blake3 over the bytes, nothing else)."""
    whole = hashlib.sha256(b"".join(w.astype("<f4").tobytes() for parts in layers for w in parts)).hexdigest()
    per_layer = [b"".join(w.astype("<f4").tobytes() for w in parts) for parts in layers]
    two = hashlib.sha256(b"".join(hashlib.sha256(b).digest() for b in per_layer)).hexdigest()
    three = blake3(b"".join(blake3(b).digest() for b in per_layer)).hexdigest()
    return whole, "2:" + two, "3:" + three


def _scheme_2(ckpt: st_io.Checkpoint, names: list[str]) -> str:
    """Scheme 2 of a dense checkpoint (a down projection per layer), by its definition."""
    return _by_hand([[ckpt.read(n).to(torch.float32).numpy()] for n in names])[1]


def _old_fingerprint(ckpt: st_io.Checkpoint, names: list[str]) -> str:
    """The fingerprint every circuit carried before scheme 2: one sha256 over every down projection as float32."""
    h = hashlib.sha256()
    for n in names:
        h.update(np.ascontiguousarray(ckpt.read(n).to(torch.float32).numpy(), dtype="<f4").tobytes())
    return h.hexdigest()


@pytest.fixture()
def fp_cache(tmp_path, monkeypatch):
    folder = tmp_path / "fp-cache"
    monkeypatch.setenv(fpcache.CACHE_SWITCH, str(folder))
    return folder


# -- the definition ----------------------------------------------------------------------------------------------


def test_schemes_2_and_3_hash_the_layer_digests_whatever_the_threads():
    layers = _layers()
    scheme1, scheme2, scheme3 = _by_hand(layers)
    feeds = [lambda parts=parts: iter(parts) for parts in layers]
    assert fingerprint_layers(feeds, scheme=1) == scheme1
    assert {fingerprint_layers(feeds, scheme=2, threads=t) for t in (1, 2, 3, 8, None)} == {scheme2}
    assert {fingerprint_layers(feeds, scheme=3, threads=t) for t in (1, 2, 3, 8, None)} == {scheme3}
    assert fingerprint_layers(feeds) == scheme3  # the current scheme
    # the same bytes cut into layers otherwise are other weights for schemes 2 and 3 (not for scheme 1)
    regrouped = [[w for parts in layers[:2] for w in parts]] + layers[2:]
    assert _by_hand(regrouped)[0] == scheme1 and _by_hand(regrouped)[1:] != (scheme2, scheme3)
    assert _by_hand(_layers(seed=1))[2] != scheme3
    with pytest.raises(CnaError, match="unknown fingerprint scheme"):
        fingerprint_layers(feeds, scheme=4)


def test_fingerprint_texts_say_their_scheme():
    one, two, three = "ab" * 32, "2:" + "ab" * 32, "3:" + "ab" * 32
    assert (scheme_of(one), scheme_of(two), scheme_of(three)) == (1, 2, 3)
    assert method_of(one) == FINGERPRINT_METHODS[1] == "sha256(fp32 little-endian down_proj weights, layer order)"
    assert method_of(two) == FINGERPRINT_METHODS[2] != FINGERPRINT_METHODS[1]
    assert method_of(three) == FINGERPRINT_METHOD == FINGERPRINT_METHODS[3] != FINGERPRINT_METHODS[2]
    for fp in (one, two, three, "2:" + "0" * 64, "3:" + "0" * 64):
        other = other_than(fp)
        assert other != fp and scheme_of(other) == scheme_of(fp) and len(other) == len(fp)
    for bad in ("", "ab" * 31, "AB" * 32, "4:" + "ab" * 32, "1:" + "ab" * 32, "2:" + "ab" * 31, "3:" + "zz" * 32):
        with pytest.raises(CnaError, match="not a model fingerprint"):
            scheme_of(bad)
    # an identity records the method of the fingerprint it carries, built or copied
    assert ModelIdentity(name="m", architecture="llama", num_layers=1, intermediate_size=1, hidden_size=1,
                         fingerprint=one).fingerprint_method == FINGERPRINT_METHODS[1]
    ident = ModelIdentity(name="m", architecture="llama", num_layers=1, intermediate_size=1, hidden_size=1)
    assert ident.fingerprint_method == FINGERPRINT_METHOD
    assert ident.with_fingerprint(one).fingerprint_method == FINGERPRINT_METHODS[1]
    assert ident.with_fingerprint(two).fingerprint_method == FINGERPRINT_METHODS[2]
    assert ident.with_fingerprint(three).fingerprint_method == FINGERPRINT_METHODS[3]


# -- every reader gives the same value -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A tiny dense model saved in bfloat16 over several shards, another one of the same shape, and the F32 GGUF
    twin of each (the same weights: bfloat16 widens to float32 exactly)."""
    pytest.importorskip("gguf")
    from cna_export.testing.gguf_twin import write_gguf_twin

    root = tmp_path_factory.mktemp("dense")
    src = make_tiny_model("smollm3", root / "src", dtype="bfloat16", max_shard_size="20KB")
    other = make_tiny_model("smollm3", root / "other", dtype="bfloat16", seed=7)
    return src, write_gguf_twin(src, root / "src.gguf"), other, write_gguf_twin(other, root / "other.gguf")


def test_loaded_safetensors_and_gguf_give_the_same_fingerprint_in_every_scheme(dense, monkeypatch):
    from cna_export.io.gguf import open_gguf

    monkeypatch.setenv(fpcache.CACHE_SWITCH, "off")
    src, twin, _, _ = dense
    ckpt, names = checkpoint_identity(src, str(src), with_fingerprint=False)[2:]
    assert len(ckpt.files) >= 3
    loaded = load_model(str(src))
    reader = open_gguf(twin)
    want = checkpoint_identity(src, str(src))[0].fingerprint
    assert scheme_of(want) == 3
    assert loaded.fingerprint() == loaded.identity().fingerprint == want
    assert gguf_fingerprint(reader) == gguf_identity(reader, "twin").fingerprint == want
    for threads in (1, 2, 5):
        assert st_io.fp32_fingerprint(ckpt, names, threads=threads) == want
        assert gguf_fingerprint(reader, threads=threads) == want
    old = _old_fingerprint(ckpt, names)  # and schemes 1 and 2 as before, from every reader
    assert loaded.fingerprint(1) == st_io.fp32_fingerprint(ckpt, names, 1) == gguf_fingerprint(reader, None, 1) == old
    two = _scheme_2(ckpt, names)
    assert loaded.fingerprint(2) == st_io.fp32_fingerprint(ckpt, names, 2) == gguf_fingerprint(reader, None, 2) == two
    assert len({old, two, want}) == 3


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2"])  # a shared expert; a dense first layer
def test_moe_readers_agree_layer_by_layer(family, tmp_path, monkeypatch):
    """A MoE layer is its experts' down projections, then the shared expert's: per-expert and fused
    checkpoints, the loaded model and the GGUF twin (one fused tensor per layer) cut the layers alike."""
    pytest.importorskip("gguf")
    from cna_export.io.gguf import open_gguf
    from cna_export.testing.gguf_twin import write_gguf_twin

    monkeypatch.setenv(fpcache.CACHE_SWITCH, "off")
    src = make_tiny_model(family, tmp_path / family)
    fused = fused_twin(src, tmp_path / f"{family}-fused")
    ident, _, ckpt, names = checkpoint_identity(src, str(src))
    assert len(names.per_layer) == ident.num_layers and sum(names.per_layer) == len(names) > ident.num_layers
    loaded = load_model(str(src))
    twin = open_gguf(write_gguf_twin(src, tmp_path / "twin.gguf", "F32"))
    got = {ident.fingerprint, checkpoint_identity(fused, str(fused))[0].fingerprint, loaded.fingerprint(),
           gguf_fingerprint(twin), gguf_fingerprint(twin, threads=1), st_io.fp32_fingerprint(ckpt, names, threads=1)}
    assert len(got) == 1 and scheme_of(got.pop()) == 3
    assert loaded.fingerprint(1) == gguf_fingerprint(twin, None, 1) == _old_fingerprint(ckpt, names)


# -- the cache ---------------------------------------------------------------------------------------------------


def test_the_cache_keeps_schemes_apart(export_sources, fp_cache, monkeypatch):
    src = export_sources[("llama", "float32", False)]
    ckpt, names = checkpoint_identity(src, str(src), with_fingerprint=False)[2:]
    calls = []
    real = st_io.fp32_fingerprint
    monkeypatch.setattr(st_io, "fp32_fingerprint", lambda *a, **k: calls.append(a[2:]) or real(*a, **k))
    one = checkpoint_fingerprint(ckpt, names, 1)
    two = checkpoint_fingerprint(ckpt, names)
    assert (scheme_of(one), scheme_of(two)) == (1, 3) and calls == [(1,), (3,)]  # the scheme-1 entry was not used
    assert checkpoint_fingerprint(ckpt, names, 1) == one and checkpoint_fingerprint(ckpt, names, 3) == two
    assert len(calls) == 2 and len(list(fp_cache.glob("*.json"))) == 2
    # an entry whose method is another scheme's is never returned, even under this scheme's key
    f = src / "model.safetensors"
    fpcache.store("gguf", [f], "ab" * 32, scheme=1)
    assert fpcache.lookup("gguf", [f], scheme=1) == "ab" * 32 and fpcache.lookup("gguf", [f], scheme=2) is None
    key = fpcache.stamp("gguf", [f], scheme=2)
    (fp_cache / f"{key}.json").write_text(json.dumps({"fingerprint": "ab" * 32, "method": FINGERPRINT_METHODS[1]}))
    assert fpcache.lookup("gguf", [f], scheme=2) is None
    # nor one whose value is another scheme's, even with this scheme's key and method (seen: an entry written by
    # code mid-change), and the next fingerprint replaces it
    (fp_cache / f"{key}.json").write_text(json.dumps({"fingerprint": "ab" * 32, "method": FINGERPRINT_METHODS[2]}))
    assert fpcache.lookup("gguf", [f], scheme=2) is None
    scheme2 = st_io.fp32_fingerprint(ckpt, names, 2)
    assert fpcache.cached("gguf", [f], lambda: two, scheme=2) == two and fpcache.lookup("gguf", [f], scheme=2) is None
    assert fpcache.cached("gguf", [f], lambda: scheme2, scheme=2) == scheme2 == fpcache.lookup("gguf", [f], scheme=2)


# -- circuits written before scheme 3 ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[1, 2])
def old_circuit(dense, tmp_path_factory, request):
    """A circuit file as written before scheme 2 (64 hex digits) or before scheme 3 ("2:" and 64 hex digits): its
    fingerprint is the old definition's."""
    src = dense[0]
    ident, _, ckpt, names = checkpoint_identity(src, str(src), with_fingerprint=False)
    old = _old_fingerprint(ckpt, names) if request.param == 1 else _scheme_2(ckpt, names)
    model = ident.model_copy(update={"fingerprint": old, "fingerprint_method": FINGERPRINT_METHODS[request.param]})
    path = tmp_path_factory.mktemp("old-circuit") / "circuit.json"
    Circuit(model=model, neurons=[Neuron(layer=1, index=3, multiplier=0.0)], method={"name": "manual"}).save(path)
    return Circuit.load(path)


def test_an_old_circuit_is_checked_in_its_scheme(dense, old_circuit, fp_cache):
    (src, _, other, _), circuit = dense, old_circuit
    scheme = scheme_of(circuit.model.fingerprint)
    assert scheme in (1, 2) and circuit.model.fingerprint_method == FINGERPRINT_METHODS[scheme]
    same = checkpoint_identity(src, str(src))[0]
    assert scheme_of(same.fingerprint) == 3
    assert circuit.check_fits(same) == []  # the model's fingerprint in the circuit's scheme equals the circuit's
    assert circuit.check_fits(load_model(str(src)).identity()) == []
    other_loaded = load_model(str(other))  # an identity hashes a loaded model again while the model is alive
    for ident in (checkpoint_identity(other, str(other))[0], other_loaded.identity()):
        with pytest.raises(CnaError, match="different weights.*--force"):
            circuit.check_fits(ident)
        (note,) = circuit.check_fits(ident, force=True)
        assert "applied anyway" in note and circuit.model.fingerprint[:12] in note
    # an identity that cannot hash its weights again is not compared across schemes, and says so
    bare = ModelIdentity.model_validate_json(same.model_dump_json())
    (note,) = circuit.check_fits(bare)
    assert "not checked" in note and f"scheme {scheme}" in note


def test_files_saved_before_scheme_3_are_compared_in_their_scheme(dense, old_circuit, fp_cache):
    """Saved statistics, refusal directions and audit caches carry the fingerprint of their time: compared in
    its scheme (ModelIdentity.differs_from), the right weights match and other weights differ."""
    (src, _, other, _), saved = dense, old_circuit.model.fingerprint
    same, different = (checkpoint_identity(p, str(p))[0] for p in (src, other))
    assert not same.differs_from(saved) and different.differs_from(saved)
    assert not same.differs_from(same.fingerprint) and different.differs_from(same.fingerprint)
    assert not same.differs_from(None)
    bare = ModelIdentity.model_validate_json(different.model_dump_json())  # cannot hash its weights again
    assert not bare.differs_from(saved) and bare.differs_from(same.fingerprint)


def test_old_circuits_still_export_and_refuse_other_weights(dense, old_circuit, tmp_path, fp_cache):
    from cna_export.export.gguf import export_gguf
    from cna_export.export.safetensors import export_safetensors

    (src, twin, other, other_twin), circuit = dense, old_circuit
    result = export_safetensors(str(src), circuit, tmp_path / "same")
    assert not any("different weights" in n for n in result.manifest.notes)
    assert result.manifest.circuit.model.fingerprint == circuit.model.fingerprint
    with pytest.raises(CnaError, match="different weights"):
        export_safetensors(str(other), circuit, tmp_path / "other")
    assert not (tmp_path / "other").exists()
    for cached in (False, True):  # hashed beside the copy, then from the fingerprint cache
        export_gguf(str(twin), circuit, tmp_path / f"same-{cached}.steered.gguf", modelfile=False)
        with pytest.raises(CnaError, match="different weights"):
            export_gguf(str(other_twin), circuit, tmp_path / "other.steered.gguf", modelfile=False)
        assert not (tmp_path / "other.steered.gguf").exists()
    forced = export_gguf(str(other_twin), circuit, tmp_path / "forced.gguf", modelfile=False, force=True)
    assert any("applied anyway" in n for n in forced.manifest.notes)


def test_new_circuits_carry_scheme_3(export_sources, tmp_path):
    from conftest import planted_circuit

    circuit = planted_circuit(export_sources[("llama", "float32", False)])
    path = tmp_path / "c.json"
    circuit.save(path)
    data = json.loads(Path(path).read_text())["model"]
    assert scheme_of(data["fingerprint"]) == 3 and data["fingerprint_method"] == FINGERPRINT_METHOD
