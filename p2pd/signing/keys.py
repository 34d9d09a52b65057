"""Trusted public keys of a ``[[signatures]]`` rule: armored (or binary) OpenPGP keys for GPG
simple signing, PEM public keys for cosign.

Rules/invariants:
- Keys are read once, when the configuration is loaded; a file that does not hold exactly
  what it should (a private key, a certificate, an unsupported algorithm, garbage) is a
  ``ConfigError`` naming the file, so the seed refuses to start or keeps its running
  configuration on reload. Nothing is guessed at request time.
- OpenPGP is read by GnuPG itself (``gpg --show-keys`` for fingerprints, ``gpg --dearmor``
  for the keyring ``gpgv`` reads); there is no OpenPGP parser here.
- ``TrustedKeys.id`` is a hash of all key material: a verdict computed under other keys is
  never reused.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from p2pd.errors import ConfigError

__all__ = ["OpenPGPKey", "PemKey", "TrustedKeys", "find_gpg_tool", "load_trusted_keys"]

MAX_KEY_FILE = 1024 * 1024  # bytes; a public key block is a few KiB
_GPG_SECONDS = 30.0  # bound on one gpg call while loading keys
_ARMORED_PUBLIC = b"-----BEGIN PGP PUBLIC KEY BLOCK-----"
_ARMORED_PRIVATE = b"-----BEGIN PGP PRIVATE KEY BLOCK-----"
_PEM_PUBLIC = (b"-----BEGIN PUBLIC KEY-----", b"-----BEGIN RSA PUBLIC KEY-----")
# cosign signs with SHA-256 whatever the ECDSA curve (sigstore's LoadVerifier default).
_EC_CURVES = {"secp256r1": "ecdsa-p256", "secp384r1": "ecdsa-p384", "secp521r1": "ecdsa-p521"}
_MIN_RSA_BITS = 2048


def find_gpg_tool(name: str) -> str:
    """The path of ``gpg`` or ``gpgv`` (Debian packages ``gnupg`` and ``gpgv``)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/bin:/usr/local/bin")
    if path is None:
        raise ConfigError(f"{name} is not installed (Debian: apt-get install gnupg gpgv); it is needed to "
                          "verify OpenPGP signatures")
    return path


@dataclass(frozen=True)
class OpenPGPKey:
    """One OpenPGP public key (a primary key and its subkeys) from a key file.

    Attributes:
        source: the file it was read from.
        fingerprint: the primary key's fingerprint (what ``gpgv`` reports last in ``VALIDSIG``).
        subkeys: fingerprints of its subkeys.
        user_ids: its user ids, for people reading a verdict.
    """

    source: str
    fingerprint: str
    subkeys: tuple[str, ...] = ()
    user_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class PemKey:
    """One PEM public key for cosign signatures.

    Attributes:
        source: the file it was read from.
        kind: ``ecdsa-p256``, ``ecdsa-p384``, ``ecdsa-p521``, ``ed25519`` or ``rsa-<bits>``.
        fingerprint: SHA-256 of the DER SubjectPublicKeyInfo, hex.
    """

    source: str
    kind: str
    fingerprint: str
    key: Any = field(compare=False, repr=False)

    def verifies(self, payload: bytes, signature: bytes) -> bool:
        """Whether ``signature`` (cosign's DER/raw bytes) is this key's signature of ``payload``."""
        try:
            if isinstance(self.key, ec.EllipticCurvePublicKey):
                self.key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
            elif isinstance(self.key, ed25519.Ed25519PublicKey):
                self.key.verify(signature, payload)
            elif isinstance(self.key, rsa.RSAPublicKey):
                self.key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
            else:  # load_trusted_keys admits no other type
                return False
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True)
class TrustedKeys:
    """The trusted keys of one rule.

    Attributes:
        openpgp: OpenPGP keys, in configuration order.
        keyring: the binary OpenPGP keyring of all of them (for ``gpgv --keyring``).
        pem: PEM keys, in configuration order.
        id: SHA-256 of all key material (hex); changes whenever a key does.
    """

    openpgp: tuple[OpenPGPKey, ...] = ()
    keyring: bytes = field(default=b"", repr=False)
    pem: tuple[PemKey, ...] = ()
    id: str = hashlib.sha256(b"").hexdigest()

    def openpgp_key(self, fingerprint: str) -> OpenPGPKey | None:
        """The trusted key a primary or subkey fingerprint belongs to."""
        wanted = fingerprint.upper()
        return next((key for key in self.openpgp if wanted == key.fingerprint or wanted in key.subkeys), None)

    def describe(self) -> list[dict[str, str]]:
        """The keys for the verdict API: source, type and fingerprint of each."""
        return ([{"source": k.source, "type": "openpgp", "fingerprint": k.fingerprint} for k in self.openpgp]
                + [{"source": k.source, "type": k.kind, "fingerprint": k.fingerprint} for k in self.pem])


