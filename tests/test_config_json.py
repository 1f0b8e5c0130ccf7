"""config.json read without transformers (io.config_json): the same identity as AutoConfig gives, and
AutoConfig wherever the file alone might not say it all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MOE_FAMILIES, MORE_DENSE, make_tiny_model, planted_circuit

from cna_export.io import identity as ident_mod
from cna_export.io.config_json import plain_config
from cna_export.io.identity import checkpoint_identity


def _both(folder: Path, monkeypatch) -> tuple:
    plain = checkpoint_identity(folder, str(folder))
    with monkeypatch.context() as m:
        m.setattr(ident_mod, "plain_config", lambda _folder: None)
        auto = checkpoint_identity(folder, str(folder))
    return plain, auto


def test_dense_families_read_plainly_give_autoconfigs_identity(tiny_models, monkeypatch):
    for arch, folder in tiny_models.items():
        cfg = plain_config(folder)
        assert (cfg is None) == (arch == "gemma3"), arch  # gemma3 nests its text config: AutoConfig reads it
        plain, auto = _both(folder, monkeypatch)
        assert plain[0] == auto[0] and plain[1] == auto[1] and list(plain[3]) == list(auto[3]), arch


@pytest.mark.parametrize("arch", sorted(MORE_DENSE)[:4])
def test_more_dense_families_too(arch, tmp_path, monkeypatch):
    folder = make_tiny_model(arch, tmp_path / arch)
    assert plain_config(folder) is not None
    plain, auto = _both(folder, monkeypatch)
    assert plain[0] == auto[0] and plain[1] == auto[1]


def _edited(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).symlink_to(p)
    (dst / "config.json").unlink()
    data = json.loads((src / "config.json").read_text())
    edit(data)
    (dst / "config.json").write_text(json.dumps(data) if isinstance(data, dict) else data)
    return dst


@pytest.mark.parametrize("name, edit", [
    ("custom code", lambda d: d.update(auto_map={"AutoConfig": "x.Config"})),
    ("experts", lambda d: d.update(num_local_experts=4)),
    ("no layer count", lambda d: d.pop("num_hidden_layers")),
    ("bool layer count", lambda d: d.update(num_hidden_layers=True)),
    ("zero layers", lambda d: d.update(num_hidden_layers=0)),
    ("unknown family", lambda d: d.update(model_type="bert")),
    ("no family", lambda d: d.pop("model_type")),
    ("nested", lambda d: d.update(text_config={"num_hidden_layers": 3})),
])
def test_anything_else_goes_to_autoconfig(name, edit, tiny_models, tmp_path):
    folder = _edited(tiny_models["llama"], tmp_path / "m", edit)
    assert plain_config(folder) is None, name


def test_unreadable_config_goes_to_autoconfig_and_its_error(tmp_path, tiny_models):
    folder = tmp_path / "m"
    folder.mkdir()
    assert plain_config(folder) is None  # no config.json
    (folder / "config.json").write_text("[1, 2]")
    assert plain_config(folder) is None
    (folder / "config.json").write_bytes(b"\xff{")
    assert plain_config(folder) is None
    from cna_export.core.errors import CnaError

    with pytest.raises(CnaError, match="cannot read the config"):
        checkpoint_identity(folder, "m")


@pytest.mark.parametrize("arch", MOE_FAMILIES[:2])
def test_moe_family_is_read_by_autoconfig(arch, tmp_path):
    folder = make_tiny_model(arch, tmp_path / arch)
    assert plain_config(folder) is None
    ident, arch_spec, *_ = checkpoint_identity(folder, str(folder))
    assert ident.moe is not None and arch_spec.moe is not None


PROBE = r"""
import json, sys
from cna_export.cli import main
try:
    rc = main(json.loads(sys.argv[1]))
except SystemExit as e:
    rc = e.code
print(json.dumps({"rc": rc, "transformers": "transformers" in sys.modules}))
"""


def test_safetensors_export_does_not_import_transformers(tiny_models, tmp_path):
    """A safetensors export of a dense checkpoint reads config.json itself (transformers: ~2 s of CPU)."""
    src = tiny_models["llama"]
    circuit = tmp_path / "c.json"
    planted_circuit(src).save(circuit)
    argv = ["export", "--model", str(src), "--circuit", str(circuit), "--multiplier", "0", "--format",
            "safetensors", "--out", str(tmp_path / "out")]
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True, text=True, timeout=300)
    got = json.loads([x for x in r.stdout.splitlines() if x.startswith('{"rc"')][-1])
    assert got == {"rc": 0, "transformers": False}, r.stderr[-1000:]
    assert (tmp_path / "out" / "config.json").is_file()
