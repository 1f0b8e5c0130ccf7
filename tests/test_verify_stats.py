"""The GGUF behaviour check's decision rule: the statistics (paired test, bootstrap intervals over prompts, the
three-way decision), "not enough positions to decide" instead of a failure on too little data, and an
inconclusive verify of an export with exact tensors: written, exit 7 (docs/verify.md)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from cna_export.core.errors import ExitCode
from cna_export.core.settings import GGUFVerifyOptions
from cna_export.verification.gguf_behaviour import _Comparisons, _judge
from cna_export.verification.report import Tolerances, VerifyReport
from cna_export.verification.stats import (
    CRITERIA,
    FALSE_ALARM,
    Criterion,
    Estimate,
    LookPlan,
    bootstrap_weights,
    mcnemar_greater,
    overall,
    ratio_estimate,
)

# -- the statistics ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b, c, p", [(5, 0, 1 / 32), (3, 1, 5 / 16), (10, 2, 79 / 4096), (0, 0, 1.0), (0, 4, 1.0)])
def test_mcnemar_exact_one_sided_at_known_counts(b, c, p):
    assert mcnemar_greater(b, c) == pytest.approx(p)


def test_the_issue_case_is_no_evidence():
    """Two more flips than the floor among ~172 positions (issue 21): nowhere near significant."""
    assert mcnemar_greater(3, 1) > 0.3 and mcnemar_greater(2, 0) == pytest.approx(0.25)


def test_bootstrap_standard_error_of_a_mean_matches_theory():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(400)
    est = ratio_estimate(x, np.ones_like(x))
    assert est.value == pytest.approx(x.mean())
    assert est.se == pytest.approx(x.std(ddof=1) / math.sqrt(x.size), rel=0.1)
    # a ratio of sums: prompts of different lengths weigh by their positions
    est = ratio_estimate([2.0, 8.0], [1.0, 3.0])
    assert est.value == pytest.approx(2.5) and est.prompts == 2


def test_bootstrap_is_deterministic_and_paired():
    w1, w2 = bootstrap_weights(7), bootstrap_weights(7)
    assert np.array_equal(w1, w2) and (w1.sum(axis=1) == 7).all()
    assert ratio_estimate([1.0, 2.0, 4.0], [1, 1, 1]) == ratio_estimate([1.0, 2.0, 4.0], [1, 1, 1])


def test_too_little_data_has_no_interval():
    assert ratio_estimate([], []).interval(0.05) == (-math.inf, math.inf)
    one = ratio_estimate([1.0], [2.0])
    assert one.value == 0.5 and math.isnan(one.se) and one.interval(0.05) == (-math.inf, math.inf)
    assert Criterion(high=1.0).decide(one, 0.01).verdict == "undecided"


def test_strict_interval_keeps_its_false_alarm_rate():
    """Clustered data whose true ratio sits exactly on the tolerance: a failure (the whole interval beyond it)
    happens at most about alpha of the time; far beyond the tolerance it fails, well inside it passes."""
    rng = np.random.default_rng(0)
    alpha, fails = 0.05, 0
    for _ in range(400):
        sizes = rng.integers(5, 30, size=16).astype(float)
        num = rng.normal(1.0 * sizes, 2.0 * np.sqrt(sizes))  # per-position mean 1, correlated within a prompt
        fails += Criterion(high=1.0).decide(ratio_estimate(num, sizes), alpha).verdict == "fail"
    assert fails / 400 <= alpha * 1.6
    far = Estimate(1.5, 0.05, 16)
    assert Criterion(high=1.0).decide(far, alpha).verdict == "fail"
    assert Criterion(high=1.0).decide(Estimate(0.5, 0.05, 16), alpha).verdict == "pass"
    assert Criterion(high=1.0).decide(Estimate(0.95, 0.05, 16), alpha).verdict == "undecided"


def test_two_sided_criterion_fails_on_either_side():
    band = Criterion(0.97, 1.03)
    assert band.decide(Estimate(1.0, 0.002, 16), 0.001).verdict == "pass"
    assert band.decide(Estimate(0.90, 0.005, 16), 0.001).verdict == "fail"
    assert band.decide(Estimate(1.10, 0.005, 16), 0.001).verdict == "fail"
    assert band.decide(Estimate(1.03, 0.005, 16), 0.001).verdict == "undecided"


def test_look_plan_and_the_family_wise_rate():
    assert LookPlan.make(16, 64, 160).sizes == (16, 32, 64)
    assert LookPlan.make(4, 64, 160).sizes == (4, 8, 16, 32, 64)
    assert LookPlan.make(16, 0, 160).sizes == (16,)  # --max-prompts 0: never widened
    assert LookPlan.make(16, 64, 40).sizes == (16, 32, 40)  # no more prompts than there are
    assert LookPlan.make(16, 64, 5).sizes == (5,)
    plan = LookPlan.make(16, 64, 160)
    assert plan.alpha * CRITERIA * len(plan.sizes) == pytest.approx(FALSE_ALARM)
    assert overall(["pass", "undecided", "fail"]) == "fail" and overall(["pass", "undecided"]) == "undecided"
    assert overall(["pass", "pass"]) == "pass"


# -- the judge on synthetic logits ---------------------------------------------------------------------------


def _comparisons(n_prompts: int, positions: int = 12, growth: float = 1.0, share: float = 1.0, seed: int = 0):
    """Transformers plain/hooked and llama.cpp source/export logits: llama.cpp adds independent noise to both; the
    export carries ``share`` of the steering and ``growth`` x the floor's noise (1, 1: an exact export)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    comp = _Comparisons()
    for _ in range(n_prompts):
        plain = 3 * torch.randn(positions, 50, generator=g)
        hooked = plain + torch.randn(positions, 50, generator=g)
        src = plain + 0.05 * torch.randn(positions, 50, generator=g)
        exp = plain + share * (hooked - plain) + 0.05 * growth * torch.randn(positions, 50, generator=g)
        comp.add(plain, hooked, src, exp)
    return comp


