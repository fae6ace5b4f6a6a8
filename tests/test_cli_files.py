"""Photographer I/O through the `restore` and `info` commands, on real files the tests generate.

Every test runs `supir_mlx.cli.main` in-process (click's CliRunner) with the tiny reference model: input formats
(JPEG, PNG 8/16-bit, palette, grayscale, alpha, TIFF 8/16-bit, WebP), EXIF orientation, ICC conversion, alpha,
EXIF/XMP/IPTC carried over, output formats and bit depths, JPEG quality, provenance (`info`, `--settings-from`),
batches (folders, globs, patterns, skip/overwrite, Ctrl-C, crashes, failures, summary, exit codes), `--compare`,
and every kind of bad input (one-line error naming the file, inputs untouched, nothing partial left behind).
Disk-full, permission and interrupted-write failures are simulated by patching the writer's file layer only.
"""

import errno
import hashlib
import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageCms, ImageFile, IptcImagePlugin

from icc import swapped_primaries_profile
from supir_mlx.cli import main
from supir_mlx.io import images as images_mod
from supir_mlx.pipeline.restore import Restorer

FAST = ["--steps", "1", "--min-size", "64"]
SEED, CFG, PROMPT = 4242, 3.25, "a harbour at dawn"

XMP = ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
       '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       '<rdf:Description rdf:about="" xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
       'xmlns:dc="http://purl.org/dc/elements/1.1/" tiff:Orientation="6">'
       '<dc:creator><rdf:Seq><rdf:li>Ada Lens</rdf:li></rdf:Seq></dc:creator></rdf:Description>'
       '</rdf:RDF></x:xmpmeta><?xpacket end="w"?>')
IPTC = {(2, 5): b"Harbour at dawn", (2, 80): b"A. Photographer", (2, 116): b"(c) 1962 A. Photographer"}


# ------------------------------------------------------------------------------------------------ helpers
def run(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def digests(folder):
    return {p.name: digest(p) for p in Path(folder).iterdir() if p.is_file()}


def leftovers(folder):
    """Temporary files of the atomic writer (or anything hidden) left in a folder."""
    return [p.name for p in Path(folder).rglob("*") if p.name.startswith(".") or p.suffix == ".part"]


def no_traceback(result):
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def lines_naming(result, name):
    return [ln for ln in result.output.splitlines() if name in ln]


def rgb_pixels(w, h, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) * 4 % 256], -1)
    return np.clip(rgb + rng.integers(-12, 12, rgb.shape), 0, 255).astype(np.uint8)


def exif_block(orientation=1, make="TestCam", size=None):
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = make
    if size:
        ifd = exif.get_ifd(0x8769)
        ifd[0xA002], ifd[0xA003] = size
    return exif.tobytes()


def iim(records):
    return b"".join(b"\x1c" + bytes(k) + struct.pack(">H", len(v)) + v for k, v in records.items())


def jpeg_with_iptc(jpeg: bytes, records) -> bytes:
    """Insert an APP13 Photoshop/IPTC segment after SOI (Pillow cannot write one)."""
    data = iim(records)
    res = b"8BIM" + struct.pack(">H", 0x0404) + b"\0\0" + struct.pack(">I", len(data)) + data
    res += b"\0" * (len(data) % 2)
    seg = b"Photoshop 3.0\0" + res
    return jpeg[:2] + b"\xff\xed" + struct.pack(">H", len(seg) + 2) + seg + jpeg[2:]


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png48(path, px16):
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    h, w, _ = px16.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), px16.astype(">u2").view(np.uint8).reshape(h, -1)], axis=1)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                           + png_chunk(b"IDAT", zlib.compress(rows.tobytes())) + png_chunk(b"IEND", b""))


def png_header_only(w, h):
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)))


def jpeg_claiming(w, h):
    """A valid small JPEG whose frame header (SOF0) claims w x h."""
    buf = io.BytesIO()
    Image.fromarray(rgb_pixels(16, 16)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, h, w)
    return bytes(data)


def png_bit_depth(path):
    data = Path(path).read_bytes()
    assert data[12:16] == b"IHDR"
    return data[24], data[25]  # bit depth, colour type


