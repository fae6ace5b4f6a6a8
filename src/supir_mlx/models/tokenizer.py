"""CLIP byte-pair-encoding tokenizer, pure Python (needs only `regex`).

One vocabulary serves both SDXL text encoders; they differ only in how the text is cleaned, which
special strings are recognised inside it, and the padding id:

    style "hf"        transformers CLIPTokenizer (encoder 1, CLIP ViT-L): ftfy-cleaned, padded with EOT (49407)
    style "open_clip" open_clip.tokenize (encoder 2, OpenCLIP bigG): ftfy-cleaned, HTML-unescaped twice, padded with 0

Both official tokenizers clean text with `ftfy.fix_text` (installed with open_clip, so it is always there
in the official environment). `fix_text` below reimplements the ftfy 6.x steps that change real prompts
(HTML entities, C1 controls, Latin ligatures, full/half-width forms, curly quotes, line breaks, surrogates,
terminal escapes, control characters, NFC). Remaining divergence: ftfy's mojibake repair
(`fix_encoding`, e.g. "cafÃ©" -> "café") is not reproduced; it only acts on text that already looks
garbled, which neither LLaVA captions nor typed prompts are.
"""

from __future__ import annotations

import gzip
import html
import html.entities
import json
import unicodedata
from functools import cache, lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import regex

ASSET = Path(__file__).resolve().parent.parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
CONTEXT_LENGTH = 77
NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary size minus bytes and specials: the merges both officials read
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
STYLES = ("hf", "open_clip")

# Words, single digits, runs of other non-space symbols; English contractions split off. Each style puts
# the special strings it recognises in front.
_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
_PATTERNS = {
    "hf": regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|" + _WORDS, regex.IGNORECASE),
    # open_clip names its specials differently, so "<|endoftext|>" is ordinary text there.
    "open_clip": regex.compile(r"<start_of_text>|<end_of_text>|" + _WORDS, regex.IGNORECASE),
}
_SPECIALS = {"<|startoftext|>": SOT, "<|endoftext|>": EOT, "<start_of_text>": SOT, "<end_of_text>": EOT}
# transformers cuts its exact special strings out before cleaning (case-sensitive, unlike the pattern).
_HF_ADDED = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
_WHITESPACE = regex.compile(r"\s+")


class TokenizerError(ValueError):
    """Unusable vocabulary files or tokenizer input."""


