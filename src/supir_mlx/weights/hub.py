"""Where every weight file comes from, and getting it onto disk once.

All hub repository ids and file names live in this module. A file is found, in order: as a local path
the user gave; in the drop-in folder (`weights_dir()`, for machines without network); in the standard
Hugging Face cache; else it is downloaded into that cache through huggingface_hub. Downloads resume
after an interruption (huggingface_hub 2.x restarts a killed download from zero, so the partial file
is ours: `blobs/<etag>.part`, continued with an HTTP Range request) and are checked against the hub's
etag (sha256 for LFS files, git blob sha1 otherwise) before they enter the cache.

How the ids and names were verified (stored copies of the hub's public listings, Nov 2026):
- stabilityai/stable-diffusion-xl-base-1.0 / sd_xl_base_1.0_0.9vae.safetensors: the repo's commit
  history page for that file, and LFS details of exact duplicates (6.94 GB, sha256 e6bb9ea8...).
- Kijai/SUPIR_pruned / SUPIR-v0{Q,F}_fp16.safetensors: the repo's file tree (2.66 GB each); ComfyUI
  PR #13250 loads them.
- camenduru/SUPIR / SUPIR-v0{Q,F}.ckpt: the repo's commit history pages for both files; the size
  (5.33 GB) is from an identical copy's LFS pointer, the official README links these files.
- llava-hf/llava-1.5-13b-hf: the repo's file tree (6 shards, tokenizer and processor files).
- llava-hf/llava-1.5-7b-hf: NOT seen directly (no stored listing); the 3-shard layout is from a mirror
  whose commits say "add remaining llava-1.5-7b-hf files". A wrong name fails with a clear 404 message.
The CLIP BPE vocabulary both SDXL text encoders use ships with the package (assets/), so no tokenizer
download is needed for the diffusion model.

Face mode's two small networks are not on the Hugging Face hub: facexlib publishes them as GitHub release
assets (the URLs facexlib's own init_detection_model / init_parsing_model download). They are pinned by size
and sha256 (each agreed by several independent listings that verify these exact release files), downloaded
with resume into the drop-in folder (`weights_dir()/facexlib/`), and verified before use.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.file_download import http_get, repo_folder_name


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str
    gb: float  # listed size, for messages and planning before the hub is asked
    revision: str = "main"

    @property
    def url(self) -> str:
        return f"{endpoint()}/{self.repo_id}/resolve/{self.revision}/{self.filename}"


SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_BASE = HubFile(SDXL_REPO, "sd_xl_base_1.0_0.9vae.safetensors", 6.94)

# (model, source) -> file. "pruned" (default) holds only the SUPIR-specific tensors in fp16 and is a
# safetensors file; "original" is the authors' full torch checkpoint.
SUPIR_FILES = {
    ("v0Q", "pruned"): HubFile("Kijai/SUPIR_pruned", "SUPIR-v0Q_fp16.safetensors", 2.66),
    ("v0F", "pruned"): HubFile("Kijai/SUPIR_pruned", "SUPIR-v0F_fp16.safetensors", 2.66),
    ("v0Q", "original"): HubFile("camenduru/SUPIR", "SUPIR-v0Q.ckpt", 5.33),
    ("v0F", "original"): HubFile("camenduru/SUPIR", "SUPIR-v0F.ckpt", 5.33),
}

_LLAVA_SIDE_FILES = (
    "config.json",
    "model.safetensors.index.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def _llava(repo: str, shard_gb: tuple[float, ...]) -> tuple[HubFile, ...]:
    n = len(shard_gb)
    shards = [HubFile(repo, f"model-{i:05d}-of-{n:05d}.safetensors", gb) for i, gb in enumerate(shard_gb, 1)]
    return tuple(HubFile(repo, f, 0.0) for f in _LLAVA_SIDE_FILES) + tuple(shards)


CAPTIONER_FILES = {
    "13b": _llava("llava-hf/llava-1.5-13b-hf", (4.96, 4.97, 4.88, 4.93, 4.93, 2.02)),
    "7b": _llava("llava-hf/llava-1.5-7b-hf", (4.99, 4.96, 4.18)),
}


@dataclass(frozen=True)
class ReleaseFile:
    """A weight file published outside the hub (a release asset), pinned by its size and sha256."""

    url: str
    size: int
    sha256: str
    folder: str  # sub-folder of the drop-in folder it lives in

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[1]

    @property
    def gb(self) -> float:
        return self.size / 1e9

    @property
    def path(self) -> Path:
        return weights_dir() / self.folder / self.filename


_FACEXLIB = "https://github.com/xinntao/facexlib/releases/download"
FACE_FILES = {
    "detector": ReleaseFile(f"{_FACEXLIB}/v0.1.0/detection_Resnet50_Final.pth", 109_497_761,
                            "6d1de9c2944f2ccddca5f5e010ea5ae64a39845a86311af6fdf30841b0a5a16d", "facexlib"),
    "parser": ReleaseFile(f"{_FACEXLIB}/v0.2.2/parsing_parsenet.pth", 85_331_193,
                          "3d558d8d0e42c20224f13cf5a29c79eba2d59913419f945545d8cf7b72920de2", "facexlib"),
}
SUPIR_MODELS = ("v0Q", "v0F")
SUPIR_SOURCES = ("pruned", "original")
CAPTIONERS = ("13b", "7b", "none")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_GIT_SHA1 = re.compile(r"^[0-9a-f]{40}$")


class WeightsUnavailable(RuntimeError):
    """Weights that are neither on disk nor downloadable now; the message says what to fetch and where."""


def endpoint() -> str:
    """HF_ENDPOINT read per call (huggingface_hub reads it once at import), so a mirror set later still counts."""
    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def weights_dir() -> Path:
    """Drop-in folder: a file placed here under its hub file name is used without asking the hub."""
    home = os.environ.get("SUPIR_MLX_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "supir-mlx") / "weights"


def parse_source(spec: str) -> Path | HubFile:
    """A user's weight spec: an existing local path, or `owner/repo/file` on the hub (any SDXL fine-tune)."""
    p = Path(spec).expanduser()
    if p.exists():
        return p
    parts = spec.split("/")
    if len(parts) >= 3 and all(parts) and not spec.startswith((".", "/", "~")):
        return HubFile("/".join(parts[:2]), "/".join(parts[2:]), 0.0)
    if len(parts) == 2 and all(parts):
        raise WeightsUnavailable(f"'{spec}' is a hub repository: name the file inside it, e.g. {spec}/model.safetensors")
    raise WeightsUnavailable(f"weight file not found: {spec}")


