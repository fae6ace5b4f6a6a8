"""Outputs' EXIF passes `exiftool -validate` (the check photographers' software is held to) with no warning the
input did not already have, for JPEG, TIFF, PNG and WebP outputs, with and without Content Credentials; the
provenance record reads back unchanged.

exiftool comes from Debian's libimage-exiftool-perl (.ci/run installs it)."""

import io
import re
import shutil
import struct
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from supir_mlx.cli import main
from supir_mlx.io.images import load_image, save_image
from supir_mlx.io.metadata import make_provenance, read_provenance

pytestmark = pytest.mark.skipif(shutil.which("exiftool") is None,
                                reason="needs exiftool (apt-get install libimage-exiftool-perl)")

PIXELS = (np.arange(16 * 24 * 3) % 251).astype(np.uint8).reshape(16, 24, 3)
PROV = make_provenance({"cfg": 4.0, "seed": 3}, model="SUPIR-v0Q", base_checkpoint="sdxl.safetensors",
                       caption="a harbour at dawn", seed=3)


def warnings_of(path):
    """exiftool -validate's warnings, with the format name taken out (JPEG/TIFF say the same thing)."""
    out = subprocess.run(["exiftool", "-validate", "-warning", "-a", "-s3", str(path)], capture_output=True,
                         text=True, check=True).stdout
    lines = [ln for ln in out.splitlines() if not re.match(r"^(OK|\d+ Warnings?)", ln)]
    return {re.sub(r"\b(JPEG|TIFF|PNG|WebP) ", "", ln) for ln in lines}


def camera_exif():
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = "TestCam", "Model 1", 6
    exif[0x011A], exif[0x011B], exif[0x0128] = 300.0, 300.0, 2
    ifd = exif.get_ifd(0x8769)
    ifd[0x9003], ifd[0x829A], ifd[0x9000] = "1962:07:01 06:30:00", 0.008, b"0230"
    return exif.tobytes()


def inputs(folder):
    folder.mkdir()
    Image.fromarray(PIXELS).save(folder / "camera.jpg", exif=camera_exif())
    Image.fromarray(PIXELS).save(folder / "scan.tif", tiffinfo={271: "Scanner", 282: 600.0, 283: 600.0, 296: 2})
    Image.fromarray(PIXELS).save(folder / "plain.png")
    Image.fromarray(PIXELS).save(folder / "web.webp", exif=camera_exif(), lossless=True)
    return sorted(folder.iterdir())


@pytest.mark.parametrize("ext, bits", [("jpg", 8), ("tif", 8), ("tif", 16), ("png", 8), ("png", 16), ("webp", 8)])
def test_outputs_validate(tmp_path, ext, bits):
    for src in inputs(tmp_path / "in"):
        loaded = load_image(src)
        out = tmp_path / f"{src.stem}_{bits}.{ext}"
        save_image(out, loaded.rgb, bits=bits, exif=loaded.exif, xmp=loaded.xmp, iptc=loaded.iptc, provenance=PROV)
        new = warnings_of(out) - warnings_of(src)
        assert not new, (src.name, out.name, new)
        assert read_provenance(out) == PROV
        exif = Image.open(out).getexif()
        if src.name == "camera.jpg":
            assert exif[0x010F] == "TestCam" and exif.get_ifd(0x8769)[0x9003] == "1962:07:01 06:30:00"


# exiftool 12.57 (Debian 12) predates C2PA in TIFF: it calls the standard's own tag for the manifest store unknown.
OLD_EXIFTOOL_C2PA_TIFF = "[minor] Unknown IFD0 tag 0xcd41"


@pytest.mark.parametrize("ext, bits", [("jpg", 8), ("tif", 8), ("png", 8), ("png", 16), ("webp", 8)])
def test_signed_outputs_validate_and_keep_their_exif_readable(tmp_path, ext, bits):
    from supir_mlx.io.credentials import Credentials, read_credentials, self_signed_identity

    signer = Credentials(self_signed_identity(tmp_path / "keys"))
    src = tmp_path / "camera.jpg"
    Image.fromarray(PIXELS).save(src, exif=camera_exif())
    loaded = load_image(src)
    out = tmp_path / f"signed_{bits}.{ext}"
    save_image(out, loaded.rgb, bits=bits, exif=loaded.exif, xmp=loaded.xmp, provenance=PROV,
               sign=signer.for_output(PROV, src, out.name))
    assert read_credentials(out)["valid"]
    new = warnings_of(out) - warnings_of(src) - ({OLD_EXIFTOOL_C2PA_TIFF} if ext == "tif" else set())
    assert not new, new  # in a PNG: not "IFD0 pointer references previous JUMBFBox directory"
    read = subprocess.run(["exiftool", "-s3", "-Make", "-DateTimeOriginal", str(out)], capture_output=True,
                          text=True, check=True).stdout.split("\n")
    assert read[:2] == ["TestCam", "1962:07:01 06:30:00"]  # exiftool reads the EXIF beside the credentials
    assert read_provenance(out) == PROV


def _entry_type(tiff: bytes, ifd_offset: int, tag: int) -> tuple[int, int]:
    """(type, value or offset) of `tag` in the IFD at `ifd_offset`."""
    e = "<" if tiff[:2] == b"II" else ">"
    (n,) = struct.unpack_from(e + "H", tiff, ifd_offset)
    for i in range(n):
        t, typ, _, value = struct.unpack_from(e + "HHII", tiff, ifd_offset + 2 + 12 * i)
        if t == tag:
            return typ, value
    raise AssertionError(f"tag {tag:#x} not found")


def test_user_comment_is_undefined_with_its_character_code(tmp_path):
    out = tmp_path / "o.jpg"
    save_image(out, PIXELS, provenance=PROV)
    tiff = Image.open(out).info["exif"][6:]
    _, exif_ifd = _entry_type(tiff, struct.unpack_from("<I" if tiff[:2] == b"II" else ">I", tiff, 4)[0], 0x8769)
    typ, offset = _entry_type(tiff, exif_ifd, 0x9286)
    assert typ == 7 and tiff[offset:offset + 8] == b"ASCII\0\0\0"  # UNDEFINED, 8-byte character code first


def test_cli_restore_of_a_camera_jpeg_validates(weights, tmp_path):
    src = tmp_path / "camera.jpg"
    buf = io.BytesIO()
    Image.fromarray(PIXELS).save(buf, "JPEG", exif=camera_exif())
    src.write_bytes(buf.getvalue())
    r = CliRunner().invoke(main, ["restore", str(src), "--weights", str(weights), "--prompt", "x", "--steps", "1",
                                  "--min-size", "64", "-q"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "camera_supir.jpg"
    assert not warnings_of(out) - warnings_of(src)
    assert read_provenance(out)["settings"]["steps"] == 1