@cache
def byte_alphabet() -> dict[int, str]:
    """Byte -> printable character: BPE works on characters, and whitespace/control bytes get stand-ins.

    Printable Latin-1 bytes stand for themselves; the other 68 map to U+0100 upwards in byte order.
    Dictionary order is CLIP's vocabulary order of the 256 byte tokens.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


# ---- ftfy.fix_text (default configuration), minus mojibake repair -------------------------------------

_ENTITY = regex.compile(r"&#?[0-9A-Za-z]{1,24};")
_C1 = regex.compile(r"[\x80-\x9f]")
_ANSI = regex.compile(r"\x1b\[[0-9;]*[a-zA-Z]")
_SURROGATE_PAIR = regex.compile(r"[\ud800-\udbff][\udc00-\udfff]")
_SURROGATE = regex.compile(r"[\ud800-\udfff]")
_QUOTES = {**dict.fromkeys([0x2BC, *range(0x2018, 0x201C)], "'"), **dict.fromkeys(range(0x201C, 0x2020), '"')}
# Ligatures of Latin letters are copy/paste artefacts (æ, œ are real letters and stay). "ﬅ" keeps its long s.
_LIGATURES = {ord(c): unicodedata.normalize("NFKC", c) for c in "ĲĳǱǲǳǄǅǆǇǈǉǊǋǌﬀﬁﬂﬃﬄﬆ"}
_LIGATURES.update({ord("ﬅ"): "ſt", ord("ŉ"): "\u02bcn"})
_LINE_BREAKS = {0x0D: "\n", 0x2028: "\n", 0x2029: "\n", 0x85: "\n"}
_CONTROLS = dict.fromkeys(
    [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)]
)


@cache
def _width_map() -> dict[int, str]:
    """Full-width ASCII and half-width katakana/hangul forms -> ordinary forms (plus the ideographic space)."""
    table = {0x3000: " "}
    for cp in range(0xFF01, 0xFFF0):
        normal = unicodedata.normalize("NFKC", chr(cp))
        if normal != chr(cp):
            table[cp] = normal
    return table


@cache
def _entities() -> dict[str, str]:
    """HTML5 named entities that end in ';' (the unambiguous ones), plus ALL-CAPS spellings of lower-case
    names when that spelling is not itself an entity (so "&EACUTE;" reads as "É")."""
    table = {}
    for name, char in html.entities.html5.items():
        if not name.endswith(";"):
            continue
        table["&" + name] = char
        upper = "&" + name.upper()
        if name == name.lower() and html.unescape(upper) == upper:
            table[upper] = char.upper()
    return table


def _entity(m: regex.Match) -> str:
    text = m.group(0)
    if text in _entities():
        return _entities()[text]
    if text.startswith("&#"):
        decoded = html.unescape(text)
        return text if ";" in decoded else decoded  # a reference only partly decoded is left alone
    return text


def _c1(m: regex.Match) -> str:
    # Stray C1 controls are Windows-1252 punctuation decoded as Latin-1; the five bytes cp1252 leaves
    # undefined stay as they are.
    try:
        return m.group(0).encode("latin-1").decode("cp1252")
    except UnicodeDecodeError:
        return m.group(0)


def _surrogate_pair(m: regex.Match) -> str:
    hi, lo = (ord(c) for c in m.group(0))
    return chr(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))


def _fix_segment(text: str, unescape: bool) -> str:
    while True:
        before = text
        if unescape:
            text = _ENTITY.sub(_entity, text)
        text = _C1.sub(_c1, text)
        text = text.translate(_LIGATURES).translate(_width_map()).translate(_QUOTES)
        text = text.replace("\r\n", "\n").translate(_LINE_BREAKS)
        if _SURROGATE.search(text):
            text = _SURROGATE.sub("\ufffd", _SURROGATE_PAIR.sub(_surrogate_pair, text))
        text = _ANSI.sub("", text).translate(_CONTROLS)
        text = unicodedata.normalize("NFC", text)
        if text == before:  # ftfy repeats its fixes until nothing changes
            return text


def fix_text(text: str) -> str:
    """ftfy.fix_text with its default settings, except mojibake repair (see the module docstring).

    Works line by line; HTML entities are decoded until the first line containing "<" (text that looks
    like HTML keeps its entities), as ftfy does.
    """
    out = []
    unescape = True
    for segment in regex.findall(r"[^\n]*\n|[^\n]+", text):
        unescape = unescape and "<" not in segment
        out.append(_fix_segment(segment, unescape))
    return "".join(out)


def clean_text(text: str, style: str) -> str:
    """The official normalisation of one style before splitting into words."""
    text = fix_text(text)
    if style == "open_clip":
        text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


# ---- the tokenizer --------------------------------------------------------------------------------------


class CLIPTokenizer:
    """CLIP BPE over a vocabulary {token: id} and a ranked merge list."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]]):
        missing = [t for t in (SOT, EOT, *byte_alphabet().values()) if t not in vocab]
        missing += ["".join(m) for m in merges if "".join(m) not in vocab]
        if missing:
            raise TokenizerError(f"vocabulary lacks token {missing[0]!r} that the merges or bytes need")
        self.vocab = vocab
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.sot, self.eot = vocab[SOT], vocab[EOT]
        self._bpe = lru_cache(maxsize=1 << 16)(self._merge)

    @staticmethod
    def from_merges_file(path: str | Path = ASSET) -> "CLIPTokenizer":
        """CLIP's released merge list (`bpe_simple_vocab_16e6.txt.gz`, gzipped or not).

        The vocabulary is implied: 256 byte tokens, the same with "</w>", one token per merge, then the
        two specials.
        """
        merges = _read_merges(_read_text(Path(path)).split("\n"), path)
        alphabet = list(byte_alphabet().values())
        tokens = [*alphabet, *(c + "</w>" for c in alphabet), *("".join(m) for m in merges), SOT, EOT]
        return CLIPTokenizer({t: i for i, t in enumerate(tokens)}, merges)

    @staticmethod
    def from_hub_files(directory: str | Path) -> "CLIPTokenizer":
        """A transformers tokenizer folder (e.g. an SDXL repository's `tokenizer/`): vocab.json + merges.txt."""
        directory = Path(directory)
        try:
            vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise TokenizerError(f"cannot read {directory / 'vocab.json'}: {e}") from None
        if not isinstance(vocab, dict):
            raise TokenizerError(f"{directory / 'vocab.json'} is not a token -> id mapping")
        merges = _read_merges(_read_text(directory / "merges.txt").strip().split("\n"), directory / "merges.txt")
        return CLIPTokenizer(vocab, merges)

    def _merge(self, word: str) -> tuple[str, ...]:
        """BPE of one word (already mapped to byte characters): apply the best-ranked adjacent merge,
        every non-overlapping occurrence left to right, until no pair has a rank."""
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, len(self.ranks)))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str, style: str = "hf", limit: int | None = None) -> list[int]:
        """Token ids of `text` without start/end tokens; stops once `limit` ids are produced."""
        if not isinstance(text, str):
            raise TokenizerError(f"prompt must be a string, got {type(text).__name__}")
        if style not in STYLES:
            raise TokenizerError(f"unknown tokenizer style {style!r} (expected one of {', '.join(STYLES)})")
        # transformers cleans the text between its special strings separately; the words are the same
        # either way except where ftfy's line-wise HTML decision differs, so follow it exactly.
        pieces = _HF_ADDED.split(text) if style == "hf" else [text]
        ids: list[int] = []
        alphabet = byte_alphabet()
        for piece in pieces:
            if piece in (SOT, EOT):
                ids.append(self.vocab[piece])
                continue
            for word in _PATTERNS[style].finditer(clean_text(piece, style)):
                w = word.group(0)
                special = _SPECIALS.get(w)  # each style's pattern yields only its own specials whole
                if special is not None:
                    ids.append(self.vocab[special])
                else:
                    ids.extend(self.vocab[t] for t in self._bpe("".join(alphabet[b] for b in w.encode("utf-8"))))
                if limit is not None and len(ids) >= limit:
                    return ids[:limit]
        return ids if limit is None else ids[:limit]

    def tokenize(self, texts: str | Sequence[str], style: str = "hf", length: int = CONTEXT_LENGTH) -> np.ndarray:
        """[B, length] int32 ids: start, text, end; cut to `length` with the end token kept last; padded
        with the end token ("hf") or 0 ("open_clip")."""
        if isinstance(texts, str):
            texts = [texts]
        pad = self.eot if style == "hf" else 0
        out = np.full((len(texts), length), pad, dtype=np.int32)
        for row, text in zip(out, texts):
            ids = [self.sot, *self.encode(text, style, limit=length - 1), self.eot][:length]
            ids[-1] = self.eot
            row[: len(ids)] = ids
        return out


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
        return (gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).decode("utf-8")
    except (OSError, UnicodeDecodeError, gzip.BadGzipFile) as e:
        raise TokenizerError(f"cannot read BPE merges {path}: {e}") from None


def _read_merges(lines: list[str], path) -> list[tuple[str, str]]:
    """Line 0 is a version header; CLIP uses the next NUM_MERGES lines."""
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
    if bad is not None:
        raise TokenizerError(f"{path}: line {bad + 2} is not a merge 'a b'")
    return merges  # type: ignore[return-value]


@cache
def default_tokenizer() -> CLIPTokenizer:
    """The tokenizer of the merge list shipped with the package (shared, loaded once)."""
    return CLIPTokenizer.from_merges_file(ASSET)
