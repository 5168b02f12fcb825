"""Policies on the Hugging Face Hub (otguard.hub), offline.

- downloads: a pre-populated Hub cache (``models--org--name/snapshots/<sha>``, ``refs/main``) read
  with ``HF_HUB_OFFLINE=1`` in a fresh process (the variable is read when huggingface_hub is
  imported), ``--policy hf://...`` through the CLI the same way, and a local repository folder;
- uploads and a full round trip: huggingface_hub's own HTTP client talks to a scripted Hub on
  127.0.0.1 (its ``endpoint``), which keeps what is committed and serves it back, so the requests,
  the committed bytes and the downloaded files are checked at the HTTP layer; nothing of otguard
  is mocked.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from otguard.errors import PolicyError, PolicyMismatchError
from otguard.hub import HubRef, model_card, parse_hub_reference, resolve_policy_path
from otguard.policy import LayerEdit, Policy
from otguard.sites import find_head_sites, model_identity
from tests.scripted_server import clear_proxies
from tests.tiny_models import tiny_llama

REPO_ROOT = Path(__file__).resolve().parents[2]
SHA = "0123456789abcdef0123456789abcdef01234567"


def make_policy(model: Any, seed: int = 0) -> Policy:
    """A small RADIANT-style policy with validation metrics in its meta (for the model card)."""
    sites = find_head_sites(model)
    H, d = sites.n_heads, sites.head_dim
    gen = torch.Generator().manual_seed(seed)
    edit = LayerEdit(
        layer=1,
        probe_weight=torch.randn(H, d, generator=gen),
        probe_bias=torch.randn(H, generator=gen),
        threshold=2,
        head_mask=torch.tensor([True, False, True, True]),
        b=torch.randn(H, d, generator=gen),
        A=torch.eye(d) + 0.1 * torch.randn(H, d, d, generator=gen),
    )
    meta = {
        "layer": 1,
        "dataset": "truthfulqa",
        "n_train": 40,
        "n_val": 10,
        "detector_val": {
            "accuracy": [0.5, 0.8125],
            "f1": [0.4, 0.75],
            "fpr": [0.5, 0.125],
            "fnr": [0.5, 0.25],
        },
        "guarantee_rate_val": [0.9, None, 0.7, 0.8],
        "stage3": {
            "kappa": 2.0,
            "rows": [{"kappa": 2.0, "score": 1.25, "preservation": 0.75, "conversion": 0.5}],
        },
    }
    return Policy(
        method="radiant", rule="replace", layers=[edit], model=model_identity(model),
        params={"alpha": 0.05, "epochs": 30}, meta=meta,
    )  # fmt: skip


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(seed=0)


def assert_same_policy(a: Policy, b: Policy) -> None:
    assert (a.method, a.rule, a.kappa, a.params, a.meta) == (b.method, b.rule, b.kappa, b.params, b.meta)
    for x, y in zip(a.layers, b.layers, strict=True):
        for name in ("probe_weight", "probe_bias", "head_mask", "b", "A"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


def fill_cache(
    cache: Path, repo_id: str, files: dict[str, bytes], *, sha: str = SHA, ref: str = "main"
) -> Path:
    """The layout huggingface_hub writes: blobs are plain files here (the cache reads snapshots only)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / sha
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(sha)
    return snapshot


def saved_files(policy: Policy, folder: Path) -> dict[str, bytes]:
    policy.save(folder)
    return {name: (folder / name).read_bytes() for name in ("policy.json", "tensors.safetensors")}


def run_offline(code: str, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with the Hub in offline mode and ``cache`` as its cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / "hf_home"),
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))  # fmt: skip
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )


# ------------------------------------------------------------------------------------- references
@pytest.mark.parametrize(
    ("uri", "want"),
    [
        ("hf://org/name", HubRef("org/name")),
        ("hf://org/name@v1", HubRef("org/name", "v1")),
        ("hf://org/name@" + SHA + "/slim/fold0", HubRef("org/name", SHA, "slim/fold0")),
        ("hf://org/name/slim", HubRef("org/name", None, "slim")),
        ("hf://org/name@refs/pr/3/slim", HubRef("org/name", "refs/pr/3", "slim")),
        ("hf://datasets/org/name@main", HubRef("org/name", "main", "", "dataset")),
        ("hf://gpt2", HubRef("gpt2")),
    ],
)
def test_parse_hub_reference(uri: str, want: HubRef) -> None:
    got = parse_hub_reference(uri)
    assert got == want
    assert parse_hub_reference(str(got)) == want  # str() writes the canonical form back
    hf_parse = pytest.importorskip("huggingface_hub").__dict__.get("parse_hf_uri")
    if hf_parse is not None:  # the Hub's own grammar (huggingface_hub >= 2.x) reads it the same way
        theirs = hf_parse(uri)
        assert (theirs.id, theirs.revision, theirs.path_in_repo) == (
            want.repo_id,
            want.revision,
            want.subfolder,
        )


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("hf://org/name@", "nothing after '@'"),
        ("hf://spaces/org/app", "not in spaces"),
        ("hf://org/na me", "is not a Hub repository id"),
        ("hf://org/name/../x", "may not contain '..'"),
    ],
)
def test_bad_hub_references(uri: str, message: str) -> None:
    with pytest.raises(PolicyError, match=re.escape(message)):
        parse_hub_reference(uri)


