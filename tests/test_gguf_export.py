"""GGUF export on small files written with gguf-py's writer: every supported tensor type, both write
modes, exact KV/tensor preservation (checked against gguf.GGUFReader), fold down, bias, fused
gate_up, the Ollama Modelfile, the CLI, and the exact tensor check of the verifier."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T
from gguf.constants import GGUFValueType as V
from test_quants import UNIT_ROUNDOFF, tensor_data

from cna_export.cli import main
from cna_export.core.circuit import Circuit, ModelIdentity, Neuron
from cna_export.core.errors import CnaError
from cna_export.core.fingerprint import other_than
from cna_export.core.manifest import GGUF_KEY, ExportManifest, side_manifest_path
from cna_export.export.card import modelfile_path, render_modelfile, stop_tokens
from cna_export.export.gguf import export_gguf, read_gguf_manifest
from cna_export.io import gguf as G
from cna_export.io.identity import gguf_fingerprint
from cna_export.io.quant_layouts import LAYOUTS, get_layout
from cna_export.io.quants import dequantize_rows
from cna_export.verification.gguf import verify_gguf
from cna_export.verification.gguf_tensors import check_tensors

N_EMBD = 256  # a whole number of blocks of every type (K-quants: 256)
N_FF = 64
N_LAYERS = 2
VOCAB = ["<unk>", "<s>", "<|im_end|>", "hello", "wörld", 'say "hi"', "", "\u2581the"] + [f"t{i}" for i in range(8)]

MULTS = {(0, 1): 0.0, (0, 5): -1.0, (0, 9): 2.0, (1, 3): 0.37, (1, N_FF - 1): -2.5}
EXACT = (0.0, -1.0, 2.0)
SUPPORTED = sorted(LAYOUTS, key=lambda t: t.value)


# ---------------------------------------------------------------------------
# Building files
# ---------------------------------------------------------------------------


def build_gguf(
    path: Path,
    up_type: T = T.Q4_K,
    down_type: T = T.F16,
    arch: str = "llama",
    alignment: int | None = None,
    bias: bool = False,
    fused: bool = False,
    nested_kv: bool = False,
    seed: int = 0,
    raw_up: np.ndarray | None = None,
) -> Path:
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, arch)
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_name("tiny test model")
    w.add_block_count(N_LAYERS)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_float32(f"{arch}.rope.freq_base", 10000.5)
    w.add_float64("test.float64", 1.0 / 3.0)
    w.add_int8("test.int8", -7)
    w.add_uint8("test.uint8", 200)
    w.add_int16("test.int16", -300)
    w.add_uint16("test.uint16", 60000)
    w.add_int64("test.int64", -(2**40))
    w.add_uint64("test.uint64", 2**63 + 5)
    w.add_bool("test.bool", True)
    w.add_array("general.tags", ["a", "ü", "tag with spaces"])
    w.add_key_value("test.float_array", [0.5, -1.25, 3.0e-8], V.ARRAY, sub_type=V.FLOAT32)
    w.add_key_value("test.uint64_array", [1, 2**60], V.ARRAY, sub_type=V.UINT64)
    w.add_key_value("test.bool_array", [True, False, True], V.ARRAY, sub_type=V.BOOL)
    if nested_kv:
        w.add_key_value("test.nested", [[1, 2], [3]], V.ARRAY)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(VOCAB)
    w.add_token_types([1] * len(VOCAB))
    w.add_token_scores([float(-i) for i in range(len(VOCAB))])
    w.add_token_merges(["h e", "l l", "w ö"])
    w.add_eos_token_id(2)
    w.add_eot_token_id(5)
    w.add_bos_token_id(1)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.add_tensor("token_embd.weight", tensor_data(T.F16, len(VOCAB), N_EMBD, rng))
    for layer in range(N_LAYERS):
        w.add_tensor(f"blk.{layer}.attn_norm.weight", rng.standard_normal(N_EMBD).astype(np.float32))
        up_rows = 2 * N_FF if fused else N_FF
        up = raw_up if raw_up is not None else tensor_data(up_type, up_rows, N_EMBD, rng)
        w.add_tensor(f"blk.{layer}.ffn_up.weight", up, raw_dtype=None if up.dtype != np.uint8 else up_type)
        if bias:
            w.add_tensor(f"blk.{layer}.ffn_up.bias", rng.standard_normal(up_rows).astype(np.float32))
        if not fused:
            gate = tensor_data(T.Q8_0, N_FF, N_EMBD, rng)
            w.add_tensor(f"blk.{layer}.ffn_gate.weight", gate, raw_dtype=T.Q8_0)
        down = tensor_data(down_type, N_EMBD, N_FF, rng)
        w.add_tensor(f"blk.{layer}.ffn_down.weight", down, raw_dtype=down_type if down.dtype == np.uint8 else None)
        w.add_tensor(f"blk.{layer}.attn_k.weight", np.arange(N_EMBD * 2, dtype=np.int32).reshape(2, N_EMBD))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def circuit_for(mults=MULTS, fingerprint: str | None = None, arch: str = "llama") -> Circuit:
    ident = ModelIdentity(name="tiny", architecture=arch, num_layers=N_LAYERS, intermediate_size=N_FF,
                          hidden_size=N_EMBD, fingerprint=fingerprint, source_format="gguf")  # fmt: skip
    return Circuit(model=ident, neurons=[Neuron(layer=l, index=i) for (l, i) in sorted(mults)])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reader_kv(path: Path) -> list[tuple[str, list, object]]:
    """(name, types, value) of every KV pair as gguf.GGUFReader reads it, in file order."""
    r = gguf.GGUFReader(path)
    out = []
    for f in list(r.fields.values())[3:]:
        if f.types and f.types[0] == V.ARRAY and len(f.types) > 2:
            value = [p.tobytes() for p in f.parts[f.data[0] :]]
        else:
            value = f.contents()
        out.append((f.name, list(f.types), value))
    return out


def reader_tensors(path: Path) -> dict[str, tuple]:
    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type, t.shape.tolist(), np.array(t.data)) for t in r.tensors}


def assert_same_kv(src: Path, out: Path, added: tuple[str, ...]) -> list:
    a, b = reader_kv(src), reader_kv(out)
    kept = [x for x in b if x[0] != GGUF_KEY]  # general.name is changed in place, cna.manifest appended
    assert [x[0] for x in a] == [x[0] for x in kept], "keys or their order changed"
    for x, y in zip(a, kept):
        if x[0] in added:
            continue
        assert x[1] == y[1], f"{x[0]} changed type"
        assert x[2] == y[2], f"{x[0]} changed value"
    return b


def check_rows(src: Path, out: Path, name: str, rows: dict[int, float], qtype: T) -> None:
    a, b = reader_tensors(src)[name], reader_tensors(out)[name]
    assert a[0] == b[0] == qtype and a[1] == b[1]
    old = dequantize_rows(a[2], qtype).astype(np.float64)
    new = dequantize_rows(b[2], qtype).astype(np.float64)
    ab = a[2].reshape(a[2].shape[0], -1).view(np.uint8)
    bb = b[2].reshape(b[2].shape[0], -1).view(np.uint8)
    others = [r for r in range(old.shape[0]) if r not in rows]
    assert np.array_equal(ab[others], bb[others]), "rows outside the circuit changed"
    rtol = max(UNIT_ROUNDOFF[get_layout(qtype).scale_encoding], 1e-6)
    for r, m in rows.items():
        if m in EXACT:
            assert np.array_equal(new[r], m * old[r]), (name, r, m)
        else:
            atol = 4 * rtol * abs(m) * np.abs(old[r]).max()
            assert np.all(np.abs(new[r] - m * old[r]) <= rtol * np.abs(m * old[r]) + atol), (name, r, m)


def export(src: Path, out: Path, **kw):
    kw.setdefault("multipliers", dict(MULTS))
    kw.setdefault("modelfile", False)
    return export_gguf(str(src), kw.pop("circuit", None) or circuit_for(), out, **kw)


# ---------------------------------------------------------------------------
# Every supported type, both modes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fast", [False, True], ids=["writer", "fast-copy"])
@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_every_type_rows_scaled_and_everything_else_identical(tmp_path, qtype, fast):
    src = build_gguf(tmp_path / "src.gguf", up_type=qtype)
    before = sha(src)
    out = tmp_path / "out.gguf"
    r = export(src, out, fast_copy=fast)
    assert sha(src) == before, "the input must not change"
    added = () if fast else ("general.name", GGUF_KEY)
    kv = assert_same_kv(src, out, added)
    if not fast:
        assert kv[-1][0] == GGUF_KEY
        assert dict((k, v) for k, _, v in kv)["general.name"] == "tiny test model (CNA-steered)"
    ta, tb = reader_tensors(src), reader_tensors(out)
    assert list(ta) == list(tb)
    touched = {f"blk.{l}.ffn_up.weight" for l, _ in MULTS}
    for name in ta:
        assert ta[name][0] == tb[name][0] and ta[name][1] == tb[name][1], name
        if name not in touched:
            assert np.array_equal(ta[name][2].view(np.uint8), tb[name][2].view(np.uint8)), name
    for layer in range(N_LAYERS):
        rows = {i: m for (l, i), m in MULTS.items() if l == layer}
        check_rows(src, out, f"blk.{layer}.ffn_up.weight", rows, qtype)
    m = r.manifest
    assert {t.name for t in m.tensors} == touched and all(t.axis == "row" and t.dtype == qtype.name for t in m.tensors)
    for t in m.tensors:
        assert t.sha256_before == hashlib.sha256(ta[t.name][2].tobytes()).hexdigest()
        assert t.sha256_after == hashlib.sha256(tb[t.name][2].tobytes()).hexdigest()
    assert m.multiplier_map() == MULTS and m.fold == "up" and m.format == "gguf"
    # the exact tensor check of the verifier agrees
    tc = check_tensors(G.open_gguf(src), G.open_gguf(out), m)
    assert tc.passed, tc.failures
    assert tc.n_identical == len(ta) - len(touched)


# ---------------------------------------------------------------------------
# File layout, header, manifest
# ---------------------------------------------------------------------------


def test_alignment_header_and_manifest_kv(tmp_path):
    src = build_gguf(tmp_path / "src.gguf", alignment=64)
    out = tmp_path / "out.gguf"
    r = export(src, out)
    rd = gguf.GGUFReader(out)
    assert rd.alignment == 64 and rd.fields["general.alignment"].contents() == 64
    assert all(t.data_offset % 64 == 0 for t in rd.tensors)
    text = rd.fields[GGUF_KEY].contents()
    m = ExportManifest.from_json(text)
    assert m.to_json() == r.manifest.to_json()
    assert read_gguf_manifest(out)[0].to_json() == m.to_json()
    # raw KV bytes identical (our parser) and tensor layout identical
    a, b = G.open_gguf(src), G.open_gguf(out)
    assert G.kv_differences(a, b, ignore=("general.name", GGUF_KEY)) == []
    assert G.tensor_differences(a, b, ignore_data=[t.name for t in m.tensors]) == []
    assert G.kv_differences(a, b) == ["key cna.manifest was added", "key general.name differs (type STRING -> STRING)"]


def test_parser_matches_gguf_reader(tmp_path):
    src = build_gguf(tmp_path / "src.gguf", up_type=T.BF16, alignment=128, bias=True)
    ours, ref = G.open_gguf(src), gguf.GGUFReader(src)
    ref_fields = list(ref.fields.values())[3:]
    assert [f.name for f in G.kv_fields(ours)] == [f.name for f in ref_fields]
    for f, g in zip(G.kv_fields(ours), ref_fields):
        assert f.type == g.types[0]
        assert f.value() == g.contents(), f.name
        if f.type == V.ARRAY:
            assert f.sub_type == g.types[1] and f.count == len(g.data)
    assert ours.alignment == ref.alignment and ours.data_offset == ref.data_offset
    for t, u in zip(ours.tensors, ref.tensors):
        assert (t.name, t.tensor_type, t.data_offset, t.n_bytes) == (u.name, u.tensor_type, u.data_offset, u.n_bytes)
        assert list(t.ne) == u.shape.tolist()
        assert t.data.shape == u.data.shape and t.data.dtype == u.data.dtype and np.array_equal(t.data, u.data)
    assert ours.get_field("tokenizer.ggml.tokens").item(5) == 'say "hi"'


def test_nested_and_empty_arrays(tmp_path):
    src = build_gguf(tmp_path / "src.gguf", nested_kv=True)
    f = G.open_gguf(src).get_field("test.nested")
    assert f.sub_type == V.ARRAY and f.count == 2
    # the writer copies every KV pair's bytes as they are: a nested array (which gguf-py's writer cannot
    # write) is kept exactly, as with --fast-copy
    export(src, tmp_path / "out.gguf")
    written = G.open_gguf(tmp_path / "out.gguf")
    assert G.kv_differences(G.open_gguf(src), written, ignore=("general.name", GGUF_KEY)) == []
    assert G.open_gguf(tmp_path / "out.gguf").get_field("test.nested").raw() == f.raw()
    export(src, tmp_path / "fast.gguf", fast_copy=True)
    assert G.kv_differences(G.open_gguf(src), G.open_gguf(tmp_path / "fast.gguf")) == []

    # an empty array, written by hand (gguf-py's writer refuses them)
    empty = tmp_path / "empty.gguf"
    key = b"x.empty"
    empty.write_bytes(struct.pack("<IIQQ", gguf.GGUF_MAGIC, 3, 0, 1) + struct.pack("<Q", len(key)) + key
                      + struct.pack("<IIQ", V.ARRAY, V.INT32, 0))  # fmt: skip
    fld = G.open_gguf(empty).get_field("x.empty")
    assert fld.value() == [] and fld.count == 0
    with pytest.raises(CnaError, match="empty array"):
        fld.writer_value()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"NOPE" + bytes(40), "bad magic"),
        (struct.pack("<IIQQ", gguf.GGUF_MAGIC, 3, 0, 5) + b"\x03", "truncated"),
        (struct.pack("<II", gguf.GGUF_MAGIC, 3 << 24) + bytes(16), "big-endian"),
        (struct.pack("<IIQQ", gguf.GGUF_MAGIC, 1, 0, 0), "version 1"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, content, message):
    p = tmp_path / "bad.gguf"
    p.write_bytes(content)
    with pytest.raises(CnaError, match=message) as info:
        G.open_gguf(p)
    assert "\n" not in str(info.value)


def test_truncated_tensor_data_is_refused(tmp_path):
    src = build_gguf(tmp_path / "src.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src.read_bytes()[:-1000])
    with pytest.raises(CnaError, match="truncated"):
        G.open_gguf(cut)


# ---------------------------------------------------------------------------
# Fast copy
# ---------------------------------------------------------------------------


def test_fast_copy_changes_only_scale_bytes_of_touched_rows(tmp_path):
    src = build_gguf(tmp_path / "src.gguf", up_type=T.Q4_K)
    out = tmp_path / "fast.gguf"
    r = export(src, out, fast_copy=True, modelfile=True)
    a = np.frombuffer(src.read_bytes(), dtype=np.uint8)
    b = np.frombuffer(out.read_bytes(), dtype=np.uint8)
    assert a.size == b.size
    changed = set(np.nonzero(a != b)[0].tolist())
    layout = get_layout(T.Q4_K)
    row_bytes = N_EMBD // 256 * layout.block_bytes
    allowed = set()
    tensors = G.tensor_map(G.open_gguf(src))
    for layer, j in MULTS:
        base = tensors[f"blk.{layer}.ffn_up.weight"].data_offset + j * row_bytes
        for blk in range(row_bytes // layout.block_bytes):
            for off in layout.scale_offsets:
                allowed.update(range(base + blk * layout.block_bytes + off, base + blk * layout.block_bytes + off + 2))
    assert changed and changed <= allowed
    side = side_manifest_path(out)
    assert r.manifest_path == side and side.is_file()
    assert ExportManifest.load(side).to_json() == r.manifest.to_json()
    assert read_gguf_manifest(out)[1] == str(side)
    text = (tmp_path / "fast.Modelfile").read_text()
    assert "fast.gguf.cna_manifest.json (side file)" in text and "FROM ./fast.gguf" in text


def test_fast_copy_and_writer_patch_identical_bytes(tmp_path):
    src = build_gguf(tmp_path / "src.gguf", up_type=T.Q6_K)
    a = export(src, tmp_path / "a.gguf")
    b = export(src, tmp_path / "b.gguf", fast_copy=True)
    assert [(t.name, t.sha256_after) for t in a.manifest.tensors] == \
        [(t.name, t.sha256_after) for t in b.manifest.tensors]


# ---------------------------------------------------------------------------
# Fold down, bias, fused gate_up
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("down_type", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_fold_down_scales_float_columns(tmp_path, down_type):
    src = build_gguf(tmp_path / "src.gguf", down_type=down_type)
    out = tmp_path / "out.gguf"
    r = export(src, out, fold="down")
    ta, tb = reader_tensors(src), reader_tensors(out)
    for layer in range(N_LAYERS):
        name = f"blk.{layer}.ffn_down.weight"
        old = dequantize_rows(ta[name][2], down_type).astype(np.float64)
        new = dequantize_rows(tb[name][2], down_type).astype(np.float64)
        cols = {i: m for (l, i), m in MULTS.items() if l == layer}
        keep = [c for c in range(N_FF) if c not in cols]
        assert np.array_equal(old[:, keep], new[:, keep])
        for c, m in cols.items():
            if m in EXACT:
                assert np.array_equal(new[:, c], m * old[:, c])
            else:
                rtol = UNIT_ROUNDOFF[get_layout(down_type).scale_encoding]
                assert np.allclose(new[:, c], m * old[:, c], rtol=rtol, atol=0)
        up = f"blk.{layer}.ffn_up.weight"
        assert np.array_equal(ta[up][2], tb[up][2])
    assert {t.axis for t in r.manifest.tensors} == {"column"} and r.manifest.fold == "down"
    assert check_tensors(G.open_gguf(src), G.open_gguf(out), r.manifest).passed


def test_fold_down_refuses_quantised_down(tmp_path):
    src = build_gguf(tmp_path / "src.gguf", down_type=T.Q8_0)
    with pytest.raises(CnaError, match="ffn_down.weight is Q8_0.*--fold up"):
        export(src, tmp_path / "out.gguf", fold="down")
    assert not (tmp_path / "out.gguf").exists()


def test_up_bias_is_scaled(tmp_path):
    src = build_gguf(tmp_path / "src.gguf", bias=True)
    out = tmp_path / "out.gguf"
    r = export(src, out)
    ta, tb = reader_tensors(src), reader_tensors(out)
    for layer in range(N_LAYERS):
        name = f"blk.{layer}.ffn_up.bias"
        idx = {i: m for (l, i), m in MULTS.items() if l == layer}
        old, new = ta[name][2].astype(np.float64), tb[name][2].astype(np.float64)
        for i in range(N_FF):
            m = idx.get(i, 1.0)
            assert new[i] == np.float32(m * old[i]), (layer, i)
    assert {(t.name, t.axis) for t in r.manifest.tensors if t.name.endswith("bias")} == {
        ("blk.0.ffn_up.bias", "element"), ("blk.1.ffn_up.bias", "element")
    }
    assert check_tensors(G.open_gguf(src), G.open_gguf(out), r.manifest).passed


def test_fused_gate_up_scales_the_up_half(tmp_path):
    src = build_gguf(tmp_path / "src.gguf", arch="phi3", fused=True, up_type=T.Q8_0)
    out = tmp_path / "out.gguf"
    r = export(src, out, circuit=circuit_for(arch="phi3"))
    for layer in range(N_LAYERS):
        rows = {N_FF + i: m for (l, i), m in MULTS.items() if l == layer}
        check_rows(src, out, f"blk.{layer}.ffn_up.weight", rows, T.Q8_0)
    assert sorted(r.manifest.tensors[0].indices) == sorted(N_FF + i for (l, i) in MULTS if l == 0)


# ---------------------------------------------------------------------------
# Refusals and warnings
# ---------------------------------------------------------------------------


def test_unsupported_type_is_a_clear_error(tmp_path):
    mx = getattr(T, "MXFP4", None)
    if mx is None:
        pytest.skip("gguf-py without MXFP4")
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[mx]
    raw = np.zeros((N_FF, N_EMBD // block_elems * block_bytes), dtype=np.uint8)
    src = build_gguf(tmp_path / "src.gguf", up_type=mx, raw_up=raw)
    with pytest.raises(CnaError, match="blk.0.ffn_up.weight.*MXFP4") as info:
        export(src, tmp_path / "out.gguf")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out.gguf").exists()


def test_subnormal_scales_warn_with_worst_error(tmp_path, caplog):
    src = build_gguf(tmp_path / "src.gguf", up_type=T.Q8_0)
    with caplog.at_level(logging.WARNING, logger="cna_export"):
        r = export(src, tmp_path / "out.gguf", multipliers=None, multiplier=1e-6)
    assert r.warnings and all("subnormals" in w and "worst relative error" in w for w in r.warnings)
    assert any("subnormals" in rec.getMessage() for rec in caplog.records)
    assert any("subnormals" in n for n in r.manifest.notes)
    assert not r.reports["blk.0.ffn_up.weight"].exact


def test_overflowing_multiplier_is_refused(tmp_path):
    src = build_gguf(tmp_path / "src.gguf", up_type=T.Q8_0)
    with pytest.raises(CnaError, match="overflows"):
        export(src, tmp_path / "out.gguf", multipliers=None, multiplier=1e9)
    assert not (tmp_path / "out.gguf").exists()


def test_circuit_must_fit_and_fingerprint_needs_force(tmp_path):
    src = build_gguf(tmp_path / "src.gguf")
    fp = gguf_fingerprint(G.open_gguf(src))
    export(src, tmp_path / "same.gguf", circuit=circuit_for(fingerprint=fp))
    with pytest.raises(CnaError, match="different weights.*--force"):
        export(src, tmp_path / "other.gguf", circuit=circuit_for(fingerprint="0" * 64))
    r = export(src, tmp_path / "other.gguf", circuit=circuit_for(fingerprint="0" * 64), force=True)
    assert any("applied anyway" in n for n in r.manifest.notes)
    big = ModelIdentity(name="x", architecture="llama", num_layers=N_LAYERS, intermediate_size=N_FF * 2,
                        hidden_size=N_EMBD)
    with pytest.raises(CnaError, match="does not fit"):
        export(src, tmp_path / "x.gguf", circuit=Circuit(model=big, neurons=[Neuron(layer=0, index=N_FF + 1)]),
               multipliers=None, multiplier=0.0)


def test_outputs_are_never_overwritten_and_inputs_never_touched(tmp_path):
    src = build_gguf(tmp_path / "src.gguf")
    before = sha(src)
    out = tmp_path / "out.gguf"
    export(src, out, modelfile=True)
    first = sha(out)
    with pytest.raises(CnaError, match="already exists.*--overwrite"):
        export(src, out, modelfile=True)
    other = tmp_path / "other.gguf"
    (tmp_path / "other.Modelfile").write_text("mine")
    with pytest.raises(CnaError, match="other.Modelfile already exists"):
        export(src, other, modelfile=True)
    assert not other.exists(), "nothing is written when the Modelfile would be overwritten"
    assert (tmp_path / "other.Modelfile").read_text() == "mine"
    export(src, out, modelfile=True, overwrite=True, multipliers={k: 0.0 for k in MULTS})
    assert sha(out) != first
    with pytest.raises(CnaError, match="is the input itself"):
        export(src, src, overwrite=True)
    assert sha(src) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary files left behind"


def test_two_exports_into_one_folder_each_get_their_modelfile(tmp_path):
    src = build_gguf(tmp_path / "src.gguf")
    a = export(src, tmp_path / "a.gguf", modelfile=True, multipliers={k: 0.0 for k in MULTS})
    b = export(src, tmp_path / "b.gguf", modelfile=True, multipliers={k: -1.0 for k in MULTS})
    assert (a.modelfile, b.modelfile) == (tmp_path / "a.Modelfile", tmp_path / "b.Modelfile")
    assert "FROM ./a.gguf" in a.modelfile.read_text() and "x0," in a.modelfile.read_text()
    assert "FROM ./b.gguf" in b.modelfile.read_text() and "x-1," in b.modelfile.read_text()
    assert "-f b.Modelfile" in b.modelfile.read_text()


def test_concurrent_overwrites_publish_each_gguf_with_its_own_modelfile(tmp_path):
    """Runs writing the same GGUF with --overwrite publish the GGUF and its Modelfile in one locked step:
    whichever run is last, the Modelfile describes the GGUF beside it (issue: x0 in the Modelfile, x2 in the file)."""
    from concurrent.futures import ThreadPoolExecutor

    src = build_gguf(tmp_path / "src.gguf")
    out = tmp_path / "out.gguf"
    export(src, out, modelfile=True, fast_copy=True)

    def run(m: float) -> None:
        export(src, out, modelfile=True, overwrite=True, fast_copy=True, multipliers={k: m for k in MULTS})

    for _ in range(2):
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(run, [0.0, 2.0, -1.0, 0.5]))
        (m,) = {v for v in read_gguf_manifest(out)[0].multiplier_map().values()}
        assert f"x{m:g}," in modelfile_path(out).read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary files left behind"


def test_the_circuit_file_is_an_input(tmp_path):
    src = build_gguf(tmp_path / "src.gguf")
    circ = tmp_path / "c.json"
    circuit_for().save(circ)
    before = sha(circ)
    with pytest.raises(CnaError, match="is the input itself"):
        export_gguf(str(src), circ, circ, multipliers=dict(MULTS), overwrite=True, modelfile=False)
    assert sha(circ) == before


# ---------------------------------------------------------------------------
# Ollama Modelfile
# ---------------------------------------------------------------------------


def test_modelfile(tmp_path):
    src = build_gguf(tmp_path / "src.gguf")
    out = tmp_path / "steered model.gguf"
    r = export(src, out, modelfile=True)
    assert r.modelfile == modelfile_path(out) == tmp_path / "steered model.Modelfile"
    text = r.modelfile.read_text()
    lines = text.splitlines()
    assert lines[0].startswith("# Ollama Modelfile written by cna-export")
    assert any("5 neurons in 2 layers" in line and "ffn_up rows" in line for line in lines)
    assert 'FROM "./steered model.gguf"' in lines
    assert lines.count('PARAMETER stop "<|im_end|>"') == 1
    assert 'PARAMETER stop """say "hi""""' not in lines  # a value ending in a quote cannot be written
    assert any(line.startswith("# stop token 'say \"hi\"'") for line in lines)
    assert 'TEMPLATE """' in text  # always written: Ollama's own detection fails for some imported GGUFs
    outside = re.sub(r'TEMPLATE """.*?"""', "TEMPLATE", text, flags=re.S).splitlines()
    assert all(line.startswith(("#", "FROM ", "PARAMETER ", "TEMPLATE")) for line in outside)
    assert stop_tokens(G.open_gguf(src)) == ["<|im_end|>", 'say "hi"']
    again = render_modelfile(out, G.open_gguf(src), r.manifest, "x")
    assert again.splitlines()[-2:] == lines[-2:]


