"""Reading and writing the user's photos: every bad file is one clear error, every write is atomic.

`load_image` returns sRGB pixels with the EXIF orientation applied, plus everything worth carrying to the output
(alpha, source bit depth, ICC profile, EXIF, XMP, IPTC). `save_image` writes PNG/TIFF (8 or 16 bit), JPEG or WebP
through a temporary file in the destination folder and `os.replace`, so a crash, a full disk or Ctrl-C never
leaves a partial file, and an existing file is never replaced unless asked.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import io
import os
import re
import stat
import struct
import sys
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryFile
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from . import metadata

DEFAULT_MAX_PIXELS = 150_000_000  # ~ a 15000 x 10000 scan; well above any camera, far below a bomb
READ_FORMATS = {"JPEG", "PNG", "TIFF", "WEBP"}
WRITE_FORMATS = {".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
INPUT_EXTENSIONS = {".png", ".tif", ".tiff", ".jpg", ".jpeg", ".webp", ".heic", ".heif"}

Image.init()  # register every plugin so `formats=` can name them
try:  # HEIC/HEIF input when the optional extra `heic` (pillow-heif) is installed
    from pillow_heif import register_heif_opener

    register_heif_opener()
    READ_FORMATS.add("HEIF")
except ImportError:
    INPUT_EXTENSIONS -= {".heic", ".heif"}


class ImageError(Exception):
    """A file that cannot be read or written; str() is one line naming the file and the reason."""


@dataclass
class LoadedImage:
    path: Path
    rgb: np.ndarray  # H x W x 3, uint8 (or uint16 for 16-bit grayscale sources), sRGB, upright
    alpha: np.ndarray | None  # H x W, same dtype as rgb, or None
    bits: int  # bit depth per channel of the source file (8 or 16)
    format: str  # Pillow format name of the source
    mode: str  # Pillow mode of the source before conversion
    icc_profile: bytes | None  # the source's profile (pixels have been converted from it to sRGB)
    exif: bytes | None
    xmp: bytes | None
    iptc: dict | None
    orientation: int  # EXIF orientation of the source (already applied to the pixels)
    notes: list[str] = field(default_factory=list)  # what was wrong but survivable ("EXIF unreadable, ignored")

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[1], self.rgb.shape[0]

    def to_pil(self) -> Image.Image:
        """8-bit RGB for the official pre-processing (which quantises to 8 bits anyway)."""
        rgb = self.rgb if self.rgb.dtype == np.uint8 else (self.rgb.astype(np.float32) / 257).round().astype(np.uint8)
        return Image.fromarray(rgb, "RGB")

    def to_float(self) -> np.ndarray:
        return self.rgb.astype(np.float32) / (255.0 if self.rgb.dtype == np.uint8 else 65535.0)


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "disk full"
    if isinstance(e, (PermissionError, IsADirectoryError, NotADirectoryError, FileNotFoundError)):
        return e.strerror.lower() if e.strerror else type(e).__name__
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text.replace(str(getattr(e, "filename", "") or "\0"), "").strip(" :'")


class _DecoderMessages:
    """What Pillow warns and libtiff prints (on the C-level stderr) while a file is read, kept out of the progress
    output: `notes()` turns what matters into short lines for that file, `libtiff()` is libtiff's own complaint."""

    def __init__(self):
        self.caught: list[str] = []
        self._text = ""  # libtiff's output from finished captures
        self._err = None  # the file the current capture sends fd 2 to

    def libtiff(self) -> str:
        text = self._text
        if self._err is not None:
            self._err.seek(0)
            text += self._err.read().decode("utf-8", "replace")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        # libtiff prefixes the module or file name ("TIFFFillStrip: ...", "tempfile.tif: ..."): keep the message
        return "; ".join(dict.fromkeys(ln.split(": ", 1)[-1].rstrip(".") for ln in lines))

    def notes(self) -> list[str]:
        notes = []
        for text in self.caught:
            if "EXIF" in text:
                notes.append("EXIF unreadable, ignored")
            elif "Tag data larger than file" in text:
                notes.append("damaged metadata tags skipped")
        if text := self.libtiff():
            notes.append(f"TIFF decoder: {text}")
        return list(dict.fromkeys(notes))

    @contextlib.contextmanager
    def capture(self) -> Iterator["_DecoderMessages"]:
        with warnings.catch_warnings(record=True) as caught, TemporaryFile() as err:
            warnings.simplefilter("always")
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused with its own message
            try:
                saved = os.dup(2)
            except OSError:  # no stderr to redirect
                saved = None
            if saved is not None:
                sys.stderr.flush()
                os.dup2(err.fileno(), 2)
            self._err = err
            try:
                yield self
            finally:
                if saved is not None:
                    os.dup2(saved, 2)
                    os.close(saved)
                err.seek(0)
                self._text += err.read().decode("utf-8", "replace")
                self._err = None
                self.caught += [str(w.message) for w in caught if not issubclass(w.category, ResourceWarning)]


