"""``p2pd containerd-config``: pure render/merge tests, the file-writing shell, and one real containerd pull."""

from __future__ import annotations

import argparse
import datetime as dt
import http.server
import threading
import tomllib
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pd.containerd_config import (
    FileChange,
    HostsFile,
    Target,
    add_arguments,
    apply_change,
    default_server,
    docker_cert_settings,
    merge,
    parse_hosts_toml,
    parse_target,
    plan_file,
    render_hosts_toml,
    run,
)
from p2pd.errors import ConfigError
from tests.harness import skopeo
from tests.harness.containerd import PrivateContainerd
from tests.harness.images import OciLayout, make_tar_layer, write_layout_image
from tests.harness.net import free_port
from tests.harness.reference_registry import ReferenceRegistry

ENDPOINT = "http://127.0.0.1:5080"

EXISTING = """\
# hand-written: the corporate mirror, then the registry itself
server = "https://seed.example:5000"
ca = "/etc/pki/corp-ca.pem"
skip_verify = false

[header]
  x-tenant = "blue"

[host."https://mirror.corp.example"]
  capabilities = ["pull"]
  ca = ["mirror-ca.pem", "mirror-ca2.pem"]
  client = [["client.cert", "client.key"]]
  skip_verify = true
  override_path = true
  [host."https://mirror.corp.example".header]
    authorization = ["Basic dXNlcjpwYXNz"]
    x-quote = "a \\"quoted\\" value\\twith tab"
"""


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="p2pd containerd-config")
    add_arguments(parser)
    return parser.parse_args(argv)


def _run(argv: list[str]) -> int:
    return run(_parse_args(argv))


def _read(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text())


def _hosts(path: Path) -> list[str]:
    return list(_read(path).get("host", {}))


def _backups(directory: Path) -> list[Path]:
    return sorted(directory.glob("hosts.toml.bak.*"))


# --------------------------------------------------------------------------- pure: targets and defaults


def test_default_servers() -> None:
    assert default_server("docker.io") == "https://registry-1.docker.io"
    assert default_server("seed.example:5000") == "https://seed.example:5000"
    assert default_server("_default") is None


def test_parse_target() -> None:
    assert parse_target("docker.io") == Target("docker.io")
    assert parse_target("seed.example:5000=http://10.0.0.5:5000/") == Target(
        "seed.example:5000", "http://10.0.0.5:5000"
    )
    assert parse_target("[::1]:5000") == Target("[::1]:5000")
    assert parse_target("_default=https://proxy.example") == Target("_default", "https://proxy.example")
    for bad in ("../etc", "a/b", "", "seed.example:5000=ftp://x", "seed.example:5000=10.0.0.5:5000", "-x"):
        with pytest.raises(ConfigError):
            parse_target(bad)


# --------------------------------------------------------------------------- pure: merge and render


def test_new_file_puts_p2pd_first_with_short_dial_timeout() -> None:
    wanted = merge(None, Target("seed.example:5000"), ENDPOINT)
    text = render_hosts_toml(wanted, "seed.example:5000")
    doc = tomllib.loads(text)
    assert doc["server"] == "https://seed.example:5000"
    assert doc["host"] == {ENDPOINT: {"capabilities": ["pull", "resolve"], "dial_timeout": "200ms"}}
    assert text.index("server =") < text.index("[host.")  # top-level keys must precede every table
    assert parse_hosts_toml(text) == wanted


def test_docker_io_maps_to_registry_1() -> None:
    doc = tomllib.loads(render_hosts_toml(merge(None, Target("docker.io"), ENDPOINT), "docker.io"))
    assert doc["server"] == "https://registry-1.docker.io"


def test_default_namespace_has_no_server_unless_given() -> None:
    doc = tomllib.loads(render_hosts_toml(merge(None, Target("_default"), ENDPOINT), "_default"))
    assert "server" not in doc and list(doc["host"]) == [ENDPOINT]
    doc = tomllib.loads(render_hosts_toml(merge(None, Target("_default", "https://up"), ENDPOINT), "_default"))
    assert doc["server"] == "https://up"


