"""Content Credentials (C2PA): a signed manifest, bound to an output's bytes, that says how it was made.

Every output gets a manifest with the input as its parent ingredient (with the input's SHA-256; an input that
already carries credentials keeps them in the chain), the actions `c2pa.opened` then `c2pa.edited` with the IPTC
digital source type *trainedAlgorithmicMedia*, the software agent `supir-mlx <version>` and the parameters that
matter (model, base checkpoint, seed, caption, preset, upscale). It is signed with the user's certificate and key
(`--signing-cert/--signing-key`, or `credentials.json` in the config folder), otherwise with a self-signed pair
made on first use in the config folder. `read_credentials` validates a file with the library (signature, binding
to the bytes, chain, trust) and sums up what the manifest says.

The c2pa-python library is the optional extra `credentials`; without it `load_credentials` raises
CredentialsUnavailable and outputs still carry the provenance record and the IPTC digital source type (XMP).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

from . import metadata

INSTALL_HINT = 'pip install "supir-mlx[credentials]"'
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "TIFF": "image/tiff", "WEBP": "image/webp", "HEIF": "image/heic"}
SELF_SIGNED_FILE = "self-signed.pem"
CONFIG_FILE = "credentials.json"
# The name a self-signed certificate carries, so that `info` can say so; it names no person or computer, since
# every output a user shares would carry it.
SELF_SIGNED_ORG = "supir-mlx self-signed (unverified)"
# The only failure a valid file signed with a certificate outside the reader's trust lists shows.
_TRUST_CODES = {"signingCredential.untrusted"}
_HASH_CODES = {"assertion.dataHash.mismatch", "assertion.boxesHash.mismatch", "assertion.bmffHash.mismatch"}


class CredentialsError(Exception):
    """Credentials that cannot be loaded, made or embedded; str() is one line saying why."""


class CredentialsUnavailable(CredentialsError):
    """The optional c2pa-python library is not installed."""


def _c2pa():
    try:
        import c2pa
    except ImportError:
        raise CredentialsUnavailable(f"Content Credentials need the c2pa-python library ({INSTALL_HINT})") from None
    return c2pa


def config_dir() -> Path:
    """The user's supir-mlx config folder: $SUPIR_MLX_CONFIG, else $XDG_CONFIG_HOME/supir-mlx, else
    ~/.config/supir-mlx."""
    if os.environ.get("SUPIR_MLX_CONFIG"):
        return Path(os.environ["SUPIR_MLX_CONFIG"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME")
    return (Path(base).expanduser() if base else Path.home() / ".config") / "supir-mlx"


# ------------------------------------------------------------------------------------------------ identity
@dataclass(frozen=True)
class Identity:
    chain: bytes  # PEM: the signing certificate first, then its issuers
    key: bytes  # PEM private key
    alg: str  # es256 / es384 / es512 / ps256 / ed25519, from the key
    self_signed: bool
    origin: str  # where it came from, for messages
    timestamp_url: str | None = None
    created: bool = False  # the self-signed pair was made just now


def _algorithm(key_pem: bytes, origin: str) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CredentialsError(f"{origin}: the private key is encrypted; give an unencrypted PEM key") from None
    except ValueError as e:
        raise CredentialsError(f"{origin}: not a PEM private key ({str(e).splitlines()[0]})") from None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algs = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}
        if key.curve.name not in algs:
            raise CredentialsError(f"{origin}: EC curve {key.curve.name} is not allowed by C2PA (P-256/384/521)")
        return algs[key.curve.name]
    if isinstance(key, rsa.RSAPrivateKey):
        return "ps256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise CredentialsError(f"{origin}: unsupported key type {type(key).__name__} (use EC P-256, RSA or Ed25519)")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.expanduser().read_bytes()
    except OSError as e:
        raise CredentialsError(f"{what} {path}: cannot read ({e.strerror or e})") from None


def load_identity(cert: str | Path | None = None, key: str | Path | None = None) -> Identity:
    """The signing identity: `cert` + `key` when given, else the config file's, else the self-signed pair.

    `credentials.json` in the config folder: {"certificate": PEM chain, "private_key": PEM key,
    "timestamp_url": optional RFC 3161 server}; relative paths are relative to the config folder.
    """
    if (cert is None) != (key is None):
        raise CredentialsError("--signing-cert and --signing-key go together (the certificate chain and its key)")
    if cert is not None:
        origin = f"--signing-cert {cert}"
        chain, pem = _read(Path(cert), "--signing-cert"), _read(Path(key), "--signing-key")
        return Identity(chain, pem, _algorithm(pem, f"--signing-key {key}"), False, origin)
    folder = config_dir()
    conf_path = folder / CONFIG_FILE
    if conf_path.is_file():
        try:
            conf = json.loads(conf_path.read_text(encoding="utf-8"))
            cert_path, key_path = (folder / Path(conf[k]).expanduser() for k in ("certificate", "private_key"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CredentialsError(f"{conf_path}: needs \"certificate\" and \"private_key\" paths "
                                   f"({type(e).__name__}: {e})") from None
        pem = _read(key_path, "private key")
        return Identity(_read(cert_path, "certificate"), pem, _algorithm(pem, str(key_path)), False,
                        str(conf_path), conf.get("timestamp_url"))
    return self_signed_identity(folder)


def _split_pem(data: bytes) -> tuple[bytes, bytes]:
    key_end = data.index(b"-----END PRIVATE KEY-----") + len(b"-----END PRIVATE KEY-----\n")
    return data[:key_end], data[key_end:]


def self_signed_identity(folder: Path | None = None) -> Identity:
    """The pair in `folder`/self-signed.pem, made on first use (private key and chain in one file, mode 0600,
    written atomically so that two first runs at once cannot pair one's key with the other's certificate)."""
    folder = folder or config_dir()
    path = folder / SELF_SIGNED_FILE
    created = not path.is_file()
    if created:
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(prefix=".self-signed.", suffix=".part", dir=folder)  # mode 0600
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(_make_self_signed())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            raise CredentialsError(f"cannot create the self-signed key in {folder} ({e.strerror or e})") from None
    key, chain = _split_pem(path.read_bytes())
    return Identity(chain, key, "es256", True, str(path), created=created)


def _make_self_signed(years: int = 10) -> bytes:
    """PEM private key + certificate chain: an ES256 signing certificate issued by a one-off CA whose key is
    thrown away (C2PA refuses a lone self-signed certificate; it wants a CA-issued one with digitalSignature
    key usage and the emailProtection/documentSigning purposes)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, SELF_SIGNED_ORG)])

    def usage(**on: bool) -> x509.KeyUsage:
        flags = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
                 "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
        return x509.KeyUsage(**{f: on.get(f, False) for f in flags})

    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
    until = now + datetime.timedelta(days=365 * years)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = name("supir-mlx self-signed CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(usage(key_cert_sign=True, crl_sign=True), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(name("supir-mlx self-signed")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return (key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            + cert.public_bytes(pem) + ca.public_bytes(pem))


# ------------------------------------------------------------------------------------------------ signing
class Credentials:
    """A loaded signer; `for_output` gives the `sign` hook `io.images.save_image` calls for one output."""

    def __init__(self, identity: Identity):
        c2pa = _c2pa()
        self.identity = identity
        try:
            self._signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(
                identity.alg, identity.chain, identity.key,
                identity.timestamp_url.encode() if identity.timestamp_url else None))
            # A key that does not match its certificate, or a chain C2PA refuses, fails here, before any work.
            self._sign_one("PNG", _tiny_png(), io.BytesIO(), {"title": "check", "assertions": [
                {"label": "c2pa.actions.v2", "data": {"actions": [{"action": "c2pa.created", "digitalSourceType":
                 "http://cv.iptc.org/newscodes/digitalsourcetype/digitalCreation"}]}}]}, None)
        except c2pa.C2paError as e:
            raise CredentialsError(f"{identity.origin}: the C2PA library refused this certificate and key "
                                   f"({_first_line(e)})") from None

    @classmethod
    def load(cls, cert: str | Path | None = None, key: str | Path | None = None) -> "Credentials":
        _c2pa()
        return cls(load_identity(cert, key))

    def for_output(self, prov: dict[str, Any], source: str | Path | None, title: str,
                   preset: str | None = None) -> Callable[[str, BinaryIO, BinaryIO], None]:
        """The signing hook for one output: (format, unsigned file, destination) -> signed file written."""
        definition = manifest_definition(prov, title, preset)

        def sign(fmt: str, unsigned: BinaryIO, dest: BinaryIO) -> None:
            c2pa = _c2pa()
            try:
                self._sign_one(fmt, unsigned, dest, definition, Path(source) if source else None)
            except c2pa.C2paError as e:
                raise CredentialsError(f"Content Credentials could not be embedded ({_first_line(e)})") from None

        return sign

    def _sign_one(self, fmt: str, unsigned: BinaryIO, dest: BinaryIO, definition: dict, source: Path | None) -> None:
        c2pa = _c2pa()
        with c2pa.Builder(definition) as builder:
            if source is not None:
                _add_input(builder, source)
            unsigned.seek(0)
            builder.sign(self._signer, MIME[fmt], unsigned, dest)