def required_files(
    model: str = "v0Q", source: str = "pruned", captioner: str = "13b", sdxl: str | None = None, supir: str | None = None,
    faces: bool = False,
) -> dict[str, list[Path | HubFile | ReleaseFile]]:
    """What a restore needs, by component: local paths where the user gave them, hub files otherwise; `faces`
    adds face mode's detector and parser."""
    for name, value, allowed in (("model", model, SUPIR_MODELS), ("source", source, SUPIR_SOURCES), ("captioner", captioner, CAPTIONERS)):
        if value not in allowed:
            raise WeightsUnavailable(f"unknown {name} '{value}' (choose from {', '.join(allowed)})")
    need: dict[str, list[Path | HubFile | ReleaseFile]] = {
        "sdxl": [parse_source(sdxl) if sdxl else SDXL_BASE],
        "supir": [parse_source(supir) if supir else SUPIR_FILES[(model, source)]],
    }
    if captioner != "none":
        need["captioner"] = list(CAPTIONER_FILES[captioner])
    if faces:
        need["faces"] = [FACE_FILES["detector"], FACE_FILES["parser"]]
    return need


def fetch(
    need: dict[str, list[Path | HubFile | ReleaseFile]],
    offline: bool = False,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, list[Path]]:
    """Local paths of every needed file, downloading what is missing; one error lists everything missing."""
    offline = offline or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    out: dict[str, list[Path]] = {}
    missing: list[tuple[HubFile | ReleaseFile, str]] = []
    for component, files in need.items():
        out[component] = []
        for f in files:
            path = f if isinstance(f, Path) else _local(f, cache)
            if path is None and not offline:
                try:
                    path = download_release(f, log) if isinstance(f, ReleaseFile) else download(f, cache, log)
                except _Unreachable as e:
                    missing.append((f, str(e)))
                    offline = True  # no network: list the rest without waiting on each of them
                    continue
            if path is None:
                missing.append((f, "offline"))
            else:
                out[component].append(path)
    if missing:
        raise WeightsUnavailable(missing_message(missing, cache))
    return out


def missing_message(missing: list[tuple[HubFile | ReleaseFile, str]], cache: Path) -> str:
    gb = sum(f.gb for f, _ in missing)
    reason = missing[0][1]
    lines = [
        f"{len(missing)} weight file(s) ({gb:.1f} GB) are not on this machine and the hub cannot be reached ({reason}).",
        f"Download them elsewhere and put each one in {weights_dir()}/<repo name>/<file name>, or run",
        "`supir-mlx download` with network access (they go to the Hugging Face cache "
        f"{cache}). Files:",
    ]
    lines += [f"  {f.url}  ->  {_drop_path(f)}" for f, _ in missing]
    return "\n".join(lines)


def _drop_path(f: HubFile | ReleaseFile) -> Path:
    return f.path if isinstance(f, ReleaseFile) else weights_dir() / f.repo_id.split("/")[1] / f.filename


def _local(f: HubFile | ReleaseFile, cache: Path) -> Path | None:
    if isinstance(f, ReleaseFile):
        if f.path.is_file():
            _verify_release(f.path, f, remove=False)
            return f.path
        return None
    dropped = _drop_path(f)
    if dropped.is_file():
        return dropped
    hit = huggingface_hub.try_to_load_from_cache(f.repo_id, f.filename, cache_dir=cache, revision=f.revision)
    return Path(hit) if isinstance(hit, str) else None


class _Unreachable(Exception):
    pass