def test_merge_keeps_everything_and_puts_p2pd_first() -> None:
    existing = parse_hosts_toml(EXISTING)
    wanted = merge(existing, Target("seed.example:5000"), ENDPOINT)
    text = render_hosts_toml(wanted, "seed.example:5000")
    doc = tomllib.loads(text)
    original = tomllib.loads(EXISTING)
    assert doc["server"] == original["server"]
    assert doc["ca"] == original["ca"] and doc["skip_verify"] is False and doc["header"] == {"x-tenant": "blue"}
    assert list(doc["host"]) == [ENDPOINT, "https://mirror.corp.example"]
    assert doc["host"]["https://mirror.corp.example"] == original["host"]["https://mirror.corp.example"]
    assert doc["host"]["https://mirror.corp.example"]["header"]["x-quote"] == 'a "quoted" value\twith tab'
    # containerd orders hosts by the line of their [host."..."] header
    assert text.index(f'[host."{ENDPOINT}"]') < text.index('[host."https://mirror.corp.example"]')


def test_merge_moves_an_existing_p2pd_entry_to_the_front_once() -> None:
    existing = parse_hosts_toml(
        'server = "https://r.example"\n'
        '[host."https://other.example"]\n  capabilities = ["pull"]\n'
        f'[host."{ENDPOINT}/"]\n  capabilities = ["pull"]\n  dial_timeout = "5s"\n'
        '  [host."http://127.0.0.1:5080/".header]\n    x-node = "n1"\n'
        '[host."HTTP://127.0.0.1:5080"]\n  capabilities = ["pull"]\n'
    )
    wanted = merge(existing, Target("r.example"), ENDPOINT)
    assert [url for url, _ in wanted.hosts] == [ENDPOINT, "https://other.example"]
    assert wanted.hosts[0][1] == {
        "capabilities": ["pull", "resolve"],
        "dial_timeout": "200ms",
        "header": {"x-node": "n1"},  # the operator's own settings on p2pd's entry survive
    }


def test_explicit_upstream_replaces_server_plain_name_keeps_it() -> None:
    existing = parse_hosts_toml(EXISTING)
    assert merge(existing, Target("seed.example:5000"), ENDPOINT).server == "https://seed.example:5000"
    assert merge(existing, Target("seed.example:5000", "http://10.0.0.5:5000"), ENDPOINT).server == (
        "http://10.0.0.5:5000"
    )
    no_server = parse_hosts_toml('[host."https://m.example"]\n')
    assert merge(no_server, Target("docker.io"), ENDPOINT).server is None  # containerd's default stays in force


def test_merge_is_a_fixed_point() -> None:
    once = merge(parse_hosts_toml(EXISTING), Target("seed.example:5000"), ENDPOINT)
    assert merge(once, Target("seed.example:5000"), ENDPOINT) == once
    assert merge(parse_hosts_toml(render_hosts_toml(once, "x")), Target("seed.example:5000"), ENDPOINT) == once


def test_dial_timeout_can_be_left_out() -> None:
    with_timeout = merge(None, Target("r.example"), ENDPOINT)
    without = merge(with_timeout, Target("r.example"), ENDPOINT, dial_timeout="")
    assert without.hosts[0][1] == {"capabilities": ["pull", "resolve"]}


def test_endpoint_equal_to_server_is_refused() -> None:
    with pytest.raises(ConfigError, match="also the upstream"):
        merge(None, Target("r.example", ENDPOINT + "/"), ENDPOINT)


def test_invalid_existing_files_are_refused() -> None:
    for text in ('server = "x"\nserver = "y"\n', "server = 5\n", 'host = "x"\n', "[host]\nx = 1\n"):
        with pytest.raises(ConfigError):
            parse_hosts_toml(text)


