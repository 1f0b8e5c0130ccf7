"""Tests for cna_export.io.quant_types, quant_layouts and quants: the GGML type records, block layouts and
exact row scaling of GGUF tensors."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as T
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cna_export.io import quant_layouts, quants, scale_codecs
from cna_export.io.quant_layouts import LAYOUTS, UNSUPPORTED, UnsupportedTensorType, get_layout, row_bytes
from cna_export.io.quant_types import FLOAT_TYPES, QUANT_TYPES, QuantType, float_type
from cna_export.io.quants import ScaleError, ScaleOverflowError, dequantize_rows, scale_rows

N_ROWS = 6
N_COLS = 256
SCALED = [1, 4]
EXACT_MULTIPLIERS = (0.0, -1.0, 2.0)
INEXACT_MULTIPLIERS = (0.37, -2.5)

REQUIRED = [
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0",
]  # fmt: skip

# Types gguf-py can quantise: tested on real quantised data; the rest on hand-built blocks.
GGUF_QUANTIZABLE = {T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.TQ1_0, T.TQ2_0}

# Relative rounding unit of each scale encoding (half an ulp at 1.0).
UNIT_ROUNDOFF = {"f16": 2.0**-11, "f16_iq1m": 2.0**-11, "bf16": 2.0**-8, "f32": 2.0**-24, "f64": 0.0}

SUPPORTED = sorted(LAYOUTS, key=lambda t: t.value)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def as_bytes(arr: np.ndarray) -> np.ndarray:
    """Tensor data as (n_rows, row_bytes) uint8."""
    arr = np.ascontiguousarray(arr)
    return arr.reshape(arr.shape[0], -1).view(np.uint8)


def put_f16_iq1m(block: np.ndarray, offset: int, value: float) -> None:
    """Store an fp16 in the high nibbles of four LE uint16 words (IQ1_M), keeping the low 12 bits."""
    bits = int(np.array(value, dtype=np.float16).view(np.uint16))
    for i in range(4):
        lo = offset + 2 * i
        word = int(block[lo]) | (int(block[lo + 1]) << 8)
        word = (word & 0x0FFF) | (((bits >> (4 * i)) & 0xF) << 12)
        block[lo], block[lo + 1] = word & 0xFF, word >> 8


def put_scale(block: np.ndarray, offset: int, encoding: str, value: float) -> None:
    if encoding == "f16_iq1m":
        put_f16_iq1m(block, offset, value)
    elif encoding == "f16":
        block[offset : offset + 2] = np.array([value], dtype="<f2").view(np.uint8)
    elif encoding == "f32":
        block[offset : offset + 4] = np.array([value], dtype="<f4").view(np.uint8)
    else:  # pragma: no cover - float kinds are not built by hand
        raise AssertionError(encoding)


def hand_built(qtype: T, rng: np.random.Generator, n_rows: int = N_ROWS, scale_range=(1e-3, 1.0)) -> np.ndarray:
    """Random quant bytes with valid random scale fields, as (n_rows, row_bytes) uint8."""
    layout = get_layout(qtype)
    n_blocks = N_COLS // layout.block_elems
    data = rng.integers(0, 256, size=(n_rows, n_blocks, layout.block_bytes), dtype=np.uint8)
    lo, hi = scale_range
    for r in range(n_rows):
        for b in range(n_blocks):
            for off in layout.scale_offsets:
                value = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
                put_scale(data[r, b], off, layout.scale_encoding, value)
    return data.reshape(n_rows, n_blocks * layout.block_bytes)


def tensor_data(qtype: T, n_rows: int, n_cols: int, rng: np.random.Generator) -> np.ndarray:
    """Data of ``qtype`` as gguf.GGUFReader exposes it (floats as floats, BF16 and quants as bytes)."""
    values = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    if qtype == T.F32:
        return values
    if qtype == T.F16:
        return values.astype(np.float16)
    if qtype == T.F64:
        return values.astype(np.float64)
    if qtype in GGUF_QUANTIZABLE:
        return gguf_quants.quantize(values, qtype)
    assert n_cols == 256, "hand-built blocks are 256 columns wide"
    return hand_built(qtype, rng, n_rows=n_rows)


def make_tensor(qtype: T, seed: int = 0) -> np.ndarray:
    """A 6 x 256 tensor of ``qtype`` in the form GGUFReader exposes it (F64 values off the float32 grid)."""
    data = tensor_data(qtype, N_ROWS, N_COLS, np.random.default_rng(seed))
    return data * (1 + 1e-9) if qtype == T.F64 else data


def scale_field_mask(layout: quant_layouts.QuantLayout) -> np.ndarray:
    """Per-block byte mask of the bytes that scale fields occupy."""
    mask = np.zeros(layout.block_bytes, dtype=bool)
    for off in layout.scale_offsets:
        mask[off : off + layout.scale_bytes] = True
    return mask


def assert_close(new: np.ndarray, expected: np.ndarray, m: float, old: np.ndarray, rtol: float) -> None:
    """Within one rounding of the scale fields (terms of formats with mins may cancel: atol by row max)."""
    atol = 4 * rtol * abs(m) * np.abs(old).max(axis=-1, keepdims=True)
    err = np.abs(new - expected)
    assert np.all(err <= rtol * np.abs(expected) + atol), float(err.max())


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


def test_required_types_are_supported() -> None:
    names = {t.name for t in LAYOUTS}
    missing = [n for n in REQUIRED if n not in names]
    assert not missing, missing


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_layouts_match_gguf_quant_sizes(qtype: T) -> None:
    layout = LAYOUTS[qtype]
    assert layout.ggml_type == qtype
    assert (layout.block_elems, layout.block_bytes) == GGML_QUANT_SIZES[qtype]
    assert layout.kind == ("float" if qtype in (T.F32, T.F16, T.BF16, T.F64) else "block")
    assert all(0 <= off and off + layout.scale_bytes <= layout.block_bytes for off in layout.scale_offsets)
    assert row_bytes(qtype, N_COLS) == N_COLS // layout.block_elems * layout.block_bytes


def test_supported_and_unsupported_are_disjoint_and_cover_known_weight_types() -> None:
    assert not set(LAYOUTS) & set(UNSUPPORTED)
    for name in ("MXFP4", "Q8_1", "I8", "I32"):
        qtype = getattr(T, name, None)
        if qtype is not None:
            assert qtype in UNSUPPORTED


def test_layout_is_frozen() -> None:
    layout = get_layout(T.Q4_K)
    with pytest.raises(AttributeError):
        layout.block_bytes = 1  # type: ignore[misc]


def test_row_bytes_rejects_partial_blocks() -> None:
    with pytest.raises(ValueError, match="Q4_K"):
        row_bytes(T.Q4_K, 100)
    assert row_bytes(T.F16, 7) == 14


@pytest.mark.parametrize("qtype", [t for t in (getattr(T, n, None) for n in ("MXFP4", "NVFP4", "Q8_1", "I32")) if t])
def test_unsupported_type_raises_with_name(qtype: T) -> None:
    with pytest.raises(UnsupportedTensorType, match=qtype.name) as info:
        get_layout(qtype)
    assert "\n" not in str(info.value)
    raw = np.zeros((2, 64), dtype=np.uint8)
    with pytest.raises(UnsupportedTensorType, match=qtype.name):
        scale_rows(raw, qtype, [0], 2.0)


def test_unknown_type_id_raises() -> None:
    with pytest.raises(UnsupportedTensorType, match="9999"):
        get_layout(9999)
    assert isinstance(UnsupportedTensorType("x"), ValueError)


def test_get_layout_accepts_int_ids() -> None:
    assert get_layout(int(T.Q6_K)) is LAYOUTS[T.Q6_K]


def test_type_records_are_the_layouts_facts() -> None:
    """Every layout is its record bound to gguf-py's type; every known GGML weight type has a record."""
    for qtype, layout in LAYOUTS.items():
        facts = QUANT_TYPES[qtype.name]
        assert layout.ggml_type == qtype and layout.name == qtype.name
        assert all(getattr(layout, f.name) == getattr(facts, f.name) for f in dataclasses.fields(facts))
    for qtype, reason in UNSUPPORTED.items():
        assert reason and QUANT_TYPES[qtype.name].block_elems in (0, GGML_QUANT_SIZES[qtype][0])
    assert FLOAT_TYPES == {"F32", "F16", "BF16", "F64"}
    assert [float_type(s) for s in ("F32", "bfloat16", "float16", "float64", "Q4_K", "int8", "float8_e4m3fn")] == [
        "F32", "BF16", "F16", "F64", None, None, None]
    with pytest.raises(ValueError, match="overlapping"):
        QuantType("X", "block", 0.1, 32, 18, (0, 1))
    with pytest.raises(ValueError, match="outside"):
        QuantType("X", "block", 0.1, 32, 18, (17,))


