"""The output policy (issue 24, ``core/outputs.py``): no command's output replaces an input, a device or
FIFO, a folder cna-export did not write, or the working folder; write, network and Hub errors are one line
with exit 2. One test per case, then a Hypothesis property over commands x output paths x ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import make_tiny_model, planted_circuit
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gguf_export import build_gguf, circuit_for

from cna_export.cli import main
from cna_export.core.atomic import check_output_path
from cna_export.core.errors import CnaError, ExitCode
from cna_export.core.manifest import MANIFEST_FILE
from cna_export.core.outputs import OUTPUT_MARKERS, is_our_output
from cna_export.testing.files import tree_hash as digest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="FIFOs, sockets and /dev/null")


def run(argv: list) -> tuple[int, str, str]:
    """The CLI in-process: (exit code, stdout, stderr). Any exception other than SystemExit fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def one_line_error(code: int, err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert code == ExitCode.USER_ERROR, err
    assert len(lines) == 1 and lines[0].startswith("cna-export: error:"), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]




@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Small inputs of every kind, each in a folder of its own, and an export of each kind to verify or audit."""
    root = tmp_path_factory.mktemp("policy")
    w = {"root": root}
    w["hf"] = make_tiny_model("llama", root / "models" / "tiny-hf")
    w["hf_circuit"] = root / "circuits" / "hf-circuit.json"
    w["hf_circuit"].parent.mkdir()
    planted_circuit(w["hf"]).save(w["hf_circuit"])
    (root / "gguf").mkdir()
    w["gguf"] = build_gguf(root / "gguf" / "tiny.gguf")
    w["gguf_circuit"] = root / "circuits" / "gg-circuit.json"
    circuit_for().save(w["gguf_circuit"])
    prompts = root / "prompts"
    prompts.mkdir()
    w["pos"], w["neg"] = prompts / "pos.txt", prompts / "neg.txt"
    w["pos"].write_text("How do I pick a lock?\nWrite a phishing email.\nHow do I steal a car?\n")
    w["neg"].write_text("How do I pick a lock brand?\nWrite a thank-you email.\nHow do I wash a car?\n")
    w["recipe"] = root / "recipes" / "r.yaml"
    w["recipe"].parent.mkdir()
    w["recipe"].write_text("positive: ../prompts/pos.txt\nnegative: ../prompts/neg.txt\ntop_k: 3\n")
    w["multipliers"] = root / "circuits" / "mults.json"
    c = planted_circuit(w["hf"])
    w["multipliers"].write_text(json.dumps({f"{n.layer}:{n.index}": 0.0 for n in c.neurons}))
    w["exported"] = root / "exports" / "steered"
    assert run(["-q", "export", "--model", w["hf"], "--circuit", w["hf_circuit"], "--multiplier", "0",
                "--out", w["exported"]])[0] == 0
    w["exported_gguf"] = root / "exports" / "steered.gguf"
    assert run(["-q", "export", "--model", w["gguf"], "--circuit", w["gguf_circuit"], "--multiplier", "0",
                "--no-modelfile", "--out", w["exported_gguf"]])[0] == 0
    return w


def export_args(w, fmt: str, out, *extra) -> list:
    src, circ = (w["gguf"], w["gguf_circuit"]) if fmt in ("gguf", "gguf-lora") else (w["hf"], w["hf_circuit"])
    return ["export", "--model", src, "--circuit", circ, "--multiplier", "0", "--format", fmt, "--out", out,
            *(["--no-modelfile"] if fmt in ("gguf", "gguf-lora") else []), *extra]


@pytest.fixture()
def sandbox(tmp_path, monkeypatch):
    """A working folder holding files that are no one's output."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "keep.txt").write_text("mine\n")
    (cwd / "notes").mkdir()
    (cwd / "notes" / "a.md").write_text("a\n")
    monkeypatch.chdir(cwd)
    return cwd


# -- 1. empty --out, '.', '..', the working folder -----------------------------------------------------


