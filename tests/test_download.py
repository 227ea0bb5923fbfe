"""model.resolve_checkpoint against a local HTTP server in the hub's URL layout
(/{org}/{name}/resolve/main/{file}, reached through HF_ENDPOINT): a full download, a sharded one,
a resume after a cut transfer, 404, 401 and HF_TOKEN, and reuse of an existing HF cache."""

import http.server
import re
import shutil
import threading

import pytest
import torch
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

import model as M

TOKEN = "hf_test_token"


class Hub(http.server.BaseHTTPRequestHandler):
    """Serves server.repos[repo][file] at /{repo}/resolve/main/{file}; logs every request.

    A gated repo wants the token and redirects as the hub does: small files to a same-host
    /api/resolve-cache/ URL (token still needed), safetensors to a signed URL on another host
    ("localhost" rather than 127.0.0.1) that rejects requests carrying a token.
    """

    def do_GET(self):
        srv, auth = self.server, self.headers.get("Authorization")
        srv.log.append((self.path, self.headers.get("Range"), auth))
        # /{repo}/resolve/main/{file}, /api/resolve-cache/{repo}/{file} or /cdn/{repo}/{file}
        m = re.fullmatch(
            r"/(cdn/|api/resolve-cache/)?([^/]+/[^/]+)/(resolve/main/)?(.+)", self.path
        )
        kind, repo, file = (m[1] or "hub/").split("/")[0], m[2], m[4]
        if kind == "cdn" and auth is not None:
            return self.send_error(400, "only one auth mechanism allowed")
        if repo in srv.gated and kind != "cdn":
            if auth != f"Bearer {TOKEN}":
                return self.send_error(401)
            if kind != "api":
                port = srv.server_address[1]
                to = f"http://localhost:{port}/cdn/{repo}/{file}"
                if not file.endswith(".safetensors"):
                    to = f"/api/resolve-cache/{repo}/{file}"
                self.send_response(302)
                self.send_header("Location", to)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        data = srv.repos.get(repo, {}).get(file)
        if data is None:
            return self.send_error(404)
        start = int(self.headers["Range"][len("bytes=") : -1]) if "Range" in self.headers else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if (repo, file) in srv.cut:  # send half, then drop the connection
            srv.cut.discard((repo, file))
            self.wfile.write(data[start : start + (len(data) - start) // 2])
            self.close_connection = True
            return
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    server.repos, server.gated, server.cut, server.log = {}, set(), set(), []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("SIKED_CACHE", str(tmp_path / "siked-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))  # empty: never the real one
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny llama checkpoint with a tokenizer, as folders of files: single-file and sharded."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    hf = AutoModelForCausalLM.from_config(config).eval()
    raw = RawTokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "hi": 2}, "hi"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    for name, shard in (("single", "100MB"), ("sharded", "20KB")):
        hf.save_pretrained(root / name, max_shard_size=shard)
        tok.save_pretrained(root / name)
    assert (root / "sharded" / "model.safetensors.index.json").is_file()
    return root, hf


def serve(hub, repo, folder):
    hub.repos[repo] = {p.name: p.read_bytes() for p in folder.iterdir()}


def test_full_download_then_reuse(hub, checkpoint, tmp_path):
    root, hf = checkpoint
    for kind in ("single", "sharded"):
        repo = f"org/tiny-{kind}"
        serve(hub, repo, root / kind)
        folder = M.resolve_checkpoint(repo)
        assert folder == tmp_path / "siked-cache" / f"org--tiny-{kind}"
        for name, data in hub.repos[repo].items():
            assert (folder / name).read_bytes() == data
        assert not list(folder.glob("*.part"))
        tokens = torch.tensor([[1, 5, 9, 2]])
        with torch.no_grad():
            torch.testing.assert_close(
                M.Transformer.from_pretrained(repo)(tokens), hf(tokens).logits
            )
    n = len(hub.log)
    M.resolve_checkpoint("org/tiny-single")  # complete in the cache: no request
    assert len(hub.log) == n


def test_tokenizer_only_skips_weights(hub, checkpoint):
    root, _ = checkpoint
    serve(hub, "org/tiny", root / "single")
    tok = M.Tokenizer.from_pretrained("org/tiny")
    assert tok.encode("hi hi") == [2, 2] and tok.eos_id == 1
    assert not any("safetensors" in path for path, _, _ in hub.log)


def test_resume_after_cut_transfer(hub, checkpoint, tmp_path):
    root, _ = checkpoint
    serve(hub, "org/tiny", root / "single")
    hub.cut.add(("org/tiny", "model.safetensors"))
    with pytest.raises(ConnectionError, match="run again to resume"):
        M.resolve_checkpoint("org/tiny")
    data = hub.repos["org/tiny"]["model.safetensors"]
    part = tmp_path / "siked-cache" / "org--tiny" / "model.safetensors.part"
    assert part.read_bytes() == data[: len(data) // 2]
    folder = M.resolve_checkpoint("org/tiny")
    assert hub.log[-1][:2] == (
        "/org/tiny/resolve/main/model.safetensors",
        f"bytes={len(data) // 2}-",
    )
    assert (folder / "model.safetensors").read_bytes() == data and not part.exists()


def test_missing_repo_is_a_one_line_error(hub, tmp_path):
    with pytest.raises(ValueError) as e:
        M.resolve_checkpoint("org/missing")
    msg = str(e.value)
    assert "org/missing" in msg and "config.json" in msg and "404" in msg and "\n" not in msg
    assert not (tmp_path / "siked-cache").exists()  # fetched nothing: no empty folders left


def test_failed_download_keeps_fetched_files_and_folders_it_did_not_create(
    hub, checkpoint, tmp_path
):
    root, _ = checkpoint
    files = {p.name: p.read_bytes() for p in (root / "single").iterdir()}
    hub.repos["org/noweights"] = {k: v for k, v in files.items() if "safetensors" not in k}
    with pytest.raises(ValueError, match="no file model.safetensors.index.json"):
        M.resolve_checkpoint("org/noweights")
    assert (tmp_path / "siked-cache" / "org--noweights" / "config.json").is_file()
    existing = tmp_path / "siked-cache" / "org--missing"
    existing.mkdir()  # empty, but not this call's: kept
    with pytest.raises(ValueError, match="HTTP 404"):
        M.resolve_checkpoint("org/missing")
    assert existing.is_dir()


def test_gated_repo_needs_token(hub, checkpoint, monkeypatch):
    root, _ = checkpoint
    serve(hub, "google/gated", root / "single")
    hub.gated.add("google/gated")
    with pytest.raises(ValueError) as e:
        M.resolve_checkpoint("google/gated")
    msg = str(e.value)
    assert "google/gated" in msg and "gated" in msg and "HF_TOKEN" in msg and "\n" not in msg
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    folder = M.resolve_checkpoint("google/gated")
    for name, data in hub.repos["google/gated"].items():
        assert (folder / name).read_bytes() == data
    # the token went to the hub and its same-host redirects, never to the other host
    sent = {path.split("/")[1]: auth for path, _, auth in hub.log if auth}
    assert set(sent) == {"google", "api"} and set(sent.values()) == {f"Bearer {TOKEN}"}
    assert any(path.startswith("/cdn/") and auth is None for path, _, auth in hub.log)


@pytest.mark.parametrize("env", ["HF_HUB_CACHE", "HF_HOME"])
def test_existing_hf_cache_is_used_without_requests(env, hub, checkpoint, tmp_path, monkeypatch):
    root, _ = checkpoint
    hub_dir = tmp_path / "hf-hub"
    if env == "HF_HOME":  # the hub cache is then $HF_HOME/hub
        monkeypatch.delenv("HF_HUB_CACHE")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        hub_dir = tmp_path / "hf-home" / "hub"
    repo_dir = hub_dir / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text("0123abcd")
    snapshot = repo_dir / "snapshots" / "0123abcd"
    shutil.copytree(root / "single", snapshot)
    assert M.resolve_checkpoint("smollm2-135m-instruct") == snapshot
    assert M.Transformer.from_pretrained("smollm2-135m-instruct").config.n_layers == 2
    assert hub.log == []
    (snapshot / "model.safetensors").unlink()  # incomplete snapshot: download instead
    serve(hub, "HuggingFaceTB/SmolLM2-135M-Instruct", root / "single")
    assert M.resolve_checkpoint("smollm2-135m-instruct") != snapshot
