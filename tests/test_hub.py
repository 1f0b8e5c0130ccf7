"""Hub push, offline: a local HTTP server on 127.0.0.1 answers the Hub API calls huggingface_hub makes
(``HF_ENDPOINT``), and the test asserts the files and the card that arrive. No real network."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from conftest import planted_circuit


class FakeHub:
    """Records repo creations and commits; every file is asked to be uploaded inline ("regular")."""

    def __init__(self) -> None:
        self.created: list[dict] = []
        self.commits: list[dict] = []  # {"repo": id, "header": {...}, "files": {path: bytes}}
        self.unknown: list[str] = []
        self.validated: list[dict] = []

    def handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _json(self, code: int, data: dict) -> None:
                body = json.dumps(data).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_POST(self) -> None:
                data = self._body()
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    req = json.loads(data)
                    req["authorization"] = self.headers.get("authorization")
                    hub.created.append(req)
                    rid = f"{req.get('organization') or 'me'}/{req['name']}" if "/" not in req["name"] else req["name"]
                    return self._json(200, {"url": f"http://{self.headers['Host']}/{rid}", "name": rid})
                if path == "/api/validate-yaml":  # the client checks the card's metadata before committing
                    hub.validated.append(json.loads(data))
                    return self._json(200, {"errors": [], "warnings": []})
                if "/preupload/" in path:
                    files = json.loads(data)["files"]
                    return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                if "/commit/" in path:
                    repo = path.split("/api/models/")[1].split("/commit/")[0]
                    lines = [json.loads(x) for x in data.decode().splitlines() if x.strip()]
                    files = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines
                             if x["key"] == "file"}
                    header = next((x["value"] for x in lines if x["key"] == "header"), {})
                    hub.commits.append({"repo": repo, "header": header, "files": files})
                    return self._json(200, {"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/1",
                                            "commitOid": "1" * 40, "success": True})
                hub.unknown.append(f"POST {path}")
                return self._json(404, {"error": "not here"})

            def do_GET(self) -> None:
                if self.path.startswith("/api/agent-harnesses"):  # the client's environment lookup (user agent)
                    return self._json(200, {})
                hub.unknown.append(f"GET {self.path}")
                return self._json(404, {"error": "not here"})

        return H


@pytest.fixture()
def fake_hub(monkeypatch):
    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), hub.handler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    import huggingface_hub.constants as C

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(C, "ENDPOINT", endpoint)
    monkeypatch.setattr(C, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
    yield hub
    server.shutdown()


def _card(files: dict[str, bytes]) -> tuple[dict, str]:
    text = files["README.md"].decode()
    assert text.startswith("---\n")
    meta_text, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(meta_text), body


def test_push_lora_adapter(fake_hub, tiny_models, tmp_path, capsys, one_thread):
    from cna_export.cli import main
    from cna_export.core.settings import VerifyOptions
    from cna_export.export.lora import export_lora
    from cna_export.verification.lora import verify_lora

    src = tiny_models["llama"]
    circ = planted_circuit(src, own=True)
    circ.method["recipe"] = "refusal"
    opts = VerifyOptions(limit=2, max_new_tokens=2)
    export_lora(str(src), circ, tmp_path / "ad",
                check=lambda staged: verify_lora(staged.source, staged.path, opts, manifest=staged.manifest))
    code = main(["push", str(tmp_path / "ad"), "someone/steered-lora", "--private"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert fake_hub.unknown == []
    assert len(fake_hub.created) == 1 and fake_hub.created[0]["visibility"] == "private"
    assert fake_hub.created[0]["authorization"] == "Bearer hf_test_token"
    assert len(fake_hub.commits) == 1  # one commit
    commit = fake_hub.commits[0]
    assert commit["repo"] == "someone/steered-lora"
    expected = {"adapter_config.json", "adapter_model.safetensors", "cna_manifest.json", "README.md"}
    assert set(commit["files"]) == expected
    assert commit["files"]["adapter_model.safetensors"] == (tmp_path / "ad" / "adapter_model.safetensors").read_bytes()
    meta, body = _card(commit["files"])
    print("card metadata sent:", meta)
    # a local base has no Hub id, so no base_model; everything else is set
    assert meta == {"library_name": "peft", "tags": ["cna-export", "steering", "refusal", "lora"]}
    assert "## Verification" in body and "| max abs delta logit |" in body and "**passed**" in body
    assert "## Steering" in body


def test_push_metadata_for_each_kind(tmp_path):
    """base_model / base_model_relation / library_name for every format, from the manifests."""
    from cna_export.core.circuit import Circuit, ModelIdentity, Neuron
    from cna_export.core.manifest import ExportManifest, NeuronMultiplier
    from cna_export.export.hub import card_metadata

    ident = ModelIdentity(name="x", architecture="llama", num_layers=2, hidden_size=4, intermediate_size=8)
    circ = Circuit(model=ident, neurons=[Neuron(layer=0, index=1, score=1.0)], method={"recipe": "refusal"})

    def m(fmt: str, source: str = "bundled:smollm2") -> ExportManifest:
        return ExportManifest(format=fmt, source=source, source_format="gguf", fold="down", circuit=circ,
                              multipliers=[NeuronMultiplier(layer=0, index=1, multiplier=0.0)])

    want = {"lora": ("adapter", "peft"), "gguf_lora": ("adapter", "gguf"), "safetensors": ("finetune", "transformers"),
            "gguf": ("quantized", "gguf")}
    for fmt, (relation, library) in want.items():
        meta = card_metadata([(".", m(fmt))])
        assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert (meta["base_model_relation"], meta["library_name"]) == (relation, library), fmt
        assert meta["tags"][:3] == ["cna-export", "steering", "refusal"]
    assert card_metadata([(".", m("lora", "Qwen/Qwen2.5-0.5B-Instruct"))])["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct"


def test_push_gguf_export_and_missing_token(fake_hub, tmp_path, capsys, monkeypatch):
    """A GGUF export goes up with its Modelfile and a card rendered from its manifest; without a token,
    export --push-to-hub stops with one line before any work."""
    from test_gguf_export import build_gguf, export

    from cna_export.cli import main

    src = build_gguf(tmp_path / "src.gguf")
    out = tmp_path / "o" / "steered.gguf"
    out.parent.mkdir()
    export(src, out, modelfile=True)
    code = main(["push", str(out), "someone/steered-gguf"])
    assert code == 0, capsys.readouterr().err
    commit = fake_hub.commits[-1]
    assert set(commit["files"]) == {"steered.gguf", "steered.Modelfile", "README.md"}
    meta, body = _card(commit["files"])
    assert meta["library_name"] == "gguf" and "cna-export" in meta["tags"] and "gguf" in meta["tags"]
    assert "## steered GGUF" in body and "### Verification" in body

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "nohome"))  # no cached login either
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_TOKEN_PATH", str(tmp_path / "nohome" / "token"))
    monkeypatch.setattr(C, "HF_STORED_TOKENS_PATH", str(tmp_path / "nohome" / "stored_tokens"))
    target = tmp_path / "never.gguf"
    code = main(["export", "--model", str(src), "--circuit", str(tmp_path / "missing.json"), "--out", str(target),
                 "--push-to-hub", "someone/x"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "token" in err, err
    assert not target.exists()
    code = main(["push", str(out), "not a repo id"])
    assert code == 2


def test_steer_push_to_hub(fake_hub, tiny_models, tmp_path, capsys, one_thread):
    from cna_export.cli import main

    src = tiny_models["llama"]
    circuit = tmp_path / "c.json"
    c = planted_circuit(src, own=True)
    c.method["recipe"] = "refusal"
    c.save(circuit)
    code = main(["steer", "--model", str(src), "--circuit", str(circuit), "--out", str(tmp_path / "o"),
                 "--format", "lora,safetensors", "--push-to-hub", "someone/steered"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "pushed" in out.out and len(fake_hub.commits) == 1
    files = fake_hub.commits[0]["files"]
    assert {"circuit.json", "steer.json", "README.md", "lora/adapter_config.json",
            "safetensors/cna_manifest.json"} <= set(files)
    meta, body = _card(files)
    assert meta["library_name"] == "peft" and meta["tags"][:3] == ["cna-export", "steering", "refusal"]
    assert "## PEFT LoRA adapter (`lora`)" in body and "## steered safetensors checkpoint (`safetensors`)" in body


def test_every_bundled_model_names_its_upstream_hub_id():
    """A card pushed from any bundled model names the model it was converted from (``base_model``)."""
    from cna_export.export.hub import base_model_id
    from cna_export.io.bundled import NAMES, PREFIX

    for name in NAMES:
        assert base_model_id(PREFIX + name), name
