"""HtpasswdProvider against files written by Apache's own ``htpasswd`` (apache2-utils)."""

from __future__ import annotations

import time
from pathlib import Path

import bcrypt
import pytest

from seed.auth.htpasswd import MAX_FILE_SIZE, MAX_LINE_LENGTH, MAX_LINES, HtpasswdProvider
from seed.auth.identity import IdentityProvider, Principal
from seed.errors import ConfigError
from tests.harness.tools import require_tool, run


@pytest.fixture
def htpasswd() -> str:
    return require_tool("htpasswd")


def add_user(tool: str, path: Path, user: str, password: str, *flags: str) -> None:
    """``htpasswd -b<flags> FILE USER PASSWORD`` (``-c`` creates the file)."""
    create = "c" if not path.exists() else ""
    run([tool, f"-b{create}{''.join(flags)}", str(path), user, password], timeout=30)


def hash_of(path: Path, user: str) -> str:
    for line in path.read_text().splitlines():
        if line.startswith(f"{user}:"):
            return line.split(":", 1)[1]
    raise AssertionError(f"{user} not in {path}")


def test_bcrypt_users_log_in(tmp_path: Path, htpasswd: str) -> None:
    path = tmp_path / "htpasswd"
    add_user(htpasswd, path, "alice", "correct horse", "B")
    add_user(htpasswd, path, "bob", "battery staple", "B", "C", "6")  # -bBC 6: cost 6
    provider = HtpasswdProvider(path)
    assert isinstance(provider, IdentityProvider)
    assert provider.name == "htpasswd"
    assert len(provider) == 2
    assert hash_of(path, "alice").startswith("$2y$05$")
    assert provider.authenticate("alice", "correct horse") == Principal(kind="user", name="alice", provider="htpasswd")
    assert provider.authenticate("bob", "battery staple") == Principal(kind="user", name="bob", provider="htpasswd")
    assert provider.authenticate("alice", "battery staple") is None
    assert provider.authenticate("alice", "") is None
    assert provider.authenticate("Alice", "correct horse") is None  # htpasswd names are case-sensitive
    assert provider.authenticate("mallory", "correct horse") is None
    assert provider.authenticate("alice", "correct horse\x00") is None


def test_all_bcrypt_prefixes_accepted(tmp_path: Path) -> None:
    # htpasswd writes $2y$; other tools (and the bcrypt package) write $2b$ or $2a$.
    two_b = bcrypt.hashpw(b"pw-b", bcrypt.gensalt(rounds=4)).decode()
    two_a = bcrypt.hashpw(b"pw-a", bcrypt.gensalt(rounds=4, prefix=b"2a")).decode()
    path = tmp_path / "htpasswd"
    path.write_text(f"carol:{two_b}\ndave:{two_a}\n")
    provider = HtpasswdProvider(path)
    assert provider.authenticate("carol", "pw-b") is not None
    assert provider.authenticate("dave", "pw-a") is not None
    assert provider.authenticate("dave", "pw-b") is None


def test_long_password_matches_apache(tmp_path: Path, htpasswd: str) -> None:
    # Apache's bcrypt uses the first 72 bytes, as every bcrypt does; so must we (bcrypt>=5 raises instead).
    password = "p" * 60 + "é" * 20  # 100 bytes
    path = tmp_path / "htpasswd"
    add_user(htpasswd, path, "long", password, "B", "C", "4")
    provider = HtpasswdProvider(path)
    assert provider.authenticate("long", password) is not None
    assert provider.authenticate("long", password[:60] + "é" * 6) is not None  # the same first 72 bytes
    assert provider.authenticate("long", password[:60] + "é" * 5) is None


def test_comments_blank_lines_and_crlf(tmp_path: Path, htpasswd: str) -> None:
    made = tmp_path / "made"
    add_user(htpasswd, made, "alice", "pw", "B", "C", "4")
    path = tmp_path / "htpasswd"
    path.write_bytes(b"# managed by ops\r\n\r\n   \n" + made.read_bytes().replace(b"\n", b"\r\n") + b"  # trailing\n")
    provider = HtpasswdProvider(path)
    assert len(provider) == 1
    assert provider.authenticate("alice", "pw") is not None


def test_other_hash_types_refused_with_lines_and_users(tmp_path: Path, htpasswd: str) -> None:
    path = tmp_path / "htpasswd"
    add_user(htpasswd, path, "alice", "pw", "B", "C", "4")
    add_user(htpasswd, path, "carol", "pw", "m")  # apr1-MD5
    add_user(htpasswd, path, "dave", "pw", "s")  # {SHA}
    add_user(htpasswd, path, "erin", "pw", "d")  # DES crypt
    add_user(htpasswd, path, "frank", "plain-s3cret", "p")  # plain text
    hashes = [hash_of(path, u) for u in ("carol", "dave", "erin")]
    assert hashes[0].startswith("$apr1$") and hashes[1].startswith("{SHA}")
    with pytest.raises(ConfigError) as info:
        HtpasswdProvider(path)
    message = str(info.value)
    for fragment in ("line 2 (user 'carol'): apr1", "line 3 (user 'dave'): SHA-1", "line 4 (user 'erin'): DES",
                     "line 5 (user 'frank'): plain", "htpasswd -B"):
        assert fragment in message
    for secret in [*hashes, hash_of(path, "alice"), "plain-s3cret"]:
        assert secret not in message


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("no-colon-here\n", "line 1: not of the form user:hash"),
        (":{hash}\n", "line 1: not of the form user:hash"),
        ("alice:{hash}\nalice:{hash}\n", "line 2 (user 'alice'): user listed twice"),
        ("alice:{cost18}\n", "line 1 (user 'alice'): bcrypt cost 18 outside 4..17"),
        ("alice:$2y$05$tooshort\n", "line 1 (user 'alice'): malformed bcrypt"),
        ("alice:$6$salt$hash\n", "line 1 (user 'alice'): crypt(3)"),
    ],
)
def test_malformed_entries_refused(tmp_path: Path, content: str, fragment: str) -> None:
    good = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    path = tmp_path / "htpasswd"
    path.write_text(content.format(hash=good, cost18=good[:4] + "18" + good[6:]))
    with pytest.raises(ConfigError, match="only bcrypt") as info:
        HtpasswdProvider(path)
    assert fragment in str(info.value)


