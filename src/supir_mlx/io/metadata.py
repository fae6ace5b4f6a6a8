"""Provenance: every output says it is a SUPIR generative reconstruction and carries the settings that made it.

The full record is a JSON object. It is written where each format allows (PNG iTXt, XMP for every format, EXIF
ImageDescription + UserComment for JPEG/WebP/TIFF) and read back by `read_provenance`, so `supir-mlx info` can
show it and `restore --settings-from FILE` can repeat the run.
"""

from __future__ import annotations

import html
import json
import re
import struct
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

KEY = "supir-mlx"
NOTICE = ("Generative reconstruction made with SUPIR (supir-mlx): detail was synthesised by a diffusion model; "
          "this is not a recovered record of the original scene.")
XMP_NS = "https://github.com/supir-mlx/supir-mlx/ns/1.0/"
# IPTC Digital Source Type (NewsCode) read by photo tools, news organisations and platforms: a composite of the
# input photo and content made by a trained algorithm.
IPTC_EXT_NS = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"

_EXIF_IFD, _DESCRIPTION, _SOFTWARE, _ORIENTATION, _USER_COMMENT = 0x8769, 0x010E, 0x0131, 0x0112, 0x9286
_PIXEL_X, _PIXEL_Y = 0xA002, 0xA003


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("supir-mlx")
    except PackageNotFoundError:
        return "unknown"


def make_provenance(settings: dict[str, Any], *, model: str, base_checkpoint: str, caption: str | None,
                    seed: int, source: str | None = None) -> dict[str, Any]:
    """The record embedded in an output: notice, generator, model, base, caption, seed and every setting."""
    return {
        "notice": NOTICE,
        "generator": f"supir-mlx {_version()}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "base_checkpoint": base_checkpoint,
        "caption": caption,
        "seed": seed,
        "source": source,
        "settings": settings,
    }


def to_json(prov: dict[str, Any]) -> str:
    # ASCII-only so the same text is valid in EXIF UserComment (ASCII charset), PNG iTXt and XMP.
    return json.dumps(prov, ensure_ascii=True, sort_keys=True, separators=(",", ":"))


def software(prov: dict[str, Any]) -> str:
    return prov.get("generator") or f"supir-mlx {_version()}"


def xmp_packet(prov: dict[str, Any], existing: bytes | str | None = None) -> bytes:
    """An XMP packet with our description, record and IPTC digital source type; an input packet is kept,
    orientation reset to 1, its own digital source type (a camera's, say) replaced by ours."""
    ours = (f'<rdf:Description rdf:about="" xmlns:supir="{XMP_NS}" xmlns:dc="http://purl.org/dc/elements/1.1/" '
            f'xmlns:Iptc4xmpExt="{IPTC_EXT_NS}">'
            f'<supir:Provenance>{html.escape(to_json(prov), quote=False)}</supir:Provenance>'
            f'<Iptc4xmpExt:DigitalSourceType>{DIGITAL_SOURCE_TYPE}</Iptc4xmpExt:DigitalSourceType>'
            f'<dc:description><rdf:Alt><rdf:li xml:lang="x-default">{html.escape(NOTICE)}</rdf:li></rdf:Alt>'
            '</dc:description></rdf:Description>')
    text = existing.decode("utf-8", "replace") if isinstance(existing, bytes) else existing
    if text and "</rdf:RDF>" in text and "<supir:Provenance>" not in text:
        # The pixels are already rotated, so a carried-over orientation would rotate them twice.
        text = re.sub(r'tiff:Orientation="\d"', 'tiff:Orientation="1"', text)
        text = re.sub(r"<tiff:Orientation>\d</tiff:Orientation>", "<tiff:Orientation>1</tiff:Orientation>", text)
        text = re.sub(r"\sIptc4xmpExt:DigitalSourceType\s*=\s*(\"[^\"]*\"|'[^']*')", "", text)
        text = re.sub(r"<Iptc4xmpExt:DigitalSourceType>.*?</Iptc4xmpExt:DigitalSourceType>", "", text, flags=re.S)
        return text.replace("</rdf:RDF>", ours + "</rdf:RDF>", 1).encode("utf-8")
    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
            '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'{ours}</rdf:RDF></x:xmpmeta><?xpacket end="w"?>').encode("utf-8")


