"""Streaming shard rewrite (kernel copy + patched tensors) and the fingerprint cache."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PLANTED, planted_circuit
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cna_export.core.fingerprint import SCHEME
from cna_export.io import fpcache
from cna_export.io import safetensors as st_io
from cna_export.io.identity import checkpoint_identity, gguf_fingerprint


def _shard(path: Path, dtypes=(torch.float32, torch.bfloat16, torch.float16), seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, dt in enumerate(dtypes):
        tensors[f"t{i}.weight"] = torch.randn(5 + i, 7, generator=g).to(dt)
    tensors["norm"] = torch.ones(3)
    save_file(tensors, path, metadata={"format": "pt", "keep": "me"})
    return tensors


def test_rewrite_shard_replaces_only_the_named_tensors(tmp_path):
    src, dst = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tensors = _shard(src)
    before = src.read_bytes()
    new = {"t0.weight": tensors["t0.weight"] * 0, "t2.weight": -tensors["t2.weight"]}
    st_io.rewrite_shard(src, dst, new, {"cna_export": "x"})
    assert src.read_bytes() == before  # the input is never modified
    out = load_file(dst)
    assert set(out) == set(tensors)
    for name, t in tensors.items():
        want = new.get(name, t)
        assert out[name].dtype == t.dtype and torch.equal(out[name], want)
    with safe_open(dst, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "keep": "me", "cna_export": "x"}
    raw = dst.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert (8 + n) % 8 == 0 and json.loads(raw[8:8 + n])["t1.weight"]["dtype"] == "BF16"
    assert os.stat(dst).st_mode & 0o044 == 0o044  # a model shard is readable by others


def test_rewrite_shard_refuses_a_changed_dtype_or_shape(tmp_path):
    src = tmp_path / "a.safetensors"
    tensors = _shard(src)
    with pytest.raises(ValueError, match="changes its dtype or shape"):
        st_io.rewrite_shard(src, tmp_path / "b.safetensors", {"t0.weight": tensors["t0.weight"].half()}, {})
    with pytest.raises(ValueError, match="changes its dtype or shape"):
        st_io.rewrite_shard(src, tmp_path / "c.safetensors", {"t0.weight": tensors["t0.weight"][:-1]}, {})
    with pytest.raises(ValueError, match="has no tensor"):
        st_io.rewrite_shard(src, tmp_path / "d.safetensors", {"nope": tensors["norm"]}, {})


def test_rewrite_shard_without_the_kernel_copy(tmp_path, monkeypatch):
    """Where copy_file_range is missing (or refuses), the bytes go through a buffer: same file."""
    src = tmp_path / "a.safetensors"
    tensors = _shard(src)
    new = {"t1.weight": tensors["t1.weight"] * 2}
    st_io.rewrite_shard(src, tmp_path / "kernel.safetensors", new, {"k": "v"})
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    st_io.rewrite_shard(src, tmp_path / "buffer.safetensors", new, {"k": "v"})
    assert (tmp_path / "kernel.safetensors").read_bytes() == (tmp_path / "buffer.safetensors").read_bytes()


@settings(max_examples=25, deadline=None)
@given(picks=st.lists(st.booleans(), min_size=4, max_size=4), seed=st.integers(0, 2**16))
def test_rewrite_shard_equals_save_file(tmp_path_factory, picks, seed):
    """Any subset of replaced tensors: the streamed shard holds what save_file would have written."""
    d = tmp_path_factory.mktemp("rw")
    src = d / "a.safetensors"
    tensors = _shard(src, seed=seed)
    names = sorted(tensors)
    g = torch.Generator().manual_seed(seed + 1)
    new = {n: torch.randn(tensors[n].shape, generator=g).to(tensors[n].dtype)
           for n, p in zip(names, picks, strict=True) if p}
    st_io.rewrite_shard(src, d / "b.safetensors", new, {"m": "1"})
    save_file({**tensors, **new}, d / "ref.safetensors", metadata={"format": "pt", "keep": "me", "m": "1"})
    a, b = load_file(d / "b.safetensors"), load_file(d / "ref.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_save_stored_writes_what_save_file_writes(tmp_path, dtype):
    """Tensors held as stored (bfloat16 as its bits) written by save_stored: the same header entries, layout and
    bytes as safetensors' own save_file (the metadata's order aside), and the library reads them back."""
    import struct

    from cna_export.io.float_bits import STORAGE

    g = torch.Generator().manual_seed(0)
    tensors = {"z.lora_B.weight": torch.randn(7, 3, generator=g).to(dtype),
               "a.lora_A.weight": torch.randn(3, 11, generator=g).to(dtype), "m.empty": torch.zeros(0, 4, dtype=dtype)}
    name = str(dtype).removeprefix("torch.")
    stored = {k: (v.view(torch.int16).numpy().view(STORAGE[name]) if dtype == torch.bfloat16 else v.numpy(), name)
              for k, v in tensors.items()}
    st_io.save_stored(stored, tmp_path / "n.safetensors", {"format": "pt", "x": "y"})
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt", "x": "y"})

    def parts(path: Path) -> tuple[dict, bytes, int]:
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        return json.loads(raw[8:8 + n]), raw[8 + n:], n

    (ha, da, na), (hb, db, nb) = parts(tmp_path / "n.safetensors"), parts(tmp_path / "t.safetensors")
    assert ha == hb and da == db and na == nb and (8 + na) % 8 == 0
    back = load_file(tmp_path / "n.safetensors")
    assert all(torch.equal(back[k].view(torch.uint8), tensors[k].view(torch.uint8)) for k in tensors)


# -- patched shard (kernel copy + touched rows/columns) -----------------------------------------


def _patch_source(path: Path, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    tensors = {"a.bias": torch.randn(6, generator=g).to(dtype), "b.weight": torch.randn(37, 11, generator=g).to(dtype),
               "c.experts": torch.randn(3, 5, 4, generator=g).to(dtype), "d.norm": torch.ones(9, dtype=dtype),
               "e.weight": torch.randn(8, 13, generator=g).to(dtype)}
    save_file(tensors, path, metadata={"format": "pt"})
    return tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("axis", ["column", "row"])
@pytest.mark.parametrize("chunk", [1 << 24, 64])
def test_patch_shard_equals_a_full_patch_in_memory(tmp_path, monkeypatch, dtype, axis, chunk):
    """The kernel copy with touched rows/columns written over it (or streamed) gives the bytes of scaling whole
    tensors in memory and writing them, for 1-D, 2-D and fused 3-D tensors, and its hashes are theirs."""
    from cna_export.export.fold import scale_slices, scale_stored
    from cna_export.io.shard_patch import SlicePatch, patch_shard
    from cna_export.io.tensor_bytes import tensor_sha256

    monkeypatch.setattr("cna_export.io.shard_patch.CHUNK", chunk)  # 64 bytes: rows streamed a few at a time
    src = tmp_path / "a.safetensors"
    tensors = _patch_source(src, dtype)
    picks = {"b.weight": ([7, 0, 10, 3] if axis == "column" else [36, 2, 11], [0.0, -1.0, 0.37, 3.5]),
             "c.experts": ([1, 9, 11, 4] if axis == "column" else [0, 14, 7], [2.0, 0.1, -0.5, 1e4]),
             "e.weight": ([12] if axis == "column" else [7], [0.5])}
    if axis == "row":
        picks["a.bias"] = ([5, 1], [-2.0, 0.3])
    patches = [SlicePatch(n, axis, idx, ms[: len(idx)]) for n, (idx, ms) in picks.items()]
    names = frozenset(picks)
    done = patch_shard(src, tmp_path / "patched.safetensors", patches, {"cna_export": "x"}, scale_stored,
                       hash_before=names, hash_after=names)
    new = {n: scale_slices(tensors[n], "element" if tensors[n].dim() == 1 else axis, idx, ms[: len(idx)])
           for n, (idx, ms) in picks.items()}
    st_io.rewrite_shard(src, tmp_path / "memory.safetensors", new, {"cna_export": "x"})
    assert (tmp_path / "patched.safetensors").read_bytes() == (tmp_path / "memory.safetensors").read_bytes()
    assert any(not torch.equal(new[n], tensors[n]) for n in new)  # the edit changed something
    for n in picks:
        assert done[n].sha256_before == tensor_sha256(tensors[n]) and done[n].sha256_after == tensor_sha256(new[n])
    idx = picks["b.weight"][0]
    want = new["b.weight"][:, idx] if axis == "column" else new["b.weight"][idx]
    assert done["b.weight"].edit == want.contiguous().view(torch.uint8).numpy().tobytes()


def test_patch_shard_refuses_bad_indices_and_integer_tensors(tmp_path):
    from cna_export.core.errors import CnaError
    from cna_export.export.fold import scale_stored
    from cna_export.io.shard_patch import SlicePatch, patch_shard

    src = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(4, 3), "i": torch.ones(4, 3, dtype=torch.int32),
               "f8": torch.ones(4, 3).to(torch.float8_e4m3fn)}, src)
    for patch, message in [(SlicePatch("w", "column", [3], [0.0]), "out of range"),
                           (SlicePatch("w", "row", [1, 1], [0.0, 2.0]), "listed twice"),
                           (SlicePatch("i", "column", [0], [0.0]), "int32 tensor .not floating point"),
                           (SlicePatch("f8", "row", [0], [0.0]), "float8_e4m3fn tensor .float64, float32")]:
        with pytest.raises(CnaError, match=message):
            patch_shard(src, tmp_path / "b.safetensors", [patch], {}, scale_stored)
    with pytest.raises(ValueError, match="has no tensor"):
        patch_shard(src, tmp_path / "b.safetensors", [SlicePatch("nope", "row", [0], [0.0])], {}, scale_stored)


# -- fingerprint cache ----------------------------------------------------------------------


@pytest.fixture()
def fp_cache(tmp_path, monkeypatch):
    folder = tmp_path / "fp-cache"
    monkeypatch.setenv(fpcache.CACHE_SWITCH, str(folder))
    return folder


def test_fingerprint_is_hashed_once_then_read_from_the_cache(export_sources, fp_cache, monkeypatch):
    src = export_sources[("llama", "float32", True)]
    first = checkpoint_identity(src, str(src))[0].fingerprint
    assert len(list(fp_cache.glob("*.json"))) == 1
    calls = []
    real = st_io.fp32_fingerprint
    monkeypatch.setattr(st_io, "fp32_fingerprint", lambda *a: calls.append(1) or real(*a))
    assert checkpoint_identity(src, str(src))[0].fingerprint == first and calls == []
    monkeypatch.setenv(fpcache.CACHE_SWITCH, "off")
    assert checkpoint_identity(src, str(src))[0].fingerprint == first and calls == [1]


def test_a_changed_file_is_hashed_again(export_sources, fp_cache, tmp_path):
    import shutil

    src = tmp_path / "copy"
    shutil.copytree(export_sources[("llama", "float32", False)], src)
    first = checkpoint_identity(src, str(src))[0].fingerprint
    shard = src / "model.safetensors"
    tensors = load_file(shard)
    name = next(n for n in tensors if "down_proj" in n)
    tensors[name] = tensors[name] * 2
    stat = shard.stat()
    save_file(tensors, shard, metadata={"format": "pt"})
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old modification time
    second = checkpoint_identity(src, str(src))[0].fingerprint
    assert second != first
    assert second == fpcache.lookup("safetensors", [shard], extra=json.dumps(checkpoint_identity(
        src, str(src), with_fingerprint=False)[3]), scheme=SCHEME)


def test_a_file_changed_while_hashing_is_not_cached(tmp_path, fp_cache):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")

    def compute():
        time.sleep(0.01)
        f.write_bytes(b"abd")
        return "0" * 64

    assert fpcache.cached("x", [f], compute) == "0" * 64
    assert fpcache.lookup("x", [f]) is None and not list(fp_cache.glob("*.json"))


def test_a_corrupt_or_unwritable_cache_is_ignored(tmp_path, monkeypatch):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv(fpcache.CACHE_SWITCH, str(blocker / "sub"))
    assert fpcache.cached("x", [f], lambda: "1" * 64) == "1" * 64  # no error, nothing stored
    monkeypatch.setenv(fpcache.CACHE_SWITCH, str(tmp_path / "c"))
    fpcache.store("x", [f], "2" * 64)
    (entry,) = (tmp_path / "c").glob("*.json")
    entry.write_text("{not json")
    assert fpcache.lookup("x", [f]) is None
    entry.write_text(json.dumps({"fingerprint": "zz"}))
    assert fpcache.lookup("x", [f]) is None


def test_gguf_fingerprint_is_cached(smollm2, fp_cache):
    from cna_export.io.gguf import open_gguf

    reader = open_gguf(smollm2.source.path)
    t = time.perf_counter()
    first = gguf_fingerprint(reader)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    assert gguf_fingerprint(reader) == first == smollm2.fingerprint()
    assert time.perf_counter() - t < cold
    assert np.asarray(sorted(p.name for p in fp_cache.glob("*.json"))).size == 1


# -- commands that must not import torch or transformers -----------------------------------------

PROBE = r"""
import json, sys
tried = []
banned = json.loads(sys.argv[2]) if len(sys.argv) > 2 else ["torch", "transformers"]
class Spy:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in banned):
            tried.append(name)
        return None