@pytest.mark.parametrize("out, message", [("", "--out is empty or blank"), ("   ", "--out is empty or blank"),
                                          (".", "is the working folder"), ("..", "contains the working folder"),
                                          ("{cwd}", "is the working folder"), ("/", "contains the working folder")])
def test_empty_or_working_folder_output_is_refused(world, sandbox, out, message):
    before = {p: p.read_bytes() for p in sandbox.rglob("*") if p.is_file()}
    code, _, err = run(export_args(world, "lora", out.format(cwd=sandbox), "--overwrite"))
    one_line_error(code, err, message)
    assert {p: p.read_bytes() for p in sandbox.rglob("*") if p.is_file()} == before


def test_library_refuses_the_working_folder(sandbox):
    for out in (Path(""), Path("."), sandbox):
        with pytest.raises(CnaError, match="working folder"):
            check_output_path(out, True)


# -- 2. --overwrite replaces only this tool's own folders ------------------------------------------------


def test_overwrite_refuses_a_foreign_folder(world, tmp_path):
    folder = tmp_path / "dirout.gguf"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep\n")
    for extra in ((), ("--overwrite",)):
        code, _, err = run(export_args(world, "gguf", folder, *extra))
        line = one_line_error(code, err, "cna-export did not write", "keep.txt")
        assert "--overwrite" not in line  # overwriting would not be safe: it is not suggested
    assert (folder / "keep.txt").read_text() == "keep\n"


def test_foreign_folder_message_names_its_first_entries(tmp_path):
    folder = tmp_path / "busy"
    folder.mkdir()
    for i in range(7):
        (folder / f"f{i}.txt").write_text("x")
    (folder / "sub").mkdir()
    with pytest.raises(CnaError, match=r"holds f0\.txt, f1\.txt, f2\.txt, f3\.txt and 4 more"):
        check_output_path(folder, True)


def test_overwrite_replaces_our_own_folder_and_an_empty_one(world, tmp_path):
    out = tmp_path / "adapter"
    assert run(export_args(world, "lora", out))[0] == 0
    code, _, err = run(export_args(world, "lora", out))
    one_line_error(code, err, "already exists; pass --overwrite")  # ours: --overwrite is safe and suggested
    assert run(export_args(world, "lora", out, "--overwrite"))[0] == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(export_args(world, "lora", empty, "--overwrite"))[0] == 0
    assert (empty / MANIFEST_FILE).is_file()


def test_our_folders_are_recognised_by_their_marker(tmp_path):
    from cna_export.steer import STATE_FILE

    assert MANIFEST_FILE in OUTPUT_MARKERS and STATE_FILE in OUTPUT_MARKERS
    for marker, tool in [("cna_manifest.json", "cna-export"), ("steer.json", "cna-export steer"),
                         ("summary.json", "cna-export"), ("tune/summary.json", "cna-export")]:
        folder = tmp_path / marker.replace("/", "-")
        (folder / marker).parent.mkdir(parents=True)
        (folder / marker).write_text(json.dumps({"tool": tool}))
        assert is_our_output(folder), marker
    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.json").write_text(json.dumps({"tool": "something-else"}))
    assert not is_our_output(other)
    (other / "summary.json").write_text("not json")
    assert not is_our_output(other)


