"""Checks one stored signature against a rule's trusted keys: the cryptography (``gpgv`` for
simple signing, ``cryptography`` for cosign) and what the payload claims. Shared by the seed
(signatures in its storage) and the agent (signatures read from its upstream), so both answer
the same way for the same bytes.

Fail closed: a signature that cannot be checked (gpgv missing, killed, too slow; a payload
that cannot be read) becomes a ``SignatureCheck`` with its error, never a verified one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import trio

from p2pd.fsutil import write_atomic
from p2pd.oci.digest import Digest

from .cosign import CosignLayer
from .errors import SignatureInvalid, VerifierUnavailable
from .extension import ExtensionSignature
from .keys import TrustedKeys, find_gpg_tool
from .openpgp import OpenPGPVerifier
from .payload import ATOMIC_TYPE, COSIGN_TYPE, parse_claim
from .policy import SignatureCheck

__all__ = ["GPGV_SECONDS", "SignatureVerifier"]

GPGV_SECONDS = 10.0  # one gpgv run; beyond it the signature counts as not verified
_GPGV_PROCESSES = 4


class SignatureVerifier:
    """Verifies signatures; keeps one gpgv keyring per key set under ``workdir``.

    Args:
        workdir: a private directory for gpgv's keyrings and empty home.
        tmp_dir: where keyrings are written before being renamed into place (same file system).
    """

    def __init__(self, workdir: Path, tmp_dir: Path | None = None) -> None:
        self._workdir = workdir
        self._tmp_dir = tmp_dir
        self._verifiers: dict[str, OpenPGPVerifier] = {}
        self._gpgv_limiter = trio.CapacityLimiter(_GPGV_PROCESSES)
        self.verifications = 0  # signatures checked cryptographically, for tests and metrics

    def forget_keys(self) -> None:
        """Drops the prepared keyrings (the keys changed)."""
        self._verifiers.clear()

    async def check_extension(self, signature: ExtensionSignature, digest: Digest,
                              keys: TrustedKeys) -> SignatureCheck:
        """A simple-signing signature from the signature API extension, for manifest ``digest``."""
        def failed(error: str) -> SignatureCheck:
            return SignatureCheck("simple-signing", "extension", signature.name, False, error=error)

        if not keys.openpgp:
            return failed("no OpenPGP key is trusted for this repository")
        self.verifications += 1
        try:
            verifier = await self._openpgp_verifier(keys)
            async with self._gpgv_limiter:
                with trio.fail_after(GPGV_SECONDS):
                    message = await verifier.verify(signature.content)
        except SignatureInvalid as exc:
            return failed(str(exc))
        except (VerifierUnavailable, OSError) as exc:
            return failed(f"the verifier is unavailable: {exc}")
        except trio.TooSlowError:
            return failed(f"gpgv did not finish within {GPGV_SECONDS:.0f} s")
        trusted = keys.openpgp_key(message.primary_key)
        if trusted is None:  # the keyring holds only trusted keys; this is a second lock on the door
            return failed(f"signed by key {message.primary_key}, which is not trusted")
        return _claimed(failed, "simple-signing", "extension", signature.name, message.payload, ATOMIC_TYPE,
                        digest, trusted.source, trusted.fingerprint)

    def check_cosign_layer(self, layer: CosignLayer, read_payload: Callable[[], bytes], *, source: str,
                           manifest_digest: str, digest: Digest, keys: TrustedKeys) -> SignatureCheck:
        """One layer of a cosign signature manifest (``source``: ``tag`` or ``referrer``).

        ``read_payload`` returns the layer's payload blob, already checked against its
        descriptor (size and digest), or raises ``SignatureInvalid``/``OSError``. Public-key
        cryptography: callers in the trio thread run this in a worker thread.
        """
        check_id = f"{manifest_digest}#{layer.index}"

        def failed(error: str) -> SignatureCheck:
            return SignatureCheck("cosign", source, check_id, False, error=error)

        if layer.error or layer.payload is None:
            return failed(layer.error)
        if not keys.pem:
            return failed("no PEM (cosign) public key is trusted for this repository")
        try:
            payload = read_payload()
        except (OSError, SignatureInvalid) as exc:
            return failed(f"the payload blob cannot be read: {exc}")
        self.verifications += 1
        key = next((pem for pem in keys.pem if pem.verifies(payload, layer.signature)), None)
        if key is None:
            return failed("not signed by a trusted key (no configured PEM key verifies it)")
        return _claimed(failed, "cosign", source, check_id, payload, COSIGN_TYPE, digest, key.source,
                        key.fingerprint)

    async def _openpgp_verifier(self, keys: TrustedKeys) -> OpenPGPVerifier:
        verifier = self._verifiers.get(keys.id)
        if verifier is None:
            verifier = await trio.to_thread.run_sync(self._prepare_keyring, keys)
            self._verifiers[keys.id] = verifier
        return verifier

    def _prepare_keyring(self, keys: TrustedKeys) -> OpenPGPVerifier:
        """Writes the keys' keyring where gpgv reads it, and an empty home for gpgv."""
        try:
            gpgv = find_gpg_tool("gpgv")
        except Exception as exc:  # ConfigError: gpgv was removed after the configuration loaded
            raise VerifierUnavailable(str(exc)) from exc
        homedir = self._workdir / "gnupg"
        homedir.mkdir(parents=True, exist_ok=True)
        os.chmod(homedir, 0o700)
        keyring = self._workdir / "keyrings" / f"{keys.id}.gpg"
        if not keyring.exists() or keyring.read_bytes() != keys.keyring:
            write_atomic(keyring, keys.keyring, tmp_dir=self._tmp_dir)
        return OpenPGPVerifier(gpgv, keyring, homedir)


def _claimed(failed: Callable[[str], SignatureCheck], format: str, source: str, check_id: str, payload: bytes,
             expected_type: str, digest: Digest, key: str, fingerprint: str) -> SignatureCheck:
    """The check of a cryptographically valid signature: its claims, and the digest it covers."""
    try:
        claim = parse_claim(payload, expected_type)
    except SignatureInvalid as exc:
        return failed(f"signed by {key}, but {exc}")
    if claim.manifest_digest != digest:
        return SignatureCheck(format, source, check_id, False, key, fingerprint, claim,
                              f"signed by {key} for manifest {claim.manifest_digest}, not this one")
    return SignatureCheck(format, source, check_id, True, key, fingerprint, claim)
