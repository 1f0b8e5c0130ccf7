"""The plain-Python row scaling (io.row_scale) against numpy's (io.quants.scale_rows): the same bytes, the same
report and the same refusals, on random rows of every layout it takes; and a small export's patch computed either
way gives the same spans."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cna_export.io import row_scale
from cna_export.io.quant_layouts import LAYOUTS
from cna_export.io.quants import scale_rows
from cna_export.io.scale_report import ScaleError

PURE = sorted((lay for lay in LAYOUTS.values() if row_scale.supports(lay, 1)), key=lambda lay: lay.name)
FMT = {"f16": "<e", "f32": "<f", "f64": "<d"}
WIDTH = {"f16": 16, "f32": 32, "f64": 64}

scales = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=16),
    st.sampled_from([0.0, -0.0, 2.0**-24, 6e-8, 2.0**-14, 65504.0, -65504.0, 1.0, -3.5]),
    st.sampled_from([float("nan"), float("inf")]),
)
multipliers = st.one_of(
    st.sampled_from([0.0, -1.0, 1.0, 2.0, 0.2, 0.3, 1.5, 1e-9, 3e-5, 4.0, 1e5, 1e300]),
    st.floats(min_value=-8, max_value=8, allow_nan=False),
)


def _rows(data: st.DataObject, layout, n_rows: int, n_blocks: int) -> np.ndarray:
    raw = bytearray(data.draw(st.binary(min_size=n_rows * n_blocks * layout.block_bytes,
                                        max_size=n_rows * n_blocks * layout.block_bytes)))
    fmt = FMT[layout.scale_encoding]
    for at in range(0, len(raw), layout.block_bytes):
        for off in layout.scale_offsets:
            value = data.draw(st.one_of(scales, st.floats(width=WIDTH[layout.scale_encoding])))
            try:
                struct.pack_into(fmt, raw, at + off, value)
            except OverflowError:
                struct.pack_into(fmt, raw, at + off, 0.0)
    return np.frombuffer(bytes(raw), dtype=np.uint8).reshape(n_rows, -1)


def _outcome(fn):
    try:
        return "ok", fn()
    except ScaleError as e:
        return type(e).__name__, str(e)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), layout=st.sampled_from(PURE), n_rows=st.integers(1, 4), n_blocks=st.integers(1, 3))
def test_plain_python_scaling_is_numpys_bit_for_bit(data, layout, n_rows, n_blocks):
    table = _rows(data, layout, n_rows, n_blocks)
    ids = data.draw(st.lists(st.integers(0, n_rows - 1), min_size=0, max_size=n_rows, unique=True))
    mults = [data.draw(multipliers) for _ in ids]

    def by_numpy():
        out, report = scale_rows(table, layout.ggml_type, ids, mults)
        return [out[i].tobytes() for i in ids], report

    def by_python():
        return row_scale.scale_row_bytes(layout, [table[i].tobytes() for i in ids], ids, mults)

    got, want = _outcome(by_python), _outcome(by_numpy)
    assert got == want


def test_refusals_match_numpys():
    q8 = LAYOUTS[next(k for k in LAYOUTS if k.name == "Q8_0")]
    row = bytearray(34 * 2)
    struct.pack_into("<e", row, 34, float("inf"))
    with pytest.raises(ScaleError, match="Q8_0 row 5 block 1 has a non-finite scale field at byte 0"):
        row_scale.scale_row_bytes(q8, [bytes(row)], [5], [2.0])
    struct.pack_into("<e", row, 34, 60000.0)
    overflow = r"multiplier 2 overflows a scale field \(60000 \* 2 = 120000 does not fit f16\)"
    with pytest.raises(ScaleError, match=overflow):
        row_scale.scale_row_bytes(q8, [bytes(row)], [5], [2.0])
    with pytest.raises(ScaleError, match="non-finite multiplier nan"):
        row_scale.scale_row_bytes(q8, [bytes(row)], [5], [float("nan")])


def test_supports_only_what_it_rounds_itself():
    names = {lay.name for lay in PURE}
    assert {"Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K", "F16", "F32"} <= names
    assert not names & {"BF16", "IQ1_M"}
    q4k = LAYOUTS[next(k for k in LAYOUTS if k.name == "Q4_K")]
    assert row_scale.supports(q4k, row_scale.MAX_FIELDS) and not row_scale.supports(q4k, row_scale.MAX_FIELDS + 1)


@pytest.mark.parametrize("multiplier", [0.0, 0.2, 2.0, -1.0])
def test_a_small_exports_patch_is_the_same_either_way(monkeypatch, multiplier):
    """patch_spans on the bundled SmolLM2 GGUF: the plain-Python spans and reports equal numpy's."""
    from cna_export.export.plan import plan_patches
    from cna_export.io import gguf as G
    from cna_export.io.bundled import resolve

    reader = G.open_gguf(resolve("bundled:smollm2"))
    spec = G.gguf_arch(reader)
    mults = {(layer, j): multiplier for layer, j in ((0, 3), (0, 1500), (7, 0), (29, 1535))}
    patches = plan_patches(reader, spec, mults, "up")
    fast = G.patch_spans(reader, patches)
    monkeypatch.setattr(row_scale, "MAX_FIELDS", -1)
    slow = G.patch_spans(reader, patches)
    assert fast.keys() == slow.keys()
    for name in fast:
        assert fast[name].report == slow[name].report
        assert [(s.offset, bytes(s.view())) for s in fast[name].spans] == [
            (s.offset, bytes(s.view())) for s in slow[name].spans]
        assert all(isinstance(s.data, bytes) for s in fast[name].spans)