def icc_description(im):
    return ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(im.info["icc_profile"])))


def xmp_text(im):
    x = im.info.get("xmp") or (im.tag_v2.get(700) if im.format == "TIFF" else None)
    if x is None and im.format == "PNG":
        x = im.text.get("XML:com.adobe.xmp")
    return x.decode("utf-8") if isinstance(x, bytes) else x


class CountingRestore:
    """Wraps Restorer.restore: counts calls and can raise `error` on call number `fail_on`."""

    def __init__(self, monkeypatch, fail_on=None, error=None):
        self.calls, self.fail_on, self.error = 0, fail_on, error
        real = Restorer.restore

        def restore(this, *a, **k):
            self.calls += 1
            if self.calls == self.fail_on:
                raise self.error
            return real(this, *a, **k)

        monkeypatch.setattr(Restorer, "restore", restore)


# ------------------------------------------------------------------------------------------------ fixtures
def make_inputs(folder: Path) -> dict:
    """One file per input kind the product reads; returns name -> (w, h) as displayed (orientation applied)."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    # JPEG, EXIF orientation 6 (display rotated 90 degrees), XMP, IPTC
    buf = io.BytesIO()
    Image.fromarray(rgb_pixels(24, 16, 1)).save(buf, "JPEG", quality=95,
                                                 exif=exif_block(6, "TestCam", (24, 16)), xmp=XMP.encode())
    (folder / "orient.jpg").write_bytes(jpeg_with_iptc(buf.getvalue(), IPTC))
    sizes["orient.jpg"] = (16, 24)
    # PNG 8-bit RGB tagged with a non-sRGB profile, pure red in that space
    red = np.zeros((16, 24, 3), np.uint8)
    red[..., 0] = 230
    Image.fromarray(red).save(folder / "icc.png", icc_profile=swapped_primaries_profile())
    sizes["icc.png"] = (24, 16)
    # PNG 16-bit grayscale, PNG 16-bit RGB
    ramp16 = (np.linspace(0, 65535, 24 * 16).reshape(16, 24)).astype(np.uint16)
    Image.fromarray(ramp16).save(folder / "gray16.png")
    sizes["gray16.png"] = (24, 16)
    png48(folder / "rgb48.png", rgb_pixels(24, 16, 2).astype(np.uint16) * 257 + 91)
    sizes["rgb48.png"] = (24, 16)
    # palette with a transparent index (tRNS): left half transparent
    pal = Image.fromarray(rgb_pixels(24, 16, 3)).quantize(16)
    arr = np.asarray(pal).copy()
    arr[:, :12] = 15
    pal = Image.fromarray(arr, "P")
    pal.putpalette(Image.fromarray(rgb_pixels(24, 16, 3)).quantize(16).getpalette())
    pal.save(folder / "palette.png", transparency=15)
    sizes["palette.png"] = (24, 16)
    # grayscale + alpha: left half transparent
    la = Image.fromarray(rgb_pixels(24, 16, 4)).convert("L")
    alpha = np.full((16, 24), 255, np.uint8)
    alpha[:, :12] = 0
    Image.merge("LA", (la, Image.fromarray(alpha))).save(folder / "graya.png")
    sizes["graya.png"] = (24, 16)
    # TIFF 8-bit RGB with EXIF, XMP and IPTC; TIFF 16-bit grayscale with EXIF
    Image.fromarray(rgb_pixels(24, 16, 5)).save(folder / "photo8.tif", tiffinfo={
        271: "TiffCam", 274: 1, 33723: iim(IPTC), 700: XMP.replace('"6"', '"1"').encode()})
    sizes["photo8.tif"] = (24, 16)
    Image.fromarray(ramp16[::-1].copy()).save(folder / "gray16.tif", exif=exif_block(1, "Tiff16Cam"))
    sizes["gray16.tif"] = (24, 16)
    # WebP with alpha: left half transparent
    rgba = np.dstack([rgb_pixels(24, 16, 6), alpha])
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.webp", lossless=True)
    sizes["alpha.webp"] = (24, 16)
    return sizes


@pytest.fixture(scope="module")
def formats_run(weights, tmp_path_factory):
    """One batch over every input kind: upscale 2, non-default seed/cfg, a prompt, --compare."""
    root = tmp_path_factory.mktemp("formats")
    src, out = root / "in", root / "out"
    sizes = make_inputs(src)
    before = digests(src)
    r = run("restore", src, "-o", out, "--weights", weights, "--upscale", "2", "--seed", SEED, "--cfg", CFG,
            "--prompt", PROMPT, "--compare", *FAST)
    return dict(result=r, src=src, out=out, sizes=sizes, before=before)


def output_of(fr, name):
    stem, ext = name.rsplit(".", 1)
    return fr["out"] / f"{stem}_supir.{ext}"


def expected_size(fr, name):
    w, h = fr["sizes"][name]
    return 2 * w, 2 * h


# ------------------------------------------------------------------------------------------------ 1. input
def test_every_input_kind_restores(formats_run):
    r = formats_run["result"]
    assert r.exit_code == 0, r.output
    no_traceback(r)
    assert f"{len(formats_run['sizes'])} done, 0 skipped, 0 failed" in r.output
    for name in formats_run["sizes"]:
        out = output_of(formats_run, name)
        with Image.open(out) as im:
            assert im.size == expected_size(formats_run, name), name
            assert im.format == {"jpg": "JPEG", "png": "PNG", "tif": "TIFF", "webp": "WEBP"}[name.rsplit(".", 1)[1]]
    assert digests(formats_run["src"]) == formats_run["before"]  # inputs never modified
    assert leftovers(formats_run["out"]) == [] and leftovers(formats_run["src"]) == []


def test_exif_orientation_applied_and_exif_fixed(formats_run):
    out = output_of(formats_run, "orient.jpg")
    with Image.open(out) as im:
        assert im.size == (32, 48)  # 24x16 stored, displayed 16x24 (orientation 6), x2
        exif = im.getexif()
        assert exif[0x0112] == 1 and exif[0x010F] == "TestCam"
        ifd = exif.get_ifd(0x8769)
        assert (ifd[0xA002], ifd[0xA003]) == (32, 48)
    # the compare image's "before" half shows the upright input: portrait, like the output
    with Image.open(out.with_name("orient_supir_compare.jpg")) as cmp:
        assert cmp.size == (2 * 32 + 4, 48)


def test_xmp_and_iptc_carried_over(formats_run):
    for name in ("orient.jpg", "photo8.tif"):
        out = output_of(formats_run, name)
        with Image.open(out) as im:
            xmp = xmp_text(im)
            assert xmp and "Ada Lens" in xmp and "supir:Provenance" in xmp, name
            assert 'tiff:Orientation="6"' not in xmp, name
            iptc = IptcImagePlugin.getiptcinfo(im) or {}
            for key, value in IPTC.items():
                assert iptc.get(key) == value, (name, key, iptc)
    for name, make in (("photo8.tif", "TiffCam"), ("gray16.tif", "Tiff16Cam")):  # EXIF in TIFF outputs, 8/16-bit
        with Image.open(output_of(formats_run, name)) as im:
            exif = im.getexif()
            assert exif[0x010F] == make and exif[0x0112] == 1, name
            ifd = exif.get_ifd(0x8769)
            # the TIFF directory states the size; EXIF's pixel-size tags are not allowed in TIFF (exiftool -validate)
            assert 0xA002 not in ifd and 0xA003 not in ifd and im.size == expected_size(formats_run, name), name


def test_icc_converted_to_srgb_and_output_tagged(formats_run):
    out = output_of(formats_run, "icc.png")
    with Image.open(out) as im:
        assert "sRGB" in icc_description(im)
        assert im.info["icc_profile"] != swapped_primaries_profile()
    # The pixels were converted, not merely re-tagged: the source's "red" is green in sRGB, as the compare
    # image's before half (the input as the pipeline saw it) shows.
    with Image.open(out.with_name("icc_supir_compare.png")) as cmp:
        before = np.asarray(cmp.convert("RGB"))[-8:, :48].reshape(-1, 3).mean(0)
    assert before[1] > 100 and before[1] > 2 * before[0], before
    for name in formats_run["sizes"]:  # every output says its pixels are sRGB
        with Image.open(output_of(formats_run, name)) as im:
            assert "icc_profile" in im.info and "sRGB" in icc_description(im), name


@pytest.mark.parametrize("name", ["palette.png", "graya.png", "alpha.webp"])
def test_alpha_carried_and_resized(formats_run, name):
    with Image.open(output_of(formats_run, name)) as im:
        assert im.mode == "RGBA" and im.size == expected_size(formats_run, name)
        a = np.asarray(im)[:, :, 3].astype(int)
    w = a.shape[1]
    assert a[:, : w // 2 - 4].max() <= 8 and a[:, w // 2 + 4:].min() >= 247  # left half transparent, right opaque


@pytest.mark.parametrize("name", ["gray16.png", "rgb48.png", "gray16.tif"])
def test_16bit_inputs_give_16bit_outputs(formats_run, name):
    out = output_of(formats_run, name)
    if out.suffix == ".png":
        depth, colour = png_bit_depth(out)
        assert depth == 16 and colour == 2
        with Image.open(out) as im:
            assert im.size == expected_size(formats_run, name)
    else:
        with Image.open(out) as im:
            assert tuple(im.tag_v2[258]) == (16, 16, 16) and im.size == expected_size(formats_run, name)
            assert im.getexif()[0x010F] == "Tiff16Cam"  # EXIF of a 16-bit TIFF is carried too


def test_8bit_inputs_give_8bit_outputs(formats_run):
    assert png_bit_depth(output_of(formats_run, "icc.png")) == (8, 2)
    with Image.open(output_of(formats_run, "photo8.tif")) as im:
        assert im.mode == "RGB" and tuple(im.tag_v2[258]) == (8, 8, 8)


# ------------------------------------------------------------------------------------------------ 3. provenance
def test_provenance_in_every_output_and_info_prints_it(formats_run):
    outs = [output_of(formats_run, n) for n in formats_run["sizes"]]
    r = run("info", "--json", *outs)
    assert r.exit_code == 0, r.output
    records = json.loads(r.output)
    assert set(records) == {str(o) for o in outs}
    for name, prov in records.items():
        assert "generative reconstruction" in prov["notice"].lower(), name
        assert prov["model"] == "SUPIR-v0Q" and prov["base_checkpoint"] == "supir_tiny.safetensors", name
        assert prov["caption"] == PROMPT and prov["seed"] == SEED, name
        s = prov["settings"]
        assert (s["seed"], s["cfg"], s["steps"], s["min_size"], s["upscale"], s["prompt"]) == \
            (SEED, CFG, 1, 64, 2.0, PROMPT), name
        assert {"sampler", "s_churn", "s_noise", "color_fix", "control_scale", "model"} <= set(s), name
    text = run("info", outs[0])
    assert text.exit_code == 0
    assert "generative reconstruction" in text.output.lower()
    assert f"seed             {SEED}" in text.output and PROMPT in text.output and "settings.cfg" in text.output
    # info on a file without a record, and on a non-image: one-line errors, non-zero exit
    plain = formats_run["src"] / "icc.png"
    bad = run("info", plain)
    assert bad.exit_code == 1 and "no supir-mlx record" in bad.output and len(bad.output.strip().splitlines()) == 1


def test_settings_from_repeats_the_run(formats_run, weights, tmp_path):
    first = output_of(formats_run, "photo8.tif")
    again = tmp_path / "again.tif"
    r = run("restore", formats_run["src"] / "photo8.tif", "-o", again, "--weights", weights,
            "--settings-from", first, "--captioner", "none")
    assert r.exit_code == 0, r.output
    with Image.open(first) as a, Image.open(again) as b:
        assert a.size == b.size
        assert np.array_equal(np.asarray(a), np.asarray(b))
    s1 = json.loads(run("info", "--json", first).output)["settings"]
    s2 = json.loads(run("info", "--json", again).output)["settings"]
    assert s1 == s2


# ------------------------------------------------------------------------------------------------ 2. output
def test_format_option_and_16bit_tiff(formats_run, weights, tmp_path):
    r = run("restore", formats_run["src"] / "icc.png", "-o", tmp_path, "--format", "tiff", "--bits", "16",
            "--weights", weights, "--prompt", "", *FAST)
    assert r.exit_code == 0, r.output
    out = tmp_path / "icc_supir.tif"
    with Image.open(out) as im:
        assert im.format == "TIFF" and tuple(im.tag_v2[258]) == (16, 16, 16) and im.size == (24, 16)
        assert "sRGB" in icc_description(im)
    assert "generative reconstruction" in run("info", out).output.lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["icc_supir.tif"]


def test_jpeg_quality_and_format_from_output_name(formats_run, weights, tmp_path):
    out = tmp_path / "low.jpg"
    r = run("restore", formats_run["src"] / "photo8.tif", "-o", out, "--jpeg-quality", "20", "--weights", weights,
            "--prompt", "", *FAST)
    assert r.exit_code == 0, r.output
    with Image.open(out) as low, Image.open(output_of(formats_run, "orient.jpg")) as high:
        assert low.format == "JPEG" and low.size == (24, 16)
        assert sum(low.quantization[0]) > 4 * sum(high.quantization[0])  # q20 tables are much coarser than q95
        assert (IptcImagePlugin.getiptcinfo(low) or {}).get((2, 80)) == IPTC[(2, 80)]  # TIFF IPTC -> JPEG
        exif = low.getexif()
        assert exif[0x010F] == "TiffCam"
        assert 256 not in exif and 273 not in exif  # the TIFF's own size and strip layout are not carried


# ------------------------------------------------------------------------------------------------ 5. compare
def test_compare_is_before_and_after_side_by_side(formats_run):
    out = output_of(formats_run, "rgb48.png")
    cmp_path = out.with_name("rgb48_supir_compare.png")
    with Image.open(out) as im, Image.open(cmp_path) as cmp:
        after = np.asarray(im.convert("RGB")).astype(int)  # 16-bit output, 8-bit view
        c = np.asarray(cmp.convert("RGB")).astype(int)
    h, w = after.shape[:2]
    assert c.shape == (h, 2 * w + 4, 3)
    assert (c[:, w: w + 4] == 255).all()  # the divider
    rows = slice(h - 6, h)  # below the labels
    assert np.abs(c[rows, w + 4:] - after[rows]).max() <= 1
    src = np.asarray(Image.open(formats_run["src"] / "rgb48.png").convert("RGB").resize((w, h), Image.LANCZOS))
    assert np.abs(c[rows, :w] - src[rows].astype(int)).mean() < 6
    assert "generative reconstruction" in run("info", cmp_path).output.lower()


# ------------------------------------------------------------------------------------------------ 4. batch
def test_batch_folder_pattern_failure_and_crash_then_resume(weights, tmp_path, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        Image.fromarray(rgb_pixels(24, 16, 10 + i)).save(src / f"p{i}.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 5)
    (src / "notes.md").write_text("not an image, ignored in a folder")
    before = digests(src)
    args = ["restore", src, "-o", out, "--pattern", "{index}-{stem}.restored{ext}", "--weights", weights,
            "--prompt", "", *FAST]
    CountingRestore(monkeypatch, fail_on=2, error=RuntimeError("simulated crash in the sampler\ndetail"))
    r = run(*args)
    assert r.exit_code == 1, r.output
    no_traceback(r)
    # folder order: broken, p0, p1, p2 -> indices 1..4; restore call 2 (p1) crashed
    assert sorted(p.name for p in out.iterdir()) == ["2-p0.restored.png", "4-p2.restored.png"]
    assert "2 done, 0 skipped, 2 failed" in r.output.splitlines()[-1]
    assert [ln for ln in lines_naming(r, "p1.png") if "FAILED" in ln] == \
        [f"  FAILED {src / 'p1.png'}: simulated crash in the sampler"]
    [broken] = lines_naming(r, "broken.png")
    assert broken.startswith(f"  FAILED {src / 'broken.png'}: ") and "cannot read" in broken
    done_times = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    # Run again: finished images are skipped (not redone), the crashed one is done, the broken one fails again.
    again = CountingRestore(monkeypatch)
    r = run(*args)
    assert r.exit_code == 1 and again.calls == 1, r.output
    assert "1 done, 2 skipped, 1 failed" in r.output.splitlines()[-1]
    assert (out / "3-p1.restored.png").is_file()
    assert all((out / n).stat().st_mtime_ns == t for n, t in done_times.items())
    # --overwrite redoes them all
    redo = CountingRestore(monkeypatch)
    r = run(*args, "--overwrite")
    assert redo.calls == 3 and "3 done, 0 skipped, 1 failed" in r.output
    assert digests(src) == before and leftovers(out) == []


def test_ctrl_c_then_resume_with_a_glob_next_to_the_inputs(weights, tmp_path, monkeypatch):
    for i in range(3):
        Image.fromarray(rgb_pixels(24, 16, 20 + i)).save(tmp_path / f"s{i}.jpg", quality=90)
    before = digests(tmp_path)
    args = ["restore", tmp_path / "s*.jpg", "--weights", weights, "--prompt", "", "--compare", *FAST]
    CountingRestore(monkeypatch, fail_on=2, error=KeyboardInterrupt())
    r = run(*args)
    assert r.exit_code == 130, r.output
    no_traceback(r)
    assert "interrupted" in r.output and "1 done" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s0.jpg", "s0_supir.jpg", "s0_supir_compare.jpg",
                                                          "s1.jpg", "s2.jpg"]
    first = (tmp_path / "s0_supir.jpg").stat().st_mtime_ns

    # The same command again resumes: the earlier output is neither redone nor taken for a new input.
    resume = CountingRestore(monkeypatch)
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert resume.calls == 2 and "2 done, 1 skipped, 0 failed" in r.output
    assert (tmp_path / "s0_supir.jpg").stat().st_mtime_ns == first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(  # the glob now matches outputs and comparisons too
        [f"s{i}{kind}.jpg" for i in range(3) for kind in ("", "_supir", "_supir_compare")])
    # and once more: nothing left to do
    idle = CountingRestore(monkeypatch)
    r = run(*args)
    assert r.exit_code == 0 and idle.calls == 0 and "0 done, 3 skipped, 0 failed" in r.output, r.output
    assert {n: d for n, d in digests(tmp_path).items() if "_supir" not in n} == before
    assert leftovers(tmp_path) == []


def test_output_that_would_replace_an_input_is_refused(weights, tmp_path):
    Image.fromarray(rgb_pixels(24, 16)).save(tmp_path / "a.png")
    before = digest(tmp_path / "a.png")
    r = run("restore", tmp_path / "a.png", "-o", tmp_path, "--pattern", "{stem}{ext}", "--weights", weights, *FAST)
    assert r.exit_code == 1 and "would overwrite an input" in r.output
    assert len(r.output.strip().splitlines()) == 1 and digest(tmp_path / "a.png") == before


# ------------------------------------------------------------------------------------------------ 6. bad input
def test_bad_inputs_each_one_line_and_the_batch_goes_on(weights, tmp_path, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    good = io.BytesIO()
    Image.fromarray(rgb_pixels(24, 16, 30)).save(good, "PNG")
    good_jpg = io.BytesIO()
    Image.fromarray(rgb_pixels(64, 64, 31)).save(good_jpg, "JPEG")
    tif = io.BytesIO()
    Image.fromarray(rgb_pixels(8, 8)).save(tif, "TIFF")
    bomb_tif = bytearray(tif.getvalue())  # patch ImageWidth/ImageLength to 100000 x 100000
    n = struct.unpack_from("<H", bomb_tif, struct.unpack_from("<I", bomb_tif, 4)[0])[0]
    ifd = struct.unpack_from("<I", bomb_tif, 4)[0]
    for i in range(n):
        tag, typ = struct.unpack_from("<HH", bomb_tif, ifd + 2 + 12 * i)
        if tag in (256, 257):
            struct.pack_into("<HHII", bomb_tif, ifd + 2 + 12 * i, tag, 4, 1, 100000)
    cases = {
        "zero.png": (b"", "empty file"),
        "text.jpg": (b"Dear diary, today I renamed a text file.\n" * 5, "not a supported image"),
        "random.webp": (np.random.default_rng(1).integers(0, 256, 600, dtype=np.uint8).tobytes(),
                        "not a supported image"),
        "trunc.png": (good.getvalue()[: len(good.getvalue()) // 2], "corrupt or truncated"),
        "trunc.jpg": (good_jpg.getvalue()[: len(good_jpg.getvalue()) // 2], "corrupt or truncated"),
        "corrupt.png": (png_header_only(24, 16).rsplit(b"IDAT", 1)[0][:-4] + png_chunk(b"IDAT", b"garbage " * 8)
                        + png_chunk(b"IEND", b""), "corrupt or truncated"),
        "bomb.png": (png_header_only(100000, 100000), "limit of 150,000,000"),
        "absurd.png": (png_header_only(13000, 12000), "156,000,000 pixels exceeds the limit of 150,000,000"),
        "huge.jpg": (jpeg_claiming(60000, 60000), "limit of 150,000,000"),
        "bomb.tif": (bytes(bomb_tif), "limit of 150,000,000"),
        "locked.png": (good.getvalue(), "permission denied"),
    }
    for name, (data, _) in cases.items():
        (src / name).write_bytes(data)
    (src / "good.png").write_bytes(good.getvalue())
    before = digests(src)

    real_open, decoded = open, []
    locked = str(src / "locked.png")

    def guarded_open(file, *a, **k):  # root can read anything: simulate a file we may not read
        if str(file) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *a, **k)

    real_load = ImageFile.ImageFile.load

    def recording_load(self):
        decoded.append(Path(getattr(self, "filename", "") or "").name)
        return real_load(self)

    monkeypatch.setattr("builtins.open", guarded_open)
    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    r = run("restore", src, "-o", out, "--weights", weights, "--prompt", "", *FAST)
    monkeypatch.undo()
    assert r.exit_code == 1, r.output
    no_traceback(r)
    assert r.output.splitlines()[-1] == f"1 done, 0 skipped, {len(cases)} failed"
    for name, (_, reason) in cases.items():
        said = lines_naming(r, name)
        assert len(said) == 1, (name, r.output)
        assert said[0].startswith(f"  FAILED {src / name}: ") and reason in said[0], (name, said)
    for name in ("bomb.png", "absurd.png", "huge.jpg", "bomb.tif"):
        assert name not in decoded  # refused from the header, before any pixel buffer exists
    assert sorted(p.name for p in out.iterdir()) == ["good_supir.png"]
    assert digests(src) == before and leftovers(out) == []


def test_single_bad_input_is_one_line(weights, tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello")
    for target, reason in [(tmp_path / "empty.jpg", "empty file"), (tmp_path / "missing.png", "no such file"),
                           (tmp_path / "notes.txt", "unsupported file type"),
                           (tmp_path / "nothing-*.png", "no files match")]:
        r = run("restore", target, "--weights", weights, "--prompt", "", *FAST)
        assert r.exit_code == 1, (target, r.output)
        no_traceback(r)
        said = lines_naming(r, Path(target).name)
        assert len(said) == 1 and reason in said[0], (target, r.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jpg", "notes.txt"]


def test_unwritable_output_folders(weights, tmp_path):
    Image.fromarray(rgb_pixels(24, 16)).save(tmp_path / "a.png")
    (tmp_path / "afile").write_text("a file where a folder should be")
    for target in ("/proc/supir-mlx-cannot-exist/out", tmp_path / "afile" / "out"):
        r = run("restore", tmp_path / "a.png", "-o", target, "--weights", weights, "--prompt", "", *FAST)
        assert r.exit_code == 1, r.output
        no_traceback(r)
        said = [ln for ln in r.output.splitlines() if "FAILED" in ln or "error" in ln]
        assert len(said) == 1 and "a_supir.png" in said[0] and "output folder" in said[0], r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "afile"]


class _Os:
    """The `os` module as io.images sees it, with fdopen replaced."""

    def __init__(self, fdopen):
        self.fdopen = fdopen

    def __getattr__(self, name):
        return getattr(os, name)


class _FailingFile(io.RawIOBase):
    """A temp file that accepts `budget` bytes, then raises `error` (a full disk, a Ctrl-C mid-write)."""

    def __init__(self, real, budget, error):
        self.real, self.budget, self.error = real, budget, error

    def writable(self):
        return True

    def write(self, b):
        b = bytes(b)
        if len(b) > self.budget:
            self.real.write(b[: self.budget])
            self.real.flush()
            self.budget = 0
            raise self.error
        self.budget -= len(b)
        return self.real.write(b)

    def fileno(self):  # no raw descriptor: Pillow must write through write()
        raise io.UnsupportedOperation("fileno")

    def close(self):
        self.real.close()
        super().close()


def test_full_disk_and_denied_folder_leave_nothing(weights, tmp_path, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name in ("full.png", "denied.jpg", "fine.png"):
        Image.fromarray(rgb_pixels(24, 16, 40)).save(src / name)
    Image.fromarray((rgb_pixels(24, 16, 41)[..., 0].astype(np.uint16) * 257)).save(src / "full16.png")
    before = digests(src)
    real_mkstemp, real_fdopen = images_mod.tempfile.mkstemp, os.fdopen
    partial, doomed = [], set()

    def mkstemp(prefix="", suffix="", dir=None):
        if prefix.startswith(".denied"):  # root may write anywhere: simulate a folder we may not write to
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        fd, tmp = real_mkstemp(prefix=prefix, suffix=suffix, dir=dir)
        if prefix.startswith(".full"):
            partial.append(tmp)
            doomed.add(fd)
        return fd, tmp

    def fdopen(fd, mode="r", *a, **k):
        f = real_fdopen(fd, mode, *a, **k)
        if fd in doomed:
            doomed.discard(fd)
            return _FailingFile(f, 100, OSError(errno.ENOSPC, "No space left on device"))
        return f

    monkeypatch.setattr(images_mod, "tempfile", type("T", (), {"mkstemp": staticmethod(mkstemp)}))
    monkeypatch.setattr(images_mod, "os", _Os(fdopen))
    r = run("restore", src, "-o", out, "--weights", weights, "--prompt", "", *FAST)
    monkeypatch.undo()
    assert r.exit_code == 1, r.output
    no_traceback(r)
    assert r.output.splitlines()[-1] == "1 done, 0 skipped, 3 failed"
    for name, reason in [("full_supir.png", "disk full"), ("full16_supir.png", "disk full"),
                         ("denied_supir.jpg", "permission denied")]:
        said = lines_naming(r, name)
        assert len(said) == 1 and str(out / name) in said[0] and reason in said[0], (name, r.output)
    assert len(partial) == 2 and not any(os.path.exists(p) for p in partial)  # written in part, then removed
    assert sorted(p.name for p in out.iterdir()) == ["fine_supir.png"] and leftovers(out) == []
    assert digests(src) == before


def test_interrupted_write_leaves_nothing_and_resumes(weights, tmp_path, monkeypatch):
    Image.fromarray(rgb_pixels(24, 16, 50)).save(tmp_path / "w.png")
    before = digest(tmp_path / "w.png")
    real_fdopen = os.fdopen
    monkeypatch.setattr(images_mod, "os", _Os(lambda fd, mode="r", *a, **k: _FailingFile(
        real_fdopen(fd, mode, *a, **k), 200, KeyboardInterrupt())))
    r = run("restore", tmp_path / "w.png", "--weights", weights, "--prompt", "", *FAST)
    monkeypatch.undo()
    assert r.exit_code == 130, r.output
    no_traceback(r)
    assert "interrupted" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.png"]  # no partial output, no temp file
    assert digest(tmp_path / "w.png") == before