# Tags of a TIFF source's first directory that describe its own pixel layout (size, strips, samples) or that are
# carried separately (XMP, IPTC, ICC): never copied into an output's EXIF, where they would describe the wrong image.
_LAYOUT_TAGS = {254, 255, 256, 257, 258, 259, 262, 266, 273, 277, 278, 279, 280, 281, 284, 317, 320, 322, 323, 324,
                325, 338, 339, 340, 341, 513, 514, 530, 531, 532, 700, 33723, 34675}


# EXIF 2.32 (CIPA DC-008) tags an Exif IFD must hold, and the IFD0 resolution tags JPEG and TIFF files must hold:
# the defaults describe what we write (an sRGB image of unknown physical size; Y/Cb/Cr order for JPEG).
_EXIF_VERSION, _COMPONENTS, _FLASHPIX, _COLOR_SPACE = 0x9000, 0x9101, 0xA000, 0xA001
_X_RES, _Y_RES, _RES_UNIT, _YCBCR_POSITIONING = 0x011A, 0x011B, 0x0128, 0x0213
_UNDEFINED = 7


def _register_exif_types() -> None:
    """Pillow's table lacks the EXIF type of UserComment and ComponentsConfiguration, so it would store them as
    BYTE; the standard (and `exiftool -validate`) wants UNDEFINED."""
    from PIL import TiffTags

    group = TiffTags.TAGS_V2_GROUPS.setdefault(_EXIF_IFD, {})
    for tag, name in ((_USER_COMMENT, "UserComment"), (_COMPONENTS, "ComponentsConfiguration")):
        if (group.get(tag) or TiffTags.TagInfo()).type != _UNDEFINED:
            group[tag] = TiffTags.TagInfo(tag, name, _UNDEFINED, 0)


def exif_bytes(existing: bytes | None, prov: dict[str, Any] | None, size: tuple[int, int], fmt: str = "JPEG",
               srgb: bool = True, shift: int = 0) -> bytes:
    """The input's EXIF with orientation reset to 1, the new pixel size, and our description/record, completed with
    the tags the EXIF standard requires in a `fmt` file ("JPEG", "TIFF", "PNG", "WEBP"); `srgb` False when the
    pixels carry another ICC profile (ColorSpace "uncalibrated"). `shift` (even) bytes of padding go between the
    TIFF header and the first directory, moving every directory by that much (see io.images._signed)."""
    from PIL import Image

    _register_exif_types()
    exif = Image.Exif()
    if existing:
        exif.load(existing)
    for tag in _LAYOUT_TAGS & set(exif):
        del exif[tag]
    exif[_ORIENTATION] = 1
    ifd = exif.get_ifd(_EXIF_IFD)
    if fmt == "TIFF":  # a TIFF's own directory gives its size; these two are not allowed there
        ifd.pop(_PIXEL_X, None)
        ifd.pop(_PIXEL_Y, None)
    else:
        ifd[_PIXEL_X], ifd[_PIXEL_Y] = size
    if prov:
        exif[_DESCRIPTION] = NOTICE
        exif[_SOFTWARE] = software(prov)
        ifd[_USER_COMMENT] = b"ASCII\0\0\0" + to_json(prov).encode("ascii")
    ifd.setdefault(_EXIF_VERSION, b"0232")
    ifd.setdefault(_FLASHPIX, b"0100")
    ifd[_COLOR_SPACE] = 1 if srgb else 0xFFFF
    if fmt == "JPEG":
        ifd.setdefault(_COMPONENTS, b"\x01\x02\x03\x00")
        exif.setdefault(_YCBCR_POSITIONING, 1)
    if fmt in ("JPEG", "TIFF") and not {_X_RES, _Y_RES} <= set(exif):
        exif[_X_RES], exif[_Y_RES], exif[_RES_UNIT] = 72.0, 72.0, 2  # 72 dpi: "unknown", as cameras write
    elif fmt in ("JPEG", "TIFF"):
        exif.setdefault(_RES_UNIT, 2)
    raw = exif.tobytes(8 + shift)  # laid out for a first directory at 8 + shift; the header still says 8
    order = "<" if raw[6:8] == b"II" else ">"
    return raw[:10] + struct.pack(order + "I", 8 + shift) + b"\0" * shift + raw[14:]


