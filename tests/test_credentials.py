"""Honest outputs through the CLI on files the tests make: C2PA Content Credentials validated by the library's own
reader in every output format, a chained input keeping its credentials, a tampered output failing in `info`,
the IPTC digital source type, signing with the user's own certificate, outputs without the optional library,
and the fidelity map beside each output."""

import hashlib
import json
import shutil
import struct
import sys
import zlib
from pathlib import Path

import c2pa
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from supir_mlx.cli import main
from supir_mlx.io.credentials import (
    SELF_SIGNED_FILE,
    SELF_SIGNED_ORG,
    TRAINED_ALGORITHMIC_MEDIA,
    Credentials,
    _make_self_signed,
)
from supir_mlx.io.images import save_image
from supir_mlx.io.metadata import DIGITAL_SOURCE_TYPE, read_digital_source_type, read_provenance

FAST = ["--steps", "1", "--min-size", "64", "--captioner", "none"]
SEED, PROMPT = 77, "a lighthouse in fog"
CAMERA_XMP = ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
              '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
              'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" Iptc4xmpExt:DigitalSourceType='
              '"http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture"/></rdf:RDF></x:xmpmeta>'
              '<?xpacket end="w"?>')
INPUTS = ["a.png", "b.jpg", "c.webp", "d.tif", "e48.png"]


def run(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def pixels(w, h, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) * 5 % 256], -1)
    return np.clip(rgb + rng.integers(-10, 10, rgb.shape), 0, 255).astype(np.uint8)


def png_chunks(data):
    pos, out = 8, []
    while pos < len(data):
        n = struct.unpack(">I", data[pos:pos + 4])[0]
        out.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]))
        pos += 12 + n
    return out


