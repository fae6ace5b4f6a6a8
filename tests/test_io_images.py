"""Reading and writing real files the tests generate: formats, bit depth, orientation, ICC, alpha, metadata,
provenance, and every bad input (one-line ImageError naming the file, nothing left behind)."""

import errno
import io
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms

from icc import swapped_primaries_profile
from supir_mlx.io import images
from supir_mlx.io.images import ImageError, load_image, save_image
from supir_mlx.io.metadata import make_provenance, read_provenance, settings_from_file

RNG = np.random.default_rng(0)
PX = RNG.integers(0, 256, (24, 36, 3), dtype=np.uint8)
PROV = make_provenance({"steps": 50, "cfg": 4.0}, model="v0Q", base_checkpoint="sdxl_base_1.0",
                       caption="a red fox", seed=1234)


def _one_line(e):
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("ext,bits,lossless", [(".png", 8, True), (".png", 16, True), (".tif", 8, True),
                                               (".tif", 16, True), (".jpg", 8, False), (".webp", 8, False)])
def test_roundtrip_formats_with_provenance(tmp_path, ext, bits, lossless):
    # lossy codecs are judged on a smooth photo-like gradient; lossless ones must return noise bit-exactly
    px = PX if lossless else np.stack([*np.meshgrid(np.linspace(0, 255, 36), np.linspace(40, 200, 24)),
                                      np.full((24, 36), 128.0)], axis=2).astype(np.uint8)
    out = save_image(tmp_path / f"o{ext}", px, bits=bits, provenance=PROV)
    back = load_image(out)
    assert back.rgb.shape == px.shape and back.bits == bits
    err = np.abs(back.rgb.astype(int) - px)
    assert err.max() == 0 if lossless else err.mean() < 3
    assert read_provenance(out)["caption"] == "a red fox"
    assert settings_from_file(out) == {"steps": 50, "cfg": 4.0}
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp file left


def test_16bit_keeps_precision(tmp_path):
    ramp = (np.linspace(0, 1, 36 * 24 * 3).reshape(24, 36, 3)).astype(np.float32)
    for ext in (".png", ".tif"):
        out = save_image(tmp_path / f"r{ext}", ramp, bits=16)
        raw = _read_raw16(out)
        assert raw.dtype == np.uint16 and len(np.unique(raw)) > 256  # more levels than 8 bits can hold
        assert np.abs(raw / 65535 - ramp).max() < 1e-4


def _read_raw16(path):
    data = path.read_bytes()
    if data[:4] == b"II*\0":  # our baseline TIFF: one strip at the offset of tag 273
        n = struct.unpack_from("<H", data, 8)[0]
        tags = {struct.unpack_from("<H", data, 10 + 12 * i)[0]: struct.unpack_from("<I", data, 18 + 12 * i)[0]
                for i in range(n)}
        w, h = tags[256], tags[257]
        return np.frombuffer(data, "<u2", w * h * 3, tags[273]).reshape(h, w, 3)
    pos, idat, w, h = 8, b"", 0, 0
    while pos < len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        body = data[pos + 8: pos + 8 + length]
        if kind == b"IHDR":
            w, h = struct.unpack_from(">II", body)
        if kind == b"IDAT":
            idat += body
        pos += 12 + length
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, -1)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].copy().view(">u2").reshape(h, w, 3).astype(np.uint16)


def test_alpha_carried_and_composited_for_jpeg(tmp_path):
    alpha = np.tile(np.linspace(0, 255, 36).astype(np.uint8), (24, 1))
    png = save_image(tmp_path / "a.png", PX, alpha=alpha)
    back = load_image(png)
    assert back.alpha is not None and (back.alpha == alpha).all() and (back.rgb == PX).all()
    jpg = load_image(save_image(tmp_path / "a.jpg", PX, alpha=alpha, jpeg_quality=100))
    assert jpg.alpha is None and jpg.rgb[:, 0].mean() > 245  # alpha 0 column composited on white
    with pytest.raises(ValueError):
        save_image(tmp_path / "b.png", PX, alpha=alpha[:, :10])


@pytest.mark.parametrize("mode", ["L", "P", "LA", "RGBA", "I;16"])
def test_png_modes(tmp_path, mode):
    src = Image.fromarray(PX).convert("RGBA" if mode in ("LA", "RGBA") else "RGB")
    if mode == "I;16":
        src = Image.fromarray((PX[:, :, 0].astype(np.uint16) * 257))
    else:
        src = src.convert(mode)
    path = tmp_path / "m.png"
    src.save(path)
    img = load_image(path)
    assert img.rgb.shape == (24, 36, 3) and img.mode == mode
    assert (img.alpha is not None) == (mode in ("LA", "RGBA"))
    assert img.bits == (16 if mode == "I;16" else 8)


def test_exif_orientation_applied_and_reset_on_output(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    exif[0x010F] = "TestCam"
    path = tmp_path / "rot.jpg"
    Image.fromarray(PX).save(path, exif=exif.tobytes(), quality=100)
    img = load_image(path)
    assert img.orientation == 6 and img.rgb.shape == (36, 24, 3)
    out = save_image(tmp_path / "out.jpg", img.rgb, exif=img.exif, provenance=PROV)
    with Image.open(out) as im:
        e = im.getexif()
        assert e[0x0112] == 1 and e[0x010F] == "TestCam"
        assert e.get_ifd(0x8769)[0xA002] == 24


def test_icc_profile_converted_to_srgb(tmp_path):
    profile = swapped_primaries_profile()
    path = tmp_path / "icc.png"
    Image.fromarray(PX).save(path, icc_profile=profile)
    img = load_image(path)
    assert img.icc_profile == profile
    assert np.abs(img.rgb.astype(int) - PX).max() > 10  # pixels were converted, not just tagged
    out = save_image(tmp_path / "o.png", img.rgb)
    with Image.open(out) as im:
        desc = ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(im.info["icc_profile"])))
    assert "sRGB" in desc