# ---------------------------------------------------------------------------
# Verifier: tensor check catches tampering
# ---------------------------------------------------------------------------


def test_tensor_check_catches_tampering(tmp_path):
    src = build_gguf(tmp_path / "src.gguf", up_type=T.Q4_1)
    out = tmp_path / "out.gguf"
    r = export(src, out, fast_copy=True)
    rep = verify_gguf(str(src), out, behaviour=False)
    assert rep.passed, rep.reasons
    # flip one byte of an untouched tensor
    bad = tmp_path / "bad.gguf"
    data = bytearray(out.read_bytes())
    t = G.tensor_map(G.open_gguf(out))["blk.1.ffn_gate.weight"]
    data[t.data_offset + 7] ^= 0xFF
    bad.write_bytes(bytes(data))
    side_manifest_path(bad).write_text(r.manifest.to_json())
    rep = verify_gguf(str(src), bad, behaviour=False)
    assert not rep.passed and any("blk.1.ffn_gate.weight bytes differ" in x for x in rep.reasons)
    # a manifest that claims another multiplier than the file carries
    lie = r.manifest.model_copy(deep=True)
    lie.multipliers[0].multiplier = 3.0
    rep = verify_gguf(str(src), out, manifest=lie, behaviour=False)
    assert not rep.passed and any("off by" in x or "not exact" in x for x in rep.reasons)
    # the wrong source
    other = build_gguf(tmp_path / "other.gguf", up_type=T.Q4_1, seed=1)
    rep = verify_gguf(str(other), out, behaviour=False)
    assert not rep.passed and any("not the one the export was made from" in x for x in rep.reasons)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def test_cli_export_gguf(tmp_path, capsys):
    src = build_gguf(tmp_path / "src.gguf", up_type=T.Q5_K)
    circ = tmp_path / "c.json"
    circuit_for().save(circ)
    mfile = tmp_path / "m.json"
    mfile.write_text(json.dumps({f"{l}:{i}": m for (l, i), m in MULTS.items()}))
    out = tmp_path / "cli.gguf"
    rc = main(["export", "--model", str(src), "--circuit", str(circ), "--multipliers", str(mfile), "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and out.is_file() and (tmp_path / "cli.Modelfile").is_file()
    assert "5 neurons in 2 layers" in text and "2 tensors (Q5_K)" in text
    assert read_gguf_manifest(out)[0].multiplier_map() == MULTS
    # --format gguf with any output name, fast copy, no Modelfile
    out2 = tmp_path / "plain-name"
    rc = main(["export", "--model", str(src), "--circuit", str(circ), "--multiplier", "0", "--out", str(out2),
               "--format", "gguf", "--fast-copy", "--no-modelfile"])  # fmt: skip
    assert rc == 0 and out2.is_file() and side_manifest_path(out2).is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--fold", "down"], "is Q8_0: scaling columns needs a float tensor"),
        (["--multiplier", "nan"], "finite"),
        (["--link"], "--link and --max-shard-size apply to safetensors"),
    ],
)
def test_cli_export_gguf_errors(tmp_path, capsys, extra, message):
    src = build_gguf(tmp_path / "src.gguf", up_type=T.Q5_K, down_type=T.Q8_0)
    circ = tmp_path / "c.json"
    circuit_for().save(circ)
    argv = ["export", "--model", str(src), "--circuit", str(circ), "--out", str(tmp_path / "o.gguf")]
    if "--multiplier" not in extra:
        argv += ["--multiplier", "0"]
    rc = main(argv + extra)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o.gguf").exists()


