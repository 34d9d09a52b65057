"""``p2pd registries-config`` (the drop-in writer) and ``p2pd.mirror_prefix`` (the path both sides agree on).

The real podman reading the file is tests/test_p2pd_podman.py; here: content, merging with the files
read before ours, idempotence, dry runs, refusals.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import p2pd.cli
from p2pd.errors import ConfigError
from p2pd.mirror_prefix import PREFIX_MARKER, namespace_component, prefix_path, split_prefixed_name
from p2pd.oci.errors import OCIError
from p2pd.oci.grammar import is_valid_name
from p2pd.registries_config import Endpoint, merge_registry, parse_endpoint, parse_namespace

ENDPOINT = "http://127.0.0.1:5080"


def run(tmp_path: Path, *args: str) -> int:
    return p2pd.cli.main(["registries-config", "--dir", str(tmp_path / "registries.conf.d"), *args])


def drop_in(tmp_path: Path) -> Path:
    return tmp_path / "registries.conf.d" / "50-p2pd.conf"


def tables(path: Path) -> dict[str, dict[str, object]]:
    return {t["prefix"]: t for t in tomllib.loads(path.read_text())["registry"]}


# ---- the path prefix ----------------------------------------------------------------------

_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)


@given(labels=st.lists(_LABEL, min_size=1, max_size=4), port=st.none() | st.integers(1, 65535))
def test_prefix_round_trips_and_is_a_repository_component(labels: list[str], port: int | None) -> None:
    namespace = ".".join(labels) + (f":{port}" if port is not None else "")
    component = namespace_component(namespace)
    assert "/" not in component and is_valid_name(component)
    assert split_prefixed_name(f"{prefix_path(namespace)}/team/app") == (namespace, "team/app")


def test_prefix_examples_and_refusals() -> None:
    assert prefix_path("seed.local:5000") == "p2pd-ns/seed.local__5000"
    assert prefix_path("docker.io") == "p2pd-ns/docker.io"
    assert split_prefixed_name("team/app") is None
    assert split_prefixed_name(f"{PREFIX_MARKER}x/app") is None  # only the exact marker
    for bad in ("[::1]:5000", "Seed.local", "seed.local:0", "seed.local:70000", "a_b", "-a.b", ""):
        with pytest.raises(ValueError):
            namespace_component(bad)
    for bad in (f"{PREFIX_MARKER}/seed.local__5000", f"{PREFIX_MARKER}/a_b/app", f"{PREFIX_MARKER}/a__/app"):
        with pytest.raises(OCIError) as caught:
            split_prefixed_name(bad)
        assert caught.value.code == "NAME_INVALID"


# ---- content ------------------------------------------------------------------------------


def test_creates_one_drop_in_with_p2pd_as_first_mirror(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path, "--endpoint", ENDPOINT, "--registry", "Seed.Local:5000", "--registry", "docker.io") == 0
    assert f"created {drop_in(tmp_path)}" in capsys.readouterr().out
    assert [p.name for p in drop_in(tmp_path).parent.iterdir()] == ["50-p2pd.conf"]
    found = tables(drop_in(tmp_path))
    assert list(found) == ["seed.local:5000", "docker.io"]
    assert found["seed.local:5000"] == {
        "prefix": "seed.local:5000", "location": "seed.local:5000",
        "mirror": [{"location": "127.0.0.1:5080/p2pd-ns/seed.local__5000", "insecure": True,
                    "pull-from-mirror": "all"}],
    }
    assert found["docker.io"]["mirror"] == [{"location": "127.0.0.1:5080/p2pd-ns/docker.io", "insecure": True,
                                             "pull-from-mirror": "all"}]
    assert drop_in(tmp_path).stat().st_mode & 0o777 == 0o644


def test_https_endpoint_is_not_insecure(tmp_path: Path) -> None:
    assert run(tmp_path, "--endpoint", "https://node.example:5443/", "--registry", "docker.io") == 0
    assert tables(drop_in(tmp_path))["docker.io"]["mirror"] == [
        {"location": "node.example:5443/p2pd-ns/docker.io", "pull-from-mirror": "all"}]


def test_idempotent_and_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--endpoint", ENDPOINT, "--registry", "seed.local:5000")
    assert run(tmp_path, *args, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "(would create)" in out and "p2pd-ns/seed.local__5000" in out
    assert not drop_in(tmp_path).exists()

    assert run(tmp_path, *args) == 0
    before = drop_in(tmp_path).stat()
    capsys.readouterr()
    assert run(tmp_path, *args) == 0
    assert capsys.readouterr().out == f"unchanged {drop_in(tmp_path)}\n"
    after = drop_in(tmp_path).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    assert run(tmp_path, *args, "--dry-run") == 0
    assert "(unchanged)" in capsys.readouterr().out

    assert run(tmp_path, "--endpoint", "http://127.0.0.1:6080", "--registry", "seed.local:5000") == 0
    assert f"updated {drop_in(tmp_path)}" in capsys.readouterr().out
    assert [p.name for p in drop_in(tmp_path).parent.iterdir()] == ["50-p2pd.conf"]  # no temp files left


def test_keeps_what_earlier_files_say_and_leaves_every_other_file_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    directory = tmp_path / "registries.conf.d"
    directory.mkdir()
    main = tmp_path / "registries.conf"
    main.write_text('unqualified-search-registries = ["docker.io"]\n\n[[registry]]\nlocation = "seed.local:5000"\n'
                    'insecure = true\n\n[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n'
                    "mirror-by-digest-only = true\n[[registry.mirror]]\nlocation = \"mirror.example/hub\"\n")
    (directory / "10-site.conf").write_text('[[registry]]\nprefix = "quay.io"\nlocation = "quay.io"\n'
                                            'blocked = false\nfuture-key = "kept"\n')
    (directory / "90-late.conf").write_text('[[registry]]\nlocation = "quay.io"\n')
    (directory / "notes.txt").write_text("not a drop-in\n")
    others = {p: p.read_bytes() for p in (main, *directory.iterdir())}

    assert run(tmp_path, "--endpoint", ENDPOINT, "--registry", "seed.local:5000", "--registry", "docker.io",
               "--registry", "quay.io") == 0
    assert {p: p.read_bytes() for p in others} == others
    assert "90-late.conf is read after 50-p2pd.conf: its [[registry]] for quay.io replaces p2pd's" in \
        capsys.readouterr().err
    found = tables(drop_in(tmp_path))
    assert found["seed.local:5000"]["insecure"] is True
    # mirror-by-digest-only would keep p2pd out of tag pulls: the same meaning moves to the old mirrors.
    assert "mirror-by-digest-only" not in found["docker.io"]
    assert found["docker.io"]["mirror"] == [
        {"location": "127.0.0.1:5080/p2pd-ns/docker.io", "insecure": True, "pull-from-mirror": "all"},
        {"location": "mirror.example/hub", "pull-from-mirror": "digest-only"},
    ]
    assert found["quay.io"]["future-key"] == "kept" and found["quay.io"]["blocked"] is False


def test_rerun_replaces_its_own_mirror_instead_of_adding_one() -> None:
    endpoint = Endpoint("127.0.0.1:5080", insecure=True)
    once = merge_registry("docker.io", endpoint, None)
    again = merge_registry("docker.io", endpoint, {**once.settings, "mirror": list(once.mirrors)})
    assert again == once


def test_all_reads_the_agents_registries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "p2pd.toml"
    config.write_text('allow_registries = ["ghcr.io", "*.example.com", "docker.io"]\n\n'
                      '[[upstream]]\nnamespace = "seed.local:5000"\nurl = "http://10.0.0.5:5000"\n\n'
                      '[[upstream]]\nnamespace = "[fd00::5]:5000"\nurl = "http://[fd00::5]:5000"\n')
    assert run(tmp_path, "--endpoint", ENDPOINT, "--all", "--config", str(config), "--registry", "docker.io") == 0
    assert list(tables(drop_in(tmp_path))) == ["docker.io", "seed.local:5000", "ghcr.io"]
    err = capsys.readouterr().err
    assert "*.example.com: registries.conf has no mirror that keeps the host" in err
    assert "[fd00::5]:5000" in err


# ---- refusals -----------------------------------------------------------------------------

REFUSALS = [
    (("--endpoint", "ftp://127.0.0.1:5080", "--registry", "docker.io"), "--endpoint must be an http"),
    (("--endpoint", "http://127.0.0.1:5080/v2", "--registry", "docker.io"), "scheme://host:port only"),
    (("--endpoint", "http://u:p@127.0.0.1:5080", "--registry", "docker.io"), "scheme://host:port only"),
    (("--endpoint", ENDPOINT, "--registry", "seed.local:5000=http://seed"), "registry host only"),
    (("--endpoint", ENDPOINT, "--registry", "[::1]:5000"), "cannot be named in a mirror path"),
    (("--endpoint", ENDPOINT, "--registry", "seed/x"), "cannot be named in a mirror path"),
    (("--endpoint", ENDPOINT), "at least one --registry"),
    (("--endpoint", ENDPOINT, "--all"), "give --config FILE"),
    (("--endpoint", ENDPOINT, "--registry", "docker.io", "--registry", "DOCKER.IO"), "given twice"),
    (("--endpoint", ENDPOINT, "--registry", "docker.io", "--file-name", "p2pd.toml"), "ending in .conf"),
    (("--endpoint", ENDPOINT, "--registry", "docker.io", "--file-name", "../50-p2pd.conf"), "plain name"),
]


@pytest.mark.parametrize(("args", "message"), REFUSALS, ids=[m for _a, m in REFUSALS])
def test_bad_input_is_refused_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         args: tuple[str, ...], message: str) -> None:
    assert run(tmp_path, *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "registries.conf.d").exists()


def test_bad_existing_files_are_refused_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    directory = tmp_path / "registries.conf.d"
    directory.mkdir()
    ours = directory / "50-p2pd.conf"
    ours.write_text('[[registry]]\nlocation = "hand.written"\n')
    assert run(tmp_path, "--endpoint", ENDPOINT, "--registry", "docker.io") == 2
    assert "was not written by p2pd registries-config" in capsys.readouterr().err
    ours.unlink()
    (directory / "20-broken.conf").write_text("[[registry]\n")
    assert run(tmp_path, "--endpoint", ENDPOINT, "--registry", "docker.io") == 2
    assert "20-broken.conf: invalid TOML" in capsys.readouterr().err
    (directory / "20-broken.conf").write_text('[[registry]]\nlocation = "127.0.0.1:5080/p2pd-ns/docker.io"\n'
                                              'prefix = "docker.io"\n')
    assert run(tmp_path, "--endpoint", ENDPOINT, "--registry", "docker.io") == 2
    assert "its location is the p2pd endpoint itself" in capsys.readouterr().err
    assert sorted(os.listdir(directory)) == ["20-broken.conf"]


def test_parsers() -> None:
    assert parse_endpoint("HTTP://Node:5080") == Endpoint("node:5080", insecure=True)
    assert parse_namespace("Seed.Local.:5000") == "seed.local:5000"
    with pytest.raises(ConfigError):
        parse_namespace("*.example.com")
