"""Acquisition against a local fake hub (HEAD/GET/Range like huggingface.co's resolve endpoint); never the network."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub
import pytest

from supir_mlx.weights import hub
from supir_mlx.weights.hub import HubFile, WeightsUnavailable

COMMIT = "a" * 40


class FakeHub:
    """Serves {(repo, filename): bytes}; LFS-style sha256 etags for *.safetensors/*.ckpt, git sha1 otherwise."""

    def __init__(self, files: dict[tuple[str, str], bytes]):
        self.files = files
        self.bad_etag: set[str] = set()
        self.drop_after: int | None = None  # close the first GET after this many bytes, then answer 503
        self.requests: list[tuple[str, str, str | None]] = []
        hubself = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _lookup(self):
                parts = self.path.split("/")
                # /<owner>/<name>/resolve/<rev>/<file...>
                if len(parts) < 6 or parts[3] != "resolve":
                    return None
                return hubself.files.get(("/".join(parts[1:3]), "/".join(parts[5:]))), parts[-1]

            def _head(self, data: bytes, name: str):
                self.send_header("X-Repo-Commit", COMMIT)
                if name.endswith((".safetensors", ".ckpt")):
                    etag = hashlib.sha256(data).hexdigest()
                else:
                    etag = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
                if name in hubself.bad_etag:
                    etag = "0" * len(etag)
                self.send_header("ETag", f'"{etag}"')

            def do_HEAD(self):
                hubself.requests.append(("HEAD", self.path, None))
                found = self._lookup()
                if not found or found[0] is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data, name = found
                self.send_response(200)
                self._head(data, name)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()

            def do_GET(self):
                rng = self.headers.get("Range")
                hubself.requests.append(("GET", self.path, rng))
                data, name = self._lookup()
                if hubself.drop_after == -1:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                body = data[start:]
                self.send_response(206 if rng else 200)
                self._head(data, name)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if hubself.drop_after is not None:
                    self.wfile.write(body[: hubself.drop_after])
                    self.wfile.flush()
                    hubself.drop_after = -1
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def gets(self) -> list[tuple[str, str | None]]:
        return [(p, r) for m, p, r in self.requests if m == "GET"]


SDXL = HubFile("org/sdxl", "base.safetensors", 0.0)
SUPIR = HubFile("org/supir", "SUPIR-v0Q_fp16.safetensors", 0.0)
CONFIG = HubFile("org/llava", "config.json", 0.0)
DATA = {
    ("org/sdxl", "base.safetensors"): os.urandom(300_000),
    ("org/supir", "SUPIR-v0Q_fp16.safetensors"): os.urandom(120_000),
    ("org/llava", "config.json"): b'{"model_type": "llava"}',
}


@pytest.fixture
def fake(monkeypatch, tmp_path):
    server = FakeHub(dict(DATA))
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("SUPIR_MLX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    yield server
    server.server.shutdown()
    server.server.server_close()  # shutdown() stops the loop; the listening socket needs closing too


def test_download_into_standard_cache_then_reuse_without_network(fake, tmp_path):
    cache = tmp_path / "hf"
    need = {"sdxl": [SDXL], "captioner": [CONFIG]}
    got = hub.fetch(need, cache_dir=cache)
    assert got["sdxl"][0].read_bytes() == DATA[("org/sdxl", "base.safetensors")]
    assert got["captioner"][0].read_bytes() == DATA[("org/llava", "config.json")]
    # standard HF layout: snapshots/<commit>/<file> -> blobs/<etag>
    assert got["sdxl"][0].parent.name == COMMIT and got["sdxl"][0].resolve().parent.name == "blobs"
    assert hub.verify_cached(got["sdxl"][0]) is True
    n = len(fake.requests)
    again = hub.fetch(need, cache_dir=cache, offline=True)
    assert again == got and len(fake.requests) == n


def test_interrupted_download_resumes_with_range(fake, tmp_path, monkeypatch):
    # small chunks so the bytes received before the connection drops reach the disk
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 16384)
    cache = tmp_path / "hf"
    data = DATA[("org/sdxl", "base.safetensors")]
    fake.drop_after = 100_000
    with pytest.raises(WeightsUnavailable, match="download interrupted .* run again to resume"):
        hub.fetch({"sdxl": [SDXL]}, cache_dir=cache)
    parts = list(cache.rglob("*.part"))
    assert len(parts) == 1
    kept = parts[0].stat().st_size
    assert 50_000 < kept <= 100_000 and parts[0].read_bytes() == data[:kept]
    fake.drop_after = None
    fake.requests.clear()
    path = hub.fetch({"sdxl": [SDXL]}, cache_dir=cache)["sdxl"][0]
    assert path.read_bytes() == data
    assert fake.gets() == [("/org/sdxl/resolve/main/base.safetensors", f"bytes={kept}-")]
    assert not list(cache.rglob("*.part"))


def test_checksum_mismatch_is_rejected_and_removed(fake, tmp_path):
    fake.bad_etag.add("SUPIR-v0Q_fp16.safetensors")
    with pytest.raises(WeightsUnavailable, match="checksum mismatch"):
        hub.fetch({"supir": [SUPIR]}, cache_dir=tmp_path / "hf")
    assert not list((tmp_path / "hf").rglob("*.part"))
    assert not list((tmp_path / "hf").rglob("snapshots/*/*"))