def _add_input(builder, source: Path) -> None:
    """The input as the parent ingredient, read by the library (so its own credentials join the chain)."""
    from PIL import Image

    data = source.read_bytes()
    try:
        with warnings.catch_warnings():  # a damaged tag was reported when the input was read (io.images)
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                mime = MIME.get(im.format or "", "application/octet-stream")
    except (OSError, ValueError, Image.DecompressionBombError):
        mime = "application/octet-stream"
    builder.add_ingredient({"title": source.name, "relationship": "parentOf", "label": "input",
                            "metadata": {"supir-mlx.sha256": hashlib.sha256(data).hexdigest()}},
                           mime, io.BytesIO(data))


def manifest_definition(prov: dict[str, Any], title: str, preset: str | None = None) -> dict[str, Any]:
    version = metadata.software(prov).removeprefix("supir-mlx ")
    settings = prov.get("settings") or {}
    params = {"model": prov.get("model"), "base_checkpoint": prov.get("base_checkpoint"), "seed": prov.get("seed"),
              "caption": prov.get("caption"), "preset": preset, "upscale": settings.get("upscale")}
    edited = {"action": "c2pa.edited", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
              "softwareAgent": {"name": "supir-mlx", "version": version}, "description": metadata.NOTICE,
              "parameters": {k: v for k, v in params.items() if v is not None}}
    return {"claim_generator_info": [{"name": "supir-mlx", "version": version}], "title": title,
            "assertions": [{"label": "c2pa.actions.v2", "data": {"actions": [
                {"action": "c2pa.opened", "parameters": {"ingredientIds": ["input"]}}, edited]}}]}