def test_non_utf8_and_long_lines_refused(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_bytes(b"# ok\n\xff\xfe:x\n" + b"u:" + b"a" * MAX_LINE_LENGTH + b"\n")
    with pytest.raises(ConfigError) as info:
        HtpasswdProvider(path)
    assert "line 2: not UTF-8" in str(info.value)
    assert f"line 3: longer than {MAX_LINE_LENGTH} bytes" in str(info.value)


def test_reading_is_bounded(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with big.open("wb") as handle:
        handle.truncate(MAX_FILE_SIZE + 1)
    with pytest.raises(ConfigError, match="bytes"):
        HtpasswdProvider(big)
    many = tmp_path / "many"
    many.write_bytes(b"#\n" * MAX_LINES)  # MAX_LINES newlines: MAX_LINES + 1 lines
    with pytest.raises(ConfigError, match="lines"):
        HtpasswdProvider(many)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read htpasswd file"):
        HtpasswdProvider(tmp_path / "absent")


def test_empty_file_knows_nobody(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    path.write_text("# nobody yet\n")
    provider = HtpasswdProvider(path)
    assert len(provider) == 0
    assert provider.authenticate("alice", "pw") is None


def test_reload_picks_up_changes_and_keeps_old_table_on_error(tmp_path: Path, htpasswd: str) -> None:
    path = tmp_path / "htpasswd"
    add_user(htpasswd, path, "alice", "one", "B", "C", "4")
    provider = HtpasswdProvider(path)
    add_user(htpasswd, path, "bob", "two", "B", "C", "4")
    add_user(htpasswd, path, "alice", "three", "B", "C", "4")  # password changed
    assert provider.authenticate("bob", "two") is None
    assert provider.reload() == 2
    assert provider.authenticate("bob", "two") is not None
    assert provider.authenticate("alice", "three") is not None
    assert provider.authenticate("alice", "one") is None
    run([htpasswd, "-D", str(path), "bob"], timeout=30)
    add_user(htpasswd, path, "carol", "pw", "m")  # an apr1 entry slips in
    with pytest.raises(ConfigError, match="carol"):
        provider.reload()
    assert provider.authenticate("bob", "two") is not None  # the last good table still answers
    path.write_text(path.read_text().replace(f"carol:{hash_of(path, 'carol')}\n", ""))
    assert provider.reload() == 1
    assert provider.authenticate("bob", "two") is None


def _fastest(provider: HtpasswdProvider, user: str, password: str, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        provider.authenticate(user, password)
        best = min(best, time.perf_counter() - start)
    return best


def test_unknown_user_costs_a_bcrypt_check(tmp_path: Path, htpasswd: str) -> None:
    path = tmp_path / "htpasswd"
    for user in ("alice", "bob", "carol"):
        add_user(htpasswd, path, user, "pw", "B", "C", "8")
    add_user(htpasswd, path, "dave", "pw", "B", "C", "4")
    provider = HtpasswdProvider(path)
    # The dummy hash has the file's most common cost, so an unknown user takes as long as most users.
    assert provider._table.dummy.startswith(b"$2b$08$")
    known = _fastest(provider, "alice", "wrong")
    unknown = _fastest(provider, "nobody", "wrong")
    # Minimum of several runs: scheduling noise only ever adds time. Cost 8 vs no hashing is
    # a factor of thousands; a factor of two is a safe margin on a busy machine.
    assert unknown > known / 2


def test_dummy_hash_follows_the_usual_cost_across_reloads(tmp_path: Path, htpasswd: str) -> None:
    path = tmp_path / "htpasswd"
    add_user(htpasswd, path, "alice", "pw", "B", "C", "4")
    provider = HtpasswdProvider(path)
    dummy = provider._table.dummy
    assert dummy.startswith(b"$2b$04$")
    add_user(htpasswd, path, "bob", "pw", "B", "C", "4")
    provider.reload()
    assert provider._table.dummy is dummy  # same cost: no new bcrypt round on SIGHUP
    add_user(htpasswd, path, "carol", "pw", "B", "C", "6")
    add_user(htpasswd, path, "dave", "pw", "B", "C", "6")
    add_user(htpasswd, path, "erin", "pw", "B", "C", "6")
    provider.reload()
    assert provider._table.dummy.startswith(b"$2b$06$")
