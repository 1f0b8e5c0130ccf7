"""Fault injection on exports of tiny models (issue 14, robustness).

* an export killed with SIGKILL (before the final rename, after the first shard/tensor is
  written, or after a delay) leaves no output, nothing beside it but its documented temporary
  (``.<out name>.<random>.tmp``, see ``core/atomic.py``), an input that is byte-identical,
  and a next export to the same ``--out`` that succeeds; with ``--overwrite`` the old output
  survives intact;
* a full disk (``RLIMIT_FSIZE`` with SIGXFSZ ignored, so writes fail with EFBIG) gives one
  ``cna-export: error:`` line, exit 2, and no output;
* two exports to the same ``--out`` at once: one wins, the other fails with one line and a
  non-zero exit, and the winner's output is complete;
* an output that is the input, or inside it, is refused (safetensors and GGUF, via the CLI);
* a manifest or index naming a path outside its folder is refused.

Exports run in subprocesses (``python -c``) that patch one hook of the library to sleep or
kill themselves at a chosen point.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import make_tiny_model, planted_circuit
from test_gguf_export import build_gguf, circuit_for

from cna_export.cli import main
from cna_export.core.errors import CnaError
from cna_export.core.manifest import MANIFEST_FILE, ExportManifest

TESTS = Path(__file__).parent
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="signals, rlimits and renameat2 are Linux")


def tree_hash(path: Path) -> str:
    """sha256 over every file's relative name and bytes (a file or a folder)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(path.parent)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(safetensors folder, safetensors circuit, GGUF file, GGUF circuit), in a folder of their own."""
    root = tmp_path_factory.mktemp("fault-src")
    st_src = make_tiny_model("llama", root / "tiny-st", max_shard_size="20KB")
    st_circ = root / "st-circuit.json"
    planted_circuit(st_src).save(st_circ)
    gg_src = build_gguf(root / "tiny.gguf")
    gg_circ = root / "gg-circuit.json"
    circuit_for().save(gg_circ)
    return {"safetensors": (st_src, st_circ), "gguf": (gg_src, gg_circ)}


def argv(sources, fmt: str, out: Path, *extra: str) -> list[str]:
    src, circ = sources[fmt]
    args = ["export", "--model", str(src), "--circuit", str(circ), "--multiplier", "0", "--out", str(out)]
    return args + (["--no-modelfile"] if fmt == "gguf" else []) + list(extra)


# The child: patch one hook, then run the CLI. KILL=1 kills at the hook, SLEEP=s sleeps there first,
# DELAY=s kills after s seconds whatever is happening, FSIZE=n limits the size of any written file.
CHILD = textwrap.dedent("""
    import json, os, resource, signal, sys, threading, time
    sys.path.insert(0, {tests!r})
    hook, args = sys.argv[1], json.loads(sys.argv[2])
    kill = os.environ.get("KILL") == "1"
    sleep = float(os.environ.get("SLEEP", "0"))
    def at_hook():
        time.sleep(sleep)
        if kill:
            os.kill(os.getpid(), signal.SIGKILL)
    import cna_export.core.atomic as A
    if hook == "rename":
        orig = A._replace
        def _replace(*a, **k):
            at_hook()
            return orig(*a, **k)
        A._replace = _replace
    elif hook == "first-write":
        import cna_export.io.safetensors as ST, gguf
        orig_save, orig_tensor = ST.rewrite_shard, gguf.GGUFWriter.write_tensor_data
        def rewrite_shard(*a, **k):
            orig_save(*a, **k)
            at_hook()
        def write_tensor_data(self, *a, **k):
            orig_tensor(self, *a, **k)
            at_hook()
        ST.rewrite_shard, gguf.GGUFWriter.write_tensor_data = rewrite_shard, write_tensor_data
        import cna_export.io.filecopy as FC
        orig_range = FC.copy_range
        def copy_range(*a, **k):  # the GGUF writer's kernel-copied data section
            orig_range(*a, **k)
            at_hook()
        FC.copy_range = copy_range
    if os.environ.get("DELAY"):
        threading.Timer(float(os.environ["DELAY"]), os.kill, (os.getpid(), signal.SIGKILL)).start()
    if os.environ.get("FSIZE"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        n = int(os.environ["FSIZE"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))
    from cna_export.cli import main
    rc = main(args)
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(rc)
""")


def child(hook: str, args: list[str], wait: bool = True, **env: str):
    e = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in env.items()}}
    cmd = [sys.executable, "-c", CHILD.format(tests=str(TESTS)), hook, json.dumps(args)]
    p = subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return p
    out, err = p.communicate(timeout=300)
    return p.returncode, out, err


def leftovers(folder: Path, out: Path, before: set[str]) -> list[str]:
    """Entries of ``folder`` that were not there before, other than ``out``."""
    return sorted(set(os.listdir(folder)) - before - {out.name})


TEMP = r"^\.{name}\.(convert-)?[A-Za-z0-9_]+\.tmp$"


def assert_valid(fmt: str, out: Path) -> None:
    if fmt == "safetensors":
        from cna_export.io.safetensors import Checkpoint

        ckpt = Checkpoint.open(out)
        for name in ckpt.weight_map:
            ckpt.read(name)
        assert ExportManifest.load(out / MANIFEST_FILE).multiplier_map()
    else:
        from cna_export.export.gguf import read_gguf_manifest
        from cna_export.io.gguf import open_gguf

        assert open_gguf(out).tensors
        assert read_gguf_manifest(out)[0].multiplier_map()


# ---------------------------------------------------------------------------
# SIGKILL
# ---------------------------------------------------------------------------