@contextlib.contextmanager
def open_header(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
                messages: _DecoderMessages | None = None) -> Iterator[Image.Image]:
    """Open an image for its header only, refusing missing/empty/non-image files and oversized dimensions.

    Decoder warnings while the file is open are kept in `messages` (dropped without one) instead of being printed."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image file")
    with (messages or _DecoderMessages()).capture():
        try:
            if path.stat().st_size == 0:
                raise ImageError(f"{path}: empty file (0 bytes)")
            im = Image.open(path, formats=sorted(READ_FORMATS))
        except ImageError:
            raise
        except Image.DecompressionBombError:
            raise ImageError(f"{path}: image size exceeds the limit of {max_pixels:,} pixels (refused before "
                             "decoding)") from None
        except UnidentifiedImageError:
            damage = _damaged(path)
            if damage:
                raise ImageError(f"{path}: {damage}") from None
            kinds = "JPEG, PNG, TIFF, WebP" + (", HEIC" if ".heic" in INPUT_EXTENSIONS else "")
            raise ImageError(f"{path}: not a supported image file ({kinds})") from None
        except (OSError, SyntaxError, ValueError, struct.error) as e:
            raise ImageError(f"{path}: cannot read ({_reason(e)})") from None
        with im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"{path}: {w} x {h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
                                 "(refused before decoding; raise max_pixels to allow it)")
            yield im


# File signatures of the formats we read: a file that starts like one but that Pillow cannot open is damaged.
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def _damaged(path: Path) -> str | None:
    """"damaged PNG file (<what its decoder found>)" for a file whose signature is a supported format's."""
    with open(path, "rb") as f:
        head = f.read(12)
    kind = next((k for sig, k in _SIGNATURES if head.startswith(sig)), None)
    if kind is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        kind = "WEBP"
    if kind is None:
        return None
    try:  # the format's own decoder says what is wrong (Image.open only says it found no decoder)
        Image.OPEN[kind][0](str(path)).close()
        detail = "unreadable header"
    except Exception as e:  # noqa: BLE001 - any decoder failure is the reason shown
        detail = re.sub(r"b'([^']*)'", r"\1", str(e).splitlines()[0] if str(e) else type(e).__name__)
        detail = re.sub(rf"^broken {kind} file \((.*)\)$", r"\1", detail, flags=re.I)
    return f"damaged {'WebP' if kind == 'WEBP' else kind} file ({detail})"


