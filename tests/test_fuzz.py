"""Fuzzing the readers of untrusted files with Hypothesis (issue 14, robustness).

Every harness feeds one reader malformed input and accepts exactly two outcomes: the input is
read (then every value and tensor of it is touched, so lazy decoding is exercised too), or a
:class:`CnaError` with a one-line message. Any other exception fails the test; a hang fails the
time budget of the suite; a memory blow-up fails because the module runs under an address-space
limit (``RLIMIT_AS``: what the process had mapped when the tests started plus 2 GiB), and
:func:`test_hostile_sizes_under_a_tight_memory_limit` re-reads the hostile-size inputs in a
subprocess limited to 512 MiB above its imports.

Readers: the GGUF header reader (``io.gguf.open_gguf``), the safetensors header reader and index
(``io.safetensors.Checkpoint.open`` and tensor look-ups), circuits and export manifests
(``Circuit.load``/``from_json``, ``ExportManifest.load``/``from_json``), the multipliers file
(``core.circuit.load_multipliers_file``) and recipes (``core.recipe.load_recipe``).

Inputs: explicit hostile sizes (header lengths 2^63 and 2^64-1, tensor/KV counts 2^60, huge
offsets, strings longer than the file, absurd ``n_dims``, unknown types, overlapping tensor data,
data past the end), small valid files truncated at every byte, random byte mutations of small
valid files (written with gguf-py's ``GGUFWriter`` and ``safetensors.numpy.save_file``),
structured headers built from hostile field values, and JSON/YAML that is valid but wrong (lists
for objects, NaN, huge integers, deep nesting). ``CNA_FUZZ_EXAMPLES`` sets the examples per
harness (200 by default); ``bench/fuzz.py`` runs the same harnesses for long.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cna_export.core.circuit import Circuit, ModelIdentity, Neuron, load_multipliers_file
from cna_export.core.errors import CnaError
from cna_export.core.manifest import ExportManifest, NeuronMultiplier, TouchedTensor
from cna_export.io.gguf import open_gguf, sha256_array
from cna_export.io.safetensors import Checkpoint

EXAMPLES = int(os.environ.get("CNA_FUZZ_EXAMPLES", "200"))
STATS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

_WORK = Path(tempfile.mkdtemp(prefix="cna-fuzz-"))
atexit.register(shutil.rmtree, _WORK, True)
_counter = iter(range(1 << 62))


def _fresh(name: str) -> Path:
    """A new empty folder per example: a file still memory-mapped is never rewritten under the map."""
    d = _WORK / f"{next(_counter)}"
    d.mkdir()
    return d / name


def _outcome(fn: Callable[[], Any]) -> str:
    """``accepted`` or ``refused`` (a one-line CnaError); any other exception propagates."""
    try:
        fn()
    except CnaError as e:
        msg = str(e)
        assert msg and "\n" not in msg, f"CnaError message is not one line: {msg!r}"
        return "refused"
    return "accepted"


# ---------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------

GGUF_MAGIC = 0x46554747
HOSTILE_U64 = [2**63, 2**64 - 1, 2**60, 2**32, 2**32 - 1, 2**31, 1 << 40]
HOSTILE_U32 = [2**32 - 1, 2**31, 5, 13, 255, 1000]


@lru_cache(maxsize=None)
def valid_gguf() -> bytes:
    """A small valid GGUF: every KV value kind (scalars, string, arrays incl. a nested one), 4 tensor types."""
    import gguf
    from gguf.constants import GGMLQuantizationType as T
    from gguf.constants import GGUFValueType as V

    path = _WORK / "valid.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_custom_alignment(8)
    w.add_name("fuzz")
    w.add_block_count(1)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("test.bool", True)
    w.add_int64("test.int64", -5)
    w.add_array("general.tags", ["a", "ü"])
    w.add_key_value("test.u8s", [1, 2, 3], V.ARRAY, sub_type=V.UINT8)
    w.add_key_value("test.nested", [[1, 2], [3]], V.ARRAY)
    w.add_tensor("f32", np.arange(8, dtype=np.float32).reshape(2, 4))
    w.add_tensor("f16", np.ones(4, dtype=np.float16))
    w.add_tensor("q8", np.zeros((1, 34), dtype=np.uint8), raw_dtype=T.Q8_0)
    w.add_tensor("i32", np.arange(2, dtype=np.int32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def read_gguf_fully(path: Path) -> None:
    """Open a GGUF and touch everything a caller may touch: raw KVs, values, items, tensor bytes."""
    r = open_gguf(path)
    for f in r.fields.values():
        f.raw()
        try:
            f.value()
        except CnaError:
            pass
        if int(f.type) == 9 and f.count and int(f.sub_type) != 9:
            f.item(0)
            f.item(f.count - 1)
    for t in r.tensors:
        sha256_array(t.data)
        assert t.data.nbytes == t.n_bytes


def check_gguf_bytes(blob: bytes) -> str:
    path = _fresh("x.gguf")
    path.write_bytes(blob)
    return _outcome(lambda: read_gguf_fully(path))


def _s(b: bytes, declared: int | None = None) -> bytes:
    return struct.pack("<Q", len(b) if declared is None else declared) + b


def _gguf(n_tensors: int, n_kv: int, body: bytes, version: int = 3) -> bytes:
    return struct.pack("<IIQQ", GGUF_MAGIC, version, n_tensors, n_kv) + body


def _tensor_info(name: bytes, ne: list[int], ttype: int = 0, offset: int = 0, n_dims: int | None = None) -> bytes:
    nd = len(ne) if n_dims is None else n_dims
    dims = b"".join(struct.pack("<Q", x) for x in ne)
    return _s(name) + struct.pack("<I", nd) + dims + struct.pack("<IQ", ttype, offset)


def _kv(key: bytes, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def hostile_gguf_cases() -> dict[str, bytes]:
    """Hand-made GGUF headers with hostile sizes, each of which must be refused."""
    pad = b"\0" * 64
    f32 = np.arange(4, dtype=np.float32).tobytes()
    cases = {
        "empty": b"",
        "magic only": struct.pack("<I", GGUF_MAGIC),
        "bad magic": b"GGUX" + b"\0" * 60,
        "big-endian": struct.pack(">IIQQ", GGUF_MAGIC, 3, 0, 0),
        "version 1": _gguf(0, 0, pad, version=1),
        "version 2^32-1": _gguf(0, 0, pad, version=2**32 - 1),
        "tensor count 2^60": _gguf(2**60, 0, pad),
        "tensor count 2^64-1": _gguf(2**64 - 1, 0, pad),
        "KV count 2^60": _gguf(0, 2**60, pad),
        "KV count 2^63": _gguf(0, 2**63, pad),
        "key length 2^63": _gguf(0, 1, _s(b"k", 2**63) + pad),
        "key length 2^64-1": _gguf(0, 1, _s(b"k", 2**64 - 1) + pad),
        "key not UTF-8": _gguf(0, 1, _kv(b"\xff\xfe", 4, b"\0" * 4)),
        "string value longer than the file": _gguf(0, 1, _kv(b"k", 8, _s(b"abc", 2**40))),
        "string value 2^64-1": _gguf(0, 1, _kv(b"k", 8, _s(b"abc", 2**64 - 1))),
        "last string value past the end": _gguf(0, 1, _kv(b"k", 8, _s(b"abc", 100))),
        "string value not UTF-8": _gguf(0, 1, _kv(b"k", 8, _s(b"\xc3\x28"))),
        "unknown value type": _gguf(0, 1, _kv(b"k", 77, pad)),
        "unknown array element type": _gguf(0, 1, _kv(b"k", 9, struct.pack("<IQ", 77, 1) + pad)),
        "u8 array count 2^60": _gguf(0, 1, _kv(b"k", 9, struct.pack("<IQ", 0, 2**60) + pad)),
        "u64 array count 2^61": _gguf(0, 1, _kv(b"k", 9, struct.pack("<IQ", 10, 2**61) + pad)),
        "string array count 2^60": _gguf(0, 1, _kv(b"k", 9, struct.pack("<IQ", 8, 2**60) + pad)),
        "string array item 2^63": _gguf(0, 1, _kv(b"k", 9, struct.pack("<IQ", 8, 1) + _s(b"a", 2**63))),
        "nested array count 2^60": _gguf(0, 1, _kv(b"k", 9, struct.pack("<IQ", 9, 2**60) + pad)),
        "arrays nested 5000 deep": _gguf(0, 1, _kv(b"k", 9, struct.pack("<IQ", 9, 1) * 5000
                                                   + struct.pack("<IQ", 0, 0))),
        "scalar past the end": _gguf(0, 1, _kv(b"k", 12, b"\0" * 3)),
        "duplicate key": _gguf(0, 2, _kv(b"k", 4, b"\0" * 4) * 2),
        "alignment 0": _gguf(0, 1, _kv(b"general.alignment", 4, struct.pack("<I", 0))),
        "alignment 3": _gguf(0, 1, _kv(b"general.alignment", 4, struct.pack("<I", 3))),
        "alignment as a string": _gguf(0, 1, _kv(b"general.alignment", 8, _s(b"32"))),
        "alignment as a u8 array": _gguf(0, 1, _kv(b"general.alignment", 9, struct.pack("<IQ", 0, 1) + b"\x20")),
        "n_dims 2^32-1": _gguf(1, 0, _tensor_info(b"t", [], n_dims=2**32 - 1) + pad),
        "n_dims 5": _gguf(1, 0, _tensor_info(b"t", [1, 1, 1, 1, 1]) + pad),
        "dims overflow int64": _gguf(1, 0, _tensor_info(b"t", [2**40, 2**40]) + pad),
        "dim 2^64-1 times 0": _gguf(1, 0, _tensor_info(b"t", [2**64 - 1, 0]) + pad),
        "quant dim 2^64-1 times 0": _gguf(1, 0, _tensor_info(b"t", [0, 2**64 - 1], ttype=8) + pad),
        "quant row not whole blocks": _gguf(1, 0, _tensor_info(b"t", [33, 1], ttype=8) + pad),
        "unknown tensor type": _gguf(1, 0, _tensor_info(b"t", [4], ttype=1000) + pad),
        "removed tensor type (Q4_2)": _gguf(1, 0, _tensor_info(b"t", [32], ttype=4) + pad),
        "tensor offset 2^64-1 (-1)": _gguf(1, 0, _tensor_info(b"t", [4], offset=2**64 - 1) + pad),
        "tensor offset 2^63": _gguf(1, 0, _tensor_info(b"t", [4], offset=2**63) + pad),
        "tensor data past the end": _gguf(1, 0, _tensor_info(b"t", [1000]) + f32),
        "overlapping tensor data": _gguf(2, 0, _tensor_info(b"a", [4]) + _tensor_info(b"b", [4], offset=8)
                                         + b"\0" * 8 + f32 * 2),
        "duplicate tensor": _gguf(2, 0, _tensor_info(b"a", [1]) + _tensor_info(b"a", [1], offset=32) + b"\0" * 80),
        "tensor name 2^63": _gguf(1, 0, _s(b"t", 2**63) + pad),
        "tensor name not UTF-8": _gguf(1, 0, _tensor_info(b"\xff", [1]) + pad),
    }
    valid = valid_gguf()
    cases["valid file cut before its tensor data"] = valid[: len(valid) - 40]
    return cases


@st.composite
def gguf_mutations(draw: st.DrawFn) -> bytes:
    """A valid GGUF with a few bytes, words or lengths overwritten by hostile values, or cut, or spliced."""
    blob = bytearray(valid_gguf())
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["byte", "u32", "u64", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, len(blob) - 1))
        if kind == "byte":
            blob[pos] = draw(st.integers(0, 255))
        elif kind == "u32":
            blob[pos : pos + 4] = struct.pack("<I", draw(st.sampled_from(HOSTILE_U32) | st.integers(0, 2**32 - 1)))
        elif kind == "u64":
            blob[pos : pos + 8] = struct.pack("<Q", draw(st.sampled_from(HOSTILE_U64) | st.integers(0, 2**64 - 1)))
        elif kind == "cut":
            del blob[pos:]
            if not blob:
                break
        elif kind == "insert":
            blob[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del blob[pos : pos + draw(st.integers(1, 16))]
            if not blob:
                break
    return bytes(blob)


_u64 = st.sampled_from(HOSTILE_U64) | st.integers(0, 300)
_maybe = lambda honest, hostile: st.one_of(st.just(honest), hostile)  # noqa: E731


@st.composite
def gguf_structured(draw: st.DrawFn) -> bytes:
    """A GGUF header built field by field, each count/length/type honest or hostile."""
    body = b""
    kvs = draw(st.lists(st.tuples(st.binary(max_size=12), st.integers(0, 12)), max_size=4))
    for key, vtype in kvs:
        vtype = draw(_maybe(vtype, st.integers(0, 2**32 - 1)))
        body += _s(key, draw(_maybe(len(key), _u64)))
        body += struct.pack("<I", vtype)
        if vtype == 8:
            s = draw(st.binary(max_size=8))
            body += _s(s, draw(_maybe(len(s), _u64)))
        elif vtype == 9:
            sub = draw(st.integers(0, 12))
            count = draw(st.integers(0, 4))
            body += struct.pack("<IQ", draw(_maybe(sub, st.integers(0, 2**32 - 1))), draw(_maybe(count, _u64)))
            body += draw(st.binary(max_size=40))
        else:
            body += draw(st.binary(max_size=8))
    tensors = draw(st.lists(st.tuples(st.binary(max_size=6), st.lists(st.integers(0, 64), max_size=4),
                                      st.sampled_from([0, 1, 8, 24, 26, 30, 12, 2])), max_size=3))
    offset = 0
    for name, ne, ttype in tensors:
        ne = draw(_maybe(ne, st.lists(_u64, max_size=5)))
        n_dims = draw(_maybe(len(ne), st.integers(0, 2**32 - 1)))
        off = draw(_maybe(offset, _u64 | st.integers(0, 64)))
        body += _tensor_info(name, ne, draw(_maybe(ttype, st.integers(0, 2**32 - 1))), off, n_dims=n_dims)
        offset += 32 * (1 + int(np.prod(ne, dtype=np.float64)) if ne and max(ne) < 2**20 else 32)
    n_tensors = draw(_maybe(len(tensors), _u64))
    n_kv = draw(_maybe(len(kvs), _u64))
    version = draw(st.sampled_from([3, 3, 3, 2, 1, 4]))
    return _gguf(n_tensors, n_kv, body + draw(st.binary(max_size=256)), version=version)


# ---------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------


@lru_cache(maxsize=None)
def valid_safetensors() -> bytes:
    from safetensors.numpy import save_file

    path = _WORK / "valid.safetensors"
    save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, dtype=np.float16),
               "c": np.array([3], dtype=np.int64)}, str(path), metadata={"format": "pt"})  # fmt: skip
    return path.read_bytes()


def read_checkpoint_fully(folder: Path) -> None:
    """Open a checkpoint folder and read every tensor's dtype, shape, bytes and every shard's metadata."""
    ckpt = Checkpoint.open(folder)
    for file in ckpt.files:
        ckpt.metadata(file)
    for name in ckpt.weight_map:
        ckpt.info(name)
        ckpt.read(name)


def check_safetensors_bytes(blob: bytes) -> str:
    path = _fresh("model.safetensors")
    path.write_bytes(blob)
    return _outcome(lambda: read_checkpoint_fully(path.parent))


def _st(header: bytes, data: bytes = b"", declared: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if declared is None else declared) + header + data


def hostile_safetensors_cases() -> dict[str, bytes]:
    def h(obj: Any, data: bytes = b"\0" * 16, declared: int | None = None) -> bytes:
        return _st(json.dumps(obj).encode(), data, declared)

    t = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    return {
        "empty": b"",
        "4 bytes": b"\x10\0\0\0",
        "header length 2^63": _st(b"{}", declared=2**63),
        "header length 2^64-1": _st(b"{}", declared=2**64 - 1),
        "header length past the end": _st(b"{}", declared=1000),
        "header length 0": _st(b"", b"{}"),
        "header is a list": h([t]),
        "header is a number": h(1),
        "header is null": h(None),
        "header not UTF-8": _st(b'{"\xff": 1}'),
        "header nested 10000 deep": _st(b"[" * 10000 + b"]" * 10000),
        "NaN shape": _st(b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', b"\0" * 8),
        "huge int shape": _st(b'{"a": {"dtype": "F32", "shape": [' + b"9" * 400 + b'], "data_offsets": [0, 8]}}'),
        "negative shape": h({"a": {**t, "shape": [-2]}}),
        "shape 2^63": h({"a": {**t, "shape": [2**63]}}),
        "shape product overflows": h({"a": {**t, "shape": [2**32, 2**32, 2**32]}}),
        "negative offset": h({"a": {**t, "data_offsets": [-8, 0]}}),
        "reversed offsets": h({"a": {**t, "data_offsets": [8, 0]}}),
        "offsets 2^64-1": h({"a": {**t, "data_offsets": [2**64 - 8, 2**64 - 1]}}),
        "offsets past the data": h({"a": {**t, "shape": [1000], "data_offsets": [0, 4000]}}),
        "overlapping tensors": h({"a": t, "b": {**t, "data_offsets": [4, 12]}}),
        "offsets disagree with shape": h({"a": {**t, "shape": [3]}}),
        "unknown dtype": h({"a": {**t, "dtype": "F128"}}),
        "dtype is a list": h({"a": {**t, "dtype": ["F32"]}}),
        "tensor entry is a list": h({"a": [1, 2]}),
        "metadata not strings": h({"__metadata__": {"format": 1}, "a": t}),
        "metadata is a list": h({"__metadata__": ["pt"], "a": t}),
        "valid file cut in its data": valid_safetensors()[:-3],
    }


def _json_values(max_leaves: int = 12) -> st.SearchStrategy:
    scalars = (st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70)
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
    return st.recursive(scalars,
                        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                        max_leaves=max_leaves)


# raw JSON snippets that json.dumps cannot produce but a file can hold
RAW_JSON = ["NaN", "-Infinity", "1e999", "9" * 5000, "-0", "[" * 3000 + "]" * 3000, '"\\ud800"', "1.5", "null", "{}"]
_PLACEHOLDER = "\u2603FUZZ\u2603"


@st.composite
def mutated_json(draw: st.DrawFn, base: Any) -> str:
    """``base`` with one to three values (at any depth) replaced by random JSON or a raw hostile snippet."""
    data = json.loads(json.dumps(base))
    raws = []
    for _ in range(draw(st.integers(1, 3))):
        node, path = data, []
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else list(range(len(node)))))
            path.append((node, key))
            node = node[key]
        if not path:
            return json.dumps(draw(_json_values())) if draw(st.booleans()) else draw(st.sampled_from(RAW_JSON))
        parent, key = path[-1]
        if draw(st.booleans()):
            raws.append(draw(st.sampled_from(RAW_JSON)))
            parent[key] = _PLACEHOLDER + str(len(raws) - 1)
        elif isinstance(parent, dict) and draw(st.booleans()):
            del parent[key]
        else:
            parent[key] = draw(_json_values())
    text = json.dumps(data)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(_PLACEHOLDER + str(i)), raw)
    return text


@st.composite
def safetensors_structured(draw: st.DrawFn) -> bytes:
    """A safetensors file whose JSON header is a mutated valid header, with an honest or hostile length."""
    valid = valid_safetensors()
    (n,) = struct.unpack_from("<Q", valid)
    header = json.loads(valid[8 : 8 + n])
    text = draw(mutated_json(header)).encode("utf-8", "surrogatepass")
    declared = draw(_maybe(len(text), st.sampled_from([2**63, 2**64 - 1, 0, 1, len(text) + 1, max(len(text) - 1, 0)])))
    return _st(text, valid[8 + n :], declared)


@st.composite
def safetensors_index(draw: st.DrawFn) -> tuple[str, bytes]:
    """(index JSON, shard bytes): a mutated index of a one-shard checkpoint, paths included."""
    shard = "model-00001-of-00001.safetensors"
    base = {"metadata": {"total_size": 56}, "weight_map": {"a": shard, "b": shard, "c": shard}}
    hostile_paths = ["../x.safetensors", "/etc/passwd", "..", "", ".", "a/../../b", "\0", "C:\\x", shard + "/x"]
    if draw(st.booleans()):
        wm = dict(base["weight_map"])
        wm[draw(st.sampled_from(["a", "b", "z"]))] = draw(st.sampled_from(hostile_paths) | _json_values(4))
        text = json.dumps({**base, "weight_map": wm})
    else:
        text = draw(mutated_json(base))
    return text, valid_safetensors()


def check_safetensors_index(case: tuple[str, bytes]) -> str:
    text, shard = case
    index = _fresh("model.safetensors.index.json")
    index.write_text(text, "utf-8", errors="surrogatepass")
    (index.parent / "model-00001-of-00001.safetensors").write_bytes(shard)
    return _outcome(lambda: read_checkpoint_fully(index.parent))


# ---------------------------------------------------------------------------
# Circuits, export manifests, multipliers, recipes
# ---------------------------------------------------------------------------


@lru_cache(maxsize=None)
def valid_circuit() -> Circuit:
    ident = ModelIdentity(name="tiny", architecture="llama", num_layers=2, intermediate_size=8, hidden_size=4,
                          fingerprint="ab" * 32)  # fmt: skip
    return Circuit(model=ident, neurons=[Neuron(layer=0, index=1, multiplier=0.0), Neuron(layer=1, index=7, score=2.5)],
                   method={"name": "manual"}, per_layer_counts={0: 1, 1: 1})  # fmt: skip


@lru_cache(maxsize=None)
def valid_manifest() -> ExportManifest:
    return ExportManifest(
        format="safetensors", source="/models/tiny", source_format="hf", fold="down", circuit=valid_circuit(),
        multipliers=[NeuronMultiplier(layer=0, index=1, multiplier=0.0)],
        tensors=[TouchedTensor(name="model.layers.0.mlp.down_proj.weight", dtype="float32", shape=[4, 8],
                               sha256_before="0" * 64, sha256_after="1" * 64, axis="column", indices=[1],
                               file="model.safetensors")],
    )  # fmt: skip


def _text_or_bytes(structured: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(structured, structured, structured, st.text(max_size=64), st.binary(max_size=64))


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, "utf-8", errors="surrogatepass")
    return path


def check_circuit(content: str | bytes) -> str:
    path = _write(_fresh("circuit.json"), content)
    if isinstance(content, str):
        _outcome(lambda: Circuit.from_json(content))
    return _outcome(lambda: Circuit.load(path).multipliers(0.5))


def check_manifest(content: str | bytes) -> str:
    path = _write(_fresh("cna_manifest.json"), content)
    if isinstance(content, str):
        _outcome(lambda: ExportManifest.from_json(content))
    _outcome(lambda: ExportManifest.load(path.parent))
    return _outcome(lambda: ExportManifest.load(path).multiplier_map())


def check_multipliers(content: str | bytes) -> str:
    import warnings

    path = _write(_fresh("mults.json"), content)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _outcome(lambda: load_multipliers_file(path, valid_circuit()))


@st.composite
def multipliers_json(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        return draw(mutated_json({"0:1": 0.0, "1:7": -1.5}))
    return draw(mutated_json([{"layer": 0, "index": 1, "multiplier": 0.0}, {"layer": 1, "index": 7, "multiplier": 2}]))


RECIPE = {"name": "fuzz", "positive": "p.txt", "negative": "n.txt", "score": "mean-diff", "top_fraction": 0.001,
          "batch_size": 16, "export": {"multiplier": 0.0}}  # fmt: skip
HOSTILE_YAML = [
    "a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\nd: &d [*c, *c]\ne: &e [*d, *d]\nf: &f [*e, *e]\n"
    "g: &g [*f, *f]\nh: &h [*g, *g]\ni: &i [*h, *h]\nj: [*i, *i]\n",  # billion laughs
    "positive: " + "[" * 3000 + "]" * 3000,
    "!!python/object/apply:os.system ['true']",
    "positive: !!python/name:os.system",
    "batch_size: " + "9" * 5000,
    "top_fraction: .nan",
    "batch_size: .inf",
    "- a\n- b",
    "a: 1\na: 2",
    "\t\x00",
    "? [a, b]\n: c",
    "positive: *undefined",
    "%YAML 9.9\n---\na: 1",
]


@st.composite
def recipe_yaml(draw: st.DrawFn) -> str:
    import yaml

    if draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from(HOSTILE_YAML))
    text = draw(mutated_json(RECIPE))  # JSON is YAML (flow style)
    if draw(st.booleans()):
        return text
    try:
        return yaml.safe_dump(json.loads(text))
    except (ValueError, RecursionError):
        return text


def check_recipe(content: str | bytes) -> str:
    from cna_export.core.recipe import load_recipe

    path = _write(_fresh("recipe.yaml"), content)
    try:
        load_recipe(path)
    except CnaError as e:
        assert "\n" not in str(e), f"multi-line error: {e!r}"  # e.g. an unknown key '\n'
        return "refused"
    return "accepted"


# ---------------------------------------------------------------------------
# Harness table (shared with bench/fuzz.py)
# ---------------------------------------------------------------------------

HARNESSES: dict[str, tuple[Callable[[], st.SearchStrategy], Callable[[Any], str]]] = {
    "gguf-mutations": (gguf_mutations, check_gguf_bytes),
    "gguf-structured": (gguf_structured, check_gguf_bytes),
    "safetensors-header": (safetensors_structured, check_safetensors_bytes),
    "safetensors-bytes": (lambda: st.binary(max_size=64).map(lambda b: b + valid_safetensors()[len(b):]),
                          check_safetensors_bytes),
    "safetensors-index": (safetensors_index, check_safetensors_index),
    "circuit": (lambda: _text_or_bytes(mutated_json(json.loads(valid_circuit().to_json()))), check_circuit),
    "export-manifest": (lambda: _text_or_bytes(mutated_json(json.loads(valid_manifest().to_json()))), check_manifest),
    "multipliers": (lambda: _text_or_bytes(multipliers_json()), check_multipliers),
    "recipe": (lambda: _text_or_bytes(recipe_yaml()), check_recipe),
}


def run_harness(name: str, examples: int, database: Any = None) -> collections.Counter:
    """Run one harness for ``examples`` inputs; returns the outcome counts (a failure raises)."""
    strategy, check = HARNESSES[name]

    @settings(max_examples=examples, deadline=None, database=database, derandomize=False,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(strategy())
    def inner(x: Any) -> None:
        STATS[name][check(x)] += 1

    inner()
    return STATS[name]


def run_explicit(name: str) -> collections.Counter:
    """The explicit (non-random) inputs of a harness: hostile sizes, every truncation of a valid file."""
    counts: collections.Counter = collections.Counter()
    if name == "gguf-hostile":
        for label, blob in hostile_gguf_cases().items():
            got = check_gguf_bytes(blob)
            # a non-UTF-8 string value is kept as raw bytes (exports copy it byte for byte); decoding it is refused
            assert got == "refused" or label == "string value not UTF-8", label
            counts[got] += 1
    elif name == "safetensors-hostile":
        for label, blob in hostile_safetensors_cases().items():
            assert check_safetensors_bytes(blob) == "refused", label
            counts["refused"] += 1
    elif name == "gguf-truncations":
        valid = valid_gguf()
        assert check_gguf_bytes(valid) == "accepted"
        for n in range(len(valid)):
            assert check_gguf_bytes(valid[:n]) == "refused", f"cut at byte {n}"
            counts["refused"] += 1
    elif name == "safetensors-truncations":
        valid = valid_safetensors()
        assert check_safetensors_bytes(valid) == "accepted"
        for n in range(len(valid)):
            assert check_safetensors_bytes(valid[:n]) == "refused", f"cut at byte {n}"
            counts["refused"] += 1
    elif name == "json-hostile":
        for raw in RAW_JSON + ["[1, 2]", '{"circuit": 1}', '{"circuit": []}', '{"schema_version": 1}', "\ufeff{}"]:
            for check in (check_circuit, check_manifest, check_multipliers):
                counts[check(raw)] += 1
            counts[check_circuit(raw.encode("utf-16"))] += 1
    elif name == "recipe-hostile":
        for text in HOSTILE_YAML:
            counts[check_recipe(text)] += 1
    else:
        raise KeyError(name)
    STATS[name].update(counts)
    return counts


EXPLICIT = ["gguf-hostile", "gguf-truncations", "safetensors-hostile", "safetensors-truncations", "json-hostile",
            "recipe-hostile"]  # fmt: skip


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


def _vm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@pytest.fixture(scope="module", autouse=True)
def memory_limit():
    """Run the module under an address-space limit: a reader that allocates from an unchecked size fails."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    vm = _vm_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = None if vm is None else vm + (2 << 30)
    if limit is None or (hard != resource.RLIM_INFINITY and limit > hard):
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _no_gaps(counts: collections.Counter) -> None:
    gaps = {k: v for k, v in counts.items() if k.startswith("gap:")}
    assert not gaps, f"non-CnaError exceptions escaped: {gaps}"


@pytest.mark.parametrize("name", EXPLICIT)
def test_explicit_hostile_inputs(name):
    counts = run_explicit(name)
    assert sum(counts.values()) > 0
    _no_gaps(counts)


@pytest.mark.parametrize("name", list(HARNESSES))
def test_fuzz(name):
    counts = run_harness(name, EXAMPLES)
    assert sum(counts.values()) > 0
    _no_gaps(counts)


_SUBPROCESS = """
import resource, sys
sys.path.insert(0, {tests!r})
import test_fuzz as F
import torch, safetensors.torch  # imported before the limit: the readers' own allocations are what is limited
F.valid_gguf(); F.valid_safetensors()
vm = F._vm_bytes()
resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
for name in ("gguf-hostile", "safetensors-hostile", "json-hostile"):
    print(name, dict(F.run_explicit(name)))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and /proc are Linux")
def test_hostile_sizes_under_a_tight_memory_limit():
    """The hostile-size inputs again, in a process that may map only 512 MiB more than its imports."""
    code = _SUBPROCESS.format(tests=str(Path(__file__).parent))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "gguf-hostile" in res.stdout and "safetensors-hostile" in res.stdout
