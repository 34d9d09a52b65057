"""The access decision (seed/access.py), without I/O: globs, roles, rules, tokens as ceilings."""

from __future__ import annotations

import pytest

from p2pd.errors import ConfigError
from seed.access import (
    ACTIONS,
    AccessPolicy,
    AccessRule,
    Need,
    actions_of_role,
    compile_glob,
    expand_actions,
    needs_for,
)
from seed.auth.identity import ANONYMOUS, Grant, Principal

ALICE = Principal(kind="user", name="alice", groups=frozenset({"team-a"}), provider="htpasswd")
BOB = Principal(kind="user", name="bob", provider="htpasswd")
CI = Principal(kind="robot", name="robot$ci", provider="robot",
               grants=(Grant("team/*", frozenset({"pull", "push"})),))


@pytest.mark.parametrize(("pattern", "name", "expected"), [
    ("team-a/**", "team-a/app", True),
    ("team-a/**", "team-a/x/y", True),
    ("team-a/**", "team-a", False),
    ("team-a/**", "team-ab/app", False),
    ("team/*", "team/app", True),
    ("team/*", "team/app/sub", False),
    ("**", "anything/at/all", True),
    ("*", "top", True),
    ("*", "a/b", False),
    ("app?", "app1", True),
    ("app?", "app/", False),
    ("a.b", "aXb", False),  # dots are literal
])
def test_glob_matching(pattern: str, name: str, expected: bool) -> None:
    assert bool(compile_glob(pattern).fullmatch(name)) is expected


@pytest.mark.parametrize("pattern", ["", "a b", "team/[ab]", "x/***", "a\\b", "a" * 300, "(evil)"])
def test_bad_globs_are_config_errors(pattern: str) -> None:
    with pytest.raises(ConfigError):
        compile_glob(pattern)


def test_roles_nest() -> None:
    assert actions_of_role("pull") == {"pull"}
    assert actions_of_role("push") == {"pull", "push"}
    assert actions_of_role("delete") == {"pull", "push", "delete"}
    assert actions_of_role("admin") == set(ACTIONS)
    assert expand_actions(["*"]) == set(ACTIONS)
    assert expand_actions(["push", "bogus"]) == {"pull", "push"}
    with pytest.raises(ValueError):
        actions_of_role("owner")


def test_rule_must_name_someone_and_know_its_role() -> None:
    with pytest.raises(ConfigError):
        AccessRule(repositories=("a/**",), role="pull")
    with pytest.raises(ConfigError):
        AccessRule(repositories=("a/**",), role="superuser", users=("alice",))
    with pytest.raises(ConfigError):
        AccessRule(repositories=(), role="pull", users=("alice",))


def _policy() -> AccessPolicy:
    return AccessPolicy([
        AccessRule(repositories=("team-a/**",), role="push", groups=("team-a",)),
        AccessRule(repositories=("team-a/**",), role="pull", users=("bob",)),
        AccessRule(repositories=("public/**",), role="pull", anonymous=True),
        AccessRule(repositories=("shared/**",), role="pull", authenticated=True),
        AccessRule(repositories=("ops/**",), role="delete", robots=("ci",)),
    ])


def test_deny_by_default() -> None:
    policy = _policy()
    assert policy.actions_for(BOB, "private/x") == frozenset()
    assert policy.actions_for(ANONYMOUS, "team-a/app") == frozenset()
    assert not policy.decide(ANONYMOUS, [Need("team-a/app", "pull")]).allowed


def test_rules_by_group_user_anonymous_authenticated_robot() -> None:
    policy = _policy()
    assert policy.actions_for(ALICE, "team-a/app") == {"pull", "push"}
    assert policy.actions_for(BOB, "team-a/app") == {"pull"}
    assert policy.actions_for(ANONYMOUS, "public/base") == {"pull"}
    assert policy.actions_for(BOB, "public/base") == {"pull"}
    assert policy.actions_for(BOB, "shared/tool") == {"pull"}
    assert policy.actions_for(ANONYMOUS, "shared/tool") == frozenset()
    # A robot: its own grants plus rules that name it, never user rules by name.
    assert policy.actions_for(CI, "team/app") == {"pull", "push"}
    assert policy.actions_for(CI, "ops/tool") == {"pull", "push", "delete"}
    assert policy.actions_for(CI, "team-a/app") == frozenset()
    impostor = Principal(kind="user", name="robot$ci")
    assert policy.actions_for(impostor, "ops/tool") == frozenset()


def test_token_is_a_ceiling_not_a_floor() -> None:
    policy = _policy()
    need = [Need("team-a/app", "push")]
    assert policy.decide(ALICE, need, {"team-a/app": frozenset({"pull", "push"})}).allowed
    assert not policy.decide(ALICE, need, {"team-a/app": frozenset({"pull"})}).allowed
    # A token that claims more than the policy now allows does not help.
    assert not policy.decide(BOB, need, {"team-a/app": frozenset({"pull", "push"})}).allowed
    # A token for repository A says nothing about B.
    assert not policy.decide(ALICE, [Need("team-a/other", "pull")], {"team-a/app": frozenset({"pull"})}).allowed


def test_mount_needs_pull_on_the_source() -> None:
    needs = needs_for("upload", "POST", "team-a/app", {"mount": ["sha256:" + "0" * 64], "from": ["private/x"]})
    assert needs == (Need("team-a/app", "push"), Need("private/x", "pull"))
    decision = _policy().decide(ALICE, needs)
    assert not decision.allowed and decision.missing == (Need("private/x", "pull"),)


def test_unknown_route_method_needs_admin() -> None:
    assert needs_for("manifest", "PROPFIND", "a", {}) == (Need("a", "admin"),)


def test_catalog_and_base() -> None:
    policy = _policy()
    assert policy.decide(BOB, needs_for("catalog", "GET", None, {})).allowed
    assert policy.visible(BOB, ["public/base", "private/x", "team-a/app", "shared/tool"]) == [
        "public/base", "team-a/app", "shared/tool"]
    assert policy.visible(ANONYMOUS, ["public/base", "private/x"]) == ["public/base"]
    # Without credentials /v2/ asks to log in even when something is public (that 401 is how
    # clients learn the realm); with an anonymous token it answers.
    assert not policy.decide(ANONYMOUS, needs_for("base", "GET", None, {})).allowed
    assert policy.decide(ANONYMOUS, needs_for("base", "GET", None, {}), {}).allowed
    assert policy.decide(ANONYMOUS, [Need("public/base", "pull")]).allowed


def test_grantable_intersects_requested_with_allowed() -> None:
    policy = _policy()
    assert policy.grantable(BOB, "team-a/app", {"pull", "push"}) == {"pull"}
    assert policy.grantable(ALICE, "team-a/app", {"pull", "push", "delete"}) == {"pull", "push"}
    assert policy.grantable(ANONYMOUS, "team-a/app", {"pull"}) == frozenset()
    assert policy.grantable(CI, "ops/x", {"*"}) == frozenset()  # delete is not admin


def test_open_mode_allows_everything() -> None:
    policy = AccessPolicy([], open_mode=True)
    assert policy.actions_for(ANONYMOUS, "x") == set(ACTIONS)
    assert policy.decide(ANONYMOUS, [Need("x", "delete")]).allowed


def test_scope_strings_of_needs() -> None:
    assert Need("a/b", "pull").scope() == "repository:a/b:pull"
    assert Need("a/b", "push").scope() == "repository:a/b:pull,push"
    assert Need("a/b", "delete").scope() == "repository:a/b:delete"
    assert Need(None, "catalog").scope() == "registry:catalog:*"