def test_docker_cert_files_become_ca_and_client() -> None:
    assert docker_cert_settings(["ca.crt", "b.crt", "client.cert", "client.key", "notes.txt"]) == {
        "ca": ["b.crt", "ca.crt"],
        "client": [["client.cert", "client.key"]],
    }
    assert docker_cert_settings(["only.cert"]) == {"client": ["only.cert"]}
    assert docker_cert_settings([]) == {}


_text = st.text(st.characters(codec="utf-8"), max_size=12)
_scalar = st.one_of(_text, st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False))
_value = st.one_of(_scalar, st.lists(_text, max_size=3), st.lists(st.lists(_text, max_size=2), max_size=2))
_table = st.dictionaries(_text.filter(lambda k: k not in ("server", "host")), _value, max_size=4)
_nested = st.dictionaries(
    _text.filter(lambda k: k not in ("server", "host")),
    st.one_of(_value, st.dictionaries(_text, _value, max_size=3)),
    max_size=4,
)


@given(
    server=st.one_of(st.none(), _text.filter(bool)),
    settings=_nested,
    hosts=st.dictionaries(_text, _nested, max_size=3),
)
def test_render_parse_roundtrip(server: str | None, settings: dict[str, Any], hosts: dict[str, Any]) -> None:
    model = HostsFile(server=server, settings=settings, hosts=tuple(hosts.items()))
    assert parse_hosts_toml(render_hosts_toml(model, "r.example")) == model


# --------------------------------------------------------------------------- the file-writing shell


def test_cli_creates_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hosts = tmp_path / "certs.d"
    assert (
        _run(
            [
                "--hosts-dir",
                str(hosts),
                "--endpoint",
                ENDPOINT,
                "--registry",
                "docker.io",
                "--registry",
                "seed.example:5000=http://10.0.0.5:5000",
                "--all",
            ]
        )
        == 0
    )
    assert _read(hosts / "docker.io" / "hosts.toml")["server"] == "https://registry-1.docker.io"
    assert _read(hosts / "seed.example:5000" / "hosts.toml")["server"] == "http://10.0.0.5:5000"
    default = _read(hosts / "_default" / "hosts.toml")
    assert "server" not in default and list(default["host"]) == [ENDPOINT]
    assert (hosts / "docker.io" / "hosts.toml").stat().st_mode & 0o777 == 0o644
    assert "created" in capsys.readouterr().out
    assert not list(hosts.rglob("*.tmp")) and not list(hosts.rglob("*.bak.*"))


def test_cli_merges_backs_up_once_and_is_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "seed.example:5000"
    directory.mkdir()
    (directory / "hosts.toml").write_text(EXISTING)
    argv = ["--hosts-dir", str(tmp_path), "--endpoint", ENDPOINT, "--registry", "seed.example:5000"]

    assert _run(argv) == 0
    first = (directory / "hosts.toml").read_text()
    [backup] = _backups(directory)
    assert backup.read_text() == EXISTING  # the comments live on in the backup
    assert _hosts(directory / "hosts.toml") == [ENDPOINT, "https://mirror.corp.example"]
    capsys.readouterr()

    assert _run(argv) == 0
    assert (directory / "hosts.toml").read_text() == first
    assert _backups(directory) == [backup]
    assert capsys.readouterr().out.startswith("unchanged")