def iptc_bytes(records: dict | bytes) -> bytes:
    """IPTC-IIM records ({(record, dataset): bytes or [bytes, ...]}, as Pillow reads them) as an IIM stream."""
    if isinstance(records, (bytes, bytearray)):
        return bytes(records)
    out = []
    for (record, dataset), values in sorted(records.items()):
        for v in values if isinstance(values, list) else [values]:
            v = v.encode("utf-8") if isinstance(v, str) else bytes(v)
            if len(v) < 0x8000:
                out.append(bytes((0x1C, record, dataset)) + len(v).to_bytes(2, "big") + v)
    return b"".join(out)


def _from_json(text: str | bytes | None) -> dict[str, Any] | None:
    if not text:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) and "notice" in value else None


def _from_xmp(xmp: bytes | str | None) -> dict[str, Any] | None:
    if isinstance(xmp, bytes):
        xmp = xmp.decode("utf-8", "replace")
    m = re.search(r"<supir:Provenance>(.*?)</supir:Provenance>", xmp or "", re.S)
    return _from_json(html.unescape(m.group(1))) if m else None


def _from_exif(exif) -> dict[str, Any] | None:
    comment = exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if isinstance(comment, bytes) and comment[:8] == b"ASCII\0\0\0":
        comment = comment[8:]
    return _from_json(comment)


def _xmp_of(im) -> bytes | str | None:
    return (im.info.get("xmp") or (im.tag_v2.get(700) if im.format == "TIFF" else None)
            or (getattr(im, "text", {}).get("XML:com.adobe.xmp") if im.format == "PNG" else None))


def read_provenance(path: str | Path) -> dict[str, Any] | None:
    """The record embedded by supir-mlx, or None when the file has none. Reads headers only."""
    from PIL import Image

    from .images import ImageError, open_header

    with open_header(path) as im:
        try:
            found = _from_json(getattr(im, "text", {}).get(KEY)) if im.format == "PNG" else None
            return found or _from_xmp(_xmp_of(im)) or _from_exif(im.getexif())
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ImageError(f"{path}: unreadable metadata ({e})") from None


def read_digital_source_type(path: str | Path) -> str | None:
    """The IPTC digital source type in the file's XMP (element or attribute form), or None."""
    from PIL import Image

    from .images import ImageError, open_header

    with open_header(path) as im:
        try:
            xmp = _xmp_of(im)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ImageError(f"{path}: unreadable metadata ({e})") from None
    if isinstance(xmp, bytes):
        xmp = xmp.decode("utf-8", "replace")
    m = re.search(r"<Iptc4xmpExt:DigitalSourceType>\s*(.*?)\s*</Iptc4xmpExt:DigitalSourceType>"
                  r"|Iptc4xmpExt:DigitalSourceType=[\"']([^\"']*)[\"']", xmp or "", re.S)
    return html.unescape(m.group(1) or m.group(2)) if m else None


def settings_from_file(path: str | Path) -> dict[str, Any]:
    """The settings of the run that made `path` (for `restore --settings-from`)."""
    from .images import ImageError

    prov = read_provenance(path)
    if not prov or not isinstance(prov.get("settings"), dict):
        raise ImageError(f"{path}: no supir-mlx settings found (not an output of supir-mlx, or metadata stripped)")
    return dict(prov["settings"])