def test_cli_gguf_only_flags_refused_for_safetensors(tmp_path, capsys):
    circ = tmp_path / "c.json"
    circuit_for().save(circ)
    (tmp_path / "model").mkdir()
    rc = main(["export", "--model", str(tmp_path / "model"), "--circuit", str(circ), "--out", str(tmp_path / "o"),
               "--fast-copy"])
    assert rc == 2 and "apply to GGUF exports" in capsys.readouterr().err


def test_steering_a_steered_file(tmp_path):
    src = build_gguf(tmp_path / "src.gguf")
    once = export(src, tmp_path / "once.gguf", multipliers={k: 2.0 for k in MULTS})
    twice = export(tmp_path / "once.gguf", tmp_path / "twice.gguf", multipliers={k: 0.5 for k in MULTS})
    rd = G.open_gguf(tmp_path / "twice.gguf")
    assert G.field_value(rd, "general.name") == "tiny test model (CNA-steered)"  # marked once
    assert read_gguf_manifest(tmp_path / "twice.gguf")[0].multiplier_map() == {k: 0.5 for k in MULTS}
    assert any("earlier cna-export export" in n for n in twice.manifest.notes)
    # x2 then x0.5 is exact: the rows are back to the source's bytes
    assert [t.sha256_after for t in twice.manifest.tensors] == [t.sha256_before for t in once.manifest.tensors]
    with pytest.raises(CnaError, match="itself a cna-export export.*without --fast-copy"):
        export(tmp_path / "once.gguf", tmp_path / "fast.gguf", fast_copy=True)


