"""TLS for the shared HTTP server: server contexts built from PEM files, reloadable in place.

Rules/invariants:
- ``TlsContextProvider.context()`` is asked once per accepted connection, so a reload changes
  what *new* connections get; connections already open keep their session undisturbed.
- A reload that fails (missing or garbled file, key that does not match the certificate)
  keeps the previous context and says why; it never takes the server down.
- TLS 1.2 at least; with ``client_ca_file`` every client must present a certificate issued by
  that CA (mutual TLS, for peer ports).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from p2pd.errors import ConfigError

__all__ = ["TlsContextProvider", "TlsFiles"]

log = logging.getLogger("p2pd.httpd.tls")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where a server's TLS material lives.

    Attributes:
        cert_file: PEM certificate chain (the server's certificate first).
        key_file: PEM private key of that certificate.
        client_ca_file: PEM CA certificates; when set, clients must present a certificate
            issued by one of them.
    """

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


def _build(files: TlsFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(files.cert_file, files.key_file)
        if files.client_ca_file is not None:
            context.load_verify_locations(cafile=files.client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"cannot load TLS certificate {files.cert_file} / key {files.key_file}"
                          f"{f' / client CA {files.client_ca_file}' if files.client_ca_file else ''}: {exc}") from None
    # HTTP/1.1 only: the server speaks nothing else.
    context.set_alpn_protocols(["http/1.1"])
    return context


class TlsContextProvider:
    """The current server context of ``files``; ``reload()`` re-reads them (e.g. on SIGHUP).

    Raises ``ConfigError`` at construction if the files do not load.
    """

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._context = _build(files)

    def context(self) -> ssl.SSLContext:
        return self._context

    def reload(self) -> bool:
        """Re-reads the files; on failure keeps the current context. Returns whether it changed."""
        try:
            self._context = _build(self.files)
        except ConfigError as exc:
            log.error("TLS reload failed, still serving the previous certificate: %s", exc)
            return False
        log.info("TLS certificate reloaded from %s", self.files.cert_file)
        return True