def load_trusted_keys(paths: Sequence[Path]) -> TrustedKeys:
    """Reads key files: armored or binary OpenPGP public keys, and PEM public keys.

    Raises:
        ConfigError: a file is missing, too large, a private key, a certificate, an
            unsupported key type, or not a key at all; or gpg is missing for an OpenPGP key.
    """
    openpgp: list[OpenPGPKey] = []
    keyring: list[bytes] = []
    pem: list[PemKey] = []
    material = hashlib.sha256()
    for path in paths:
        data = _read_key_file(Path(path))
        material.update(len(data).to_bytes(8, "big") + data)
        head = data.lstrip()
        if head.startswith(_ARMORED_PRIVATE) or b"PRIVATE KEY-----" in head[:100]:
            raise ConfigError(f"signature key {path}: this is a private key; configure the public key "
                              "(gpg --armor --export FPR, or cosign's cosign.pub)")
        if head.startswith(_PEM_PUBLIC):
            pem.append(_load_pem(path, data))
        elif head.startswith(_ARMORED_PUBLIC) or (data and data[0] & 0x80):
            keys, binary = _load_openpgp(path, data, armored=head.startswith(_ARMORED_PUBLIC))
            openpgp.extend(keys)
            keyring.append(binary)
        elif head.startswith(b"-----BEGIN CERTIFICATE-----"):
            raise ConfigError(f"signature key {path}: a certificate; keyless (Fulcio) signatures are not "
                              "supported, configure the signer's public key")
        else:
            raise ConfigError(f"signature key {path}: unknown key type; expected an armored OpenPGP public key "
                              "block (gpg --armor --export) or a PEM public key (cosign.pub)")
    return TrustedKeys(tuple(openpgp), b"".join(keyring), tuple(pem), material.hexdigest())


def _read_key_file(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"signature key {path}: cannot read it ({exc.strerror or exc})") from exc
    if len(data) > MAX_KEY_FILE:
        raise ConfigError(f"signature key {path}: larger than {MAX_KEY_FILE} bytes, not a public key")
    if not data.strip():
        raise ConfigError(f"signature key {path}: the file is empty")
    return data


def _load_pem(path: Path, data: bytes) -> PemKey:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"signature key {path}: not a readable PEM public key ({exc})") from exc
    if isinstance(key, ec.EllipticCurvePublicKey):
        kind = _EC_CURVES.get(key.curve.name)
        if kind is None:
            raise ConfigError(f"signature key {path}: unsupported elliptic curve {key.curve.name} "
                              f"(supported: {', '.join(_EC_CURVES.values())})")
    elif isinstance(key, ed25519.Ed25519PublicKey):
        kind = "ed25519"
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise ConfigError(f"signature key {path}: RSA key of {key.key_size} bits is too weak "
                              f"(at least {_MIN_RSA_BITS})")
        kind = f"rsa-{key.key_size}"
    else:
        raise ConfigError(f"signature key {path}: unsupported key type {type(key).__name__} "
                          "(supported: ECDSA P-256/P-384/P-521, Ed25519, RSA)")
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return PemKey(str(path), kind, hashlib.sha256(der).hexdigest(), key)


def _gpg(args: Sequence[str], *, homedir: str, stdin: bytes, where: Path) -> bytes:
    gpg = find_gpg_tool("gpg")
    try:
        result = subprocess.run([gpg, "--batch", "--no-tty", "--homedir", homedir, *args], input=stdin,
                                capture_output=True, timeout=_GPG_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"signature key {where}: gpg failed ({exc})") from exc
    if result.returncode != 0:
        message = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ConfigError(f"signature key {where}: not a readable OpenPGP key ({message[-1] if message else 'gpg'})")
    return result.stdout


def _load_openpgp(path: Path, data: bytes, *, armored: bool) -> tuple[list[OpenPGPKey], bytes]:
    with tempfile.TemporaryDirectory(prefix="seed-gpg-") as homedir:
        listing = _gpg(["--with-colons", "--show-keys"], homedir=homedir, stdin=data, where=path).decode(
            "utf-8", "replace")
        binary = _gpg(["--dearmor"], homedir=homedir, stdin=data, where=path) if armored else data
    entries: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    last_record = ""
    for line in listing.splitlines():
        fields = line.split(":")
        record = fields[0]
        if record in ("sec", "ssb"):
            raise ConfigError(f"signature key {path}: this is a private key; configure the public key "
                              "(gpg --armor --export FPR)")
        if record == "pub":
            current = {"fingerprint": "", "subkeys": [], "uids": []}
            entries.append(current)
        elif record == "fpr" and current is not None and len(fields) > 9:
            if last_record == "pub":
                current["fingerprint"] = fields[9].upper()
            elif last_record == "sub":
                current["subkeys"].append(fields[9].upper())
        elif record == "uid" and current is not None and len(fields) > 9:
            current["uids"].append(fields[9])
        if record != "fpr":
            last_record = record
    result = [OpenPGPKey(str(path), entry["fingerprint"], tuple(entry["subkeys"]), tuple(entry["uids"]))
              for entry in entries if entry["fingerprint"]]
    if not result:
        raise ConfigError(f"signature key {path}: no OpenPGP public key in it")
    return result, binary
