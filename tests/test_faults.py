"""Fault injection on exports of tiny models (issues 14 and 23, robustness).

* an export killed with SIGKILL leaves nothing in the output's folder: at 10 times from 0.05 s to
  past the child's exit (8 of them spread over the window from the creation of the output's temporary
  to its publication, timed from that creation by an uninterrupted run), and at fixed points (before
  publication, after the first shard/tensor is written); a GGUF (an unnamed ``O_TMPFILE`` until
  published) leaves no entry at all, a safetensors folder at most its owned temporary
  (``.<out>.<pid>.<start>.<boot>.<random>.tmp``, see ``core/atomic.py``), which the next run removes;
  an export that completed before the kill is whole; the input is byte-identical;
* with ``--overwrite`` the old output survives intact a kill at any point before the swap, and a kill
  just after it leaves the new output whole; what the killed run left is removed by the next run;
* stale temporaries: removed only when their writer is dead (pid and start time, ``flock``);
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

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import make_tiny_model, planted_circuit
from test_gguf_export import build_gguf, circuit_for

from cna_export.cli import main
from cna_export.core.errors import CnaError
from cna_export.core.manifest import MANIFEST_FILE, ExportManifest
from cna_export.testing.files import tree_hash

TESTS = Path(__file__).parent
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="signals, rlimits and renameat2 are Linux")




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
# DELAY=s kills s seconds after the child starts whatever is happening, IN_WRITE=s kills s seconds after
# the output's temporary is created, FSIZE=n limits the size of any written file. The hook "trace" prints
# when the output's temporary is created and when it is published.
CHILD = textwrap.dedent("""
    import json, os, resource, signal, sys, threading, time
    t0 = time.perf_counter()
    sys.path.insert(0, {tests!r})
    hook, args = sys.argv[1], json.loads(sys.argv[2])
    kill = os.environ.get("KILL") == "1"
    sleep = float(os.environ.get("SLEEP", "0"))
    def at_hook():
        time.sleep(sleep)
        if kill:
            os.kill(os.getpid(), signal.SIGKILL)
    import cna_export.core.atomic as A
    from pathlib import Path
    out = Path(args[args.index("--out") + 1]).resolve() if "--out" in args else None
    def mark(name, final):  # only the output's own temporary (not a fingerprint cache entry)
        if Path(final) != out:
            return
        if hook == "trace":
            print(f"trace {{name}} {{time.perf_counter() - t0:.4f}}", file=sys.stderr, flush=True)
        if name == "temp" and os.environ.get("IN_WRITE"):
            threading.Timer(float(os.environ["IN_WRITE"]), os.kill, (os.getpid(), signal.SIGKILL)).start()
    orig_new, orig_publish = A._new_temp, A._publish
    def _new_temp(final, *a, **k):
        temp = orig_new(final, *a, **k)
        mark("temp", final)
        return temp
    def _publish(temp, final, *a, **k):
        orig_publish(temp, final, *a, **k)
        mark("published", final)
    A._new_temp, A._publish = _new_temp, _publish
    if hook in ("publish", "replace", "swapped"):  # before publication; before a named rename; after a swap
        name = dict(publish="_publish", replace="_replace", swapped="remove")[hook]
        orig = getattr(A, name)
        def hooked(*a, **k):
            at_hook()
            return orig(*a, **k)
        setattr(A, name, hooked)
    elif hook == "first-write":
        import cna_export.io.shard_patch as SP
        orig_save = SP.patch_shard
        def patch_shard(*a, **k):
            out = orig_save(*a, **k)
            at_hook()
            return out
        SP.patch_shard = patch_shard
        # the exporters import these names after this hook is installed, so they call the hooked ones
        import cna_export.io.filecopy as FC
        orig_range, orig_range_at = FC.copy_range, FC.copy_range_at
        def copy_range(*a, **k):  # a shard's kernel-copied bytes
            orig_range(*a, **k)
            at_hook()
        def copy_range_at(*a, **k):  # a piece of the GGUF writer's kernel-copied data (on a worker thread)
            orig_range_at(*a, **k)
            at_hook()
        FC.copy_range, FC.copy_range_at = copy_range, copy_range_at
    if os.environ.get("DELAY"):
        left = float(os.environ["DELAY"]) - (time.perf_counter() - t0)  # DELAY counts from t0
        threading.Timer(left, os.kill, (os.getpid(), signal.SIGKILL)).start()
    if os.environ.get("FSIZE"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        n = int(os.environ["FSIZE"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))
    from cna_export.cli import main
    rc = main(args)
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(rc)
""")


class Run(NamedTuple):
    rc: int
    out: str
    err: str
    pid: int


def child(hook: str, args: list[str], wait: bool = True, **env: str):
    e = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in env.items()}}
    cmd = [sys.executable, "-c", CHILD.format(tests=str(TESTS)), hook, json.dumps(args)]
    p = subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return p
    out, err = p.communicate(timeout=300)
    return Run(p.returncode, out, err, p.pid)


def leftovers(folder: Path, out: Path, before: set[str]) -> list[str]:
    """Entries of ``folder`` that were not there before, other than ``out``."""
    return sorted(set(os.listdir(folder)) - before - {out.name})


def owned_temps_of(folder: Path, out: Path, pid: int) -> list[str]:
    """The entries of ``folder`` other than ``out``, each checked to be an owned temporary of ``out``
    written by process ``pid`` (``.<out>.[label-]<pid>.<start>.<boot>.<random>.tmp``)."""
    from cna_export.core.owned_temps import TEMP_RE

    stray = leftovers(folder, out, set())
    for s in stray:
        m = TEMP_RE.match(s)
        assert m and m["stem"] == out.name and int(m["pid"]) == pid, stray
    return stray


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

OUT_NAME = {"safetensors": "out", "gguf": "out.gguf"}


class Timing(NamedTuple):
    """When, in seconds after a child starts, its export creates the output's temporary (``write``) and
    publishes it (``published``), and when the child has exited (``total``)."""

    write: float
    published: float
    total: float

    def kill_env(self, when: str | float) -> dict[str, str]:
        """When to kill: seconds after the start (str), a fraction of the write window after the
        temporary's creation (float), or "after" the child would have exited."""
        if when == "after":
            return {"DELAY": f"{3 * self.total:.3f}"}
        if isinstance(when, str):
            return {"DELAY": when}
        return {"IN_WRITE": f"{when * (self.published - self.write):.4f}"}


@pytest.fixture(scope="module")
def timing(sources, tmp_path_factory):
    """The :class:`Timing` of a whole export in a child process, per format (measured once, uninterrupted)."""
    seen: dict[str, Timing] = {}

    def measure(fmt: str) -> Timing:
        if fmt not in seen:
            out = tmp_path_factory.mktemp(f"timing-{fmt}") / OUT_NAME[fmt]
            start = time.perf_counter()
            run = child("trace", argv(sources, fmt, out))
            total = time.perf_counter() - start
            assert run.rc == 0, run.err[-2000:]
            marks = dict(line.split()[1:] for line in run.err.splitlines() if line.startswith("trace "))
            seen[fmt] = Timing(float(marks["temp"]), float(marks["published"]), total)
            print(f"{fmt}: {seen[fmt]}")
        return seen[fmt]

    return measure


# kill times: seconds after the child starts (str), fractions of the window from the temporary's creation to
# its publication (float: that long after the creation), or after the child would have exited
DELAYS: list[str | float] = ["0.05", 0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0, "after"]
HOOKS = ["publish", "first-write"]


def check_killed(fmt: str, out: Path, run: Run) -> None:
    """After a kill: a whole output (published before the kill) and nothing else, or no output and nothing
    at all (GGUF) / only the dead child's owned temporaries (safetensors)."""
    assert run.rc in (0, -signal.SIGKILL), run.err[-2000:]
    if out.exists():  # published before the kill (and maybe exited): whole, and nothing beside it
        print(f"{fmt}: {'completed' if run.rc == 0 else 'published'} before the kill")
        assert leftovers(out.parent, out, set()) == []
        assert_valid(fmt, out)
        return
    assert run.rc == -signal.SIGKILL, run.err[-2000:]
    stray = owned_temps_of(out.parent, out, run.pid)
    print(f"{fmt}: killed, leaving {stray}")
    if fmt == "gguf":
        assert stray == [], "an unnamed temporary leaves no entry"


def next_run_cleans_up(sources, fmt: str, out: Path, capsys, *extra: str) -> None:
    """The next export to the same --out succeeds and leaves nothing but the output."""
    assert main(argv(sources, fmt, out, *extra)) == 0, capsys.readouterr().err
    assert_valid(fmt, out)
    assert leftovers(out.parent, out, set()) == []


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
@pytest.mark.parametrize("when", DELAYS + HOOKS, ids=[f"at-{d}s" if isinstance(d, str) else f"at-{d}-of-write"
                                                      for d in DELAYS[:-1]] + ["after-exit", *HOOKS])
def test_sigkill_leaves_nothing_behind(sources, timing, tmp_path, fmt, when, capsys):
    src = sources[fmt][0]
    digest = tree_hash(src)
    out = tmp_path / OUT_NAME[fmt]
    if when in HOOKS:
        run = child(when, argv(sources, fmt, out), KILL=1)
        assert run.rc == -signal.SIGKILL, run.err[-2000:]
    else:
        run = child("none", argv(sources, fmt, out), **timing(fmt).kill_env(when))
    check_killed(fmt, out, run)
    assert tree_hash(src) == digest, "the input changed"
    next_run_cleans_up(sources, fmt, out, capsys, *(["--overwrite"] if out.exists() else []))
    assert tree_hash(src) == digest


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
@pytest.mark.parametrize("hook", ["first-write", "publish", "replace"])
def test_sigkill_during_overwrite_keeps_the_old_output(sources, tmp_path, fmt, hook, capsys):
    """Killed before the swap: the old output is intact; what the run left (GGUF: the name it linked its
    file to just before renaming it over the output) is the dead child's own, and the next run removes it."""
    out = tmp_path / OUT_NAME[fmt]
    assert main(argv(sources, fmt, out)) == 0
    old = tree_hash(out)
    run = child(hook, argv(sources, fmt, out, "--overwrite", "--multiplier", "2"), KILL=1)
    assert run.rc == -signal.SIGKILL, run.err[-2000:]
    assert tree_hash(out) == old
    assert_valid(fmt, out)
    stray = owned_temps_of(tmp_path, out, run.pid)
    assert bool(stray) == (fmt == "safetensors" or hook == "replace"), stray
    next_run_cleans_up(sources, fmt, out, capsys, "--overwrite", "--multiplier", "2")
    assert tree_hash(out) != old


def test_sigkill_just_after_a_folder_swap_leaves_the_new_output_whole(sources, tmp_path, capsys):
    """Replacing a folder swaps it with the old one (RENAME_EXCHANGE), then removes the old one from
    the owned name it got: killed in between, the output is the new one, whole, and the old one is
    removed by the next run."""
    fmt, out = "safetensors", tmp_path / "out"
    assert main(argv(sources, fmt, out)) == 0
    run = child("swapped", argv(sources, fmt, out, "--overwrite", "--multiplier", "2"), KILL=1)
    assert run.rc == -signal.SIGKILL, run.err[-2000:]
    assert_valid(fmt, out)
    assert set(ExportManifest.load(out / MANIFEST_FILE).multiplier_map().values()) == {2.0}
    assert len(owned_temps_of(tmp_path, out, run.pid)) == 1  # the old output, under the dead child's name
    next_run_cleans_up(sources, fmt, out, capsys, "--overwrite")


# ---------------------------------------------------------------------------
# Full disk
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_full_disk_is_one_line_error(sources, tmp_path, fmt):
    src = sources[fmt][0]
    digest = tree_hash(src)
    out = tmp_path / ("out.gguf" if fmt == "gguf" else "out")
    size = src.stat().st_size if src.is_file() else max(p.stat().st_size for p in src.glob("*.safetensors"))
    rc, _, err, _ = child("none", argv(sources, fmt, out), FSIZE=size // 2)
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
    procs = [child("publish", argv(sources, fmt, out, "--multiplier", m), wait=False, SLEEP=sleep) for m in ("0", "2")]
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


# ---------------------------------------------------------------------------
# Unnamed and owned temporaries (core/atomic.py, core/owned_temps.py)
# ---------------------------------------------------------------------------


def test_a_single_file_output_is_unnamed_until_published(tmp_path):
    """The temporary of a file output has no entry in its folder; writers open it by its /proc name with
    open, mmap, np.memmap, copy_file_range and shutil.copyfile; it is published with linkat."""
    import mmap

    import numpy as np

    from cna_export.core.atomic import atomic_path

    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 64)
    out = tmp_path / "out" / "x.bin"  # a missing parent folder is created
    with atomic_path(out) as tmp:
        assert str(tmp).startswith("/proc/self/fd/") and os.listdir(out.parent) == []
        shutil.copyfile(src, tmp)
        with open(src, "rb") as s, open(tmp, "r+b") as d:
            d.seek(0, os.SEEK_END)
            assert os.copy_file_range(s.fileno(), d.fileno(), 256, 0) == 256
        mm = np.memmap(tmp, dtype=np.uint8, mode="r+", offset=0, shape=(4,))
        mm[:] = 7
        mm.flush()
        del mm
        with open(tmp, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
            assert m[:5] == bytes([7, 7, 7, 7, 4])
        assert os.listdir(out.parent) == []
    assert os.listdir(out.parent) == ["x.bin"]
    assert out.read_bytes() == bytes([7] * 4) + (bytes(range(256)) * 64)[4:] + bytes(range(256))
    umask = os.umask(0)
    os.umask(umask)
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~umask)


def test_an_unnamed_file_never_replaces_an_output_that_appeared_meanwhile(tmp_path):
    from cna_export.core.atomic import atomic_file

    out = tmp_path / "x.txt"
    with pytest.raises(CnaError, match="another run created it meanwhile"):
        with atomic_file(out, mode="w") as fh:
            fh.write("mine")
            out.write_text("theirs")
    assert out.read_text() == "theirs" and os.listdir(tmp_path) == ["x.txt"]
    with atomic_file(out, overwrite=True, mode="w") as fh:
        fh.write("mine")
    assert out.read_text() == "mine" and os.listdir(tmp_path) == ["x.txt"]


def test_the_named_fallback_is_owned_and_removed_after_a_kill(tmp_path, monkeypatch):
    """Where O_TMPFILE is missing, a file output is written under an owned name; killed, it is removed by
    the next run that writes the same output."""
    import cna_export.core.atomic as A

    monkeypatch.setattr(A, "_new_unnamed", lambda final: None)
    out = tmp_path / "x.bin"
    with A.atomic_path(out) as tmp:
        assert tmp.parent == tmp_path and owned_temps_of(tmp_path, out, os.getpid()) == [tmp.name]
        tmp.write_bytes(b"data")
    assert os.listdir(tmp_path) == ["x.bin"] and out.read_bytes() == b"data"
    code = ("import os, sys, cna_export.core.atomic as A\nA._new_unnamed = lambda final: None\n"
            "with A.atomic_path(sys.argv[1], overwrite=True) as t:\n    t.write_bytes(b'x')\n"
            "    os.kill(os.getpid(), 9)\n")
    p = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert len(leftovers(tmp_path, out, set())) == 1
    A.atomic_write_text(out, "new", overwrite=True)
    assert os.listdir(tmp_path) == ["x.bin"] and out.read_text() == "new"


def test_linkat_on_the_descriptor_when_the_proc_link_fails(tmp_path, monkeypatch):
    """The unnamed file is linked through /proc/self/fd with AT_SYMLINK_FOLLOW, else on its descriptor with
    AT_EMPTY_PATH, which needs CAP_DAC_READ_SEARCH (then the /proc error is reported)."""
    import cna_export.core.atomic as A

    real_link = os.link

    def no_proc_link(src, dst, **kw):
        if str(src).startswith("/proc/self/fd/"):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src))
        return real_link(src, dst, **kw)

    monkeypatch.setattr(os, "link", no_proc_link)
    out = tmp_path / "x.txt"
    if os.geteuid() != 0:
        with pytest.raises(CnaError, match="cannot write .*x.txt"):
            A.atomic_write_text(out, "data")
        assert os.listdir(tmp_path) == []
        return
    A.atomic_write_text(out, "data")
    assert out.read_text() == "data" and os.listdir(tmp_path) == ["x.txt"]