def test_shared_prefixes_are_counted_once_and_near_ties_left_out():
    from cna_export.verification.gguf_behaviour import confident_agreement, fresh_positions, top1_margin

    assert fresh_positions([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 4], [9], [1, 2, 3, 4, 6]]) == [0, 2, 3, 0, 4]
    import torch

    logits = torch.tensor([[2.0, 2.0, 0.0], [3.0, 1.0, 0.0], [0.0, 0.05, 5.0]])
    m = top1_margin(logits)
    assert m[0] == pytest.approx(0.0) and m[1] == pytest.approx(2.0) and m[2] == pytest.approx(4.95)
    agree = np.array([0.0, 1.0, 1.0])
    assert confident_agreement(m, agree, 0.1) == 1.0
    assert confident_agreement(m, agree, 0.0) == pytest.approx(2 / 3)
    assert confident_agreement(m, agree, 10.0) == 1.0  # no confident position: nothing to disagree on


def _synthetic_comparisons(noise_growth: float, seed: int = 0):
    """Plain/hooked transformers logits and llama.cpp logits with noise; the steered pair's noise is
    ``noise_growth`` x the unsteered pair's (steering moves the logits a lot)."""
    import torch

    from cna_export.verification.gguf_behaviour import _Comparisons

    g = torch.Generator().manual_seed(seed)
    comp = _Comparisons()
    for _ in range(8):
        plain = 3 * torch.randn(12, 50, generator=g)
        hooked = plain.roll(1, dims=-1)  # a different distribution of the same entropy
        src = plain + 0.05 * torch.randn(12, 50, generator=g)
        exp = hooked + 0.05 * noise_growth * torch.randn(12, 50, generator=g)
        comp.add(plain, hooked, src, exp)
    return comp