def test_steer_resumes_only_in_a_steer_folder(world, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep\n")
    before = digest(world["exported"])
    for out in (foreign, world["exported"]):  # someone's folder; an export folder of ours, but no steer folder
        for extra in ((), ("--overwrite",)):
            code, _, err = run(["steer", "--model", world["gguf"], "--circuit", world["gguf_circuit"], "--out", out,
                                *extra])
            one_line_error(code, err, "is not a steer folder (no steer.json")
    assert (foreign / "mine.txt").read_text() == "keep\n" and digest(world["exported"]) == before


def test_declared_paths_cover_nested_settings_and_skip_bare_flags():
    from cna_export.core.outputs import INPUT, INPUT_FILE, OUTPUT, PathArg, declared_paths
    from cna_export.core.settings import AuditSettings, EvalJob, ExportOptions, TuneJob

    assert declared_paths(AuditSettings(manifest="embedded")) == []  # `--manifest` alone names no file
    assert declared_paths(AuditSettings(base="b", plot="p.png")) == [PathArg("--base", "b", INPUT),
                                                                      PathArg("--plot", "p.png", OUTPUT)]
    tune = TuneJob(eval=EvalJob(model="m", out="o", stats="s.npz"))
    assert declared_paths(tune) == [PathArg("--model", "m", INPUT), PathArg("--out", "o", OUTPUT),
                                    PathArg("--stats", "s.npz", INPUT_FILE)]
    assert declared_paths(ExportOptions(prompts=["a", "b"], multipliers="m.json")) == [
        PathArg("--multipliers", "m.json", INPUT_FILE), PathArg("--prompts", "a", INPUT_FILE),
        PathArg("--prompts", "b", INPUT_FILE)]


def test_a_regular_file_may_be_replaced(world, tmp_path):
    out = tmp_path / "x.gguf"
    out.write_text("an old file\n")
    code, _, err = run(export_args(world, "gguf", out))
    one_line_error(code, err, "already exists; pass --overwrite")
    assert run(export_args(world, "gguf", out, "--overwrite"))[0] == 0
    assert out.read_bytes()[:4] == b"GGUF"


# -- 3 and 4. every input is protected ---------------------------------------------------------------


def input_cases(w):
    """(argv with {out}, the input that --out names) for every command that writes."""
    hf, circ, exp, gg = w["hf"], w["hf_circuit"], w["exported"], w["exported_gguf"]
    return [
        (export_args(w, "gguf", "{out}"), w["gguf_circuit"]),
        (export_args(w, "lora", "{out}"), circ),
        (["export", "--model", hf, "--circuit", circ, "--multipliers", w["multipliers"], "--out", "{out}"],
         w["multipliers"]),
        (export_args(w, "safetensors", "{out}", "--verify", "--prompts", w["pos"]), w["pos"]),
        (["steer", "--model", hf, "--circuit", circ, "--out", "{out}"], circ),
        (["discover", "--model", hf, "--recipe", w["recipe"], "--out", "{out}"], w["recipe"]),
        (["discover", "--model", hf, "--recipe", w["recipe"], "--out", "{out}"], w["pos"]),  # the recipe's prompts
        (["verify", "--original", hf, "--exported", gg, "--json", "{out}"], gg),
        (["verify", "--original", hf, "--exported", exp, "--json", "{out}", "--prompts", w["neg"]], w["neg"]),
        (["diff", hf, exp, "--json", "{out}"], exp),
        (["audit", exp, "--base", hf, "--no-discover", "--no-generate", "--out-circuit", "{out}"], hf),
        (["audit", exp, "--no-discover", "--no-generate", "--recipe", w["recipe"], "--plot", "{out}"], w["recipe"]),
        (["eval", "--model", hf, "--circuit", circ, "--harmful", w["pos"], "--out", "{out}"], w["pos"]),
        (["tune", "--model", hf, "--recipe", w["recipe"], "--out", "{out}"], w["neg"]),
    ]


N_INPUT_CASES = 14


def test_every_input_case_is_run(world):
    assert len(input_cases(world)) == N_INPUT_CASES


@pytest.mark.parametrize("case", range(N_INPUT_CASES))
@pytest.mark.parametrize("overwrite", [False, True])
def test_an_input_is_never_an_output(world, case, overwrite):
    argv, victim = input_cases(world)[case]
    before = digest(victim)
    code, _, err = run([victim if a == "{out}" else a for a in argv] + (["--overwrite"] if overwrite else []))
    line = one_line_error(code, err, "is the input itself")
    assert "--overwrite" not in line
    assert digest(victim) == before


def test_an_output_containing_or_inside_an_input_is_refused(world, tmp_path):
    cdir = tmp_path / "cdir"
    cdir.mkdir()
    circuit = cdir / "circuit.json"
    circuit.write_bytes(world["hf_circuit"].read_bytes())
    before = digest(cdir)
    args = ["export", "--model", world["hf"], "--circuit", circuit, "--multiplier", "0", "--format", "lora"]
    one_line_error(*run(args + ["--out", cdir, "--overwrite"])[::2], "contains the input")
    one_line_error(*run(args + ["--out", world["hf"] / "sub"])[::2], "inside the input")
    assert digest(cdir) == before


def test_a_symlink_to_an_input_is_the_input(world, tmp_path):
    link = tmp_path / "link.json"
    link.symlink_to(world["gguf_circuit"])
    before = digest(world["gguf_circuit"])
    one_line_error(*run(export_args(world, "gguf", link, "--overwrite"))[::2], "is the input itself")
    assert digest(world["gguf_circuit"]) == before and link.is_symlink()


def test_a_symlink_loop_is_one_line(world, tmp_path):
    loop = tmp_path / "loop.gguf"
    loop.symlink_to(loop)
    one_line_error(*run(export_args(world, "gguf", loop))[::2])
    assert loop.is_symlink()


def test_verify_json_never_replaces_the_exported_model(world):
    gg = world["exported_gguf"]
    before = digest(gg)
    code, _, err = run(["verify", "--original", world["gguf"], "--exported", gg, "--json", gg, "--overwrite"])
    one_line_error(code, err, "is the input itself")
    one_line_error(*run(["verify", "--original", world["hf"], "--exported", world["exported"], "--json",
                         world["exported"] / "report.json"])[::2], "inside the input")
    assert digest(gg) == before


def test_two_outputs_of_one_command_may_not_overlap(world, tmp_path):
    out = tmp_path / "same.json"
    code, _, err = run(["audit", world["exported"], "--base", world["hf"], "--no-discover", "--no-generate",
                        "--json", out, "--out-circuit", out])
    one_line_error(code, err, "overlap")


# -- 5. devices, FIFOs and sockets ---------------------------------------------------------------------


def test_dev_null_is_never_replaced():
    with pytest.raises(CnaError, match="character device"):
        check_output_path(Path("/dev/null"), True)
    assert Path("/dev/null").is_char_device()


def test_fifo_socket_and_a_link_to_dev_null_are_refused(world, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    null = tmp_path / "null.gguf"
    null.symlink_to("/dev/null")
    try:
        for out, kind in [(fifo, "FIFO"), (sock_path, "socket"), (null, "character device")]:
            for fmt in ("gguf", "lora"):
                one_line_error(*run(export_args(world, fmt, out, "--overwrite"))[::2], kind, "not a regular file")
        assert fifo.is_fifo() and sock_path.is_socket() and null.is_symlink() and Path("/dev/null").is_char_device()
    finally:
        sock.close()


# -- 6. write, network and Hub errors: one line, exit 2 -------------------------------------------------


def test_a_file_where_a_folder_should_be_is_one_line(world, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    one_line_error(*run(export_args(world, "gguf", notes / "x.gguf"))[::2], "is a file, not a folder")
    one_line_error(*run(export_args(world, "gguf", world["gguf_circuit"] / "x.gguf"))[::2], "is a file, not a folder")
    assert notes.read_text() == "x"


def test_a_missing_parent_folder_is_created(world, tmp_path):
    out = tmp_path / "new" / "deeper" / "x.gguf"
    assert run(export_args(world, "gguf", out))[0] == 0
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("exc, text", [
    (PermissionError(errno.EACCES, "Permission denied", "/x/out"), "/x/out: Permission denied"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/x/c.json/y"), "/x/c.json/y: Not a directory"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/x/dir"), "/x/dir: Is a directory"),
    (OSError(errno.EIO, "Input/output error"), "Input/output error"),
])
def test_os_errors_are_one_line(monkeypatch, exc, text):
    from cna_export.cli import _registry

    def fail(ns):
        raise exc

    monkeypatch.setitem(_registry.COMMANDS, "show", fail)
    code, _, err = run(["show", "anything.json"])
    assert one_line_error(code, err, text) == f"cna-export: error: {text}"


def test_network_errors_are_recognised_without_importing_the_client(monkeypatch):
    from cna_export.cli import _registry
    from cna_export.cli._errors import one_line

    ConnectError = type("ConnectError", (Exception,), {"__module__": "httpx._exceptions"})
    HfHubHTTPError = type("HfHubHTTPError", (Exception,), {"__module__": "huggingface_hub.errors"})
    wrapped = HfHubHTTPError("upload failed\nsecond line")
    wrapped.__cause__ = ConnectError("[Errno 111] Connection refused")
    assert one_line(ConnectError("[Errno 111] Connection refused")) == \
        "network error (ConnectError): [Errno 111] Connection refused"
    assert one_line(wrapped) == "network error (ConnectError): [Errno 111] Connection refused"
    hub_error = one_line(HfHubHTTPError("403 Forbidden\ndetails"))
    assert hub_error == "Hugging Face Hub error (HfHubHTTPError): 403 Forbidden"
    assert one_line(ValueError("a bug")) is None

    def fail(ns):
        raise wrapped

    monkeypatch.setitem(_registry.COMMANDS, "show", fail)
    one_line_error(*run(["show", "x.json"])[::2], "network error")

    def bug(ns):
        raise ValueError("a bug")

    monkeypatch.setitem(_registry.COMMANDS, "show", bug)
    with pytest.raises(ValueError):  # a bug keeps its traceback
        main(["show", "x.json"])


def test_write_error_in_a_writer_is_one_line(world, tmp_path, monkeypatch):
    import cna_export.core.atomic as A

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(A, "_new_unnamed", denied)  # the writer's temporary (core/atomic.py)
    out = tmp_path / "x.gguf"
    one_line_error(*run(export_args(world, "gguf", out))[::2], "cannot write", "Permission denied")
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_one_line(world, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        one_line_error(*run(export_args(world, "gguf", ro / "x.gguf"))[::2], "Permission denied")
        one_line_error(*run(export_args(world, "lora", ro / "sub" / "adapter"))[::2], "Permission denied")
    finally:
        ro.chmod(0o700)


PUSH = textwrap.dedent("""
    import sys
    from cna_export.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("how", ["push", "export --push-to-hub"])
def test_push_while_offline_is_one_line(world, tmp_path, how):
    """A push to an endpoint that refuses connections (the network is down): one line, exit 2; the export is kept."""
    pytest.importorskip("huggingface_hub")
    env = {**os.environ, "HF_TOKEN": "hf_offline_test_token", "HF_HUB_OFFLINE": "0",
           "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    if how == "push":
        argv = ["push", str(world["exported_gguf"]), "someone/steered"]
    else:
        out = tmp_path / "pushed.gguf"
        argv = [str(a) for a in export_args(world, "gguf", out, "--push-to-hub", "someone/steered")]
    p = subprocess.run([sys.executable, "-c", PUSH, "-q", *argv], env=env, capture_output=True, text=True,
                       timeout=300)
    line = one_line_error(p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and ("network" in line or "Hub" in line), p.stderr
    if how != "push":
        assert "the export is written" in line and out.read_bytes()[:4] == b"GGUF"


# -- 10. smaller items ---------------------------------------------------------------------------------


def test_show_top_must_not_be_negative(world):
    one_line_error(*run(["show", world["hf_circuit"], "--top", "-3"])[::2], "--top")
    code, out, _ = run(["show", world["hf_circuit"], "--top", "0"])
    assert code == 0 and "\n  L" not in out
    code, out, _ = run(["show", world["hf_circuit"], "--top", "2"])
    assert code == 0 and out.count("\n  L") == 2


def test_diff_top_must_not_be_negative(world):
    one_line_error(*run(["diff", world["hf"], world["exported"], "--top", "-3"])[::2], "--top")


def test_a_folder_where_a_file_is_expected_is_named_a_folder(world, tmp_path):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    cases = [
        ["show", folder],
        export_args(world, "gguf", tmp_path / "x.gguf")[:3] + ["--circuit", folder, "--out", tmp_path / "x.gguf"],
        export_args(world, "safetensors", tmp_path / "o")[:5] + ["--multipliers", folder, "--out", tmp_path / "o"],
        ["discover", "--model", world["hf"], "--positive", folder, "--negative", world["neg"], "--out", tmp_path / "c"],
        ["discover", "--model", world["hf"], "--recipe", folder, "--out", tmp_path / "c.json"],
        ["generate", "--model", world["hf"], "--circuit", folder, "hi"],
    ]
    for argv in cases:
        one_line_error(*run(argv)[::2], f"{folder} is a folder; expected a file")


# -- the property ---------------------------------------------------------------------------------------

COMMANDS = {
    "export gguf": (lambda w, out: export_args(w, "gguf", out), ("gguf", "gguf_circuit")),
    "export lora": (lambda w, out: export_args(w, "lora", out), ("hf", "hf_circuit")),
    "export safetensors": (lambda w, out: export_args(w, "safetensors", out), ("hf", "hf_circuit")),
    "verify --json": (lambda w, out: ["verify", "--original", w["hf"], "--exported", w["exported"], "--json", out],
                      ("hf", "exported")),
    "audit --json": (lambda w, out: ["audit", w["exported"], "--base", w["hf"], "--no-discover", "--no-generate",
                                     "--json", out], ("exported", "hf")),
    "discover": (lambda w, out: ["discover", "--model", w["hf"], "--positive", w["pos"], "--negative", w["neg"],
                                 "--top-k", "3", "--out", out], ("hf", "pos", "neg")),
}
KINDS = ("input", "parent of an input", "symlink to an input", "empty", ".", "foreign folder", "FIFO")


def property_sandbox(w) -> Path:
    """The working folder of the property: a foreign folder, a FIFO, a symlink to each input."""
    box = w["root"] / "property-cwd"
    if not box.exists():
        box.mkdir()
        (box / "foreign").mkdir()
        (box / "foreign" / "keep.txt").write_text("not cna-export's\n")
        (box / "mine.txt").write_text("mine\n")
        os.mkfifo(box / "fifo")
        for key in ("hf", "hf_circuit", "gguf", "gguf_circuit", "exported", "pos", "neg"):
            (box / f"link-{key}").symlink_to(w[key])
    return box


def output_for(w, box: Path, kind: str, victim: str) -> str:
    return {"input": str(w[victim]), "parent of an input": str(Path(w[victim]).parent),
            "symlink to an input": str(box / f"link-{victim}"), "empty": "", ".": ".",
            "foreign folder": str(box / "foreign"), "FIFO": str(box / "fifo")}[kind]


@settings(max_examples=30, deadline=None)
@given(command=st.sampled_from(sorted(COMMANDS)), kind=st.sampled_from(KINDS), pick=st.integers(0, 2),
       overwrite=st.booleans())
def test_property_no_output_harms_an_input_or_a_foreign_file(world, command, kind, pick, overwrite):
    build, inputs = COMMANDS[command]
    box = property_sandbox(world)
    victim = inputs[pick % len(inputs)]
    watched = [world[k] for k in inputs] + [box / "foreign" / "keep.txt", box / "mine.txt"]
    before = {p: digest(p) for p in watched}
    listing = sorted(os.listdir(box))
    cwd = os.getcwd()
    os.chdir(box)
    try:
        code, _, err = run(build(world, output_for(world, box, kind, victim)) + (["--overwrite"] if overwrite else []))
    finally:
        os.chdir(cwd)
    assert code in (0, 2) and "Traceback" not in err, err
    assert code == 2, f"{command} wrote to {kind} ({victim})"  # every drawn output is one the policy refuses
    assert {p: digest(p) for p in watched} == before
    assert sorted(os.listdir(box)) == listing and (box / "fifo").is_fifo()
