"""Broken weight folders: one line naming the folder and what is wrong, exit status 1, nothing written."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from supir_mlx.cli import main


@pytest.fixture(scope="module")
def good(tmp_path_factory, reference_dir):
    out = tmp_path_factory.mktemp("w") / "tiny"
    r = CliRunner().invoke(main, ["convert", str(reference_dir / "tiny" / "supir_tiny.safetensors"), "--config",
                                  str(reference_dir / "tiny" / "config.json"), "--dtype", "float32", "-o", str(out)])
    assert r.exit_code == 0, r.output
    return out


def _shard(d):
    return d / json.loads((d / "manifest.json").read_text())["shards"][0]["file"]


def _truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _garble(p):  # same size, header destroyed
    data = bytearray(p.read_bytes())
    data[:64] = b"\xff" * 64
    p.write_bytes(bytes(data))


BREAKAGES = {
    "config.json missing": (lambda d: (d / "config.json").unlink(), "no config.json"),
    "config.json not JSON": (lambda d: (d / "config.json").write_bytes(b"\x00\x01garbage"), "config.json is corrupt"),
    "config.json no architecture": (lambda d: (d / "config.json").write_text('{"format": "supir-mlx-config", "unet": 3}'),
                                    "config.json does not describe a SUPIR architecture"),
    "config.json empty object": (lambda d: (d / "config.json").write_text("{}"),
                                 "config.json does not describe a SUPIR architecture"),
    "shard missing": (lambda d: _shard(d).unlink(), "is missing"),
    "shard truncated": (lambda d: _truncate(_shard(d)), "is truncated"),
    "shard damaged": (lambda d: _garble(_shard(d)), "cannot be read"),
    "manifest missing": (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
    "manifest not JSON": (lambda d: (d / "manifest.json").write_text("{oops"), "manifest.json is corrupt"),
    "manifest wrong format": (lambda d: (d / "manifest.json").write_text('{"format": "x"}'),
                              "not a supir-mlx weights manifest"),
    "manifest without shards": (lambda d: (d / "manifest.json").write_text(
        json.dumps({**json.loads((d / "manifest.json").read_text()), "shards": [{"file": "../x"}]})),
        "lists no valid shards"),
}


def one_line_error(r, folder, words):
    out = r.output.strip()
    assert r.exit_code == 1, out
    assert "Traceback" not in out and r.exception is None or isinstance(r.exception, SystemExit), out
    assert len(out.splitlines()) == 1, out
    assert str(folder) in out and words in out, out


@pytest.mark.parametrize("case", sorted(BREAKAGES))
@pytest.mark.parametrize("plan", [False, True])
def test_broken_converted_folder(good, tmp_path, case, plan):
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    damage, words = BREAKAGES[case]
    damage(broken)
    img = tmp_path / "in" / "p.png"
    img.parent.mkdir()
    Image.fromarray(np.full((24, 24, 3), 100, np.uint8)).save(img)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = CliRunner().invoke(main, ["restore", str(img), "--weights", str(broken), "--prompt", "x", "--steps", "1",
                                  "--min-size", "64", *(["--plan"] if plan else [])])
    one_line_error(r, broken, words)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


LLAVA_BREAKAGES = {
    "no config.json": lambda d: None,
    "config.json does not describe a LLaVA captioner": lambda d: (d / "config.json").write_text('{"model_type": "bert"}'),
    "config.json is corrupt": lambda d: (d / "config.json").write_text("[1, 2"),
    "no model*.safetensors": lambda d: (d / "config.json").write_text(json.dumps(_llava_config())),
    "model-00001.safetensors cannot be read (truncated": lambda d: (
        (d / "config.json").write_text(json.dumps(_llava_config())),
        (d / "model-00001.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\": 1, \"b\": 2}"),
    ),
}


def _llava_config():
    from pathlib import Path

    ref = Path(__file__).parent / "reference" / "llava" / "llava_tiny_config.json"
    return json.loads(ref.read_text())


@pytest.mark.parametrize("words", sorted(LLAVA_BREAKAGES))
def test_broken_captioner_folder(good, tmp_path, words):
    cap = tmp_path / "llava"
    cap.mkdir()
    LLAVA_BREAKAGES[words](cap)
    img = tmp_path / "p.png"
    Image.fromarray(np.full((24, 24, 3), 100, np.uint8)).save(img)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = CliRunner().invoke(main, ["restore", str(img), "--weights", str(good), "--captioner-weights", str(cap),
                                  "--steps", "1", "--min-size", "64"])
    one_line_error(r, cap, words)
    r = CliRunner().invoke(main, ["caption", str(img), "--weights", str(cap)])
    one_line_error(r, cap, words)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_convert_into_an_existing_folder(good, tmp_path, reference_dir):
    for existing in (tmp_path / "full", tmp_path / "file.txt"):
        if existing.suffix:
            existing.write_text("keep me")
        else:
            existing.mkdir()
            (existing / "notes.txt").write_text("keep me")
        before = sorted(str(p) for p in tmp_path.rglob("*"))
        r = CliRunner().invoke(main, ["convert", str(reference_dir / "tiny" / "supir_tiny.safetensors"), "--config",
                                      str(reference_dir / "tiny" / "config.json"), "-o", str(existing)])
        one_line_error(r, existing, "already exists")
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before