def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def repaint_png(src, dst):
    """`src` with some pixels changed and every other chunk (the credentials too) kept: an edit after signing."""
    chunks = png_chunks(Path(src).read_bytes())
    raw = bytearray(zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT")))
    raw[1:40] = bytes(255 - b for b in raw[1:40])
    out, done = b"\x89PNG\r\n\x1a\n", False
    for kind, body in chunks:
        if kind == b"IDAT":
            if not done:
                out += chunk(b"IDAT", zlib.compress(bytes(raw)))
                done = True
            continue
        out += chunk(kind, body)
    Path(dst).write_bytes(out)


def manifest_of(path):
    with c2pa.Reader(str(path)) as r:
        return json.loads(r.json())


@pytest.fixture(scope="module")
def signed(tiny_weights, tmp_path_factory):
    """One batch over an input of each format (8-bit PNG, JPEG with a camera's IPTC source type, WebP, TIFF,
    16-bit PNG), with --fidelity-map."""
    root = tmp_path_factory.mktemp("signed")
    src, out = root / "in", root / "out"
    src.mkdir()
    Image.fromarray(pixels(24, 16, 1)).save(src / "a.png")
    Image.fromarray(pixels(24, 16, 2)).save(src / "b.jpg", quality=95, xmp=CAMERA_XMP.encode())
    Image.fromarray(pixels(24, 16, 3)).save(src / "c.webp", lossless=True)
    Image.fromarray(pixels(24, 16, 4)).save(src / "d.tif")
    px16 = pixels(24, 16, 5).astype(np.uint16) * 257
    rows = np.concatenate([np.zeros((16, 1), np.uint8), px16.astype(">u2").view(np.uint8).reshape(16, -1)], 1)
    (src / "e48.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 24, 16, 16, 2, 0, 0, 0))
                                  + chunk(b"IDAT", zlib.compress(rows.tobytes())) + chunk(b"IEND", b""))
    with pytest.MonkeyPatch.context() as mp:  # a config folder of its own: the self-signed key is made here
        mp.setenv("SUPIR_MLX_CONFIG", str(root / "config"))
        r = run("restore", src, "-o", out, "--weights", tiny_weights, "--upscale", "2", "--seed", SEED, "--prompt",
                PROMPT, "--preset", "quality", "--fidelity-map", *FAST)
    assert r.exit_code == 0, r.output
    return {"src": src, "out": out, "result": r, "config": root / "config"}


def out_of(signed, name):
    stem, ext = name.rsplit(".", 1)
    return signed["out"] / f"{stem}_supir.{ext}"


def test_every_output_format_carries_credentials_the_library_validates(signed):
    for name in INPUTS:
        path = out_of(signed, name)
        with c2pa.Reader(str(path)) as r:
            assert r.get_validation_state() == "Valid", name  # not Invalid; not Trusted (self-signed)
            failures = [f["code"] for f in r.get_validation_results()["activeManifest"].get("failure", [])]
            assert failures == ["signingCredential.untrusted"], (name, failures)
            m = r.get_active_manifest()
        assert m["claim_generator_info"][0]["name"] == "supir-mlx" and m["title"] == path.name
        assert m["signature_info"]["issuer"] == SELF_SIGNED_ORG
        actions = next(a for a in m["assertions"] if a["label"].startswith("c2pa.actions"))["data"]["actions"]
        assert [a["action"] for a in actions] == ["c2pa.opened", "c2pa.edited"]
        edit = actions[1]
        assert edit["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
        assert edit["softwareAgent"]["name"] == "supir-mlx"
        p = edit["parameters"]
        assert (p["seed"], p["caption"], p["preset"], p["model"], p["base_checkpoint"], p["upscale"]) == \
            (SEED, PROMPT, "quality", "SUPIR-v0Q", "supir_tiny.safetensors", 2.0)
        [ing] = m["ingredients"]
        assert ing["title"] == name and ing["relationship"] == "parentOf"
        assert ing["metadata"]["supir-mlx.sha256"] == hashlib.sha256((signed["src"] / name).read_bytes()).hexdigest()
        with Image.open(path) as im:  # still an ordinary image with our record
            assert im.size == (48, 32)
        assert read_provenance(path)["seed"] == SEED
    key = signed["config"] / SELF_SIGNED_FILE
    assert key.stat().st_mode & 0o777 == 0o600
    assert "self-signed key" in signed["result"].output and str(key) in signed["result"].output


def test_iptc_digital_source_type_in_every_output_replacing_the_inputs(signed):
    assert read_digital_source_type(signed["src"] / "b.jpg").endswith("/digitalCapture")
    for name in INPUTS:
        path = out_of(signed, name)
        assert read_digital_source_type(path) == DIGITAL_SOURCE_TYPE, name
        with Image.open(path) as im:
            xmp = im.info.get("xmp") or (im.tag_v2.get(700) if im.format == "TIFF" else None) \
                or getattr(im, "text", {}).get("XML:com.adobe.xmp")
        xmp = xmp.decode() if isinstance(xmp, bytes) else xmp
        assert xmp.count("DigitalSourceType") == 2 and "digitalCapture" not in xmp, name  # one element, opened+closed


def test_info_validates_and_says_plainly_it_is_self_signed(signed):
    path = out_of(signed, "b.jpg")
    r = run("info", path)
    assert r.exit_code == 0, r.output
    assert "SELF-SIGNED" in r.output and "not who made it" in r.output
    assert "compositeWithTrainedAlgorithmicMedia" in r.output and "c2pa.edited by supir-mlx" in r.output
    assert "trainedAlgorithmicMedia" in r.output and "b.jpg (parentOf" in r.output
    j = json.loads(run("info", "--json", path).output)
    c = j["credentials"]
    assert (c["valid"], c["trusted"], c["self_signed"], c["tampered"]) == (True, False, True, False)
    assert j["digital_source_type"] == DIGITAL_SOURCE_TYPE
    assert c["manifest"]["title"] == path.name and c["manifests"] == 1


def test_a_changed_output_no_longer_matches_its_credentials(signed, tmp_path):
    png = tmp_path / "edited.png"
    repaint_png(out_of(signed, "a.png"), png)
    tif = tmp_path / "edited.tif"
    shutil.copy(out_of(signed, "d.tif"), tif)
    with Image.open(tif) as im:
        strip = im.tag_v2[273][0]
    data = bytearray(tif.read_bytes())
    data[strip:strip + 30] = bytes(255 - b for b in data[strip:strip + 30])
    tif.write_bytes(bytes(data))
    for path in (png, tif):
        assert read_provenance(path)["seed"] == SEED  # the record is intact: only the pixels changed
        r = run("info", path)
        assert r.exit_code == 1, r.output
        assert "DO NOT MATCH this file" in r.output and "changed after the credentials were signed" in r.output
        c = json.loads(run("info", "--json", path).output)["credentials"]
        assert c["valid"] is False and c["tampered"] is True
        assert "assertion.dataHash.mismatch" in {f["code"] for f in c["failures"]}


def test_a_chained_input_keeps_its_credentials(signed, tiny_weights, tmp_path):
    first = out_of(signed, "a.png")
    again = tmp_path / "again.png"
    r = run("restore", first, "-o", again, "--weights", tiny_weights, "--prompt", "", *FAST)
    assert r.exit_code == 0, r.output
    before, after = manifest_of(first), manifest_of(again)
    assert len(after["manifests"]) == 2
    [ing] = after["manifests"][after["active_manifest"]]["ingredients"]
    assert ing["active_manifest"] == before["active_manifest"]  # the input's own manifest, in the chain
    assert after["manifests"][before["active_manifest"]]["title"] == first.name
    c = json.loads(run("info", "--json", again).output)["credentials"]
    assert c["valid"] and c["ingredients"][0]["credentials_valid"] is True
    assert "its own credentials valid, kept in the chain" in run("info", again).output


def test_fidelity_map_beside_each_output_and_its_summary_in_the_record(signed):
    for name in INPUTS:
        path = out_of(signed, name)
        fmap = path.with_name(path.stem + "_fidelity.png")
        with Image.open(fmap) as im, Image.open(path) as out:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == out.size
        fid = read_provenance(path)["fidelity"]
        assert fid["map"] == fmap.name
        assert 0 <= fid["strong_share"] <= fid["moderate_share"] <= 1 and 0 <= fid["mean_score"] <= 1
    text = run("info", out_of(signed, "a.png")).output
    assert "fidelity.strong_share" in text and "fidelity.mean_drift" in text


def test_maps_next_to_their_inputs_are_not_restored_again(tiny_weights, tmp_path):
    Image.fromarray(pixels(24, 16, 8)).save(tmp_path / "x.png")
    for name in ("x_supir.png", "x_supir_fidelity.png"):
        Image.fromarray(pixels(48, 32, 9)).save(tmp_path / name)
    r = run("restore", tmp_path, "--weights", tiny_weights, "--plan", "--upscale", "2", *FAST)
    assert r.exit_code == 0, r.output
    assert "x.png" in r.output and "fidelity" not in r.output and "x_supir.png:" not in r.output


def test_no_credentials_option(tiny_weights, tmp_path):
    Image.fromarray(pixels(24, 16, 6)).save(tmp_path / "n.png")
    r = run("restore", tmp_path / "n.png", "--weights", tiny_weights, "--no-credentials", "--prompt", "", *FAST)
    assert r.exit_code == 0, r.output
    out = tmp_path / "n_supir.png"
    assert c2pa.Reader.try_create(str(out)) is None
    assert read_digital_source_type(out) == DIGITAL_SOURCE_TYPE
    assert "credentials      none" in run("info", out).output


def test_without_the_optional_library_outputs_still_say_what_they_are(tiny_weights, tmp_path, monkeypatch):
    for i in range(2):
        Image.fromarray(pixels(24, 16, 20 + i)).save(tmp_path / f"m{i}.jpg")
    monkeypatch.setitem(sys.modules, "c2pa", None)  # `import c2pa` now fails as if not installed
    r = run("restore", tmp_path, "--weights", tiny_weights, "--prompt", "", *FAST)
    assert r.exit_code == 0, r.output
    notes = [ln for ln in r.output.splitlines() if "Content Credentials" in ln]
    assert len(notes) == 1 and 'pip install "supir-mlx[credentials]"' in notes[0]
    out = tmp_path / "m0_supir.jpg"
    assert "not checked" in run("info", out).output
    monkeypatch.undo()
    for i in range(2):
        out = tmp_path / f"m{i}_supir.jpg"
        assert c2pa.Reader.try_create(str(out)) is None
        assert read_digital_source_type(out) == DIGITAL_SOURCE_TYPE and read_provenance(out)["notice"]


def _split(pem):
    end = pem.index(b"-----END PRIVATE KEY-----") + len(b"-----END PRIVATE KEY-----\n")
    return pem[:end], pem[end:]


def _serial(chain):
    from cryptography import x509

    return str(x509.load_pem_x509_certificates(chain)[0].serial_number)


def test_signing_with_the_users_certificate_options_and_config_file(tiny_weights, tmp_path, monkeypatch):
    Image.fromarray(pixels(24, 16, 30)).save(tmp_path / "u.png")
    key, chain = _split(_make_self_signed())
    (tmp_path / "key.pem").write_bytes(key)
    (tmp_path / "chain.pem").write_bytes(chain)
    r = run("restore", tmp_path / "u.png", "-o", tmp_path / "opt.png", "--weights", tiny_weights, "--prompt", "",
            "--signing-cert", tmp_path / "chain.pem", "--signing-key", tmp_path / "key.pem", *FAST)
    assert r.exit_code == 0, r.output
    m = manifest_of(tmp_path / "opt.png")
    assert m["manifests"][m["active_manifest"]]["signature_info"]["cert_serial_number"] == _serial(chain)

    conf = tmp_path / "conf"
    conf.mkdir()
    key2, chain2 = _split(_make_self_signed())
    (conf / "k.pem").write_bytes(key2)
    (conf / "c.pem").write_bytes(chain2)
    (conf / "credentials.json").write_text(json.dumps({"certificate": "c.pem", "private_key": "k.pem"}))
    monkeypatch.setenv("SUPIR_MLX_CONFIG", str(conf))
    creds = Credentials.load()
    assert creds.identity.origin == str(conf / "credentials.json") and not creds.identity.self_signed
    prov = read_provenance(tmp_path / "opt.png")
    save_image(tmp_path / "conf.png", pixels(24, 16, 32), provenance=prov,
               sign=creds.for_output(prov, tmp_path / "u.png", "conf.png"))
    m = manifest_of(tmp_path / "conf.png")
    assert m["manifests"][m["active_manifest"]]["signature_info"]["cert_serial_number"] == _serial(chain2)
    assert not (conf / SELF_SIGNED_FILE).exists()


@pytest.mark.parametrize("case", ["mismatched key", "cert alone", "not a key", "missing file", "contradiction"])
def test_bad_signing_options_are_one_line_before_any_work(tiny_weights, tmp_path, case):
    Image.fromarray(pixels(24, 16, 31)).save(tmp_path / "v.png")
    _, chain = _split(_make_self_signed())
    other_key, _ = _split(_make_self_signed())
    (tmp_path / "chain.pem").write_bytes(chain)
    (tmp_path / "other.pem").write_bytes(other_key)
    (tmp_path / "junk.pem").write_text("not a key")
    args = {"mismatched key": ["--signing-cert", tmp_path / "chain.pem", "--signing-key", tmp_path / "other.pem"],
            "cert alone": ["--signing-cert", tmp_path / "chain.pem"],
            "not a key": ["--signing-cert", tmp_path / "chain.pem", "--signing-key", tmp_path / "junk.pem"],
            "missing file": ["--signing-cert", tmp_path / "nope.pem", "--signing-key", tmp_path / "other.pem"],
            "contradiction": ["--no-credentials", "--signing-cert", tmp_path / "chain.pem"]}[case]
    r = run("restore", tmp_path / "v.png", "--weights", tiny_weights, "--prompt", "", *args, *FAST)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit))
    assert len(r.output.strip().splitlines()) == 1 and r.output.startswith("error: "), r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.pem", "junk.pem", "other.pem", "v.png"]
