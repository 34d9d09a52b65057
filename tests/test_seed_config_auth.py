"""Loading ``[auth]``, ``[[access]]``, ``[audit]``, ``[server] upload_rate``: deny by default, what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from seed.config import ConfigError, load_config


def _load(tmp_path: Path, text: str, **overrides: object):  # type: ignore[no-untyped-def]
    path = tmp_path / "seed.toml"
    path.write_text(text)
    return load_config(path, data=tmp_path / "data", **overrides)


def test_no_auth_is_open_only_on_loopback(tmp_path: Path) -> None:
    config = _load(tmp_path, "", listen="127.0.0.1:5000", serving=True)
    assert not config.auth.enforced
    with pytest.raises(ConfigError, match="without access control"):
        _load(tmp_path, "", listen="0.0.0.0:5000", serving=True)
    assert _load(tmp_path, "", listen="0.0.0.0:5000", serving=True, open=True).auth.mode == "open"
    assert _load(tmp_path, '[auth]\nmode = "open"\n', listen="0.0.0.0:5000", serving=True).auth.mode == "open"
    # Maintenance commands read the same file without serving it.
    assert _load(tmp_path, "[server]\nlisten = '0.0.0.0:5000'\n").auth.mode == "enforce"


def test_auth_is_enforced_and_rules_load(tmp_path: Path) -> None:
    config = _load(tmp_path, """
[auth]
service = "seed.example"
[auth.token]
expiry = 120
[[access]]
repositories = "team/**"
groups = ["team"]
role = "push"
""", listen="0.0.0.0:5000", serving=True)
    assert config.auth.enforced and config.auth.token.expiry == 120
    assert config.access[0].repositories == ("team/**",) and config.access[0].actions == {"pull", "push"}


@pytest.mark.parametrize(("text", "message"), [
    ('[[access]]\nrepositories = ["a/**"]\nusers = ["x"]\nrole = "pull"\n', "need an \\[auth\\]"),
    ('[auth]\n[[access]]\nrepositories = ["a/**"]\nrole = "pull"\n', "names nobody"),
    ('[auth]\n[[access]]\nrepositories = ["a/**"]\nusers = ["x"]\nrole = "owner"\n', "unknown role"),
    ('[auth]\n[[access]]\nrepositories = ["a b"]\nusers = ["x"]\nrole = "pull"\n', "invalid repository pattern"),
    ('[auth]\n[[access]]\nrepositories = ["a"]\nusers = "x"\nrole = "pull"\n', "list of strings"),
    ('[auth]\n[[access]]\nrepositories = ["a"]\nusers = ["x"]\nrole = "pull"\nadmins = true\n', "unknown setting"),
    ('[auth]\nproviders = ["ldap:nope"]\n', "unknown provider"),
    ('[auth]\nmode = "maybe"\n', "auth.mode"),
    ('[auth]\nconfigured = true\n', "unknown setting"),
    ('[auth.token]\nexpiry = 0\n', "expiry"),
    ('[auth]\n[[auth.issuer]]\nname = "sso"\nissuer = "https://sso"\naudience = "seed"\n', "exactly one"),
    ('[auth]\n[[auth.ldap]]\nname = "a"\nurl = "ldap://x"\nbind_template = "uid={username},dc=x"\n'
     '[[auth.ldap]]\nname = "a"\nurl = "ldap://y"\nbind_template = "uid={username},dc=x"\n', "unique"),
    ("[audit]\nrotate = 5\n", "unknown setting"),
    ("[nonsense]\n", "unknown sections"),
])
def test_bad_auth_configuration_is_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, text)


@pytest.mark.parametrize("value", ["-1", "true", '"1M"', "1.5"])
def test_the_upload_rate_is_a_whole_number_of_bytes_per_second(tmp_path: Path, value: str) -> None:
    """``[server] upload_rate`` (the rate the blob downloads in progress share, paced): bytes per
    second, 0 (the default) for none; the command line's ``--upload-rate`` wins over the file."""
    assert _load(tmp_path, "[server]\nupload_rate = 2500000\n").server.upload_rate == 2_500_000
    assert _load(tmp_path, "[server]\nupload_rate = 2500000\n", upload_rate=0).server.upload_rate == 0
    assert _load(tmp_path, "").server.upload_rate == 0
    with pytest.raises(ConfigError, match=r"server\.upload_rate"):
        _load(tmp_path, f"[server]\nupload_rate = {value}\n")


def test_the_upload_rate_flag_reaches_the_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``seed serve --upload-rate`` is checked like ``[server] upload_rate`` (a refused value stops it)."""
    from seed.cli import main

    assert main(["serve", "--data", str(tmp_path / "data"), "--upload-rate", "-1"]) == 2
    assert "server.upload_rate" in capsys.readouterr().err