def test_allowance_grows_with_the_steering_effect():
    import time

    from cna_export.core.settings import GGUFVerifyOptions
    from cna_export.verification.gguf_behaviour import _judge

    comp = _synthetic_comparisons(1.2)  # steered pair about 1.44x the floor, like strongly steered real exports
    b = _judge(comp, GGUFVerifyOptions(), time.perf_counter())
    m = b.metrics
    assert m["kl_ratio"] > 1.3 and m["steering_effect_mean_kl"] > 100 * m["floor_mean_kl"]
    assert m["allowed_mean_kl"] == pytest.approx(1.1 * m["floor_mean_kl"] + 0.01 * m["steering_effect_mean_kl"])
    assert 0 < m["excess_share_of_effect"] < 0.01
    assert not b.reasons, b.reasons
    # the noise floor alone (the literal rule) fails the same export, and says by how much
    strict = _judge(comp, GGUFVerifyOptions(max_effect_share=0), time.perf_counter())
    assert len(strict.reasons) == 1
    assert "above the allowed" in strict.reasons[0] and "of the steering effect" in strict.reasons[0]
    # an export whose discrepancy is a sizeable share of the steering effect fails under the defaults
    bad = _judge(_synthetic_comparisons(12.0), GGUFVerifyOptions(), time.perf_counter())
    assert bad.metrics["excess_share_of_effect"] > 0.01 and any("above the allowed" in r for r in bad.reasons)


