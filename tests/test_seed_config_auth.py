"""Loading ``[auth]``, ``[[access]]`` and ``[audit]``: deny by default, and what is refused."""

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