def test_too_few_positions_are_undecided_never_failed():
    """Issue 24 item 9: --limit 4 gave "+- nan%" and a failure; two prompts cannot decide anything."""
    b = _judge(_comparisons(2, positions=3), GGUFVerifyOptions(), time.perf_counter())
    assert b.verdict == "undecided" and not b.reasons, b.reasons
    assert b.undecided and all(u.startswith("not enough positions to decide") for u in b.undecided)
    assert not any("nan" in text for text in b.notes + b.undecided + [c.value for c in b.checks])
    import torch

    one = _Comparisons()  # one prompt, no steering at all: no slope, no interval, no "nan"
    plain = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    one.add(plain, plain, plain + 0.01, plain + 0.02)
    b = _judge(one, GGUFVerifyOptions(), time.perf_counter())
    assert b.verdict == "undecided" and not b.reasons
    assert not any("nan" in text for text in b.notes + b.undecided + [c.value for c in b.checks]), b.notes


@pytest.mark.parametrize("seed", range(6))
def test_exact_exports_never_fail_on_few_prompts(seed):
    b = _judge(_comparisons(4, seed=seed), GGUFVerifyOptions(), time.perf_counter())
    assert b.verdict != "fail", b.reasons


def test_clear_faults_fail_with_the_stated_confidence():
    plan = LookPlan.make(8, 64, 160)
    short = _judge(_comparisons(8, share=0.5), GGUFVerifyOptions(), time.perf_counter(), plan)
    assert short.verdict == "fail" and any("reproduces" in r for r in short.reasons)
    noisy = _judge(_comparisons(8, growth=12.0), GGUFVerifyOptions(), time.perf_counter(), plan)
    assert noisy.verdict == "fail" and any("above the allowed" in r for r in noisy.reasons)
    assert any(f"at most {FALSE_ALARM:.0%}" in n for n in noisy.notes)  # the false-alarm rate is stated
    none = _judge(_comparisons(8, share=0.0), GGUFVerifyOptions(), time.perf_counter(), plan)
    assert none.verdict == "fail" and any("closer to hook steering" in r for r in none.reasons)