def test_cli_leaves_an_already_correct_handwritten_file_alone(tmp_path: Path) -> None:
    text = (
        "# mine, with comments\n"
        f'[host."{ENDPOINT}"]\n  dial_timeout = "200ms"  # fast\n  capabilities = ["resolve", "pull"]\n'
    )
    (tmp_path / "docker.io").mkdir()
    (tmp_path / "docker.io" / "hosts.toml").write_text(text)
    # capability order differs, so this is a (harmless) rewrite; the second run must not touch it again
    assert _run(["--hosts-dir", str(tmp_path), "--endpoint", ENDPOINT, "--registry", "docker.io"]) == 0
    rewritten = (tmp_path / "docker.io" / "hosts.toml").read_text()
    assert "server" not in tomllib.loads(rewritten)  # absent server stays absent: containerd's default applies
    text = rewritten.replace("# Pulls", "# my own note\n# Pulls")
    (tmp_path / "docker.io" / "hosts.toml").write_text(text)
    assert _run(["--hosts-dir", str(tmp_path), "--endpoint", ENDPOINT, "--registry", "docker.io"]) == 0
    assert (tmp_path / "docker.io" / "hosts.toml").read_text() == text


def test_cli_dry_run_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "seed.example:5000"
    directory.mkdir()
    (directory / "hosts.toml").write_text(EXISTING)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    argv = [
        "--hosts-dir",
        str(tmp_path),
        "--endpoint",
        ENDPOINT,
        "--registry",
        "seed.example:5000",
        "--registry",
        "docker.io",
        "--dry-run",
    ]
    assert _run(argv) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert (directory / "hosts.toml").read_text() == EXISTING
    assert f"# ===== {directory / 'hosts.toml'} (would update)" in out
    assert f"# ===== {tmp_path / 'docker.io' / 'hosts.toml'} (would create)" in out
    assert 'server = "https://registry-1.docker.io"' in out and '"https://mirror.corp.example"' in out


def test_cli_bad_input_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "broken.example").mkdir()
    (tmp_path / "broken.example" / "hosts.toml").write_text("server = [\n")
    base = ["--hosts-dir", str(tmp_path), "--endpoint", ENDPOINT]
    assert _run([*base, "--registry", "docker.io", "--registry", "broken.example"]) == 2
    assert not (tmp_path / "docker.io").exists()  # every file is planned before any is written
    assert "broken.example/hosts.toml: invalid TOML" in capsys.readouterr().err
    assert _run(base) == 2
    assert _run([*base, "--registry", "docker.io", "--registry", "docker.io"]) == 2
    assert _run([*base, "--registry", "docker.io", "--dial-timeout", "200"]) == 2
    assert _run(["--hosts-dir", str(tmp_path), "--endpoint", "127.0.0.1:5080", "--registry", "docker.io"]) == 2
    assert not (tmp_path / "docker.io").exists()


def test_cli_prefers_existing_host_underscore_port_directory(tmp_path: Path) -> None:
    # containerd looks up "seed.example:5000" as "seed.example_5000_" first
    (tmp_path / "seed.example_5000_").mkdir()
    assert _run(["--hosts-dir", str(tmp_path), "--endpoint", ENDPOINT, "--registry", "seed.example:5000"]) == 0
    assert (tmp_path / "seed.example_5000_" / "hosts.toml").exists()
    assert not (tmp_path / "seed.example:5000").exists()


def test_cli_carries_docker_cert_files_into_a_new_file(tmp_path: Path) -> None:
    directory = tmp_path / "seed.example:5000"
    directory.mkdir()
    for name in ("ca.crt", "client.cert", "client.key"):
        (directory / name).write_text("pem")
    assert _run(["--hosts-dir", str(tmp_path), "--endpoint", ENDPOINT, "--registry", "seed.example:5000"]) == 0
    doc = _read(directory / "hosts.toml")
    assert doc["ca"] == ["ca.crt"] and doc["client"] == [["client.cert", "client.key"]]
    assert "ca" not in doc["host"][ENDPOINT]


