"""Damaged files are named for what they are, and decoder warnings never interleave with the progress output:
they become one short note for that file where they matter."""

import gc
import io
import struct
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from supir_mlx.cli import main
from supir_mlx.io.images import ImageError, load_image

PIXELS = (np.arange(48 * 64 * 3) % 251).astype(np.uint8).reshape(48, 64, 3)


def png_bad_ihdr_crc(path):
    b = io.BytesIO()
    Image.fromarray(PIXELS).save(b, "PNG")
    d = bytearray(b.getvalue())
    d[29] ^= 0xFF  # the IHDR chunk's CRC
    path.write_bytes(bytes(d))
    return path


def jpeg_corrupt_exif(path):
    b = io.BytesIO()
    Image.fromarray(PIXELS).save(b, "JPEG", exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff" + b"\x00" * 10)
    path.write_bytes(b.getvalue())
    return path


def _ifd_entry(d, wanted):
    off = struct.unpack("<I", d[4:8])[0]
    for i in range(struct.unpack("<H", d[off:off + 2])[0]):
        e = off + 2 + 12 * i
        if struct.unpack("<H", d[e:e + 2])[0] == wanted:
            return e
    raise AssertionError(wanted)


def tiff_oversized_tag(path):
    b = io.BytesIO()
    Image.fromarray(PIXELS).save(b, "TIFF", tiffinfo={305: "x" * 50})
    d = bytearray(b.getvalue())
    e = _ifd_entry(d, 305)  # Software: claims a million bytes
    d[e + 4:e + 8] = struct.pack("<I", 10**6)
    path.write_bytes(bytes(d))
    return path


def tiff_bad_lzw(path):
    b = io.BytesIO()
    Image.fromarray(PIXELS).save(b, "TIFF", compression="tiff_lzw")
    d = bytearray(b.getvalue())
    e = _ifd_entry(d, 279)  # the last strip's byte count runs past its data
    last = struct.unpack("<I", d[e + 8:e + 12])[0] + 4 * (struct.unpack("<I", d[e + 4:e + 8])[0] - 1)
    d[last:last + 4] = struct.pack("<I", struct.unpack("<I", d[last:last + 4])[0] + 100000)
    path.write_bytes(bytes(d))
    return path


def test_damaged_png_is_called_a_damaged_png(tmp_path):
    with pytest.raises(ImageError) as e:
        load_image(png_bad_ihdr_crc(tmp_path / "scan.png"))
    assert str(e.value) == f"{tmp_path / 'scan.png'}: damaged PNG file (bad header checksum in IHDR)"


def test_decoder_warnings_become_notes(tmp_path, capfd):
    exif = load_image(jpeg_corrupt_exif(tmp_path / "a.jpg"))
    tags = load_image(tiff_oversized_tag(tmp_path / "b.tif"))
    with pytest.raises(ImageError, match=r"c\.tif: corrupt or truncated image data \(Using code not yet in table\)"):
        load_image(tiff_bad_lzw(tmp_path / "c.tif"))
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # neither Python warnings nor libtiff's C-level messages got through
    assert exif.notes == ["EXIF unreadable, ignored"] and exif.size == (64, 48)
    assert tags.notes == ["damaged metadata tags skipped"] and np.array_equal(tags.rgb, PIXELS)


def test_batch_output_has_one_line_per_problem(weights, tmp_path, capfd):
    src = tmp_path / "in"
    src.mkdir()
    png_bad_ihdr_crc(src / "a.png")
    jpeg_corrupt_exif(src / "b.jpg")
    tiff_oversized_tag(src / "c.tif")
    tiff_bad_lzw(src / "d.tif")
    gc.collect()  # the restore collects garbage; what earlier tests left must not warn inside the recording below
    with warnings.catch_warnings(record=True) as stray:
        warnings.simplefilter("always")
        r = CliRunner().invoke(main, ["restore", str(src), "-o", str(tmp_path / "out"), "--weights", str(weights),
                                      "--prompt", "x", "--steps", "1", "--min-size", "64", "-q"])
    _, err = capfd.readouterr()
    assert not [str(w.message) for w in stray]  # none escaped to be printed by Python's warning machinery
    assert r.exit_code == 1
    lines = r.output.splitlines()
    assert f"  FAILED {src / 'a.png'}: damaged PNG file (bad header checksum in IHDR)" in lines
    assert f"  note: {src / 'b.jpg'}: EXIF unreadable, ignored" in lines
    assert f"  note: {src / 'c.tif'}: damaged metadata tags skipped" in lines
    assert f"  FAILED {src / 'd.tif'}: corrupt or truncated image data (Using code not yet in table)" in lines
    for noise in ("Corrupt EXIF", "Tag data larger", "tempfile.tif", "Warning"):
        assert noise not in r.output and noise not in err
    assert "2 done, 0 skipped, 2 failed" in r.output