sys.meta_path.insert(0, Spy())
from cna_export.cli import main
try:
    rc = main(json.loads(sys.argv[1]))
except SystemExit as e:  # --help
    rc = e.code
print(json.dumps({"rc": rc, "tried": sorted(set(tried))}))
"""


def assert_runs_without(argv: list[str], banned: list[str] | None = None, env: dict | None = None) -> None:
    """``cna-export argv`` in a child process exits 0 without trying to import any of ``banned`` (default: torch
    and transformers), as PROBE watches it."""
    import subprocess
    import sys

    extra = [] if banned is None else [json.dumps(banned)]
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv), *extra], capture_output=True, text=True,
                       timeout=300, env=env)
    lines = [x for x in r.stdout.splitlines() if x.startswith('{"rc"')]
    assert lines, (argv, r.stdout[-500:], r.stderr[-2000:])
    got = json.loads(lines[-1])
    assert got["rc"] == 0 and got["tried"] == [], (argv, got, r.stderr[-1000:])


def test_one_string_of_a_gguf_array_without_listing_them():
    from cna_export.io.bundled import resolve
    from cna_export.io.gguf import open_gguf

    tokens = open_gguf(resolve("bundled:smollm2")).fields["tokenizer.ggml.tokens"]
    picks = [0, 2, 100, tokens.count - 1]
    got = [tokens.item(i) for i in picks]
    assert tokens._item_list is None  # found by walking to them, nothing listed
    full = tokens.value()
    assert got == [full[i] for i in picks] == [tokens.item(i) for i in picks]
    with pytest.raises(IndexError):
        tokens.item(tokens.count)


def test_gguf_constants_without_the_rest_of_gguf_py():
    """Reading and patching GGUF files needs gguf-py's constants only: its package (reader, writer, YAML) is not
    imported, and a later ``import gguf`` shares the same enum classes."""
    import subprocess
    import sys

    code = ("import sys, cna_export.io.gguf, cna_export.io.quants as q; assert 'gguf' not in sys.modules, 'gguf'; "
            "assert 'yaml' not in sys.modules; import gguf; from gguf.quants import Q4_K; "
            "assert gguf.GGMLQuantizationType is q.GGMLQuantizationType; "
            "assert q.GGML_QUANT_SIZES is gguf.GGML_QUANT_SIZES")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_gguf_commands_never_import_torch(tmp_path):
    """GGUF export (writer and fast copy), diff of two GGUF files and show run without torch or
    transformers: a process pays for those imports only when it needs tensors."""

    from cna_export.core.circuit import Circuit, Neuron
    from cna_export.io.bundled import resolve
    from cna_export.io.gguf import open_gguf
    from cna_export.io.identity import gguf_identity

    src = str(resolve("bundled:smollm2"))
    circuit = tmp_path / "c.json"
    Circuit(model=gguf_identity(open_gguf(src), "smollm2"), neurons=[Neuron(layer=2, index=7, score=1.0)],
            method={"name": "manual"}).save(circuit)
    w, f = tmp_path / "w.gguf", tmp_path / "f.gguf"
    commands = [
        ["--help"],
        ["show", str(circuit)],
        ["export", "--model", src, "--circuit", str(circuit), "--multiplier", "0", "--format", "gguf", "--out", str(w),
         "--no-modelfile"],
        ["export", "--model", src, "--circuit", str(circuit), "--multiplier", "0", "--format", "gguf", "--fast-copy",
         "--out", str(f), "--no-modelfile"],
        ["diff", str(w), src],
    ]
    for argv in commands:
        assert_runs_without(argv)


@pytest.mark.parametrize("fold", ["down", "up"])
def test_a_safetensors_export_never_imports_torch(export_sources, tmp_path, fold):
    """A safetensors export of a bfloat16 checkpoint (fingerprint hashed cold, shards folded by numpy) runs without
    torch or transformers, and writes the bytes the torch fold writes (scale_slices of each whole tensor)."""
    import os

    from cna_export.export.fold import scale_slices

    src = export_sources[("llama", "bfloat16", True)]
    circuit = tmp_path / "c.json"
    planted_circuit(src, own=True).save(circuit)
    out = tmp_path / "out"
    argv = ["export", "--model", str(src), "--circuit", str(circuit), "--format", "safetensors", "--fold", fold,
            "--out", str(out)]
    assert_runs_without(argv, env=dict(os.environ, CNA_EXPORT_FINGERPRINT_CACHE="off"))
    before, after = st_io.Checkpoint.open(src), st_io.Checkpoint.open(out)
    for layer in {layer for layer, _ in PLANTED}:
        name = f"model.layers.{layer}.mlp.{fold}_proj.weight"
        idx = [j for (l, j) in PLANTED if l == layer]
        want = scale_slices(before.read(name), "column" if fold == "down" else "row", idx,
                            [PLANTED[layer, j] for j in idx])
        assert not torch.equal(want, before.read(name))
        assert torch.equal(after.read(name).view(torch.int16), want.view(torch.int16))


def test_gguf_export_imports_only_what_it_uses(tmp_path):
    """A small GGUF export (writer or fast copy, Modelfile on, no progress bars, not verified) imports neither
    tqdm, nor the verification package, nor the safetensors reader, nor numpy (its rows are scaled in plain
    Python, io.row_scale): start-up is most of a small export's time."""

    from cna_export.core.circuit import Circuit, Neuron
    from cna_export.io.bundled import resolve
    from cna_export.io.gguf import open_gguf
    from cna_export.io.identity import gguf_identity

    src = str(resolve("bundled:smollm2"))
    circuit = tmp_path / "c.json"
    Circuit(model=gguf_identity(open_gguf(src), "smollm2"), neurons=[Neuron(layer=2, index=7, score=1.0),
                                                                    Neuron(layer=3, index=9, score=1.0)],
            method={"name": "manual"}).save(circuit)
    banned = ["tqdm", "cna_export.verification", "cna_export.io.safetensors", "numpy", "torch", "transformers"]
    for extra in ([], ["--fast-copy"]):
        argv = ["export", "--model", src, "--circuit", str(circuit), "--multiplier", "0", "--format", "gguf",
                "--out", str(tmp_path / f"o{len(extra)}.gguf"), *extra]
        assert_runs_without(argv, banned)