@pytest.mark.parametrize("name", ["Q8_0", "Q6_K", "Q5_0", "Q5_1", "Q5_K", "Q4_0", "Q4_1", "Q4_K", "Q3_K", "IQ4_NL",
                                  "IQ4_XS"])
def test_representation_error_bounds_ggmls_quantiser(name: str) -> None:
    """A record's representation error bounds how far ggml's own quantiser moves a value (row-max relative)."""
    qtype = T[name]
    rng = np.random.default_rng(3)
    values = (rng.standard_normal((16, 512)) * rng.uniform(0.2, 3.0, size=(16, 1))).astype(np.float32)
    try:
        raw = quants.quantize_rows(values, qtype)
    except UnsupportedTensorType as e:
        pytest.skip(str(e))
    err = np.abs(dequantize_rows(raw, qtype) - values).max(axis=1) / np.abs(values).max(axis=1)
    assert np.all(err <= QUANT_TYPES[name].representation_error), (name, float(err.max()))
    assert np.all(err > QUANT_TYPES[name].representation_error / 20)  # the figure is a bound, not a guess far off


@pytest.mark.parametrize("name", [n for n, t in QUANT_TYPES.items() if t.rounding is not None])
def test_rounding_step_reads_the_records_fields(name: str) -> None:
    """The rounding noise of a row scales with the square of its ``d`` (the record's first scale field)."""
    qtype = T[name]
    raw = hand_built(qtype, np.random.default_rng(4), scale_range=(0.01, 0.02))
    noise = quants.rounding_noise_rows(raw, qtype)
    assert noise is not None and noise.shape == (N_ROWS,) and np.all(noise >= 0)
    layout = get_layout(qtype)
    doubled = raw.reshape(N_ROWS, -1, layout.block_bytes).copy()
    for b in range(doubled.shape[1]):
        for r in range(N_ROWS):
            off = layout.scale_offsets[0]
            d = float(doubled[r, b, off : off + 2].copy().view("<f2")[0])
            put_scale(doubled[r, b], off, "f16", 2 * d)
    assert np.allclose(quants.rounding_noise_rows(doubled.reshape(N_ROWS, -1), qtype), 4 * noise, rtol=1e-12)