def fake_temp(folder: Path, out: str, pid: int, start: int, boot: str | None = None, label: str = "",
              folder_temp: bool = True) -> Path:
    from cna_export.core.owned_temps import current_owner

    boot = boot or current_owner().boot
    p = folder / f".{out}.{label}{pid}.{start}.{boot}.0123abcd.tmp"
    if folder_temp:
        p.mkdir()
        (p / "part").write_bytes(b"x")
    else:
        p.write_bytes(b"x")
    return p


def test_only_temporaries_of_dead_writers_are_removed(tmp_path):
    """pid dead, or alive with another start time (a reused pid): removed. Alive with its start time, or
    its lock held, or another output's, or not an owned name: kept. Another boot's: removed when the lock
    is free. A backup is kept while the output is missing."""
    from cna_export.core.atomic import remove_stale_temps
    from cna_export.core.owned_temps import _proc_start, current_owner

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    parent = os.getppid()
    parent_start = _proc_start(parent)[0]
    me = current_owner()
    out = tmp_path / "m.gguf"
    stale = [fake_temp(tmp_path, out.name, int(dead), 12345),
             fake_temp(tmp_path, out.name, parent, parent_start + 1),  # a reused pid
             fake_temp(tmp_path, out.name, int(dead), 5, folder_temp=False),
             fake_temp(tmp_path, out.name, parent, parent_start, boot="ffffffff" if me.boot != "ffffffff" else "0" * 8)]
    kept = [fake_temp(tmp_path, out.name, parent, parent_start),  # a live writer (it may not hold its lock yet)
            fake_temp(tmp_path, out.name, me.pid, me.start),  # this process's own
            fake_temp(tmp_path, "other.gguf", int(dead), 1),
            fake_temp(tmp_path, out.name, int(dead), 1, label="old-")]  # a backup while the output is missing
    (tmp_path / f".{out.name}.abcd1234.tmp").mkdir()  # an old-style temporary: its writer is unknown
    kept.append(tmp_path / f".{out.name}.abcd1234.tmp")
    held = fake_temp(tmp_path, out.name, int(dead), 99)
    hold = ("import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDONLY)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\ntime.sleep(60)")
    locker = subprocess.Popen([sys.executable, "-c", hold, str(held)], stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        removed = remove_stale_temps(out)
    finally:
        locker.kill()
        locker.wait()
    assert sorted(removed) == sorted(stale)
    assert all(not p.exists() for p in stale) and all(p.exists() for p in kept + [held])
    out.write_bytes(b"the output is back")
    assert sorted(remove_stale_temps(out)) == sorted([kept[3], held])  # the backup; the temp whose locker died