# -- ggml's C dequantisation -------------------------------------------------------------------


@pytest.mark.parametrize("qname", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K"])
def test_c_dequantisation_gives_gguf_py_bits(qname):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf import quants as gq

    from cna_export.io import quants
    from cna_export.io.llama import ggml_dequantize, ggml_has

    if not ggml_has("dequantize_row_q8_0"):
        pytest.skip("llama-cpp-python's libggml-base is not installed")
    q = GGMLQuantizationType[qname]
    block_elems, block_bytes = GGML_QUANT_SIZES[q]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(6, 4 * block_bytes), dtype=np.uint8)
    # sane fp16 scale fields at the start of each block (random bytes may be inf/nan)
    blocks = raw.reshape(-1, block_bytes)
    if q == GGMLQuantizationType.Q2_K:  # d and dmin close the block
        blocks[:, -4:] = rng.uniform(1e-3, 1e-2, size=(blocks.shape[0], 2)).astype(np.float16).view(np.uint8)
    elif q in (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K):
        blocks[:, 0:4] = rng.uniform(1e-3, 1e-2, size=(blocks.shape[0], 2)).astype(np.float16).view(np.uint8)
    elif q in (GGMLQuantizationType.Q6_K, GGMLQuantizationType.Q3_K):
        blocks[:, -2:] = rng.uniform(1e-3, 1e-2, size=(blocks.shape[0], 1)).astype(np.float16).view(np.uint8)
    else:
        blocks[:, 0:2] = rng.uniform(1e-3, 1e-2, size=(blocks.shape[0], 1)).astype(np.float16).view(np.uint8)
    fast = ggml_dequantize(raw, qname, 4 * block_elems)
    ref = np.asarray(gq.dequantize(raw, q), dtype=np.float32).reshape(6, -1)
    assert fast is not None and np.array_equal(fast.view(np.uint32), ref.view(np.uint32))
    assert np.array_equal(quants.dequantize_rows(raw, q).view(np.uint32), ref.view(np.uint32))
    assert q not in quants._GGML_BAD