def test_steering_reproduction_slope():
    import time

    import torch

    from cna_export.core.settings import GGUFVerifyOptions
    from cna_export.verification.gguf_behaviour import _Comparisons, _judge, steering_slope

    g = torch.Generator().manual_seed(1)

    def run(share: float, noise: float = 0.02):
        comp = _Comparisons()
        for _ in range(10):
            plain = 3 * torch.randn(9, 40, generator=g, dtype=torch.float64)
            hooked = plain + torch.randn(9, 40, generator=g, dtype=torch.float64)
            src = plain + noise * torch.randn(9, 40, generator=g, dtype=torch.float64)
            exp = src + share * (hooked - plain) + noise * torch.randn(9, 40, generator=g, dtype=torch.float64)
            comp.add(plain, hooked, src, exp)
        return comp

    exact = run(1.0, noise=0.0)
    assert steering_slope(exact.slope_terms)[0] == pytest.approx(1.0, abs=1e-12)
    good = _judge(run(1.0), GGUFVerifyOptions(), time.perf_counter())
    slope, se = good.metrics["steering_reproduced"], good.metrics["steering_reproduced_se"]
    assert abs(slope - 1) < 0.01 and 0 < se < 0.01 and not good.reasons, good.reasons
    # a tenth of the steering missing: the KL allowance (1% of the effect) lets it through, the slope does not
    short = _judge(run(0.9), GGUFVerifyOptions(), time.perf_counter())
    assert short.metrics["steering_reproduced"] == pytest.approx(0.9, abs=0.01)
    assert short.metrics["mean_kl"] <= short.metrics["allowed_mean_kl"]
    assert [r for r in short.reasons if "reproduces 9" in r and "hook-steering effect" in r] == short.reasons
    ok = {c.label: c.ok for c in short.checks}
    assert ok["steering reproduced (slope)"] is False and ok["mean KL, allowed"] is not False  # passed or undecided
    lenient = _judge(run(0.9), GGUFVerifyOptions(max_steering_error=0.15), time.perf_counter())
    assert not [r for r in lenient.reasons if "reproduces" in r]
    # no steering at all: reproduces nothing
    none = _judge(run(0.0), GGUFVerifyOptions(), time.perf_counter())
    assert abs(none.metrics["steering_reproduced"]) < 0.02 and len(none.reasons) >= 2
    assert steering_slope([]) != steering_slope([])  # nan without data


