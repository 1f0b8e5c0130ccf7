"""The base-free eigenvalue-gap audit (cna_export/inspect/isolated.py): a planted directional ablation is flagged
under 4-bit-like rounding, clean quantised writers are not, the threshold comes from clean files of the same
storage type, and the decision never reads the suspect's own refusal direction."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_model
from safetensors.numpy import load_file, save_file
from test_audit import write_gguf

from cna_export.core.errors import CnaError
from cna_export.inspect import isolated
from cna_export.inspect.audit import AuditSettings, audit
from cna_export.inspect.isolated import GramBlocks, build_calibration, collect_gaps
from cna_export.inspect.refusal_direction import RefusalDirections
from cna_export.inspect.scan import scan_base_free
from cna_export.io.weights import open_weights
from cna_export.testing import abliterate as ab

pytestmark = pytest.mark.usefixtures("one_thread")
H, L = 64, 8


def synthetic_writers(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer (o_proj [H, 2H], down_proj [H, 4H]), Gaussian, with unequal row scales like trained writers."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(L):
        rows = np.exp(0.3 * rng.standard_normal((H, 1)))
        out.append((rows * rng.standard_normal((H, 2 * H)), rows * rng.standard_normal((H, 4 * H))))
    return out


def four_bit(W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4-like rounding: 16 levels between each group of 32's min and max; the values read back and the predicted
    rounding noise per row (sum of step^2 / 12)."""
    g = W.reshape(W.shape[0], -1, 32)
    lo, hi = g.min(axis=2, keepdims=True), g.max(axis=2, keepdims=True)
    step = (hi - lo) / 15
    q = lo + step * np.round((g - lo) / step)
    return q.reshape(W.shape), (32 * step[..., 0] ** 2 / 12).sum(axis=1)


def ablate(layers, r: np.ndarray, which: range, lam: float = 1.0):
    P = np.eye(H) - lam * np.outer(r, r)
    return [(P @ o, P @ d) if i in which else (o, d) for i, (o, d) in enumerate(layers)]


def score(layers, table, storage: str = "Q4_K") -> isolated.IsolatedDirection:
    blocks = GramBlocks(L, H, table)
    for i, pair in enumerate(layers):
        for role, W in zip(("attn_output", "ffn_down"), pair, strict=True):
            Wq, noise = four_bit(W) if storage == "Q4_K" else (W, np.zeros(H))
            blocks.add(role, i, Wq @ Wq.T, noise, storage, W.shape[1])
    sc = blocks.score()
    assert sc is not None
    return sc


@pytest.fixture(scope="module")
def table() -> isolated.Calibration:
    """Calibrated on clean files of other seeds only (the rounding model is exact for four_bit: factor 1)."""
    gaps: dict[str, list[float]] = {}
    provisional = build_calibration({"Q4_K": [1.0]}, {"Q4_K": [0.5], "F32": [0.5]}, 0.8, ["synthetic"], "test")
    for seed in (0, 1, 2):
        for storage in ("Q4_K", "F32"):
            collect_gaps(score(synthetic_writers(seed), provisional, storage), gaps)
    return build_calibration({"Q4_K": [1.0]}, gaps, 0.8, ["synthetic seeds 0-2"], "test")


def test_table_is_calibrated_per_type(table):
    for t in ("Q4_K", "F32"):
        c = table.types[t]
        assert c.gap_threshold == pytest.approx(0.8 * c.clean_min_gap, abs=1e-4) and c.clean_windows > 0
    smallest = min(c.gap_threshold for c in table.types.values() if c.gap_threshold is not None)
    assert table.threshold({"Q4_K", "Q2_K"}) == (smallest, ["Q2_K"])  # a type never calibrated: the smallest


def test_packaged_table_is_valid():
    t = isolated.calibration()
    assert {"F32", "Q8_0", "Q4_K", "Q6_K"} <= {k for k, v in t.types.items() if v.gap_threshold}
    for v in t.types.values():
        assert v.noise_low <= v.noise_high
        if v.gap_threshold is not None:
            assert v.gap_threshold == pytest.approx(t.margin * v.clean_min_gap, abs=1e-4)