def test_a_c_routine_that_disagrees_is_retired(monkeypatch):
    from gguf import GGMLQuantizationType
    from gguf import quants as gq

    from cna_export.io import llama, quants

    q = GGMLQuantizationType.Q8_0
    raw = np.zeros((4, 34 * 2), dtype=np.uint8)
    raw[:, 0:2] = np.array([0.5], np.float16).view(np.uint8)
    raw[:, 2:34] = 3
    monkeypatch.setattr(quants, "_GGML_BAD", set())
    monkeypatch.setattr(llama, "ggml_dequantize", lambda b, name, n: np.full((b.shape[0], n), 7.0, np.float32))
    got = quants.dequantize_rows(raw, q)
    assert np.array_equal(got, np.asarray(gq.dequantize(raw, q), np.float32).reshape(4, -1))
    assert q in quants._GGML_BAD


# -- --batch-size auto ---------------------------------------------------------------------------


def test_memory_model_sizes_batches_by_width_and_memory(tiny_loaded):
    from cna_export.model.batching import MAX_CPU, memory_model

    loaded = tiny_loaded("llama")
    small = memory_model(loaded, available=10_000_000)
    assert small.fits(8) > small.fits(64) > small.fits(4096) >= 1  # longer prompts, smaller batches
    assert memory_model(loaded, available=1 << 40).fits(8) == MAX_CPU  # capped on a CPU
    assert memory_model(loaded, available=1).fits(8) == 1  # never below one prompt
    # the estimate is a bound on bytes: a batch it allows needs no more than the memory given
    m = memory_model(loaded, available=50_000_000, share=1.0)
    for width in (5, 50, 500):
        b = m.fits(width)
        assert b == MAX_CPU or b * width * (m.per_token + m.per_token_per_position * width) <= 50_000_000
        assert (b + 1) * width * (m.per_token + m.per_token_per_position * width) > 50_000_000 or b == MAX_CPU
    small = 10**7
    backward = memory_model(loaded, backward=True, available=small)
    assert backward.fits(32) < memory_model(loaded, available=small).fits(32)