def download(f: HubFile, cache: Path, log: Callable[[str], None] = print) -> Path:
    """Download one file into the HF cache (resuming a partial one), verify it, return its cache path."""
    ep = endpoint()
    url = huggingface_hub.hf_hub_url(f.repo_id, f.filename, revision=f.revision, endpoint=ep)
    try:
        meta = huggingface_hub.get_hf_file_metadata(url, endpoint=ep)
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403, 404):
            raise WeightsUnavailable(f"{f.repo_id}/{f.filename}: the hub answered {status} (wrong name, or a gated/private repo needing `hf auth login`)") from None
        raise _Unreachable(f"hub error {status}") from None
    except Exception as e:  # connection refused, DNS, timeouts, offline mode: all mean "no hub now"
        raise _Unreachable(type(e).__name__) from None
    etag = meta.etag
    if not etag or not meta.commit_hash:
        raise _Unreachable(f"{url} does not look like a Hugging Face hub endpoint")
    blobs = cache / repo_folder_name(repo_id=f.repo_id, repo_type="model") / "blobs"
    blob = blobs / etag
    if not blob.exists():
        blobs.mkdir(parents=True, exist_ok=True)
        part = blob.with_name(etag + ".part")
        have = part.stat().st_size if part.exists() else 0
        if meta.size is not None and have > meta.size:
            part.unlink()
            have = 0
        log(f"{'Resuming' if have else 'Downloading'} {f.repo_id}/{f.filename} ({_fmt(meta.size)})")
        headers = huggingface_hub.utils.build_hf_headers()
        if urlparse(meta.location).netloc != urlparse(url).netloc:
            headers.pop("authorization", None)  # never send a token to a CDN host
        try:
            with open(part, "ab") as fh:
                http_get(meta.location, fh, resume_size=have, headers=headers, expected_size=meta.size, displayed_filename=f.filename)
        except Exception as e:  # any transfer failure: keep the partial file for the next run
            kept = part.stat().st_size if part.exists() else 0
            raise WeightsUnavailable(f"{f.repo_id}/{f.filename}: download interrupted ({type(e).__name__}) after {_fmt(kept)}; run again to resume") from None
        _verify(part, etag, meta.size, f)
        part.rename(blob)
    # The blob is in place, so this only records the snapshot pointer and ref (standard cache layout).
    return Path(huggingface_hub.hf_hub_download(f.repo_id, f.filename, revision=f.revision, cache_dir=cache, endpoint=ep))


def download_release(f: ReleaseFile, log: Callable[[str], None] = print) -> Path:
    """Download a release file into the drop-in folder (resuming a partial one), verify size and sha256."""
    part = f.path.with_name(f.filename + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if have > f.size:
        part.unlink()
        have = 0
    log(f"{'Resuming' if have else 'Downloading'} {f.filename} ({_fmt(f.size)})")
    try:
        with open(part, "ab") as fh:
            http_get(f.url, fh, resume_size=have, expected_size=f.size, displayed_filename=f.filename)
    except Exception as e:  # no network, refused, interrupted: keep the partial file for the next run
        kept = part.stat().st_size if part.exists() else 0
        if kept > have:
            raise WeightsUnavailable(f"{f.filename}: download interrupted ({type(e).__name__}) after {_fmt(kept)}; run again to resume") from None
        raise _Unreachable(type(e).__name__) from None
    _verify_release(part, f, remove=True)
    part.rename(f.path)
    return f.path


def _verify_release(path: Path, f: ReleaseFile, remove: bool) -> None:
    """Size and sha256 against the pinned values; `remove` deletes a failed download (never a file the user put)."""
    actual = path.stat().st_size
    if actual != f.size:
        if remove:
            path.unlink()
        raise WeightsUnavailable(f"{path}: {actual} bytes, but {f.filename} has {f.size}; replace it or delete it and run again")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    if h.hexdigest() != f.sha256:
        if remove:
            path.unlink()
        what = "the download was removed, run again" if remove else f"replace {path}"
        raise WeightsUnavailable(f"{f.filename}: checksum mismatch (expected {f.sha256[:12]}, file {h.hexdigest()[:12]}); {what}")


def _verify(path: Path, etag: str, size: int | None, f: HubFile) -> None:
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise WeightsUnavailable(f"{f.filename}: got {actual} bytes, the hub says {size}; run the download again to resume")
    digest = file_digest(path, etag)
    if digest is not None and digest != etag:
        path.unlink()
        raise WeightsUnavailable(f"{f.filename}: checksum mismatch (hub {etag[:12]}, file {digest[:12]}); the corrupt download was removed, run again")


def file_digest(path: Path, etag: str) -> str | None:
    """The hash the hub's etag is of: sha256 for LFS files, git blob sha1 for small ones; None if unknown."""
    if _SHA256.match(etag):
        h = hashlib.sha256()
    elif _GIT_SHA1.match(etag):
        h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    else:
        return None
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def verify_cached(path: Path) -> bool | None:
    """Re-check a cached file against its blob name (the etag); None when the name is not a known hash."""
    blob = path.resolve()
    digest = file_digest(blob, blob.name)
    return None if digest is None else digest == blob.name


def _fmt(n: int | None) -> str:
    return "size unknown" if n is None else f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