def test_exact_export_passes_with_enough_prompts():
    b = _judge(_comparisons(24), GGUFVerifyOptions(), time.perf_counter())
    assert b.verdict == "pass", b.undecided + b.reasons
    # one flip of the steered pair alone in 245 positions (0.41%, the issue's case): no evidence of anything
    assert (b.metrics["top1_steered_only_flips"], b.metrics["top1_floor_only_flips"]) == (1, 0)
    assert {c.label: c.ok for c in b.checks}["top-1 flips vs floor, margin >= 0.1"] is True


def test_the_prompt_set_is_widened_until_decided(monkeypatch):
    """check_behaviour doubles the prompts from ``start`` while undecided (1 -> 2 -> 4 here)."""
    from types import SimpleNamespace

    import cna_export.verification.gguf_behaviour as B

    logits = [_prompt_logits(i) for i in range(64)]
    looked = []

    def compare(loaded, src, exp, mults, ids, starts, opts, comp, progress, adapter, session=None):
        looked.append(len(ids))
        for (i,) in ids:
            comp.add(*logits[i])

    monkeypatch.setattr(B, "token_ids", lambda tok, prompts, opts: [[i] for i in range(len(prompts))])
    monkeypatch.setattr(B, "_compare", compare)
    model = SimpleNamespace(tokenizer=None)
    b = B.check_behaviour(model, None, None, {}, [f"p{i}" for i in range(64)], GGUFVerifyOptions(), start=1)
    assert looked == [1, 1, 2] and b.verdict == "pass" and b.metrics["prompts"] == 4
    assert b.metrics["looks"] == 3 and any("(1 -> 2 -> 4 -> 8 -> 16 -> 32 -> 64)" in n for n in b.notes)
    assert any(n.startswith("prompts widened: 1 prompts left mean KL, allowed") and "; 2 prompts left" in n
               for n in b.notes)  # fmt: skip
    few = B.check_behaviour(model, None, None, {}, ["p0", "p1"], GGUFVerifyOptions(), start=1)
    assert few.verdict == "undecided" and few.metrics["prompts"] == 2 and not few.reasons  # pool spent: no failure


def _prompt_logits(i: int):
    """One prompt of an exact export: llama.cpp's noise alike on both pairs."""
    import torch

    g = torch.Generator().manual_seed(1000 + i)
    plain = 3 * torch.randn(12, 50, generator=g)
    hooked = plain + torch.randn(12, 50, generator=g)
    noise = 0.05 * torch.randn(2, 12, 50, generator=g)
    return plain, hooked, plain + noise[0], hooked + noise[1]


# -- the report and the exit codes ----------------------------------------------------------------------------


def test_report_verdicts():
    kw = dict(reference="r", candidate="c", dtype="f")
    undecided = VerifyReport.build({}, Tolerances(), undecided=["not enough positions to decide x"], **kw)
    assert (undecided.verdict, undecided.passed, undecided.publishable) == ("inconclusive", False, True)
    assert "INCONCLUSIVE" in undecided.render() and "not enough positions" in undecided.render()
    assert VerifyReport.model_validate_json(undecided.to_json()) == undecided
    failed = VerifyReport.build({}, Tolerances(), extra_reasons=["tensor check: 1 problem"], undecided=["y"], **kw)
    assert (failed.verdict, failed.publishable, failed.undecided) == ("failed", False, [])
    old = VerifyReport.model_validate({"passed": True, "tolerances": {}, **kw})  # a report from before verdicts
    assert old.verdict == "passed"
    with pytest.raises(ValueError):
        VerifyReport.model_validate({"passed": True, "verdict": "failed", "tolerances": {}, **kw})
    assert ExitCode.VERIFY_INCONCLUSIVE == 7