def test_apply_change_keeps_mode_and_numbers_same_second_backups(tmp_path: Path) -> None:
    path = tmp_path / "r" / "hosts.toml"
    path.parent.mkdir()
    path.write_text("old\n")
    path.chmod(0o600)
    now = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.UTC)
    first = apply_change(FileChange(path, True, "new\n", "new\n"), now=now)
    second = apply_change(FileChange(path, True, "newer\n", "newer\n"), now=now)
    assert first is not None and first.name == "hosts.toml.bak.20240501T120000Z"
    assert second is not None and second.name == "hosts.toml.bak.20240501T120000Z.1"
    assert (first.read_text(), second.read_text(), path.read_text()) == ("old\n", "new\n", "newer\n")
    assert path.stat().st_mode & 0o777 == 0o600
    assert apply_change(FileChange(path, True, None, "newer\n")) is None


def test_plan_file_treats_an_empty_file_as_missing(tmp_path: Path) -> None:
    (tmp_path / "docker.io").mkdir()
    (tmp_path / "docker.io" / "hosts.toml").write_text("")
    change = plan_file(tmp_path, Target("docker.io"), ENDPOINT)
    assert change.existed and change.content is not None
    assert tomllib.loads(change.content)["server"] == "https://registry-1.docker.io"


# --------------------------------------------------------------------------- real containerd


class _NotFoundMirror(http.server.ThreadingHTTPServer):
    """A mirror that answers 404 to everything and records what containerd asked."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _not_found(self) -> None:
                mirror.paths.append(f"{self.command} {self.path}")
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD = _not_found

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def not_found_mirror() -> Iterator[_NotFoundMirror]:
    server = _NotFoundMirror()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.root
def test_containerd_pulls_through_generated_files_when_p2pd_is_down(
    tmp_path: Path,
    reference_registry: ReferenceRegistry,
    containerd: PrivateContainerd,
    not_found_mirror: _NotFoundMirror,
) -> None:
    """Files written by this module are valid for containerd 1.6 and fall back to ``server``.

    1. ``seed.local:5000`` (a name nothing resolves) with ``server`` = the registry and a p2pd endpoint on a
       closed port: the pull can only succeed through ``server``. The file also carries ``dial_timeout``, which
       containerd 1.6 does not know: the pull proves the unknown key is ignored.
    2. ``--all``: ``_default/hosts.toml`` without ``server`` and a mirror that answers 404: containerd asks the
       mirror first (with ``ns=``), then falls back to the registry named in the image reference.
    """
    layer = make_tar_layer({"hello.txt": b"hello from p2pd\n"})
    digest, _ = write_layout_image(tmp_path / "layout", [layer], tag="v1")
    skopeo.copy(
        OciLayout(tmp_path / "layout").ref("v1"),
        f"docker://{reference_registry.host}/lab/tiny:v1",
        preserve_digests=True,
    )
    hosts = tmp_path / "certs.d"

    dead = f"http://127.0.0.1:{free_port()}"
    assert (
        _run(["--hosts-dir", str(hosts), "--endpoint", dead, "--registry", f"seed.local:5000={reference_registry.url}"])
        == 0
    )
    assert 'dial_timeout = "200ms"' in (hosts / "seed.local:5000" / "hosts.toml").read_text()
    named = "seed.local:5000/lab/tiny:v1"
    containerd.pull(named, hosts_dir=hosts, timeout=30)
    assert containerd.image_digest(named) == digest

    containerd.remove_all()
    assert _run(["--hosts-dir", str(hosts), "--endpoint", not_found_mirror.url, "--all"]) == 0
    assert "server" not in _read(hosts / "_default" / "hosts.toml")
    direct = f"{reference_registry.host}/lab/tiny:v1"
    # --plain-http: without a server line containerd builds the URL from the reference, https unless told
    containerd.pull(direct, hosts_dir=hosts, plain_http=True, timeout=30)
    assert containerd.image_digest(direct) == digest
    assert not_found_mirror.paths, "containerd never asked the mirror"
    first = urllib.parse.unquote(not_found_mirror.paths[0])  # containerd sends ns=127.0.0.1%3APORT
    assert first == f"HEAD /v2/lab/tiny/manifests/v1?ns={reference_registry.host}"
