"""Loading by name from a Hugging Face Hub served on the loopback interface.

A small HTTP server (``http.server`` in a thread, 127.0.0.1) serves repositories in the hub's
layout: ``HEAD`` / ``GET /{org}/{repo}/resolve/{revision}/{file}`` answered with the headers
``huggingface_hub`` reads (``X-Repo-Commit``, ``ETag``, ``Content-Length``; ``X-Error-Code``
``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound`` on a 404). ``HF_ENDPOINT`` points at
it and ``HF_HOME`` is a temporary folder, so each load runs in a fresh interpreter (the
library reads both at import). The repositories hold the random-weight checkpoints of
tests/checkpoints.py in both key layouts; every loaded model must compute exactly what the
same files loaded from disk compute.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import clipdecomp

pytest.importorskip("huggingface_hub")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN, V2 = "a" * 40, "b" * 40   # commit hashes of the branch "main" and the tag "v2"


class Hub:
    """Repositories ``{repo: {revision name or commit: (commit, {file: bytes})}}`` and the
    requests seen; ``flaky`` (repo, file) pairs are cut off half-way through the body."""

    def __init__(self):
        self.repos: dict[str, dict[str, tuple[str, dict[str, bytes]]]] = {}
        self.requests: list[tuple[str, str]] = []
        self.flaky: set[str] = set()

    def add(self, repo: str, revision: str, commit: str, files: dict[str, bytes]) -> None:
        revs = self.repos.setdefault(repo, {})
        revs[revision] = revs[commit] = (commit, files)


def _handler(hub: Hub):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _answer(self, body: bool) -> None:
            hub.requests.append((self.command, self.path))
            parts = self.path.split("?")[0].strip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                return self._error(404, "RepoNotFound")
            repo, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            rev = rev.replace("%2F", "/")
            if repo not in hub.repos:
                return self._error(404, "RepoNotFound")
            if rev not in hub.repos[repo]:
                return self._error(404, "RevisionNotFound")
            commit, files = hub.repos[repo][rev]
            if name not in files:
                return self._error(404, "EntryNotFound", commit)
            data = files[name]
            self.send_response(200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if body:
                if (repo, name) in hub.flaky:
                    self.wfile.write(data[: len(data) // 2])   # a server dying mid-download
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)

        def _error(self, code: int, kind: str, commit: str | None = None) -> None:
            msg = json.dumps({"error": kind}).encode()
            self.send_response(code)
            self.send_header("X-Error-Code", kind)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(msg)

        def do_HEAD(self):
            self._answer(body=False)

        def do_GET(self):
            self._answer(body=True)

    return Handler


def _files(directory: str) -> dict[str, bytes]:
    out = {}
    for f in sorted(os.listdir(directory)):
        with open(os.path.join(directory, f), "rb") as fh:
            out[f] = fh.read()
    return out


@pytest.fixture(scope="module")
def hub(b32, b16):
    h = Hub()
    h.add("org/oc", "main", MAIN, _files(b32.dirs[("open_clip", "F32")]))
    h.add("org/oc", "v2", V2, _files(b32.dirs[("open_clip", "BF16")]))
    h.add("org/hf", "main", MAIN, _files(b16.dirs[("hf", "F32")]))
    pickled = {k: v for k, v in _files(b32.dirs[("open_clip", "F32")]).items()
               if not k.endswith(".safetensors")}
    pickled["open_clip_pytorch_model.bin"] = b"not really a pickle"
    h.add("org/pickled", "main", MAIN, pickled)
    h.add("org/flaky", "main", MAIN, _files(b16.dirs[("open_clip", "F32")]))
    h.flaky.add(("org/flaky", "open_clip_model.safetensors"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(h))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    h.url = f"http://127.0.0.1:{server.server_address[1]}"
    h.server = server
    yield h
    server.shutdown()
    server.server_close()


@pytest.fixture
def home(tmp_path):
    return str(tmp_path / "hf_home")


_RUN = """
import json, sys, warnings
import numpy as np
import clipdecomp
from clipdecomp.engine import hub
args = json.loads(sys.argv[1])
try:
    if args.get("revision"):
        path = hub.download(args["name"], revision=args["revision"])
        model = clipdecomp.load(path, threads=1)
    else:
        model = clipdecomp.load(args["name"], threads=1)
        path = model.path
    s = model.config.image_size
    px = np.random.default_rng(0).normal(size=(2, 3, s, s)).astype(np.float32)
    print(json.dumps({"path": path, "emb": model.encode_image(px).tolist()}))
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
"""


def _load(hub: Hub, home: str, name: str, revision: str | None = None, offline=False) -> dict:
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=home, OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT, HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="5",
               HF_HUB_DOWNLOAD_TIMEOUT="5", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    env.pop("HF_TOKEN", None)
    env["HF_HUB_OFFLINE"] = "1" if offline else "0"
    r = subprocess.run([sys.executable, "-c", _RUN, json.dumps({"name": name,
                        "revision": revision})], check=False, capture_output=True, text=True,
                       timeout=180, env=env)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _want(weights: str) -> np.ndarray:
    model = clipdecomp.load(weights, threads=1)
    s = model.config.image_size
    px = np.random.default_rng(0).normal(size=(2, 3, s, s)).astype(np.float32)
    return model.encode_image(px)


def test_hf_hub_name_open_clip_layout_then_offline(hub, home, b32):
    got = _load(hub, home, "hf-hub:org/oc")
    assert "error" not in got, got
    np.testing.assert_array_equal(got["emb"], _want(b32.file("open_clip", "F32")))
    assert f"snapshots{os.sep}{MAIN}" in got["path"]
    seen = [(m, p) for m, p in hub.requests if "/org/oc/" in p]
    assert ("HEAD", "/org/oc/resolve/main/open_clip_model.safetensors") in seen
    assert ("GET", "/org/oc/resolve/main/open_clip_model.safetensors") in seen
    # the cache is used offline: same numbers, no request to the server
    before = len(hub.requests)
    again = _load(hub, home, "hf-hub:org/oc", offline=True)
    assert "error" not in again, again
    np.testing.assert_array_equal(again["emb"], got["emb"])
    assert len(hub.requests) == before


def test_repo_name_transformers_layout(hub, home, b16):
    got = _load(hub, home, "org/hf")
    assert "error" not in got, got
    np.testing.assert_array_equal(got["emb"], _want(b16.file("hf", "F32")))
    assert os.path.basename(got["path"]) == "model.safetensors"


def test_revision_by_tag_and_commit(hub, home, b32):
    want = _want(b32.file("open_clip", "BF16"))
    for rev in ("v2", V2):
        got = _load(hub, home, "org/oc", revision=rev)
        assert "error" not in got, got
        assert f"snapshots{os.sep}{V2}" in got["path"]
        np.testing.assert_array_equal(got["emb"], want)
    assert not np.array_equal(want, _want(b32.file("open_clip", "F32")))
    bad = _load(hub, home, "org/oc", revision="nope")
    assert bad["error"] == "RuntimeError" and "revision 'nope'" in bad["message"]


def test_missing_files_and_repositories(hub, home):
    got = _load(hub, home, "hf-hub:org/pickled")
    assert got["error"] == "RuntimeError"
    assert "has no safetensors weights" in got["message"] and "org/pickled" in got["message"]
    got = _load(hub, home, "hf-hub:org/absent")
    assert got["error"] == "RuntimeError" and "'org/absent' not found" in got["message"]
    got = _load(hub, home, "hf-hub:org/absent", offline=True)
    assert got["error"] == "RuntimeError" and "no cached copy" in got["message"]


def test_server_error_mid_download(hub, home, b16):
    got = _load(hub, home, "hf-hub:org/flaky")
    assert got["error"] == "RuntimeError", got
    assert "open_clip_model.safetensors" in got["message"] and "org/flaky" in got["message"]
    snapshots = os.path.join(home, "hub", "models--org--flaky", "snapshots")
    for d, _, files in os.walk(snapshots):
        assert "open_clip_model.safetensors" not in files, d     # nothing half-written
    off = _load(hub, home, "hf-hub:org/flaky", offline=True)     # and nothing to load offline
    assert off["error"] == "RuntimeError"
    hub.flaky.discard(("org/flaky", "open_clip_model.safetensors"))   # the server recovers
    try:
        ok = _load(hub, home, "hf-hub:org/flaky")
    finally:
        hub.flaky.add(("org/flaky", "open_clip_model.safetensors"))
    assert "error" not in ok, ok
    np.testing.assert_array_equal(ok["emb"], _want(b16.file("open_clip", "F32")))