# ---------------------------------------------------------------------------
# Scaling every supported type
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_scale_rows_every_type(qtype: T) -> None:
    layout = get_layout(qtype)
    raw = make_tensor(qtype)
    raw_before = raw.copy()
    old = dequantize_rows(raw, qtype)
    assert old.shape == (N_ROWS, N_COLS)
    assert np.all(np.isfinite(old))
    others = [r for r in range(N_ROWS) if r not in SCALED]
    n_blocks = N_COLS // layout.block_elems
    mask = scale_field_mask(layout)

    for m in EXACT_MULTIPLIERS + INEXACT_MULTIPLIERS:
        new, report = scale_rows(raw, qtype, SCALED, m)
        assert np.array_equal(as_bytes(raw), as_bytes(raw_before)), "input must not be modified"
        assert new.shape == raw.shape and new.dtype == raw.dtype
        new_bytes, old_bytes = as_bytes(new), as_bytes(raw)
        # unlisted rows byte-identical; in listed rows only scale-field bytes may change
        assert np.array_equal(new_bytes[others], old_bytes[others])
        nb = new_bytes[SCALED].reshape(len(SCALED), n_blocks, layout.block_bytes)
        ob = old_bytes[SCALED].reshape(len(SCALED), n_blocks, layout.block_bytes)
        assert np.array_equal(nb[..., ~mask], ob[..., ~mask])
        if layout.scale_encoding == "f16_iq1m":  # low 12 bits of the packed words are sub-block scales
            off = layout.scale_offsets[0]
            words_new = np.ascontiguousarray(nb[..., off : off + 8]).view("<u2")
            words_old = np.ascontiguousarray(ob[..., off : off + 8]).view("<u2")
            assert np.array_equal(words_new & 0x0FFF, words_old & 0x0FFF)

        deq = dequantize_rows(new, qtype)
        assert np.array_equal(deq[others], old[others])
        expected = (m * old[SCALED].astype(np.float64)).astype(old.dtype)
        if m in EXACT_MULTIPLIERS:
            # np.array_equal compares values, so -0.0 == 0.0
            assert np.array_equal(deq[SCALED], expected), f"{qtype.name} m={m}"
            assert report.max_rel_error == 0.0 and report.exact
        else:
            assert_close(deq[SCALED], expected, m, old[SCALED], rtol=max(UNIT_ROUNDOFF[layout.scale_encoding], 1e-6))
            assert 0.0 <= report.max_rel_error <= UNIT_ROUNDOFF[layout.scale_encoding]

        n_fields = len(SCALED) * n_blocks * layout.scales_per_block
        assert report.ggml_type == qtype
        assert report.n_rows == len(SCALED)
        assert report.n_fields == n_fields
        assert report.n_subnormal == 0 and report.n_flushed == 0
        assert report.warning() is None
        # all scale fields are nonzero here, so every one changes for these multipliers
        assert report.n_changed == n_fields


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q8_0, T.IQ1_M, T.F16, T.BF16], ids=lambda t: t.name)
def test_identity_multiplier_is_byte_identical(qtype: T) -> None:
    raw = make_tensor(qtype)
    new, report = scale_rows(raw, qtype, range(N_ROWS), 1.0)
    assert np.array_equal(as_bytes(new), as_bytes(raw))
    assert report.n_changed == 0 and report.exact


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q6_K, T.IQ4_XS, T.F32, T.BF16], ids=lambda t: t.name)
def test_per_row_multipliers(qtype: T) -> None:
    raw = make_tensor(qtype, seed=3)
    old = dequantize_rows(raw, qtype).astype(np.float64)
    rows = [5, 0, 2, 3]
    mults = [2.0, -1.0, 0.0, 0.37]
    new, report = scale_rows(raw, qtype, rows, mults)
    deq = dequantize_rows(new, qtype).astype(np.float64)
    for r, m in zip(rows[:3], mults[:3], strict=True):
        assert np.array_equal(deq[r], m * old[r]), (r, m)
    rtol = max(UNIT_ROUNDOFF[get_layout(qtype).scale_encoding], 1e-6)
    assert_close(deq[3:4], 0.37 * old[3:4], 0.37, old[3:4], rtol)
    assert np.array_equal(as_bytes(new)[1], as_bytes(raw)[1])
    assert np.array_equal(as_bytes(new)[4], as_bytes(raw)[4])
    assert report.n_rows == 4


