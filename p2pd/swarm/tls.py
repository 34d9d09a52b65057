"""Mutual TLS on the peer port: certificates from a cluster CA.

Two ways to have a CA (docs/security.md, "Peer transport"):

- **Derived from the cluster key** (the default, nothing to set up): every node derives the same
  CA key from the cluster key (HKDF-SHA256 → a P-256 scalar) and issues itself a certificate
  for its node id at start. Whoever has the cluster key can join, as before; the
  gain is encryption and a handshake that refuses anyone without it.
- **An operator CA** (``p2pd ca init``, ``p2pd ca issue NODE``): the CA key stays with the
  operator; nodes get only their own key and certificate (``[swarm] tls_ca_file``,
  ``tls_cert_file``, ``tls_key_file``). A stolen node key then cannot mint certificates for others,
  and a node is evicted by letting its certificate expire (or by a new CA).

Peers are reached by address, so the client does not check host names; it checks the chain
to the cluster CA (the only CA either side trusts: not the machine's store), and the server
requires a client certificate from the same CA.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2pd.errors import ConfigError
from p2pd.fsutil import write_atomic

__all__ = [
    "NODE_CERT_DAYS",
    "PeerTls",
    "derive_cluster_ca",
    "issue_node_certificate",
    "new_ca",
    "pem_certificate",
    "pem_private_key",
    "refusal_reason",
]

# A derived node certificate (issued again at every start). Long on purpose: every holder of the
# cluster key can mint one, so expiry would evict nobody — it would only break a node that runs
# longer than that. With an operator CA, expiry is the eviction tool (``p2pd ca issue --days``).
NODE_CERT_DAYS = 3650
_CA_NOT_BEFORE = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
_CA_NOT_AFTER = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def derive_cluster_ca(cluster_key: bytes) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA every holder of ``cluster_key`` derives alike: same key, same name, same certificate
    fields (only the signature bytes differ, which verification does not care about)."""
    material = HKDF(hashes.SHA256(), 48, salt=b"p2pd peer TLS", info=b"cluster CA v1").derive(cluster_key)
    scalar = int.from_bytes(material, "big") % (_P256_ORDER - 1) + 1
    key = ec.derive_private_key(scalar, ec.SECP256R1())
    fingerprint = hashlib.sha256(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"p2pd cluster CA {fingerprint[:16]}")])
    return key, _ca_certificate(key, name, int(fingerprint[:30], 16), _CA_NOT_BEFORE, _CA_NOT_AFTER)


def new_ca(name: str, *, days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new operator CA (``p2pd ca init``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return key, _ca_certificate(key, subject, x509.random_serial_number(), now - dt.timedelta(minutes=5),
                                now + dt.timedelta(days=days))


def _ca_certificate(key: ec.EllipticCurvePrivateKey, name: x509.Name, serial: int, not_before: dt.datetime,
                    not_after: dt.datetime) -> x509.Certificate:
    public = key.public_key()
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(public)
            .serial_number(serial).not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256()))


def issue_node_certificate(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, node_id: str, *,
                           addresses: tuple[str, ...] = (), days: int = NODE_CERT_DAYS,
                           now: dt.datetime | None = None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A node's key and certificate (client and server use), named by its node id."""
    if days < 1:
        raise ConfigError("a certificate must be valid for at least one day")
    key = ec.generate_private_key(ec.SECP256R1())
    start = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(minutes=5)
    names: list[x509.GeneralName] = [x509.DNSName(node_id)]
    for address in addresses:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            names.append(x509.DNSName(address))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256()))
    return key, certificate


def pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def pem_certificate(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class PeerTls:
    """This node's TLS material for the peer port: files ``ssl`` loads.

    ``server()`` requires a client certificate from the CA; ``client()`` presents ours and
    verifies the peer's chain (no host name check: peers are reached by address).
    """

    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def derived(cls, cluster_key: bytes, node_id: str, directory: Path) -> PeerTls:
        """Derives the cluster CA and issues this node a fresh certificate, written (0600) to
        ``directory`` (the data directory's ``peer-tls/``)."""
        ca_key, ca_cert = derive_cluster_ca(cluster_key)
        key, certificate = issue_node_certificate(ca_key, ca_cert, node_id)
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        files = cls(directory / "ca.pem", directory / "node.pem", directory / "node.key")
        write_atomic(files.ca_file, pem_certificate(ca_cert))
        write_atomic(files.key_file, pem_private_key(key), mode=0o600)
        write_atomic(files.cert_file, pem_certificate(certificate))
        return files

    # Both contexts are built bare rather than with ``ssl.create_default_context``: for a client
    # that also loads the machine's CA store, and with host names unchecked any certificate a
    # public CA issued would pass for a peer. The cluster CA is the only one trusted here.
    def server(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._load(context)
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        self._load(context)
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def _load(self, context: ssl.SSLContext) -> None:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
            context.load_verify_locations(cafile=self.ca_file)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"peer TLS: cannot load CA {self.ca_file}, certificate {self.cert_file} or key "
                              f"{self.key_file}: {exc}") from None


def refusal_reason(error: BaseException | None) -> str:
    """A metric label for a failed peer handshake: ``no_certificate``, ``unknown_ca``, ``expired``,
    ``not_tls`` or ``other``."""
    if isinstance(error, ssl.SSLCertVerificationError):
        if error.verify_code in (9, 10):  # not yet valid, expired
            return "expired"
        if error.verify_code in (2, 18, 19, 20, 21, 30):  # self-signed, unknown issuer, key id mismatch
            return "unknown_ca"
        return "other"
    reason = getattr(error, "reason", None) or ""
    if "CERTIFICATE_REQUIRED" in reason or "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason:
        return "no_certificate"
    if "WRONG_VERSION_NUMBER" in reason or "HTTP_REQUEST" in reason:
        return "not_tls"
    if "UNKNOWN_CA" in reason:
        return "unknown_ca"
    if "EXPIRED" in reason:
        return "expired"
    return "other"
