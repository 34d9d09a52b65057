"""The seed over HTTPS as a real process: skopeo pushes and pulls with credentials and the test
CA, the token realm is https, and SIGHUP swaps the certificate without dropping a keep-alive
connection (a broken certificate file keeps the old one, a broken rule file does not hold the
renewal back); ``[tls]`` settings refused when read and at start-up."""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from seed.config import ConfigError, TlsConfig, load_config
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


def _wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def _connection_of(response: httpx.Response) -> tuple[tuple[str, int], bytes]:
    """The client's local address and the certificate the server showed on that connection."""
    stream = response.extensions["network_stream"]
    der = stream.get_extra_info("socket").getpeercert(binary_form=True)  # an ssl.SSLSocket
    return stream.get_extra_info("client_addr"), der


def test_sighup_swaps_the_certificate_without_dropping_connections(https_seed: SeedProcess, pki: Ca,
                                                                   tmp_path: Path) -> None:
    before = _served_certificate(https_seed, pki)
    verify = ssl.create_default_context(cafile=str(pki.cert_file))
    with httpx.Client(base_url=https_seed.url, verify=verify, trust_env=False, timeout=10,
                      auth=("alice", "alice-pw")) as kept:
        first = kept.get("/v2/")
        assert first.status_code == 200
        opened = _connection_of(first)
        assert opened[1] == before
        renewed = pki.issue("seed", file_name="renewed")
        shutil.copy(renewed.cert_file, tmp_path / "tls" / "seed.crt")
        shutil.copy(renewed.key_file, tmp_path / "tls" / "seed.key")
        assert https_seed.proc is not None
        https_seed.proc.send_signal(signal.SIGHUP)
        assert _wait_for(lambda: _served_certificate(https_seed, pki) != before)
        # The connection opened before the reload is still the same one, with its old session.
        again = kept.get("/v2/")
        assert again.status_code == 200 and _connection_of(again) == opened
        after = _served_certificate(https_seed, pki)
        (tmp_path / "tls" / "seed.key").write_text("garbage")
        https_seed.proc.send_signal(signal.SIGHUP)
        assert _wait_for(lambda: "TLS reload failed" in https_seed.log_text())
        assert _served_certificate(https_seed, pki) == after
        last = kept.get("/v2/")
        assert last.status_code == 200 and _connection_of(last) == opened
    assert https_seed.is_running()


def test_sighup_renews_the_certificate_even_when_the_rules_do_not_load(https_seed: SeedProcess, pki: Ca,
                                                                       tmp_path: Path) -> None:
    before = _served_certificate(https_seed, pki)
    assert https_seed.config_path is not None
    https_seed.config_path.write_text(https_seed.config_path.read_text() + "\n[nonsense]\n")
    renewed = pki.issue("seed", file_name="renewed")
    shutil.copy(renewed.cert_file, tmp_path / "tls" / "seed.crt")
    shutil.copy(renewed.key_file, tmp_path / "tls" / "seed.key")
    assert https_seed.proc is not None
    https_seed.proc.send_signal(signal.SIGHUP)
    assert _wait_for(lambda: _served_certificate(https_seed, pki) != before)
    assert _wait_for(lambda: "unknown sections" in https_seed.log_text())  # the rules stayed as they were
    assert https_seed.is_running()


def _config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "seed.toml"
    path.write_text(body)
    return path


def test_tls_settings_are_checked_when_the_configuration_is_read(tmp_path: Path, pki: Ca) -> None:
    issued = pki.issue("seed")
    config = load_config(_config(tmp_path, f'[tls]\ncert_file = "{issued.cert_file}"\n'
                                           f'key_file = "{issued.key_file}"\n'
                                           f'client_ca_file = "{pki.cert_file}"\n'))
    assert config.tls == TlsConfig(issued.cert_file, issued.key_file, pki.cert_file)
    assert load_config(_config(tmp_path, "")).tls is None
    with pytest.raises(ConfigError, match="needs cert_file and key_file"):
        load_config(_config(tmp_path, f'[tls]\ncert_file = "{issued.cert_file}"\n'))
    with pytest.raises(ConfigError, match=r"tls\.key_file"):
        load_config(_config(tmp_path, f'[tls]\ncert_file = "{issued.cert_file}"\n'
                                      f'key_file = "{tmp_path / "missing.key"}"\n'))


def test_a_certificate_that_does_not_load_stops_the_start_with_a_clear_message(tmp_path: Path, pki: Ca) -> None:
    issued = pki.issue("seed")
    other = pki.issue("other")
    config = _config(tmp_path, f'[tls]\ncert_file = "{issued.cert_file}"\nkey_file = "{other.key_file}"\n')
    result = subprocess.run([sys.executable, "-m", "seed", "serve", "--listen", "127.0.0.1:0",
                             "--data", str(tmp_path / "data"), "--config", str(config)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("seed: cannot load TLS certificate"), result.stderr
    assert "Traceback" not in result.stderr