def _undecided_behaviour(*args, **kw):
    return _judge(_comparisons(2, positions=3), GGUFVerifyOptions(), time.perf_counter())


def _failed_behaviour(*args, **kw):
    return _judge(_comparisons(8, share=0.0), GGUFVerifyOptions(), time.perf_counter())


@pytest.fixture()
def tiny_gguf(tmp_path, monkeypatch):
    """A tiny GGUF, a circuit file, and no transformers load (the behaviour check is replaced per test)."""
    from test_gguf_export import MULTS, build_gguf, circuit_for

    import cna_export.model.loading

    monkeypatch.setattr(cna_export.model.loading, "load_model", lambda spec, **kw: object())
    src = build_gguf(tmp_path / "src.gguf")
    circ = tmp_path / "c.json"
    circuit_for().save(circ)
    return src, circ, MULTS


def test_borderline_behaviour_with_exact_tensors_is_written_with_exit_7(tiny_gguf, tmp_path, monkeypatch, capsys):
    import cna_export.verification.gguf as V
    from cna_export.cli import main

    src, circ, _ = tiny_gguf
    monkeypatch.setattr(V, "check_behaviour", _undecided_behaviour)
    out = tmp_path / "out.gguf"
    rc = main(["export", "--model", str(src), "--circuit", str(circ), "--multiplier", "0", "--out", str(out),
               "--no-modelfile", "--verify"])  # fmt: skip
    cap = capsys.readouterr()
    assert rc == ExitCode.VERIFY_INCONCLUSIVE and out.is_file()
    assert "tensors and KV pairs exact" in cap.out and "INCONCLUSIVE" in cap.out
    assert "verification inconclusive (export written): not enough positions to decide" in cap.err
    rc = main(["verify", "--original", str(src), "--exported", str(out)])
    assert rc == ExitCode.VERIFY_INCONCLUSIVE and "nothing changed" in capsys.readouterr().err


def test_a_real_fault_still_fails_and_writes_nothing(tiny_gguf, tmp_path, monkeypatch, capsys):
    import cna_export.verification.gguf as V
    from cna_export.cli import main

    src, circ, _ = tiny_gguf
    monkeypatch.setattr(V, "check_behaviour", _failed_behaviour)
    out = tmp_path / "bad.gguf"
    rc = main(["export", "--model", str(src), "--circuit", str(circ), "--multiplier", "0", "--out", str(out),
               "--no-modelfile", "--verify"])  # fmt: skip
    assert rc == ExitCode.VERIFY_FAILED and not out.exists()
    assert "export not written: verification failed: steered mean KL" in capsys.readouterr().err


def test_undecided_behaviour_with_failed_tensors_fails(tiny_gguf, tmp_path, monkeypatch, capsys):
    import cna_export.verification.gguf as V
    from cna_export.cli import main
    from cna_export.io import gguf as G

    src, circ, _ = tiny_gguf
    out = tmp_path / "out.gguf"
    assert main(["export", "--model", str(src), "--circuit", str(circ), "--multiplier", "0", "--out", str(out),
                 "--no-modelfile"]) == 0  # fmt: skip
    t = next(t for t in G.open_gguf(out).tensors if t.name == "blk.0.ffn_down.weight")  # untouched by the fold
    data = bytearray(out.read_bytes())
    data[t.data_offset] ^= 0x40
    out.write_bytes(bytes(data))
    monkeypatch.setattr(V, "check_behaviour", _undecided_behaviour)
    capsys.readouterr()
    rc = main(["verify", "--original", str(src), "--exported", str(out)])
    cap = capsys.readouterr()
    assert rc == ExitCode.VERIFY_FAILED and "FAILED" in cap.out and "inconclusive" not in cap.err