def _to_srgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    """8-bit RGB(A) in sRGB; a broken or unusual profile leaves the pixels as they are."""
    if not icc or im.mode not in ("RGB", "RGBA", "CMYK"):
        return im
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        out_mode = "RGBA" if im.mode == "RGBA" else "RGB"
        return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode=out_mode)
    except (ImageCms.PyCMSError, OSError, ValueError):
        return im


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Decode `path` to upright sRGB; raise ImageError (one line, naming the file) for anything unusable."""
    path = Path(path)
    messages = _DecoderMessages()
    with open_header(path, max_pixels, messages) as im:
        try:
            im.seek(0)  # first frame of an animation or multi-page TIFF
            im.load()
            info = dict(im.info)
            fmt, mode = im.format, im.mode
            exif = im.getexif()
            orientation = int(exif.get(0x0112, 1) or 1)
            bits = 16 if mode.startswith("I;16") or _declared_16bit(im, path) else 8
            iptc = _iptc(im)
            xmp = info.get("xmp") or (im.tag_v2.get(700) if fmt == "TIFF" else None)
            upright = ImageOps.exif_transpose(im)
        except ImageError:
            raise
        except (OSError, SyntaxError, ValueError, struct.error, EOFError, zlib.error) as e:
            detail = messages.libtiff() or _reason(e)
            raise ImageError(f"{path}: corrupt or truncated image data ({detail})") from None
    icc = info.get("icc_profile") or None
    raw_exif = exif.tobytes() if len(exif) else None
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    with messages.capture():  # colour conversion and rotation decode nothing new, but libtiff may be lazy
        rgb, alpha = _pixels(upright, icc)
    return LoadedImage(path, rgb, alpha, bits, fmt, mode, icc, raw_exif, xmp, iptc, orientation, messages.notes())


def _declared_16bit(im: Image.Image, path: Path) -> bool:
    # Pillow reduces 48/64-bit RGB(A) PNG and TIFF to 8 bits; the header still says what the photographer had.
    if im.format == "PNG":
        with open(path, "rb") as f:
            head = f.read(25)
        return len(head) == 25 and head[12:16] == b"IHDR" and head[24] == 16
    if im.format == "TIFF":
        bps = im.tag_v2.get(258)
        return bool(bps) and max(bps if isinstance(bps, tuple) else (bps,)) == 16
    return False


def _iptc(im: Image.Image) -> dict | None:
    from PIL import IptcImagePlugin

    try:
        return IptcImagePlugin.getiptcinfo(im) or None
    except (OSError, SyntaxError, ValueError, IndexError):
        return None


def _pixels(im: Image.Image, icc: bytes | None) -> tuple[np.ndarray, np.ndarray | None]:
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):  # 16-bit (or wider) grayscale: keep 16 bits
        a = np.asarray(im)
        g = (a.astype(np.float64).clip(0, 65535) if mode != "F" else (a.clip(0, 1) * 65535)).round().astype(np.uint16)
        return np.repeat(g[:, :, None], 3, axis=2), None
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info) \
        or (mode in ("L", "RGB") and "transparency" in im.info)
    im = im.convert("RGBA" if has_alpha else ("CMYK" if mode == "CMYK" else "RGB"))
    im = _to_srgb(im, icc)
    if im.mode == "CMYK":
        im = im.convert("RGB")
    a = np.asarray(im)
    return np.ascontiguousarray(a[:, :, :3]), (np.ascontiguousarray(a[:, :, 3]) if has_alpha else None)


# ------------------------------------------------------------------------------------------------ writing
def _quantize(x: np.ndarray, bits: int) -> np.ndarray:
    x = np.asarray(x)
    top = 255 if bits == 8 else 65535
    if x.dtype == np.uint8:
        return x if bits == 8 else x.astype(np.uint16) * 257
    if x.dtype == np.uint16:
        return x if bits == 16 else (x.astype(np.float32) / 257).round().astype(np.uint8)
    v = (np.asarray(x, np.float32).clip(0, 1) * top).round()  # float input is [0, 1]
    return v.astype(np.uint8 if bits == 8 else np.uint16)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _itxt(key: str, text: str) -> bytes:
    return _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8"))


def _png16(f, px: np.ndarray, icc: bytes | None, exif: bytes | None, texts: dict[str, str]) -> None:
    """A 16-bit RGB(A) PNG, which Pillow cannot write: IHDR, iCCP, eXIf, iTXt, one zlib IDAT, IEND."""
    h, w, c = px.shape
    f.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 6 if c == 4 else 2, 0, 0, 0)))
    if icc:
        f.write(_chunk(b"iCCP", b"ICC profile\0\0" + zlib.compress(icc)))
    if exif:
        f.write(_chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\0\0") else exif))
    for k, v in texts.items():
        f.write(_itxt(k, v))
    rows = np.concatenate([np.zeros((h, 1), np.uint8), px.astype(">u2").view(np.uint8).reshape(h, -1)], axis=1)
    f.write(_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + _chunk(b"IEND", b""))


def _tiff16(f, px: np.ndarray, icc: bytes | None, exif: bytes | None, tags: dict[int, bytes | str]) -> None:
    """A 16-bit RGB(A) little-endian baseline TIFF (one uncompressed strip), which Pillow cannot write.

    The directory (EXIF tags and EXIF/GPS sub-directories included) is serialised by Pillow's IFD writer.
    """
    from PIL.TiffImagePlugin import ImageFileDirectory_v2

    h, w, c = px.shape
    data = px.astype("<u2").tobytes()
    ifd = ImageFileDirectory_v2(ifh=b"II*\0\0\0\0\0")
    if exif:
        e = Image.Exif()
        e.load(exif)
        for tag, value in e.items():
            if tag not in (0x8769, 0x8825):
                ifd[tag] = value
            elif sub := e.get_ifd(tag):  # the EXIF and GPS sub-directories
                ifd[tag] = dict(sub)
    for tag, value in {**tags, **({34675: icc} if icc else {})}.items():
        ifd[tag] = value
    ifd.update({256: w, 257: h, 258: (16,) * c, 259: 1, 262: 2, 273: 0, 277: c, 278: h, 279: len(data), 284: 1})
    if c == 4:
        ifd[338] = (2,)  # unassociated alpha
    f.write(b"II*\0" + struct.pack("<I", 8) + ifd.tobytes(8) + data)  # strip offset 0 -> after the directory



def _remove_stale_parts(path: Path) -> None:
    """Temporary files of `path` left by a writer that was killed outright (kill -9, power loss): the writer's
    pid is in the name, so only files of processes that no longer exist are removed."""
    for part in path.parent.glob(f".{glob.escape(path.name)}.*.part"):
        pid = part.name[len(path.name) + 2 :].split(".", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                part.unlink()
        except OSError:
            pass  # the process exists (another user's): its file is not ours to remove


def output_mode(path: Path) -> int:
    """The permissions a file written at `path` should end with: an existing file keeps its own, a new one gets
    what any editor would give it (0666 less the umask). mkstemp makes its temporary file 0600, and the rename
    would otherwise carry that onto outputs other users, web servers or sync tools must read."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mask = os.umask(0o022)  # the only portable way to read the umask is to set it; put it straight back
        os.umask(mask)
        return 0o666 & ~mask