def test_in_place_and_out() -> None:
    raw = make_tensor(T.Q4_K)
    expected, _ = scale_rows(raw, T.Q4_K, [2], -1.0)
    target = np.empty_like(raw)
    got, _ = scale_rows(raw, T.Q4_K, [2], -1.0, out=target)
    assert got is target and np.array_equal(target, expected)
    got, _ = scale_rows(raw, T.Q4_K, [2], -1.0, out=raw)
    assert got is raw and np.array_equal(raw, expected)
    with pytest.raises(ValueError, match="out"):
        scale_rows(raw, T.Q4_K, [2], -1.0, out=np.empty((1, 1), dtype=np.uint8))


def test_three_dimensional_tensor_rows_are_flattened() -> None:
    raw = make_tensor(T.Q8_0).reshape(2, 3, -1)  # (n_expert, n_ff, bytes)
    old = dequantize_rows(raw, T.Q8_0)
    new, report = scale_rows(raw, T.Q8_0, [4], 2.0)  # expert 1, neuron 1
    assert new.shape == raw.shape
    deq = dequantize_rows(new, T.Q8_0)
    assert np.array_equal(deq[4], 2 * old[4])
    assert np.array_equal(np.delete(deq, 4, axis=0), np.delete(old, 4, axis=0))
    assert report.n_rows == 1


def test_empty_rows_is_a_no_op() -> None:
    raw = make_tensor(T.Q5_K)
    new, report = scale_rows(raw, T.Q5_K, [], 3.0)
    assert np.array_equal(new, raw) and report.n_fields == 0 and report.exact


def test_bad_arguments() -> None:
    raw = make_tensor(T.Q4_0)
    with pytest.raises(IndexError):
        scale_rows(raw, T.Q4_0, [N_ROWS], 2.0)
    with pytest.raises(IndexError):
        scale_rows(raw, T.Q4_0, [-1], 2.0)
    with pytest.raises(ValueError, match="repeat"):
        scale_rows(raw, T.Q4_0, [1, 1], 2.0)
    with pytest.raises(ValueError, match="multipliers"):
        scale_rows(raw, T.Q4_0, [1, 2], [2.0])
    with pytest.raises(ScaleError, match="non-finite multiplier"):
        scale_rows(raw, T.Q4_0, [1], math.nan)
    with pytest.raises(ValueError, match="blocks"):
        scale_rows(raw[:, :10], T.Q4_0, [1], 2.0)
    with pytest.raises(ValueError, match="uint8"):
        scale_rows(raw.view(np.int8), T.Q4_0, [1], 2.0)
    with pytest.raises(ValueError, match="float16"):
        scale_rows(np.zeros((2, 4), dtype=np.float32), T.F16, [1], 2.0)