@pytest.mark.parametrize("storage", ["Q4_K", "F32"])
def test_clean_quantised_writers_are_not_flagged(table, storage):
    for seed in (3, 4):
        sc = score(synthetic_writers(seed), table, storage)
        assert not sc.flagged and sc.score > sc.threshold, (seed, sc.score, sc.threshold)


@pytest.mark.parametrize("which", [range(0, 2), range(3, 5), range(6, 8), range(0, 8)])
def test_planted_rank1_ablation_under_four_bit_rounding_is_flagged(table, which):
    r = ab.unit(np.random.default_rng(9).standard_normal(H))
    sc = score(ablate(synthetic_writers(3), r, which), table, "Q4_K")
    assert sc.flagged, (sc.score, sc.threshold)
    assert sc.window[0] <= which[-1] and sc.window[1] >= which[0], (sc.window, which)


def test_weak_partial_ablation_is_below_the_limit(table):
    """Strength 0.3 leaves 49% of the energy along r: within the clean spectrum, so not flagged (a stated limit)."""
    r = ab.unit(np.random.default_rng(9).standard_normal(H))
    assert not score(ablate(synthetic_writers(3), r, range(0, 8), lam=0.3), table, "Q4_K").flagged


# -- the audit's own path: a tiny model, as a file ------------------------------------------------------------------


def _save(base: Path, tensors: dict, out: Path) -> Path:
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("base-free")
    clean = [make_tiny_model("llama", root / f"clean{s}", seed=s, layers=4, head_dim=16, intermediate_size=128)
             for s in (1, 2, 3)]  # no square writer: a random square matrix has a near-zero eigenvalue of its own
    T = dict(load_file(str(clean[2] / "model.safetensors")))
    r = ab.unit(np.random.default_rng(4).standard_normal(32))
    abl = _save(clean[2], ab.rank1(T, r), root / "ablated")
    gg = {name: write_gguf(folder, root / f"{name}.Q8_0.gguf", "Q8_0")
          for name, folder in (("clean1", clean[0]), ("clean2", clean[1]), ("clean3", clean[2]), ("ablated", abl))}
    return {"clean": clean, "ablated": abl, "gguf": gg, "direction": r}


def _iso(spec, table=None):
    src = open_weights(str(spec))
    try:
        return scan_base_free(src, calibration=table).isolated
    finally:
        src.close()


def test_scan_flags_an_ablated_gguf_against_clean_twins(tiny):
    gaps: dict[str, list[float]] = {}
    provisional = build_calibration({"Q8_0": [1.0]}, {"Q8_0": [0.5], "F32": [0.5]}, 0.8, ["tiny"], "test")
    for spec in (tiny["clean"][0], tiny["clean"][1], tiny["gguf"]["clean1"], tiny["gguf"]["clean2"]):
        collect_gaps(_iso(spec, provisional), gaps)
    table = build_calibration({"Q8_0": [1.0]}, gaps, 0.8, ["tiny seeds 1-2"], "test")
    assert not _iso(tiny["gguf"]["clean3"], table).flagged
    assert not _iso(tiny["clean"][2], table).flagged
    hit = _iso(tiny["gguf"]["ablated"], table)
    assert hit.flagged and hit.score < 1e-3, hit.score


def test_decision_never_reads_the_suspects_refusal_direction(tiny, monkeypatch):
    """The verdict is the same whether the suspect's refusal direction is the ablated one, a random one, absent, or
    not measured at all."""
    from cna_export.inspect import refusal_direction as rdm

    r = tiny["direction"]
    spec = str(tiny["gguf"]["ablated"])

    def fake(direction):
        def _dirs(*args, **kwargs):
            if direction is None:
                raise CnaError("no directions here")
            hm = np.tile(direction, (4, 1))
            return RefusalDirections(1, spec, None, {}, hm, np.zeros_like(hm)), "test"
        return _dirs

    verdicts = []
    for direction in (r, ab.unit(np.random.default_rng(7).standard_normal(32)), None):
        monkeypatch.setattr(rdm, "refusal_directions", fake(direction))
        rep = audit(spec, AuditSettings(generate=False))
        verdicts.append((rep.verdict, rep.exit_code))
    rep = audit(spec, AuditSettings(generate=False, refusal_direction=False))
    verdicts.append((rep.verdict, rep.exit_code))
    assert len(set(verdicts)) == 1, verdicts