def _whole(src: Path, r) -> None:
    """``r``'s GGUF is the source with the touched tensors edited and the manifest added, nothing else."""
    a, b = G.open_gguf(src), G.open_gguf(r.out)
    assert read_gguf_manifest(r.out)[0].to_json() == r.manifest.to_json()
    assert G.kv_differences(a, b, ignore=("general.name", GGUF_KEY)) == []
    assert G.tensor_differences(a, b, ignore_data=[t.name for t in r.manifest.tensors]) == []
    written = G.tensor_map(b)
    for t in r.manifest.tensors:
        assert G.sha256_array(written[t.name].data) == t.sha256_after
        assert G.sha256_array(G.tensor_map(a)[t.name].data) == t.sha256_before
    assert b.data_offset > a.data_offset and r.out.stat().st_size == b.data_offset + sum(
        -(-int(t.n_bytes) // b.alignment) * b.alignment for t in b.tensors)


def test_a_fingerprint_check_ending_late_leaves_the_data_in_place(tmp_path, monkeypatch):
    """Without the fingerprint cache the fingerprint is hashed while the data section is copied. With --force
    the manifest's JSON is padded to the longer of its texts with and without a mismatch's note, so the data is
    copied once whether the fingerprints match or not; only a note longer than any expected moves the data after
    a larger header. Every file is as whole as any other."""
    from cna_export.export import gguf as export_module

    src = build_gguf(tmp_path / "src.gguf")
    monkeypatch.setenv("CNA_EXPORT_FINGERPRINT_CACHE", "off")
    copies = []
    write_data = G.write_data
    monkeypatch.setattr(G, "write_data", lambda *a, **k: copies.append(len(a[2])) or write_data(*a, **k))
    fp = gguf_fingerprint(G.open_gguf(src))
    other = circuit_for(fingerprint=other_than(fp))  # of the same scheme: the same manifest length but the note
    expected = export(src, tmp_path / "expected.gguf", circuit=other, force=True)
    assert any("applied anyway" in n for n in expected.manifest.notes)
    assert len(copies) == 1  # with --force the mismatch's note was expected: the data is copied once
    r = export(src, tmp_path / "late.gguf", circuit=circuit_for(fingerprint=fp), force=True)
    assert not any("applied anyway" in n for n in r.manifest.notes)
    assert len(copies) == 2 and copies[1] == copies[0]  # no note after all: the same header size, one copy
    text = G.field_value(G.open_gguf(r.out), GGUF_KEY)
    assert text.endswith(" ") and text.rstrip() == r.manifest.to_json()
    assert G.open_gguf(r.out).data_offset == G.open_gguf(expected.out).data_offset
    for done in (expected, r):
        _whole(src, done)
    # a note longer than either expected text: the header grows, the data is written again after it
    checked = export_module._Fingerprint.checked
    monkeypatch.setattr(export_module._Fingerprint, "checked", lambda self: checked(self) + ["n" * 300])
    longer = export(src, tmp_path / "longer.gguf", circuit=circuit_for(fingerprint=fp), force=True)
    assert "n" * 300 in longer.manifest.notes
    assert len(copies) == 4 and copies[3] > copies[2]
    _whole(src, longer)


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_spans_are_the_patched_copy_s_changed_bytes(qtype):
    """A row edit computed on the touched rows alone (TensorPatch.spans) writes exactly the bytes that
    patching a copy of the whole tensor changes, with the same report."""
    rng = np.random.default_rng(3)
    data = tensor_data(qtype, 48, N_EMBD, rng)
    rows, mults = [40, 3, 17, 0], [0.37, 0.0, -1.0, 2.0]
    patch = G.TensorPatch("t", qtype, "row", rows, mults)
    full, report = patch.patched_copy(data)
    spans, report2 = patch.spans(data)
    assert report2 == report and [s.offset for s in spans] == sorted(s.offset for s in spans)
    got = np.array(data, copy=True).reshape(-1).view(np.uint8)
    for s in spans:
        got[s.offset : s.offset + s.data.nbytes] = s.data
    assert got.tobytes() == np.ascontiguousarray(full).tobytes()


def test_slope_tolerance_follows_the_noise():
    """Where llama.cpp's noise is large against the edit's effect (Gemma 3: effect 1.3-2.2x the floor), an exact
    export's slope sits a few % from 1; the tolerance widens by steering_noise_share x sqrt(floor / effect).
    A backend that halves the edit still fails there; the fixed tolerance alone cannot decide the exact one."""
    import time

    import torch

    from cna_export.core.settings import GGUFVerifyOptions
    from cna_export.verification.gguf_behaviour import _Comparisons, _judge
    from cna_export.verification.gguf_judge import noise_ratio

    def run(share: float, seed: int = 3):
        g = torch.Generator().manual_seed(seed)
        comp = _Comparisons()
        for _ in range(24):
            plain = 3 * torch.randn(9, 40, generator=g, dtype=torch.float64)
            hooked = plain + 0.3 * torch.randn(9, 40, generator=g, dtype=torch.float64)
            src = plain + 0.2 * torch.randn(9, 40, generator=g, dtype=torch.float64)
            exp = src + share * (hooked - plain) + 0.05 * torch.randn(9, 40, generator=g, dtype=torch.float64)
            comp.add(plain, hooked, src, exp)
        return comp

    near = _judge(run(0.96), GGUFVerifyOptions(), time.perf_counter())
    m = near.metrics
    assert m["noise_to_effect"] == pytest.approx(noise_ratio(m["floor_mean_kl"], m["steering_effect_mean_kl"]))
    assert 0.4 < m["noise_to_effect"] < 1.0
    assert m["slope_tolerance"] == pytest.approx(0.03 + 0.05 * m["noise_to_effect"])
    assert m["steering_reproduced"] == pytest.approx(0.96, abs=0.02)
    assert near.verdict == "pass", near.reasons + near.undecided
    assert "noise/effect" in {c.label: c.tolerance for c in near.checks}["steering reproduced (slope)"] or any(
        "noise/effect" in n for n in near.notes)
    fixed = _judge(run(0.96), GGUFVerifyOptions(steering_noise_share=0), time.perf_counter())
    assert fixed.metrics["slope_tolerance"] == pytest.approx(0.03)
    assert fixed.verdict != "pass"
    halved = _judge(run(0.5), GGUFVerifyOptions(), time.perf_counter())
    assert halved.verdict == "fail" and any("reproduces 5" in r for r in halved.reasons), halved.reasons
    assert noise_ratio(0.01, 0.0) == float("inf") and noise_ratio(0.0, 1.0) == 0.0
    import pydantic

    for bad in (-0.1, float("inf"), float("nan")):
        with pytest.raises(pydantic.ValidationError):
            GGUFVerifyOptions(steering_noise_share=bad)