def test_non_finite_input_scale_raises() -> None:
    raw = make_tensor(T.Q8_0)
    raw[3, 0:2] = np.array([np.inf], dtype="<f2").view(np.uint8)
    with pytest.raises(ScaleError, match="row 3 block 0"):
        scale_rows(raw, T.Q8_0, [3], 0.0)


# ---------------------------------------------------------------------------
# Overflow and subnormals
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K, T.IQ1_M, T.F16, T.BF16, T.F32], ids=lambda t: t.name)
def test_overflow_raises_and_writes_nothing(qtype: T) -> None:
    floats = (T.F16, T.BF16, T.F32)
    raw = make_tensor(qtype) if qtype in floats else hand_built(qtype, np.random.default_rng(1), scale_range=(0.5, 1.0))
    before = raw.copy()
    huge = 1e6 if get_layout(qtype).scale_encoding.startswith("f16") else 1e39
    with pytest.raises(ScaleOverflowError, match=qtype.name):
        scale_rows(raw, qtype, [0, 2], huge, out=raw)
    assert np.array_equal(as_bytes(raw), as_bytes(before))
    assert issubclass(ScaleOverflowError, OverflowError)


def test_tiny_multiplier_reports_subnormals() -> None:
    qtype = T.Q4_K
    raw = hand_built(qtype, np.random.default_rng(2), scale_range=(1e-3, 1.0))
    m = 1e-6
    new, report = scale_rows(raw, qtype, [0, 1, 2], m)

    layout = get_layout(qtype)
    blocks = as_bytes(raw)[[0, 1, 2]].reshape(3, -1, layout.block_bytes)
    old = np.stack([np.ascontiguousarray(blocks[..., o : o + 2]).view("<f2")[..., 0] for o in layout.scale_offsets])
    exact = old.astype(np.float64) * m
    written = exact.astype(np.float16).astype(np.float64)
    n_sub = int(np.count_nonzero((written != 0) & (np.abs(written) < 2.0**-14)))
    n_flush = int(np.count_nonzero((exact != 0) & (written == 0)))
    assert n_sub > 0
    assert report.n_subnormal == n_sub
    assert report.n_flushed == n_flush
    nz = exact != 0
    assert report.max_rel_error == pytest.approx(float(np.max(np.abs(written[nz] - exact[nz]) / np.abs(exact[nz]))))
    assert report.max_rel_error > 2.0**-11
    message = report.warning()
    assert message is not None and f"{n_sub} scales into fp16 subnormals" in message and "\n" not in message

    # the tensor still dequantises to m * old within the (coarser) subnormal spacing
    old_vals = dequantize_rows(raw, qtype, [0, 1, 2]).astype(np.float64)
    new_vals = dequantize_rows(new, qtype, [0, 1, 2]).astype(np.float64)
    bound = 2.0**-25 * (63 * 31 + 63) + 2.0**-11 * np.abs(m * old_vals)
    assert np.all(np.abs(new_vals - m * old_vals) <= bound)


def test_report_of_nothing_and_warning() -> None:
    assert quants.ScaleReport.nothing(T.Q4_K) == quants.ScaleReport(T.Q4_K, 0, 0, 0, 0, 0, 0.0)
    assert quants.ScaleReport.nothing(T.Q4_K).exact and quants.ScaleReport.nothing(T.Q4_K).warning() is None
    warn = quants.ScaleReport(T.Q8_K, 2, 16, 15, 0, 2, 2e-3).warning()
    assert warn == ("Q8_K: multiplier pushes 0 scales into f32 subnormals and flushes 2 to zero, "
                    "worst relative error 0.002")


# ---------------------------------------------------------------------------
# Rounding of the scale fields
# ---------------------------------------------------------------------------


def _reference_round_bf16(x: float) -> int:
    """Correct round-to-nearest-even of a float64 to bfloat16 bits, by exact rational arithmetic."""
    guess = int(np.array([x], dtype=np.float32).view(np.uint32)[0] >> 16)
    best: tuple[Fraction, int, int] | None = None
    for cand in (guess - 1, guess, guess + 1):
        if not 0 <= cand <= 0xFFFF or (cand & 0x7F80) == 0x7F80:
            continue
        value = float(np.array([cand << 16], dtype=np.uint32).view(np.float32)[0])
        key = (abs(Fraction(value) - Fraction(x)), cand & 1, cand)
        if best is None or key[:2] < best[:2]:
            best = key
    assert best is not None
    return best[2]