KILLS = [("rename", {"KILL": 1}), ("first-write", {"KILL": 1}), ("none", {"DELAY": 1.5}), ("none", {"DELAY": 2.5})]


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
@pytest.mark.parametrize("hook, env", KILLS, ids=["before-rename", "after-first-write", "after-1.5s", "after-2.5s"])
def test_sigkill_leaves_no_output_and_input_untouched(sources, tmp_path, fmt, hook, env, capsys):
    src = sources[fmt][0]
    digest = tree_hash(src)
    out = tmp_path / ("out.gguf" if fmt == "gguf" else "out")
    rc, _, err = child(hook, argv(sources, fmt, out), **env)
    if rc == 0:  # a delayed kill may come after a fast export finished: then it must be complete
        assert "DELAY" in env
        assert_valid(fmt, out)
    else:
        assert rc == -signal.SIGKILL, err[-2000:]
        assert not out.exists()
        stray = leftovers(tmp_path, out, set())
        pattern = re.compile(TEMP.format(name=re.escape(out.name)))
        assert all(pattern.match(s) for s in stray), stray  # only the documented temporaries
    assert tree_hash(src) == digest, "the input changed"
    # the next export to the same --out ignores any stale temporary and succeeds
    assert main(argv(sources, fmt, out, "--overwrite")) == 0, capsys.readouterr().err
    assert_valid(fmt, out)
    assert tree_hash(src) == digest


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_sigkill_during_overwrite_keeps_the_old_output(sources, tmp_path, fmt):
    out = tmp_path / ("out.gguf" if fmt == "gguf" else "out")
    assert main(argv(sources, fmt, out)) == 0
    old = tree_hash(out)
    rc, _, err = child("first-write", argv(sources, fmt, out, "--overwrite", "--multiplier", "2"), KILL=1)
    assert rc == -signal.SIGKILL, err[-2000:]
    assert tree_hash(out) == old
    assert_valid(fmt, out)


# ---------------------------------------------------------------------------
# Full disk
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_full_disk_is_one_line_error(sources, tmp_path, fmt):
    src = sources[fmt][0]
    digest = tree_hash(src)
    out = tmp_path / ("out.gguf" if fmt == "gguf" else "out")
    size = src.stat().st_size if src.is_file() else max(p.stat().st_size for p in src.glob("*.safetensors"))
    rc, _, err = child("none", argv(sources, fmt, out), FSIZE=size // 2)
    lines = err.strip().splitlines()
    assert rc == 2, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("cna-export: error:"), err
    assert re.search("File too large|disk is full", lines[0]), err
    assert not out.exists() and leftovers(tmp_path, out, set()) == []
    assert tree_hash(src) == digest


# ---------------------------------------------------------------------------
# Two exports to the same --out
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
@pytest.mark.parametrize("sleep", [0, 2], ids=["free-race", "both-reach-rename"])
def test_concurrent_exports_one_wins(sources, tmp_path, fmt, sleep):
    out = tmp_path / ("out.gguf" if fmt == "gguf" else "out")
    procs = [child("rename", argv(sources, fmt, out, "--multiplier", m), wait=False, SLEEP=sleep) for m in ("0", "2")]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes[0] == 0 and codes[1] == 2, results
    loser = next(r for r in results if r[0] != 0)
    lines = loser[2].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cna-export: error:") and "already exists" in lines[0], loser[2]
    assert_valid(fmt, out)
    assert leftovers(tmp_path, out, set()) == []


# ---------------------------------------------------------------------------
# Outputs on or inside inputs; paths outside a folder
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_output_on_or_inside_the_input_is_refused(sources, tmp_path, capsys, fmt):
    src = sources[fmt][0]
    digest = tree_hash(src)
    targets = [src] if fmt == "gguf" else [src, src / "sub", src / "model.safetensors"]
    for target in targets:
        for extra in ((), ("--overwrite",)):
            rc = main(argv(sources, fmt, target, *extra))
            err = capsys.readouterr().err
            assert rc == 2 and err.count("\n") == 1 and err.startswith("cna-export: error:"), err
            assert re.search(r"is the input itself|inside the input|already exists", err), err
    assert tree_hash(src) == digest
    assert not (src / "sub").exists() if src.is_dir() else True


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "a/../../b.safetensors", "..\\x", "C:\\x", ""])
def test_manifest_naming_a_path_outside_its_folder_is_refused(path):
    from test_fuzz import valid_manifest

    data = json.loads(valid_manifest().to_json())
    data["tensors"][0]["file"] = path
    with pytest.raises(CnaError, match="tensors.0.file"):
        ExportManifest.from_json(json.dumps(data))


@pytest.mark.parametrize("path", ["../model.safetensors", "/etc/passwd", "a/../../model.safetensors", ""])
def test_index_naming_a_path_outside_its_folder_is_refused(tmp_path, path):
    from test_fuzz import valid_safetensors

    from cna_export.io.safetensors import Checkpoint

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (tmp_path / "model.safetensors").write_bytes(valid_safetensors())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": path}}))
    with pytest.raises(CnaError, match="invalid shard path"):
        Checkpoint.open(folder)


def test_directory_outputs_get_umask_permissions(tmp_path):
    """A file a library wrote privately (0600) inside an output folder is published with the umask's
    permissions, like every other output; a hard link into the input keeps the input's mode."""
    import os
    import stat

    from cna_export.core.atomic import atomic_dir

    src = tmp_path / "input.bin"
    src.write_bytes(b"x")
    os.chmod(src, 0o600)
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        private = tmp / "private.bin"
        private.write_bytes(b"y")
        os.chmod(private, 0o600)
        os.link(src, tmp / "linked.bin")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((out / "private.bin").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(src.stat().st_mode) == 0o600  # the input is untouched