def test_auto_batches_are_longest_first_and_sized_per_batch(tiny_loaded):
    from cna_export.model.prompts import batches

    loaded = tiny_loaded("llama")
    texts = ["word " * n for n in (40, 3, 3, 3, 3, 3, 20, 3)]
    got = list(batches(loaded.tokenizer, texts, lambda width: 2 if width > 30 else 4, chat_template=False))
    assert [len(b.indices) for b in got] == [2, 4, 2] and got[0].indices[0] == 0
    # unsorted: a long prompt later in the window shrinks the batch to what its width allows
    got = list(batches(loaded.tokenizer, texts, lambda width: 2 if width > 30 else 4, chat_template=False,
                       sort_by_length=False))
    assert all(len(b.indices) <= (2 if b.input_ids.shape[1] > 30 else 4) for b in got)
    assert sorted(i for b in got for i in b.indices) == list(range(len(texts)))


def test_discover_with_auto_batches_equals_batch_one(tiny_loaded, prompt_files):
    from cna_export.core.settings import DiscoverOptions
    from cna_export.discovery.cna import discover
    from cna_export.model.prompts import load_prompts

    loaded = tiny_loaded("qwen2")
    pos, neg, _ = (load_prompts(p) for p in prompt_files)
    auto = discover(loaded, pos, neg, None, DiscoverOptions(top_k=6), progress=False)
    one = discover(loaded, pos, neg, None, DiscoverOptions(top_k=6, batch_size=1), progress=False)
    assert [(n.layer, n.index) for n in auto.circuit.neurons] == [(n.layer, n.index) for n in one.circuit.neurons]
    assert max(b for r in auto.stats.reports.values() for b in r.batches) > 1
    assert all(b == 1 for r in one.stats.reports.values() for b in r.batches)