def test_bf16_rounding_is_correct() -> None:
    rng = np.random.default_rng(5)
    values = rng.standard_normal(400) * np.exp2(rng.integers(-20, 20, 400))
    # exact ties between two bfloat16 values, and values just beside them
    ties = (np.arange(1, 50, dtype=np.float64) * 2 + 1) * 2.0**-8 + 1.0
    values = np.concatenate([values, ties, np.nextafter(ties, 0), np.nextafter(ties, 3), -ties])
    got = scale_codecs.float_to_bits(values, "bf16")
    want = np.array([_reference_round_bf16(float(v)) for v in values], dtype=np.uint16)
    assert np.array_equal(got, want)


# ---------------------------------------------------------------------------
# Real GGUF files
# ---------------------------------------------------------------------------


def test_tensors_as_gguf_reader_exposes_them(tmp_path) -> None:
    import gguf

    path = tmp_path / "tiny.gguf"
    rng = np.random.default_rng(7)
    values = rng.standard_normal((N_ROWS, N_COLS)).astype(np.float32)
    writer = gguf.GGUFWriter(path, "llama")
    q4 = gguf_quants.quantize(values, T.Q4_0)
    writer.add_tensor("blk.0.ffn_up.weight", q4, raw_dtype=T.Q4_0)
    bf = gguf_quants.quantize(values, T.BF16)
    writer.add_tensor("blk.0.ffn_gate.weight", bf, raw_dtype=T.BF16)
    writer.add_tensor("blk.0.ffn_down.weight", values.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf.GGUFReader(path)
    for tensor in reader.tensors:
        qtype = T(tensor.tensor_type)
        data = tensor.data
        old = dequantize_rows(data, qtype)
        assert old.shape == (N_ROWS, N_COLS)
        new, report = scale_rows(data, qtype, [1, 4], -1.0)
        assert report.n_rows == 2
        deq = dequantize_rows(new, qtype)
        assert np.array_equal(deq[[1, 4]], -old[[1, 4]])
        assert np.array_equal(deq[[0, 2, 3, 5]], old[[0, 2, 3, 5]])
    assert {T(t.tensor_type) for t in reader.tensors} == {T.Q4_0, T.BF16, T.F16}


# ---------------------------------------------------------------------------
# Property test
# ---------------------------------------------------------------------------

# Scale fields are >= 1e-3 and <= 1, so |m| in [0.1, 8] keeps every product in fp16's normal range.
_POWERS_OF_TWO = st.sampled_from([0.0, -1.0, 2.0, -0.5, 4.0, 0.25, -8.0])
_ANY_MULTIPLIER = st.floats(min_value=0.1, max_value=8.0) | st.floats(min_value=-8.0, max_value=-0.1)
_BASE = {qtype: make_tensor(qtype, seed=11) for qtype in (T.Q4_K, T.Q5_1)}


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    qtype=st.sampled_from(sorted(_BASE, key=lambda t: t.value)),
    rows=st.lists(st.integers(0, N_ROWS - 1), unique=True, max_size=N_ROWS),
    data=st.data(),
)
def test_property_random_rows_and_multipliers(qtype: T, rows: list[int], data: st.DataObject) -> None:
    raw = _BASE[qtype]
    mults = [data.draw(st.one_of(_POWERS_OF_TWO, _ANY_MULTIPLIER)) for _ in rows]
    old = dequantize_rows(raw, qtype).astype(np.float64)
    new, report = scale_rows(raw, qtype, rows, mults)
    deq = dequantize_rows(new, qtype).astype(np.float64)
    others = [r for r in range(N_ROWS) if r not in rows]
    assert np.array_equal(as_bytes(new)[others], as_bytes(raw)[others])
    for r, m in zip(rows, mults, strict=True):
        if m == 0 or math.frexp(abs(m))[0] == 0.5:  # 0 or a power of two: exact
            assert np.array_equal(deq[r], m * old[r]), (r, m)
        else:
            assert_close(deq[r : r + 1], m * old[r : r + 1], m, old[r : r + 1], rtol=2.0**-11)
    assert report.n_rows == len(rows)
    assert report.max_rel_error <= 2.0**-11
