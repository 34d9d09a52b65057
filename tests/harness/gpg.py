"""Debian's GnuPG with a throw-away home: a signing key made offline, its public key exported
the way a registry or a client policy consumes it, and messages signed with it.

Usage::

    with GpgHome() as gpg:
        gpg.export_public(tmp_path / "release.asc")
        skopeo.copy(src, dst, extra_args=["--sign-by", gpg.fingerprint])  # with GNUPGHOME=gpg.home

The home lives in a short directory under /tmp: gpg-agent's socket path must stay under
108 bytes, which a pytest tmp_path may not. ``close`` stops the agent that signing started.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from .tools import require_tool, run

__all__ = ["GpgHome"]


class GpgHome:
    """A GNUPGHOME with one signing key (ed25519, no passphrase, no expiry).

    Args:
        user_id: the key's user id.

    Attributes after ``__enter__``: ``home`` (the directory), ``fingerprint`` (of the primary
    key), ``env`` (``{"GNUPGHOME": ...}`` for tools that sign, such as skopeo ``--sign-by``).
    """

    def __init__(self, user_id: str = "Release <release@example.com>") -> None:
        self.user_id = user_id
        self.home = Path()
        self.fingerprint = ""
        self._gpg = ""

    def __enter__(self) -> GpgHome:
        self._gpg = require_tool("gpg")
        require_tool("gpgv")
        self.home = Path(tempfile.mkdtemp(prefix="gpg-", dir="/tmp"))
        os.chmod(self.home, 0o700)
        try:
            self.gpg("--passphrase", "", "--quick-gen-key", self.user_id, "ed25519", "sign", "never")
            listing = self.gpg("--with-colons", "--list-keys", self.user_id).decode()
            self.fingerprint = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def env(self) -> dict[str, str]:
        return {"GNUPGHOME": str(self.home)}

    def gpg(self, *args: str, input: bytes | None = None) -> bytes:
        """``gpg --batch --homedir HOME ARGS``; returns stdout."""
        return run([self._gpg, "--batch", "--no-tty", "--pinentry-mode", "loopback", "--homedir", str(self.home),
                    *args], timeout=60, input=input).stdout

    def export_public(self, path: Path, *, armor: bool = True) -> Path:
        """Writes the public key (``gpg --armor --export FPR``, or binary) to ``path``."""
        path.write_bytes(self.gpg(*(["--armor"] if armor else []), "--export", self.fingerprint))
        return path

    def export_secret(self, path: Path) -> Path:
        """Writes the private key, armored (to show it is refused where a public key belongs)."""
        path.write_bytes(self.gpg("--passphrase", "", "--armor", "--export-secret-keys", self.fingerprint))
        return path

    def sign(self, payload: bytes, *, compress: bool = True) -> bytes:
        """A binary OpenPGP signed message of ``payload`` (what skopeo ``--sign-by`` makes).

        ``compress=False`` leaves the payload readable inside the message, so a test can edit
        exactly one byte of the signed content.
        """
        return self.gpg("--passphrase", "", "--local-user", self.fingerprint,
                        *([] if compress else ["--compress-algo", "none"]), "--sign", "--output", "-", input=payload)

    def close(self) -> None:
        if self._gpg and self.home != Path() and self.home.exists():
            gpgconf = shutil.which("gpgconf")
            if gpgconf is not None:  # signing started a gpg-agent for this home: stop it
                run([gpgconf, "--homedir", str(self.home), "--kill", "gpg-agent"], timeout=30, check=False)
            shutil.rmtree(self.home, ignore_errors=True)
