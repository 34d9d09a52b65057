"""The seed over HTTPS as a real process: skopeo pushes and pulls with credentials and the test
CA, the token realm is https, and SIGHUP swaps the certificate without dropping a keep-alive
connection (a broken certificate file keeps the old one)."""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import skopeo
from tests.harness.certs import Ca, make_ca
from tests.harness.images import OciLayout
from tests.harness.seed_process import SeedProcess
from tests.test_seed_auth_api import make_htpasswd


@pytest.fixture
def pki(tmp_path: Path) -> Ca:
    return make_ca(tmp_path / "pki", "seed")


@pytest.fixture
def https_seed(tmp_path: Path, pki: Ca) -> Iterator[SeedProcess]:
    issued = pki.issue("seed")
    cert, key = tmp_path / "tls" / "seed.crt", tmp_path / "tls" / "seed.key"
    cert.parent.mkdir()
    shutil.copy(issued.cert_file, cert)
    shutil.copy(issued.key_file, key)
    htpasswd = tmp_path / "htpasswd"
    make_htpasswd(htpasswd, {"alice": "alice-pw"})
    config = tmp_path / "seed.toml"
    config.write_text(f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n\n[auth]\nhtpasswd = "{htpasswd}"\n'
                      f'service = "seed.test"\n\n[[access]]\nrepositories = ["team/**"]\nusers = ["alice"]\n'
                      f'role = "admin"\n')
    with SeedProcess(tmp_path / "seed-data", config_path=config, ca_file=pki.cert_file, log_level="INFO") as seed:
        yield seed


def _cert_dir(tmp_path: Path, ca: Ca) -> Path:
    """What skopeo/podman/containers-image read for a registry's CA: ``DIR/ca.crt``."""
    directory = tmp_path / "certs.d"
    directory.mkdir(exist_ok=True)
    shutil.copy(ca.cert_file, directory / "ca.crt")
    return directory


def test_skopeo_push_and_pull_over_https(https_seed: SeedProcess, pki: Ca, busybox_layout: OciLayout,
                                          tmp_path: Path) -> None:
    certs = _cert_dir(tmp_path, pki)
    with httpx.Client(verify=ssl.create_default_context(cafile=str(pki.cert_file)), trust_env=False) as client:
        challenge = client.get(f"{https_seed.url}/v2/").headers["www-authenticate"]
    assert f'realm="https://{https_seed.host}/token"' in challenge
    ref = f"docker://{https_seed.host}/team/busybox:v1"
    pushed = skopeo.copy(busybox_layout.ref("busybox"), ref, tls_verify=True,
                         extra_args=["--dest-cert-dir", str(certs), "--dest-creds", "alice:alice-pw"])
    pulled = skopeo.copy(ref, f"dir:{tmp_path / 'out'}", tls_verify=True,
                         extra_args=["--src-cert-dir", str(certs), "--src-creds", "alice:alice-pw"])
    assert pulled == pushed
    # Without the CA the client refuses the seed (the certificate is checked, not skipped).
    with pytest.raises(Exception, match="certificate"):
        skopeo.copy(ref, f"dir:{tmp_path / 'nope'}", tls_verify=True, extra_args=["--src-creds", "alice:alice-pw"])


def _served_certificate(seed: SeedProcess, ca: Ca) -> bytes:
    context = ssl.create_default_context(cafile=str(ca.cert_file))
    with socket.create_connection(("127.0.0.1", seed.port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def _wait_for(condition: object, seconds: float = 10.0) -> bool:
    for _ in range(int(seconds / 0.1)):
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_sighup_swaps_the_certificate_without_dropping_connections(https_seed: SeedProcess, pki: Ca,
                                                                   tmp_path: Path) -> None:
    before = _served_certificate(https_seed, pki)
    verify = ssl.create_default_context(cafile=str(pki.cert_file))
    with httpx.Client(base_url=https_seed.url, verify=verify, trust_env=False, timeout=10,
                      auth=("alice", "alice-pw")) as kept:
        assert kept.get("/v2/").status_code == 200
        renewed = pki.issue("seed", file_name="renewed")
        shutil.copy(renewed.cert_file, tmp_path / "tls" / "seed.crt")
        shutil.copy(renewed.key_file, tmp_path / "tls" / "seed.key")
        assert https_seed.proc is not None
        https_seed.proc.send_signal(signal.SIGHUP)
        assert _wait_for(lambda: _served_certificate(https_seed, pki) != before)
        assert kept.get("/v2/").status_code == 200  # the same connection, opened before the reload
        after = _served_certificate(https_seed, pki)
        (tmp_path / "tls" / "seed.key").write_text("garbage")
        https_seed.proc.send_signal(signal.SIGHUP)
        assert _wait_for(lambda: "TLS reload failed" in https_seed.log_text())
        assert _served_certificate(https_seed, pki) == after
        assert kept.get("/v2/").status_code == 200
    assert https_seed.is_running()