def test_no_network_gives_one_message_listing_every_file(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setenv("SUPIR_MLX_HOME", str(tmp_path / "home"))
    need = hub.required_files("v0F", "pruned", "7b")
    with pytest.raises(WeightsUnavailable) as e:
        hub.fetch(need, cache_dir=tmp_path / "hf")
    msg = str(e.value)
    names = [f.filename for files in need.values() for f in files]
    assert all(n in msg for n in names)
    assert "SUPIR-v0F_fp16.safetensors" in msg and "sd_xl_base_1.0_0.9vae.safetensors" in msg
    assert str(tmp_path / "home" / "weights") in msg


def test_offline_uses_drop_in_folder_and_local_paths(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    drop = tmp_path / "home" / "weights" / "supir" / SUPIR.filename
    drop.parent.mkdir(parents=True)
    drop.write_bytes(b"x")
    own = tmp_path / "juggernaut.safetensors"
    own.write_bytes(b"y")
    need = hub.required_files(sdxl=str(own), supir=None, captioner="none")
    need["supir"] = [SUPIR]
    got = hub.fetch(need, cache_dir=tmp_path / "hf")
    assert got == {"sdxl": [own], "supir": [drop]} and fake.requests == []


def test_missing_hub_file_names_it(fake, tmp_path):
    with pytest.raises(WeightsUnavailable, match="org/sdxl/nope.safetensors: the hub answered 404"):
        hub.fetch({"sdxl": [HubFile("org/sdxl", "nope.safetensors", 0.0)]}, cache_dir=tmp_path / "hf")


def test_parse_source_and_choices(tmp_path):
    assert hub.parse_source("RunDiffusion/Juggernaut-XL/juggernaut.safetensors") == HubFile(
        "RunDiffusion/Juggernaut-XL", "juggernaut.safetensors", 0.0
    )
    with pytest.raises(WeightsUnavailable, match="name the file inside it"):
        hub.parse_source("RunDiffusion/Juggernaut-XL")
    with pytest.raises(WeightsUnavailable, match="not found"):
        hub.parse_source(str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightsUnavailable, match="unknown model 'v1'"):
        hub.required_files(model="v1")
    assert [f.filename for f in hub.required_files(captioner="13b")["captioner"]][-1] == "model-00006-of-00006.safetensors"


def test_cli_download_offline_message_and_success(fake, tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hfhome"), "HF_ENDPOINT": fake.url}
    cmd = [sys.executable, "-c", "from supir_mlx.cli import main; main()", "download", "--captioner", "none"]
    r = subprocess.run(cmd + ["--offline"], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "sd_xl_base_1.0_0.9vae.safetensors" in r.stderr and "SUPIR-v0Q_fp16.safetensors" in r.stderr
    fake.files[(hub.SDXL_BASE.repo_id, hub.SDXL_BASE.filename)] = b"sdxl-bytes"
    fake.files[(hub.SUPIR_FILES[("v0Q", "pruned")].repo_id, "SUPIR-v0Q_fp16.safetensors")] = b"supir-bytes"
    r = subprocess.run(cmd + ["--sdxl", f"{hub.SDXL_REPO}/{hub.SDXL_BASE.filename}"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip().splitlines()[-1].split()[-1]).read_bytes() == b"supir-bytes"


# ------------------------------------------------------------------ release files (face mode's facexlib networks)
FACE_DATA = os.urandom(200_000)


@pytest.fixture
def release(fake, monkeypatch):
    """The detector pinned to a fake release file served by the fake server (size and sha256 of its bytes)."""
    fake.files[("xinntao/facexlib", "detection_Resnet50_Final.pth")] = FACE_DATA
    f = hub.ReleaseFile(f"{fake.url}/xinntao/facexlib/resolve/v0.1.0/detection_Resnet50_Final.pth", len(FACE_DATA),
                        hashlib.sha256(FACE_DATA).hexdigest(), "facexlib")
    monkeypatch.setitem(hub.FACE_FILES, "detector", f)
    return f


def test_release_file_downloads_verified_into_drop_in_folder_then_offline(fake, release, tmp_path):
    got = hub.fetch({"faces": [release]}, cache_dir=tmp_path / "hf")
    assert got["faces"][0] == tmp_path / "home" / "weights" / "facexlib" / "detection_Resnet50_Final.pth"
    assert got["faces"][0].read_bytes() == FACE_DATA
    n = len(fake.requests)
    assert hub.fetch({"faces": [release]}, cache_dir=tmp_path / "hf", offline=True) == got and len(fake.requests) == n
    assert hub.required_files(captioner="none", faces=True)["faces"][0] == release


def test_release_file_resumes_and_rejects_a_wrong_hash(fake, release, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 16384)
    fake.drop_after = 100_000
    with pytest.raises(WeightsUnavailable, match="download interrupted .* run again to resume"):
        hub.fetch({"faces": [release]}, cache_dir=tmp_path / "hf")
    part = release.path.with_name(release.filename + ".part")
    kept = part.stat().st_size
    assert 0 < kept <= 100_000
    fake.drop_after = None
    fake.requests.clear()
    assert hub.fetch({"faces": [release]}, cache_dir=tmp_path / "hf")["faces"][0].read_bytes() == FACE_DATA
    assert fake.gets()[0][1] == f"bytes={kept}-" and not part.exists()
    release.path.unlink()
    wrong = hub.ReleaseFile(release.url, release.size, "0" * 64, "facexlib")
    with pytest.raises(WeightsUnavailable, match="checksum mismatch .* the download was removed"):
        hub.fetch({"faces": [wrong]}, cache_dir=tmp_path / "hf")
    assert not release.path.exists() and not part.exists()


def test_release_file_offline_message_and_a_bad_drop_in(monkeypatch, tmp_path):
    monkeypatch.setenv("SUPIR_MLX_HOME", str(tmp_path / "home"))
    need = {"faces": hub.required_files(captioner="none", faces=True)["faces"]}
    with pytest.raises(WeightsUnavailable) as e:
        hub.fetch(need, cache_dir=tmp_path / "hf", offline=True)
    msg = str(e.value)
    for f in need["faces"]:
        assert f"{f.url}  ->  {tmp_path / 'home' / 'weights' / 'facexlib' / f.filename}" in msg
    bad = need["faces"][1].path
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not the parser")
    with pytest.raises(WeightsUnavailable, match="14 bytes, but parsing_parsenet.pth has 85331193"):
        hub.fetch({"faces": [need["faces"][1]]}, cache_dir=tmp_path / "hf", offline=True)
    assert bad.exists()  # a file the user put there is never deleted