def test_plain_paths_are_never_sent_to_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only hf:// resolves remotely in Policy.load; ``org/name`` stays a local path."""
    assert resolve_policy_path("org/name") == Path("org/name")
    assert resolve_policy_path(tmp_path) == tmp_path
    with pytest.raises(PolicyError, match="is not a policy folder"):
        Policy.load("org/name")
    with pytest.raises(PolicyError, match="No such policy folder: ./runs/x"):
        Policy.from_pretrained("./runs/x")
    with pytest.raises(PolicyError, match="No such policy folder"):
        Policy.from_pretrained(Path("org/name"))  # a Path is never a repository id
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(PolicyError, match="No such policy folder: runs/typo"):
        Policy.from_pretrained("runs/typo")  # an existing first folder: a local path, not org/name


# ------------------------------------------------------------------------------------ local folder
def test_from_pretrained_fake_repository_folder(llama, tmp_path: Path) -> None:
    """A cloned repository (card, .gitattributes, a stray script) loads through the same checks."""
    policy = make_policy(llama)
    repo = tmp_path / "clone"
    policy.save(repo)
    (repo / "README.md").write_text(model_card(policy, "org/name"))
    (repo / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    (repo / "modeling_evil.py").write_text("raise SystemExit('repository code must never run')\n")
    loaded = Policy.from_pretrained(str(repo), model=llama)
    assert_same_policy(loaded, policy)
    with pytest.raises(PolicyMismatchError, match="different weights"):
        Policy.from_pretrained(repo, model=tiny_llama(seed=1))
    with pytest.raises(PolicyError, match="revision='v1' is only for Hub repositories"):
        Policy.from_pretrained(repo, revision="v1")
    data = bytearray((repo / "tensors.safetensors").read_bytes())
    data[-3] ^= 0x40
    (repo / "tensors.safetensors").write_bytes(bytes(data))
    with pytest.raises(PolicyError, match="does not match the checksum"):
        Policy.from_pretrained(repo)


# -------------------------------------------------------------------------- offline, Hub cache
OFFLINE_SCRIPT = """
import sys
from pathlib import Path
from huggingface_hub import constants
from otguard.errors import PolicyError
from otguard.policy import Policy

assert constants.HF_HUB_OFFLINE
cache = Path(sys.argv[1])
for source, kwargs in [("org/name", {}), ("hf://org/name", {}), ("hf://org/name@%(sha)s", {}),
                       ("org/name", {"revision": "v1"}), ("hf://org/name@v1", {}),
                       ("hf://org/multi/slim", {})]:
    p = Policy.from_pretrained(source, **kwargs)
    print(source, kwargs, p.method, float(p.layers[0].b.sum()))
p = Policy.load("hf://org/name")
print("load", p.method, float(p.layers[0].b.sum()))
for bad in ["hf://org/missing", "hf://org/name@nope", "hf://org/notapolicy", "hf://org/corrupt"]:
    try:
        Policy.load(bad)
    except PolicyError as exc:
        print("ERR", bad, str(exc).splitlines()[0])
"""


def test_from_pretrained_offline_from_the_hub_cache(llama, tmp_path: Path) -> None:
    policy, other = make_policy(llama), make_policy(llama, seed=1)
    files, files_other = saved_files(policy, tmp_path / "p"), saved_files(other, tmp_path / "q")
    cache = tmp_path / "hub"
    fill_cache(cache, "org/name", files)
    fill_cache(cache, "org/name", files_other, sha="f" * 40, ref="v1")
    fill_cache(cache, "org/multi", {f"slim/{k}": v for k, v in files.items()})
    fill_cache(cache, "org/notapolicy", {"README.md": b"# not a policy\n"})
    corrupt = dict(files, **{"tensors.safetensors": files["tensors.safetensors"][:-8] + b"\0" * 8})
    fill_cache(cache, "org/corrupt", corrupt)
    proc = run_offline(OFFLINE_SCRIPT % {"sha": SHA}, cache, str(cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    b0, b1 = float(policy.layers[0].b.sum()), float(other.layers[0].b.sum())
    assert b0 != b1
    lines = proc.stdout.splitlines()
    assert lines[:7] == [
        f"org/name {{}} radiant {b0}",
        f"hf://org/name {{}} radiant {b0}",
        f"hf://org/name@{SHA} {{}} radiant {b0}",
        f"org/name {{'revision': 'v1'}} radiant {b1}",
        f"hf://org/name@v1 {{}} radiant {b1}",
        f"hf://org/multi/slim {{}} radiant {b0}",
        f"load radiant {b0}",
    ]
    errors = lines[7:]
    assert len(errors) == 4, proc.stdout
    assert errors[0].startswith("ERR hf://org/missing hf://org/missing is not in the local Hub cache")
    assert errors[1].startswith("ERR hf://org/name@nope hf://org/name@nope is not in the local Hub cache")
    assert errors[2] == (
        "ERR hf://org/notapolicy hf://org/notapolicy holds no policy.json and no tensors.safetensors: it is "
        "not an otguard policy repository (publish one with Policy.push_to_hub)."
    )
    assert "does not match the checksum" in errors[3]


CLI_SCRIPT = "import sys; from otguard.cli import main; sys.exit(main(sys.argv[1:]))"


def test_cli_generate_accepts_hf_policy_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``otguard generate --policy hf://org/name`` loads the cached policy and edits the output."""
    from transformers import AutoModelForCausalLM

    from otguard.cli import main
    from tests.tiny_models import save_tiny_model

    folder = save_tiny_model(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(folder)
    sites = find_head_sites(model)
    H, d = sites.n_heads, sites.head_dim
    edit = LayerEdit(layer=1, probe_weight=torch.zeros(H, d), probe_bias=torch.zeros(H), threshold=None,
                     head_mask=torch.ones(H, dtype=torch.bool), b=4.0 * torch.randn(H, d))  # fmt: skip
    policy = Policy(method="mean-shift", rule="shift", layers=[edit], model=model_identity(model))
    cache = tmp_path / "hub"
    fill_cache(cache, "org/name", saved_files(policy, tmp_path / "p"))
    argv = ["generate", "--model", str(folder), "--prompt", "w1 w2 w3", "--max-new-tokens", "6"]
    capsys.readouterr()
    assert main(argv) == 0  # the plain model, in this process
    plain = capsys.readouterr().out
    steered = run_offline(CLI_SCRIPT, cache, *argv, "--policy", "hf://org/name")
    assert steered.returncode == 0, steered.stderr[-2000:]
    assert plain.startswith(">>> w1 w2 w3") and steered.stdout.startswith(">>> w1 w2 w3")
    assert steered.stdout != plain, "the policy from the Hub cache did not edit anything"


# ------------------------------------------------------------------------- upload, scripted Hub
class FakeHub:
    """Just enough of the Hub's HTTP API for create_repo / create_commit / snapshot_download.

    Commits are kept per branch (files and a sha); every request is recorded.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.repos: dict[str, dict[str, Any]] = {}  # repo -> {"private", "branches": {name: (sha, files)}}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _reply(self, status: int, body: Any = None, headers: dict[str, str] | None = None,
                       head: bool = False) -> None:  # fmt: skip
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                for key, value in (headers or {"Content-Type": "application/json"}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length", 0) or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?")[0]
                hub.requests.append({"method": method, "path": self.path, "headers": dict(self.headers),
                                     "body": body})  # fmt: skip
                status, payload, headers = hub.answer(method, path, body, self.headers)
                self._reply(status, payload, headers, head=method == "HEAD")

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                self._handle("GET")

            def do_HEAD(self) -> None:  # noqa: N802
                self._handle("HEAD")

            def do_POST(self) -> None:  # noqa: N802
                self._handle("POST")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _branch(self, repo: str, rev: str) -> tuple[str, dict[str, bytes]] | None:
        branches = self.repos.get(repo, {}).get("branches", {})
        if rev in branches:
            return branches[rev]
        return next((v for v in branches.values() if v[0] == rev), None)

    def answer(
        self, method: str, path: str, body: bytes, headers: Any
    ) -> tuple[int, Any, dict[str, str] | None]:
        not_found = (404, {"error": "Repository not found"}, {"Content-Type": "application/json",
                                                              "X-Error-Code": "RepoNotFound"})  # fmt: skip
        if path == "/api/repos/create" and method == "POST":
            req = json.loads(body)
            repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            private = req.get("private", req.get("visibility") == "private")  # older / newer clients
            self.repos.setdefault(repo, {"private": private, "branches": {"main": ("0" * 40, {})}})
            return 200, {"url": f"{self.url}/{repo}"}, None
        if path == "/api/validate-yaml" and method == "POST":
            return 200, {}, None
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch|revision|tree)/(.+)", path)
        if m:
            repo, action, rev = m.group(1), m.group(2), m.group(3)
            if repo not in self.repos:
                return not_found
            branches = self.repos[repo]["branches"]
            if action == "branch":
                branches.setdefault(rev, branches["main"])
                return 200, {}, None
            if action == "preupload":
                files = json.loads(body)["files"]
                modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                return 200, {"files": modes}, None
            if action == "commit":
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                files = dict(branches.get(rev, branches["main"])[1])
                for line in lines[1:]:
                    assert line["key"] == "file" and line["value"]["encoding"] == "base64", line
                    files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                digests = sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items())
                sha = hashlib.sha1(json.dumps(digests).encode()).hexdigest()
                branches[rev] = (sha, files)
                self.last_commit = {"revision": rev, "header": lines[0]["value"], "files": files}
                return 200, {"commitUrl": f"{self.url}/{repo}/commit/{sha}", "commitOid": sha}, None
            found = self._branch(repo, rev.split("?")[0])
            if found is None:
                return 404, {"error": "Invalid rev id"}, {"Content-Type": "application/json",
                                                           "X-Error-Code": "RevisionNotFound"}  # fmt: skip
            sha, files = found
            if action == "revision":
                siblings = [{"rfilename": name} for name in sorted(files)]
                return 200, {"id": repo, "sha": sha, "siblings": siblings, "private": False}, None
            entries = [
                {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for name, data in sorted(files.items())
            ]
            return 200, entries, None
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and method in ("GET", "HEAD"):
            found = self._branch(m.group(1), m.group(2))
            if found is None or m.group(3) not in found[1]:
                return 404, {"error": "Entry not found"}, {"Content-Type": "application/json",
                                                            "X-Error-Code": "EntryNotFound"}  # fmt: skip
            sha, files = found
            data = files[m.group(3)]
            etag = hashlib.sha1(data).hexdigest()
            return 200, data, {"Content-Type": "application/octet-stream", "X-Repo-Commit": sha,
                               "ETag": f'"{etag}"'}  # fmt: skip
        return 418, {"error": f"the fake Hub does not know {method} {path}"}, None


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch):
    clear_proxies(monkeypatch)
    hub = FakeHub()
    yield hub
    hub.close()


def test_push_to_hub_then_from_pretrained_round_trip(llama, tmp_path: Path, fake_hub: FakeHub) -> None:
    policy = make_policy(llama)
    info = policy.push_to_hub("org/name", private=True, token="hf_testtoken", commit_message="first fit",
                              endpoint=fake_hub.url)  # fmt: skip
    sha, committed = fake_hub.repos["org/name"]["branches"]["main"]
    assert info.oid == sha
    assert fake_hub.repos["org/name"]["private"] is True
    calls = [(r["method"], r["path"].split("?")[0]) for r in fake_hub.requests]
    assert calls == [
        ("POST", "/api/repos/create"),
        ("POST", "/api/validate-yaml"),
        ("POST", "/api/models/org/name/preupload/main"),
        ("POST", "/api/models/org/name/commit/main"),
    ]
    assert all(r["headers"].get("authorization") == "Bearer hf_testtoken" for r in fake_hub.requests)
    assert fake_hub.last_commit["header"]["summary"] == "first fit"
    # The committed files are the bytes Policy.save writes, plus the card.
    local = saved_files(policy, tmp_path / "local")
    assert set(committed) == {"policy.json", "tensors.safetensors", "README.md"}
    assert committed["tensors.safetensors"] == local["tensors.safetensors"]
    assert json.loads(committed["policy.json"]) == json.loads(local["policy.json"])
    card = committed["README.md"].decode()
    assert card == model_card(policy, "org/name")

    # A stray file in the repository is never downloaded (allow_patterns: the two policy files).
    sha, files = fake_hub.repos["org/name"]["branches"]["main"]
    fake_hub.repos["org/name"]["branches"]["main"] = (sha, dict(files, **{"pytorch_model.bin": b"pickle!"}))
    fake_hub.requests.clear()
    cache = tmp_path / "cache"
    loaded = Policy.from_pretrained("org/name", model=llama, cache_dir=cache, endpoint=fake_hub.url)
    assert_same_policy(loaded, policy)
    fetched = {r["path"].split("?")[0] for r in fake_hub.requests if "/resolve/" in r["path"]}
    assert fetched == {f"/org/name/resolve/{sha}/policy.json", f"/org/name/resolve/{sha}/tensors.safetensors"}
    snapshot = cache / "models--org--name" / "snapshots" / sha
    assert sorted(p.name for p in snapshot.iterdir()) == ["policy.json", "tensors.safetensors"]
    # The model identity check runs on downloads too.
    with pytest.raises(PolicyMismatchError, match="different weights"):
        Policy.from_pretrained(
            "hf://org/name", model=tiny_llama(seed=1), cache_dir=cache, endpoint=fake_hub.url
        )


def test_push_to_a_branch_and_a_subfolder(llama, tmp_path: Path, fake_hub: FakeHub) -> None:
    first, second = make_policy(llama), make_policy(llama, seed=3)
    first.push_to_hub("org/name", endpoint=fake_hub.url, token="hf_x")
    second.push_to_hub("org/name", revision="v2", path_in_repo="slim/fold0", license="apache-2.0",
                       endpoint=fake_hub.url, token="hf_x")  # fmt: skip
    assert ("POST", "/api/models/org/name/branch/v2") in [(r["method"], r["path"]) for r in fake_hub.requests]
    _, main_files = fake_hub.repos["org/name"]["branches"]["main"]
    _, v2_files = fake_hub.repos["org/name"]["branches"]["v2"]
    assert set(main_files) == {"policy.json", "tensors.safetensors", "README.md"}
    assert set(v2_files) == set(main_files) | {"slim/fold0/policy.json", "slim/fold0/tensors.safetensors",
                                               "slim/fold0/README.md"}  # fmt: skip
    assert "license: apache-2.0" in v2_files["slim/fold0/README.md"].decode()
    cache = tmp_path / "cache"
    got = Policy.load(
        resolve_policy_path("hf://org/name@v2/slim/fold0", cache_dir=cache, endpoint=fake_hub.url)
    )
    assert_same_policy(got, second)
    got_main = Policy.from_pretrained("org/name", cache_dir=cache, endpoint=fake_hub.url)
    assert_same_policy(got_main, first)
    with pytest.raises(PolicyError, match="has no revision 'v3'"):
        Policy.from_pretrained("org/name", revision="v3", cache_dir=cache, endpoint=fake_hub.url)
    with pytest.raises(PolicyError, match="no such repository on the Hub"):
        Policy.from_pretrained("org/absent", cache_dir=cache, endpoint=fake_hub.url)


def test_push_refuses_a_non_finite_policy_before_any_request(llama, fake_hub: FakeHub) -> None:
    policy = make_policy(llama)
    policy.layers[0].b[0, 0] = float("nan")
    with pytest.raises(PolicyError, match="hold NaN or infinite values"):
        policy.push_to_hub("org/name", endpoint=fake_hub.url, token="hf_x")
    assert fake_hub.requests == []
    with pytest.raises(PolicyError, match="is not a Hub repository id"):
        make_policy(llama).push_to_hub("just-a-name", endpoint=fake_hub.url)


def test_model_card_names_model_method_parameters_and_metrics(llama) -> None:
    policy = make_policy(llama)
    policy.model = dataclasses.replace(policy.model, name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    card = model_card(policy, "org/name", license="mit")
    header = card.split("---")[1]
    assert header.splitlines() == ["", "library_name: otguard", "tags:", "- otguard", "- activation-steering",
                                   "- radiant", "base_model: HuggingFaceTB/SmolLM2-135M-Instruct",
                                   "license: mit"]  # fmt: skip
    for line in [
        "| 1 | 2 | 3 | affine (A, b) |",
        "| `alpha` | 0.05 |",
        "| `epochs` | 30 |",
        "| detector accuracy (validation, layer 1) | 0.8125 |",
        "| detector fpr (validation, layer 1) | 0.125 |",
        "| guarantee rate (validation, mean over heads) | 0.8 |",
        "| Stage 3 kappa | 2 |",
        "| Stage 3 preservation (validation) | 0.75 |",
        "| n_train | 40 |",
        'policy = otguard.Policy.from_pretrained("hf://org/name", model=model)',
        "This policy is released under `mit`.",
    ]:
        assert line in card, line
    policy.model = dataclasses.replace(policy.model, name_or_path="/home/me/llama")  # a path: no base_model
    assert "base_model" not in model_card(policy, "org/name")
    policy.meta = {}
    assert "No validation metrics were recorded" in model_card(policy, "org/name")