@pytest.mark.parametrize("value, want", [("auto", "auto"), ("AUTO", "auto"), ("16", 16), (16, 16)])
def test_batch_size_setting_accepts_auto_or_a_count(value, want):
    from cna_export.core.settings import DiscoverOptions

    assert DiscoverOptions(batch_size=value).batch_size == want
    assert DiscoverOptions().batch_size == "auto"


@pytest.mark.parametrize("value", ["0", "-2", "many", "1.5", 2.5])
def test_batch_size_setting_refuses_nonsense(value, capsys):
    from cna_export import cli

    code = cli.main(["discover", "--model", "x", "--out", "y.json", "--batch-size", str(value)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "batch_size" in err[0].replace("-", "_")


def test_gguf_writer_copies_the_data_section_byte_for_byte(tmp_path, monkeypatch):
    """The kernel-copied data section gives the same file as GGUFWriter writing every tensor."""
    from cna_export.core.circuit import Circuit, Neuron
    from cna_export.export.gguf import export_gguf
    from cna_export.io import gguf as G
    from cna_export.io import gguf_write
    from cna_export.io.bundled import resolve

    src = str(resolve("bundled:smollm2"))
    circuit = Circuit(model=gguf_identity_of(src), neurons=[Neuron(layer=0, index=3, score=1.0),
                                                          Neuron(layer=29, index=1535, score=1.0)],
                      method={"name": "manual"})
    assert gguf_write._same_data_layout(G.open_gguf(src), G.open_gguf(src).alignment)
    fast = export_gguf(src, circuit, tmp_path / "fast.gguf", multiplier=-1.0, modelfile=False).out
    monkeypatch.setattr(gguf_write, "_same_data_layout", lambda reader, alignment: False)
    slow = export_gguf(src, circuit, tmp_path / "slow.gguf", multiplier=-1.0, modelfile=False).out
    a, b = G.open_gguf(fast), G.open_gguf(slow)  # headers differ only in the manifest's time stamp
    assert fast.read_bytes()[a.data_offset:] == slow.read_bytes()[b.data_offset:]
    assert [(t.name, t.data_offset - a.data_offset) for t in a.tensors] == \
        [(t.name, t.data_offset - b.data_offset) for t in b.tensors]


def gguf_identity_of(path: str):
    from cna_export.io.gguf import open_gguf
    from cna_export.io.identity import gguf_identity

    return gguf_identity(open_gguf(path), "smollm2", fingerprint=False)


# -- hashing only what the fingerprint cache does not know ---------------------------------------


def test_fingerprints_are_hashed_a_chunk_at_a_time(export_sources, monkeypatch):
    """GGUF and safetensors fingerprints read and convert a few rows at a time: the same sha256 as hashing each
    whole down projection as float32 (what LoadedModel.fingerprint() hashes)."""
    from cna_export.core.fingerprint import combine, fingerprint, layer_digest
    from cna_export.io import identity
    from cna_export.io.bundled import resolve
    from cna_export.io.gguf import open_gguf
    from cna_export.io.gguf_arch import ffn_tensors, gguf_arch, num_layers
    from cna_export.io.quants import dequantize_rows

    monkeypatch.setenv(fpcache.CACHE_SWITCH, "off")
    reader = open_gguf(resolve("bundled:smollm2"))
    spec = gguf_arch(reader)
    downs = [ffn_tensors(reader, spec, layer)[0] for layer in range(num_layers(reader))]
    whole = fingerprint(dequantize_rows(t.data, t.tensor_type) for t in downs)
    layers = combine(layer_digest([dequantize_rows(t.data, t.tensor_type)]) for t in downs)
    monkeypatch.setattr(identity, "FINGERPRINT_CHUNK", 3 * downs[0].n_bytes // downs[0].data.shape[0] + 5)
    assert len(list(identity.dequantised_chunks(reader, downs[0]))) > 100
    assert gguf_fingerprint(reader, spec, 1) == whole and gguf_fingerprint(reader, spec) == layers

    src = export_sources[("llama", "bfloat16", True)]
    ckpt, names = checkpoint_identity(src, str(src), with_fingerprint=False)[2:]
    whole = fingerprint(ckpt.read(n).to(torch.float32).numpy() for n in names)
    layers = combine(layer_digest([ckpt.read(n).to(torch.float32).numpy()]) for n in names)
    monkeypatch.setattr(st_io, "FP32_CHUNK", 4 * ckpt.info(names[0]).shape[1] * 3)
    assert st_io.fp32_fingerprint(ckpt, names, 1) == whole and st_io.fp32_fingerprint(ckpt, names) == layers


def test_a_second_gguf_export_hashes_nothing_it_hashed_before(tmp_path, fp_cache, monkeypatch):
    """The touched tensors' sha256 before and after an edit are remembered (keyed by the file as it is and by
    the edit's bytes): exporting the same edit again reads none of them; another multiplier hashes only the
    patched bytes (after), not the source's (before)."""
    from cna_export.core.circuit import Circuit, Neuron
    from cna_export.export.gguf import export_gguf
    from cna_export.io import gguf_patch
    from cna_export.io.bundled import resolve

    src = str(resolve("bundled:smollm2"))
    circuit = Circuit(model=gguf_identity_of(src), neurons=[Neuron(layer=1, index=3, score=1.0),
                                                          Neuron(layer=20, index=9, score=1.0)],
                      method={"name": "manual"})
    calls = []
    real = gguf_patch.copy_patched
    monkeypatch.setattr("cna_export.io.gguf_write.copy_patched",
                        lambda *a, **k: calls.append(k.get("before", True)) or real(*a, **k))
    first = export_gguf(src, circuit, tmp_path / "a.gguf", multiplier=0.0, modelfile=False)
    assert calls == [True, True]
    again = export_gguf(src, circuit, tmp_path / "b.gguf", multiplier=0.0, modelfile=False, fast_copy=True)
    assert calls == [True, True] and [t.sha256_after for t in again.manifest.tensors] == \
        [t.sha256_after for t in first.manifest.tensors]
    other = export_gguf(src, circuit, tmp_path / "c.gguf", multiplier=-1.0, modelfile=False)
    assert calls == [True, True, False, False]
    assert [t.sha256_before for t in other.manifest.tensors] == [t.sha256_before for t in first.manifest.tensors]
    from cna_export.io import gguf as G

    written = G.tensor_map(G.open_gguf(other.out))
    assert all(G.sha256_array(written[t.name].data) == t.sha256_after for t in other.manifest.tensors)


def test_each_copied_chunk_goes_to_writeback_at_once(tmp_path, monkeypatch):
    """copy_range_at hands every chunk it copied to the kernel's writeback (so a big export's fsync finds its data
    written and the copy is never throttled for dirty pages), in the kernel path and the pread/pwrite fallback;
    a refused hint changes nothing."""
    import os

    from cna_export.io import filecopy

    src, dst = tmp_path / "s", tmp_path / "d"
    data = os.urandom(3 << 20)
    src.write_bytes(data)
    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: calls.append((off, n, advice)))
    for kernel in (True, False):
        if not kernel:
            monkeypatch.delattr(os, "copy_file_range", raising=False)
        calls.clear()
        with open(src, "rb") as s, open(dst, "wb+") as d:
            filecopy.copy_range_at(s.fileno(), d.fileno(), 1000, 10, len(data) - 1000)
        assert dst.read_bytes()[10:] == data[1000:]
        assert calls and calls[0][0] == 10 and sum(n for _, n, _ in calls) == len(data) - 1000
        assert {a for _, _, a in calls} == {os.POSIX_FADV_DONTNEED}

    def refuse(*_):
        raise OSError(22, "no")

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    with open(src, "rb") as s, open(dst, "wb+") as d:
        filecopy.copy_range_at(s.fileno(), d.fileno(), 0, 0, len(data))
    assert dst.read_bytes() == data
