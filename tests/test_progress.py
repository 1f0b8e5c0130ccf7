"""One progress-bar helper (core.progress) and one multiplier formatter (core.multipliers)."""

from __future__ import annotations

import pytest

from cna_export.core import progress
from cna_export.core.multipliers import STYLES, describe_multipliers, multiplier_action, multiplier_counts


def test_bar_is_silent_unless_shown(capsys):
    assert list(progress.bar(False, range(3), desc="x")) == [0, 1, 2]
    with progress.bar(False, total=2, desc="x", unit="B", unit_scale=True) as b:
        b.update(2)
    assert capsys.readouterr().err == ""
    assert list(progress.bar(True, range(3), desc="shown", unit="thing")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "shown" in err and "thing" in err


def test_wanted_never_when_quiet():
    assert progress.wanted(quiet=True) is False


def test_no_library_module_sets_up_tqdm_itself():
    """tqdm is opened in core/progress.py only (the CLI decides with progress.wanted)."""
    from pathlib import Path

    import cna_export

    root = Path(cna_export.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.parts[-2] != "cli" and p.name != "progress.py" and "from tqdm" in p.read_text("utf-8")]
    assert offenders == []


def test_gguf_dequantising_bar_goes_through_the_helper():
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from cna_export.model.loading import _gguf_progress

    original = gguf_utils.tqdm
    with _gguf_progress(False):
        assert gguf_utils.tqdm.func is progress.bar and gguf_utils.tqdm.args == (False,)
        assert list(gguf_utils.tqdm([1, 2], desc="Converting")) == [1, 2]
    assert gguf_utils.tqdm is original


MIXED = {(0, 1): -1.0, (0, 2): 0.0, (0, 3): 0.0, (1, 4): 0.5, (1, 5): 0.5, (1, 6): 0.0}


@pytest.mark.parametrize("style, one, mixed, many", [
    ("value", "0", "per-neuron (3 values, -1 .. 0.5)", "per-neuron (6 values, 0 .. 5)"),
    ("times", "x0", "per-neuron multipliers from x-1 to x0.5", "per-neuron multipliers from x0 to x5"),
    ("counts", "x0", "x0 (3), x0.5 (2), x-1 (1)", "x0 .. x5 (6 values)"),
    ("phrase", "multiplier 0", "multipliers x0 (3), x0.5 (2), x-1 (1)", "multipliers x0 .. x5 (6 values)"),
    ("tally", "x0 (2)", "x0 (3), x0.5 (2), x-1 (1)", "x0 (1), x1 (1), x2 (1), x3 (1), x4 (1), x5 (1)"),
    ("action", "ablated", "steered", "steered"),
])
def test_describe_multipliers(style, one, mixed, many):
    assert describe_multipliers([0.0, 0.0], style) == one
    assert describe_multipliers(MIXED, style) == mixed  # a mapping: its values
    assert describe_multipliers(range(6), style) == many


def test_multiplier_helpers():
    assert set(STYLES) == {"value", "times", "counts", "phrase", "tally", "action"}
    assert multiplier_counts(MIXED) == {"0": 3, "0.5": 2, "-1": 1}
    actions = [multiplier_action(v) for v in ([-1, -2], [0.5], [2, 3], [0, 1])]
    assert actions == ["inverted", "dampened", "amplified", "steered"]
    with pytest.raises(ValueError, match="unknown multiplier style"):
        describe_multipliers([0.0], "fancy")