def test_xmp_carried_with_orientation_reset(tmp_path):
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description tiff:Orientation="6" xmlns:tiff="http://ns.adobe.com/tiff/1.0/"/></rdf:RDF>'
           b'</x:xmpmeta>')
    out = save_image(tmp_path / "x.jpg", PX, xmp=xmp, provenance=PROV)
    with Image.open(out) as im:
        text = im.info["xmp"].decode() if isinstance(im.info["xmp"], bytes) else im.info["xmp"]
    assert 'tiff:Orientation="1"' in text and "supir:Provenance" in text
    assert read_provenance(out)["seed"] == 1234


def test_no_provenance_means_none_and_settings_error(tmp_path):
    path = tmp_path / "plain.png"
    Image.fromarray(PX).save(path)
    assert read_provenance(path) is None
    with pytest.raises(ImageError) as e:
        settings_from_file(path)
    assert str(path) in _one_line(e)


# ------------------------------------------------------------------------------------------- bad inputs
def _png_header(w, h):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))


def _bad_files(tmp_path):
    good_png, good_jpg = io.BytesIO(), io.BytesIO()
    Image.fromarray(PX).save(good_png, "PNG")
    Image.fromarray(np.repeat(PX, 8, axis=0)).save(good_jpg, "JPEG")
    files = {
        "zero.png": (b"", "empty file"),
        "text.jpg": (b"this is not an image\n" * 10, "not a supported image"),
        "random.png": (RNG.integers(0, 256, 500, dtype=np.uint8).tobytes(), "not a supported image"),
        "trunc.png": (good_png.getvalue()[: len(good_png.getvalue()) // 2], "corrupt or truncated"),
        "trunc.jpg": (good_jpg.getvalue()[: len(good_jpg.getvalue()) // 2], "corrupt or truncated"),
        "corrupt.png": (_png_header(36, 24) + b"\0\0\0\x10IDATgarbagegarbage1234", "corrupt or truncated"),
        "bomb.png": (_png_header(100000, 100000) + b"\0\0\0\0IDAT\x35\xaf\x06\x1e", "exceeds the limit"),
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    return files


def test_bad_inputs_are_one_line_errors(tmp_path):
    for name, (_, reason) in _bad_files(tmp_path).items():
        with pytest.raises(ImageError) as e:
            load_image(tmp_path / name)
        msg = _one_line(e)
        assert str(tmp_path / name) in msg and reason in msg, (name, msg)
    (tmp_path / "folder.png").mkdir()
    for path, reason in [(tmp_path / "missing.png", "file not found"), (tmp_path / "folder.png", "is a folder")]:
        with pytest.raises(ImageError) as e:
            load_image(path)
        assert reason in _one_line(e)


def test_bomb_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(PX).save(path)
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1))
    with pytest.raises(ImageError) as e:
        load_image(path, max_pixels=100)
    assert "864 pixels exceeds the limit of 100" in _one_line(e) and not decoded


def test_unwritable_destinations(tmp_path):
    (tmp_path / "afile").write_text("x")
    for target, reason in [(tmp_path / "nofolder" / "o.png", "does not exist"),
                           (tmp_path / "afile" / "o.png", "does not exist"),
                           (tmp_path / "o.bmp", "cannot write format"),
                           (tmp_path / "o.jpg", "16-bit needs PNG or TIFF")]:
        with pytest.raises(ImageError) as e:
            save_image(target, PX, bits=16 if target.suffix == ".jpg" else 8)
        assert reason in _one_line(e)


def test_existing_output_never_overwritten(tmp_path):
    out = tmp_path / "o.png"
    out.write_bytes(b"precious")
    with pytest.raises(ImageError, match="already exists"):
        save_image(out, PX)
    assert out.read_bytes() == b"precious"
    save_image(out, PX, overwrite=True)
    assert (load_image(out).rgb == PX).all()


def test_full_disk_leaves_nothing(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(images.os, "fsync", full)
    with pytest.raises(ImageError) as e:
        save_image(tmp_path / "o.tif", PX, bits=16)
    assert "disk full" in _one_line(e)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(images, "_png16", boom)
    with pytest.raises(KeyboardInterrupt):
        save_image(tmp_path / "o.png", PX, bits=16)
    assert list(tmp_path.iterdir()) == []
    assert not os.path.exists(tmp_path / "o.png")


def test_temp_files_of_killed_writers_are_removed_on_the_next_write(tmp_path):
    """A writer killed outright (kill -9) leaves its hidden .part file; the next write of that output removes it,
    but never the temp file of a writer that is still running."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".out.png.{child.stdout.strip()}.x1.part"
    alive = tmp_path / f".out.png.{os.getpid()}.x2.part"
    dead.write_bytes(b"partial")
    alive.write_bytes(b"in progress")
    save_image(tmp_path / "out.png", np.zeros((4, 4, 3), np.uint8))
    assert (tmp_path / "out.png").is_file() and not dead.exists() and alive.exists()