def _tiny_png() -> io.BytesIO:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    return buf


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


# ------------------------------------------------------------------------------------------------ reading
def read_credentials(path: str | Path) -> dict[str, Any] | None:
    """What the library finds in `path`: None without a manifest, else a summary (see `summarize`)."""
    c2pa = _c2pa()
    try:
        reader = c2pa.Reader.try_create(str(path))
    except c2pa.C2paError as e:
        return {"valid": False, "trusted": False, "self_signed": False, "state": "Unreadable",
                "failures": [{"code": "manifest.unreadable", "explanation": _first_line(e)}]}
    if reader is None:
        return None
    with reader:
        store = json.loads(reader.json())
    return summarize(store)


def summarize(store: dict[str, Any]) -> dict[str, Any]:
    """The reader's manifest store in a few fields: valid (signature and binding to the bytes hold), trusted
    (signer on a trust list the library knows), self_signed (our generated certificate), failures, signer,
    actions, ingredients (with whether their own credentials validated), and the active manifest itself."""
    active = store.get("manifests", {}).get(store.get("active_manifest"), {})
    results = store.get("validation_results") or {}
    failures = [{"code": f.get("code"), "explanation": f.get("explanation")}
                for f in (results.get("activeManifest") or {}).get("failure", [])]
    signer = active.get("signature_info") or {}
    deltas = {d.get("ingredientAssertionURI", "").rsplit("/", 1)[-1]: d.get("validationDeltas", {}).get("failure", [])
              for d in results.get("ingredientDeltas", [])}
    ingredients = []
    for ing in active.get("ingredients", []):
        chained = ing.get("active_manifest")
        own_failures = [f for f in deltas.get(ing.get("label", ""), []) + (
            ing.get("validation_results", {}).get("activeManifest", {}).get("failure", []))
            if f.get("code") not in _TRUST_CODES]
        ingredients.append({"title": ing.get("title"), "format": ing.get("format"),
                            "relationship": ing.get("relationship"),
                            "sha256": (ing.get("metadata") or {}).get("supir-mlx.sha256"),
                            "credentials": chained, "credentials_valid": (not own_failures) if chained else None})
    actions = [a for assertion in active.get("assertions", []) if assertion.get("label", "").startswith("c2pa.actions")
               for a in assertion.get("data", {}).get("actions", [])]
    return {
        "valid": not [f for f in failures if f["code"] not in _TRUST_CODES],
        "trusted": store.get("validation_state") == "Trusted",
        "self_signed": signer.get("issuer") == SELF_SIGNED_ORG,
        "tampered": any(f["code"] in _HASH_CODES for f in failures),
        "state": store.get("validation_state"),
        "failures": failures,
        "signer": {k: signer.get(k) for k in ("common_name", "issuer", "alg", "time") if signer.get(k)},
        "claim_generator": ", ".join(f"{g.get('name')} {g.get('version', '')}".strip()
                                     for g in active.get("claim_generator_info", [])),
        "title": active.get("title"),
        "actions": actions,
        "ingredients": ingredients,
        "manifests": len(store.get("manifests", {})),
        "manifest": active,
    }


def describe(summary: dict[str, Any]) -> str:
    """One plain sentence on what the credentials prove."""
    if not summary["valid"]:
        failed = [f for f in summary["failures"] if f["code"] not in _TRUST_CODES]
        if summary.get("tampered"):
            return ("DO NOT MATCH this file: the image data was changed after the credentials were signed "
                    f"({', '.join(f['code'] for f in failed)})")
        return "INVALID, the file does not match them: " + "; ".join(f"{f['code']}: {f['explanation']}" for f in failed)
    signer = summary["signer"]
    who = signer.get("common_name") or "unknown signer"
    if summary["trusted"]:
        return f"valid and trusted: signed by {who} ({signer.get('issuer', '')}), the file is unchanged since"
    if summary["self_signed"]:
        return ("valid (signature and image data match), but SELF-SIGNED: the key was made by supir-mlx on the "
                "computer that wrote the file, so they show the file is unchanged since signing, not who made it")
    return (f"valid (signature and image data match); the signer {who} ({signer.get('issuer', '')}) is not on "
            "a trust list this check knows")
