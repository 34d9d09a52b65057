"""OpenPGP signature verification with GnuPG's ``gpgv`` (no OpenPGP parser of our own).

``gpgv --keyring K --status-fd 2 --output - -`` reads the signed message on stdin, writes
the signed data to stdout and machine-readable ``[GNUPG:]`` status lines to stderr. A
message is accepted only when gpgv exits 0 and its status says exactly one good signature
(``NEWSIG``, ``GOODSIG``, ``VALIDSIG``) and nothing bad (``BADSIG``, ``ERRSIG``, expired or
revoked keys): gpgv writes the signed data even for a bad signature, so the output alone
means nothing.

Resource handling: the output is read up to ``MAX_PAYLOAD_SIZE`` bytes and the process is
killed beyond it (a compressed message can expand without bound); the caller bounds the
time with ``trio.fail_after``, and a cancelled verification kills gpgv.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import trio

from .errors import SignatureInvalid, VerifierUnavailable
from .payload import MAX_PAYLOAD_SIZE

__all__ = ["OpenPGPVerifier", "VerifiedMessage"]

_STATUS_PREFIX = "[GNUPG:] "
_MAX_STATUS = 64 * 1024  # bytes of gpgv's stderr kept
_READ_PIECE = 16 * 1024


@dataclass(frozen=True, slots=True)
class VerifiedMessage:
    """A message whose one signature verified with a key of the keyring.

    Attributes:
        payload: the signed data.
        signing_key: fingerprint of the (sub)key that signed.
        primary_key: fingerprint of its primary key.
    """

    payload: bytes
    signing_key: str
    primary_key: str


class OpenPGPVerifier:
    """Verifies OpenPGP-signed messages against one keyring file.

    Args:
        gpgv: the path of ``gpgv``.
        keyring: a binary OpenPGP keyring (``gpg --dearmor`` of the trusted keys).
        homedir: an empty private directory, so that gpgv reads no user's ``trustedkeys.kbx``.
    """

    def __init__(self, gpgv: str, keyring: Path, homedir: Path) -> None:
        self._argv = [gpgv, "--homedir", str(homedir), "--keyring", str(keyring), "--status-fd", "2",
                      "--output", "-", "-"]

    async def verify(self, message: bytes) -> VerifiedMessage:
        """Checks one signed message.

        Raises:
            SignatureInvalid: not an OpenPGP message, a bad signature, an untrusted, expired
                or revoked key, several signatures, or a payload over the size limit.
            VerifierUnavailable: gpgv could not be run.
        """
        stdout, stderr, returncode = await self._run(message)
        status = [line[len(_STATUS_PREFIX):].split()
                  for line in stderr.decode("utf-8", "replace").splitlines() if line.startswith(_STATUS_PREFIX)]
        words = [fields[0] for fields in status if fields]
        problem = _problem(status, words)
        if problem is not None:
            raise SignatureInvalid(problem)
        if returncode != 0 or words.count("NEWSIG") != 1 or words.count("GOODSIG") != 1 \
                or words.count("VALIDSIG") != 1:
            raise SignatureInvalid(f"gpgv did not accept the signature (exit {returncode})")
        validsig = next(fields for fields in status if fields and fields[0] == "VALIDSIG")
        if len(validsig) < 11:
            raise SignatureInvalid("gpgv's VALIDSIG status is incomplete")
        return VerifiedMessage(stdout, validsig[1].upper(), validsig[10].upper())

    async def _run(self, message: bytes) -> tuple[bytes, bytes, int]:
        try:
            process = await trio.lowlevel.open_process(self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                       stderr=subprocess.PIPE)
        except OSError as exc:
            raise VerifierUnavailable(f"cannot run gpgv: {exc}") from exc
        stdout = bytearray()
        stderr = bytearray()
        too_large = False

        async def feed() -> None:
            assert process.stdin is not None
            try:
                await process.stdin.send_all(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # gpgv stopped reading (garbage input): its status says why
            finally:
                await process.stdin.aclose()

        async def drain(stream: trio.abc.ReceiveStream | None, sink: bytearray, limit: int,
                        kill_on_overflow: bool) -> None:
            nonlocal too_large
            assert stream is not None
            while chunk := await stream.receive_some(_READ_PIECE):
                if len(sink) + len(chunk) > limit:
                    if kill_on_overflow:
                        too_large = True
                        process.kill()
                        return
                    continue  # keep reading so gpgv never blocks on a full pipe; drop the rest
                sink += chunk

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(feed)
                nursery.start_soon(drain, process.stdout, stdout, MAX_PAYLOAD_SIZE, True)
                nursery.start_soon(drain, process.stderr, stderr, _MAX_STATUS, False)
            returncode = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
        if too_large:
            raise SignatureInvalid(f"the signed payload is larger than {MAX_PAYLOAD_SIZE} bytes")
        return bytes(stdout), bytes(stderr), returncode


def _problem(status: list[list[str]], words: list[str]) -> str | None:
    """The first reason in gpgv's status why the message is not one good trusted signature."""
    for fields in status:
        word = fields[0] if fields else ""
        if word == "NO_PUBKEY":
            key = fields[1] if len(fields) > 1 else "?"
            return f"signed by a key that is not trusted (key id {key})"
        if word == "BADSIG":
            return "the signature does not match the signed content (altered, or forged)"
        if word in ("EXPKEYSIG", "EXPSIG"):
            return "signed by an expired key, or the signature has expired"
        if word == "REVKEYSIG":
            return "signed by a revoked key"
    if "ERRSIG" in words:
        return "gpgv could not check the signature (unsupported algorithm or damaged signature)"
    if "NODATA" in words or "NEWSIG" not in words:
        return "not an OpenPGP signed message"
    if words.count("NEWSIG") > 1:
        return "more than one signature in one message"
    return None