@contextlib.contextmanager
def atomic_write(path: str | Path, overwrite: bool = False) -> Iterator[Any]:
    """A binary file object whose content appears at `path` only if the block completes.

    The temporary file lives in the destination folder (so `os.replace` is atomic) and is removed on any failure,
    including KeyboardInterrupt.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ImageError(f"{path}: already exists (not overwritten)")
    if not path.parent.is_dir():
        raise ImageError(f"{path}: output folder {path.parent} does not exist")
    _remove_stale_parts(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".part", dir=path.parent)
    except OSError as e:
        raise ImageError(f"{path}: cannot write to {path.parent} ({_reason(e)})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), output_mode(path))
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise ImageError(f"{path}: write failed ({_reason(e)})") from None
        raise


def save_image(path: str | Path, rgb: np.ndarray, *, bits: int = 8, format: str | None = None,
               jpeg_quality: int = 95, alpha: np.ndarray | None = None, icc: str | bytes | None = "srgb",
               exif: bytes | None = None, xmp: bytes | None = None, iptc: dict | bytes | None = None,
               provenance: dict | None = None, overwrite: bool = False,
               sign: Callable[[str, Any, Any], None] | None = None) -> Path:
    """Write H x W x 3 pixels (uint8, uint16, or float in [0, 1]) atomically.

    `format` defaults to the extension's. `alpha` (H x W) is stored where the format can (PNG, TIFF, WebP) and
    composited on white for JPEG. `icc`: "srgb" embeds sRGB (our pixels are sRGB), None embeds nothing, bytes
    converts the 8-bit pixels from sRGB into that profile and embeds it. `exif`/`xmp` from the input are carried
    over with orientation reset to 1 and the new size; `iptc` (IIM records, as `load_image` returns them) is
    carried into JPEG (APP13) and TIFF (tag 33723), the formats with a standard place for it; `provenance` is
    embedded as described in io.metadata. `sign(format, unsigned, signed)` (io.credentials) rewrites the encoded
    file with Content Credentials before it reaches the disk.
    """
    path = Path(path)
    fmt = (format or WRITE_FORMATS.get(path.suffix.lower(), "")).upper()
    fmt = {"JPG": "JPEG", "TIF": "TIFF"}.get(fmt, fmt)
    if fmt not in set(WRITE_FORMATS.values()):
        raise ImageError(f"{path}: cannot write format {format or path.suffix!r} (use .png, .tif, .jpg or .webp)")
    if bits not in (8, 16) or (bits == 16 and fmt not in ("PNG", "TIFF")):
        raise ImageError(f"{path}: {fmt} cannot store {bits}-bit pixels (16-bit needs PNG or TIFF)")
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"save_image needs H x W x 3 pixels, got shape {rgb.shape}")
    h, w = rgb.shape[:2]
    if alpha is not None and np.asarray(alpha).shape != (h, w):
        raise ValueError(f"alpha shape {np.asarray(alpha).shape} does not match the image {(h, w)}")
    px = _quantize(rgb, bits)
    a = None if alpha is None else _quantize(alpha, bits)
    if fmt == "JPEG" and a is not None:  # JPEG has no alpha: composite on white as the official HWC3 does
        af = a.astype(np.float32)[:, :, None] / 255
        px = (px.astype(np.float32) * af + 255 * (1 - af)).clip(0, 255).astype(np.uint8)
        a = None
    profile = None if icc is None else (ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
                                        if icc == "srgb" else icc)
    if isinstance(icc, bytes):
        if bits == 16:
            raise ImageError(f"{path}: converting to a custom ICC profile is supported for 8-bit output only")
        try:
            conv = ImageCms.profileToProfile(Image.fromarray(px, "RGB"), ImageCms.createProfile("sRGB"),
                                             ImageCms.ImageCmsProfile(io.BytesIO(icc)), outputMode="RGB")
        except ImageCms.PyCMSError as e:
            raise ImageError(f"{path}: invalid ICC profile ({e})") from None
        px = np.asarray(conv)
    xmp_out = metadata.xmp_packet(provenance, xmp) if provenance else xmp
    iim = metadata.iptc_bytes(iptc) if iptc else None
    full = px if a is None else np.concatenate([px, a[:, :, None]], axis=2)

    def encode(f, exif_shift: int = 0):
        exif_out = metadata.exif_bytes(exif, provenance, (w, h), fmt, srgb=not isinstance(icc, bytes),
                                       shift=exif_shift) if (exif or provenance) else None
        if bits == 16 and fmt == "PNG":
            texts = {}
            if provenance:
                texts = {metadata.KEY: metadata.to_json(provenance), "Description": metadata.NOTICE,
                         "Software": metadata.software(provenance)}
            if xmp_out:
                texts["XML:com.adobe.xmp"] = xmp_out.decode("utf-8")
            _png16(f, full, profile, exif_out, texts)
        elif bits == 16:
            tags: dict[int, bytes | str] = {700: xmp_out} if xmp_out else {}
            if iim:
                tags[33723] = iim
            if provenance:
                tags.update({270: metadata.NOTICE, 305: metadata.software(provenance)})
            _tiff16(f, full, profile, exif_out, tags)
        else:
            _save_pillow(f, Image.fromarray(full, "RGBA" if a is not None else "RGB"), fmt, jpeg_quality, profile,
                         exif_out, xmp_out, provenance, iim)
        return f

    with atomic_write(path, overwrite) as dest:
        if sign:  # signed in memory and written to `dest` here, so a full disk reads as one, not as a library error
            dest.write(_signed(fmt, sign, lambda shift: encode(io.BytesIO(), shift)))
        else:
            encode(dest)
    return path


def _signed(fmt: str, sign: Callable[[str, Any, Any], None], encode: Callable[[int], io.BytesIO]) -> bytes:
    """The encoded file with Content Credentials. In a PNG the credentials' JUMBF chunk comes before the EXIF, and
    exiftool (Debian's 12.57 at least) keys each directory it reads by its offset inside its own chunk: an EXIF
    directory at the offset of a JUMBF box is taken for a loop and skipped ("IFD0 pointer references previous
    JUMBFBox directory"), so the EXIF would be invisible to it. There the EXIF's directories are moved clear of the
    boxes (padding after the TIFF header, which the format allows) and the file is signed again."""
    shift = 0
    for _ in range(4):  # the JUMBF layout does not depend on the EXIF, so the second signing is the last in practice
        signed = io.BytesIO()
        sign(fmt, encode(shift), signed)
        data = signed.getvalue()
        chunks = _png_chunks(data) if fmt == "PNG" else {}
        if b"eXIf" not in chunks or b"caBX" not in chunks:
            return data
        boxes, dirs = _jumbf_offsets(chunks[b"caBX"]), _tiff_directories(chunks[b"eXIf"])
        if not dirs & boxes:
            return data
        unshifted = {d - shift for d in dirs}
        shift = next(s for s in range(2, 1 << 20, 2) if not {d + s for d in unshifted} & boxes)
    return data


def _png_chunks(data: bytes) -> dict[bytes, bytes]:
    """The first chunk of each kind in a PNG, by kind."""
    chunks: dict[bytes, bytes] = {}
    pos = 8
    while pos + 8 <= len(data):
        n, kind = struct.unpack_from(">I4s", data, pos)
        chunks.setdefault(kind, data[pos + 8:pos + 8 + n])
        pos += 12 + n
    return chunks


def _tiff_directories(tiff: bytes) -> set[int]:
    """Offsets of IFD0 and its EXIF, GPS and Interoperability sub-directories in a TIFF stream."""
    e = "<" if tiff[:2] == b"II" else ">"
    found: set[int] = set()

    def walk(offset: int) -> None:
        if offset in found or offset + 2 > len(tiff):
            return
        found.add(offset)
        (n,) = struct.unpack_from(e + "H", tiff, offset)
        for i in range(n):
            if offset + 14 + 12 * i > len(tiff):
                return
            tag, _, _, value = struct.unpack_from(e + "HHII", tiff, offset + 2 + 12 * i)
            if tag in (0x8769, 0x8825, 0xA005):
                walk(value)

    walk(struct.unpack_from(e + "I", tiff, 4)[0])
    return found


def _jumbf_offsets(jumbf: bytes) -> set[int]:
    """Every offset in a JUMBF stream where a reader may start a directory: each box's start and content start,
    recursively through superboxes, and every byte of the (short) description boxes, whose private fields are
    boxes too."""
    found: set[int] = set()

    def walk(start: int, end: int) -> None:
        pos = start
        while pos + 8 <= end:
            size, kind = struct.unpack_from(">I4s", jumbf, pos)
            head = 8
            if size == 1 and pos + 16 <= end:
                size, head = struct.unpack_from(">Q", jumbf, pos + 8)[0], 16
            elif size == 0:
                size = end - pos
            if size < head or pos + size > end:
                return
            found.update((pos, pos + head))
            if kind == b"jumb":
                walk(pos + head, pos + size)
            elif kind == b"jumd":
                found.update(range(pos, pos + size))
            pos += size

    walk(0, len(jumbf))
    return found


def _with_app13(jpeg: bytes, iim: bytes) -> bytes:
    """`jpeg` with a Photoshop APP13 segment holding the IPTC records, after the leading APPn segments."""
    res = b"8BIM\x04\x04\0\0" + struct.pack(">I", len(iim)) + iim + b"\0" * (len(iim) % 2)
    seg = b"Photoshop 3.0\0" + res
    if len(seg) + 2 > 0xFFFF:
        return jpeg  # too large for one segment; the XMP still carries the description
    pos = 2
    while jpeg[pos] == 0xFF and 0xE0 <= jpeg[pos + 1] <= 0xEF:
        pos += 2 + struct.unpack_from(">H", jpeg, pos + 2)[0]
    return jpeg[:pos] + b"\xff\xed" + struct.pack(">H", len(seg) + 2) + seg + jpeg[pos:]


def _save_pillow(f, im: Image.Image, fmt: str, quality: int, icc: bytes | None, exif: bytes | None,
                 xmp: bytes | None, prov: dict | None, iim: bytes | None = None) -> None:
    kw: dict[str, Any] = {}
    if icc:
        kw["icc_profile"] = icc
    if exif:
        kw["exif"] = exif
    if fmt == "PNG":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        if prov:
            info.add_itxt(metadata.KEY, metadata.to_json(prov))
            info.add_itxt("Description", metadata.NOTICE)
            info.add_itxt("Software", metadata.software(prov))
        if xmp:
            info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8"))
        kw["pnginfo"] = info
    elif fmt == "TIFF":
        # One directory holding the EXIF tags (with their EXIF/GPS sub-directories) and ours, all passed as
        # `exif`: Pillow ignores `exif` when `tiffinfo` is given, and libtiff (which any compression needs)
        # cannot write sub-directories, so the strip is stored uncompressed, like the 16-bit writer's.
        tags = Image.Exif()
        if exif:
            tags.load(exif)
        if xmp:
            tags[700] = xmp
        if iim:
            tags[33723] = iim
        if prov:
            tags[270], tags[305] = metadata.NOTICE, metadata.software(prov)
        kw.update(exif=tags, compression="raw")
    else:
        kw.update(quality=quality)
        if xmp:
            kw["xmp"] = xmp
        if fmt == "JPEG":
            kw["subsampling"] = 0 if quality >= 90 else 2
        else:
            kw["exact"] = True  # keep colour under transparent pixels: the alpha is carried, not baked in
    if fmt == "JPEG" and iim:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        f.write(_with_app13(buf.getvalue(), iim))
        return
    im.save(f, format=fmt, **kw)
