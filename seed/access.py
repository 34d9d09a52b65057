"""The seed's one authorization decision: may this principal do this to that repository?

Rules/invariants:
- Deny by default. A principal has an action on a repository only if an ``[[access]]`` rule
  that names it (user, group, robot, any authenticated caller, or anonymous) and matches the
  repository grants a role that includes the action, or, for robots, their own grants do.
- Roles nest: ``pull`` < ``push`` (pull, push) < ``delete`` (pull, push, delete) < ``admin``
  (everything, including signature and scan administration).
- A bearer token is a ceiling, never a floor: what a request may do is the token's granted
  actions intersected with what the policy grants now, so a rule removed by a reload or a
  revoked robot takes effect at once, not when the token expires.
- The decision depends only on the principal, the token and the repository *name*, never on
  whether the repository exists, so a refusal cannot reveal existence.
- Pure: no I/O, no clock. The registry derives the needs of a request with ``needs_for`` and
  calls ``AccessPolicy.decide`` once per request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from p2pd.errors import ConfigError
from p2pd.globs import compile_glob, validate_glob

from .auth.identity import Grant, Principal

__all__ = [
    "ACTIONS",
    "ROLES",
    "AccessPolicy",
    "AccessRule",
    "Decision",
    "Need",
    "actions_of_role",
    "compile_glob",
    "expand_actions",
    "needs_for",
    "validate_glob",
]

# Actions in increasing power; a role grants its own action and every weaker one.
ACTIONS = ("pull", "push", "delete", "admin")
ROLES = ACTIONS
# Token scopes say "*" for everything (Docker's convention); it means admin here.
_SCOPE_ALIASES = {"*": "admin"}


def actions_of_role(role: str) -> frozenset[str]:
    """``push`` → {pull, push}; ``admin`` → all actions."""
    role = _SCOPE_ALIASES.get(role, role)
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    return frozenset(ACTIONS[: ACTIONS.index(role) + 1])


def expand_actions(actions: Iterable[str]) -> frozenset[str]:
    """Closes a set of granted actions under the role order (admin implies the rest, and so on)."""
    result: set[str] = set()
    for action in actions:
        action = _SCOPE_ALIASES.get(action, action)
        if action in ROLES:
            result |= actions_of_role(action)
    return frozenset(result)


def _matches(patterns: Iterable[str], repository: str) -> bool:
    return any(compile_glob(p).fullmatch(repository) for p in patterns)


@dataclass(frozen=True, slots=True)
class AccessRule:
    """One ``[[access]]`` entry of the configuration.

    Attributes:
        repositories: globs of the repositories it covers.
        role: ``pull``, ``push``, ``delete`` or ``admin``.
        users, groups, robots: who it grants the role to (robots by name, with or without
            the ``robot$`` prefix).
        anonymous: grants the role to everyone, logged in or not (a public pattern).
        authenticated: grants the role to every logged-in caller.
    """

    repositories: tuple[str, ...]
    role: str
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    robots: tuple[str, ...] = ()
    anonymous: bool = False
    authenticated: bool = False
    actions: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        if not self.repositories:
            raise ConfigError("[[access]] needs at least one repositories pattern")
        for pattern in self.repositories:
            validate_glob(pattern)
        try:
            object.__setattr__(self, "actions", actions_of_role(self.role))
        except ValueError as exc:
            raise ConfigError(f"[[access]] {exc}") from exc
        if not (self.users or self.groups or self.robots or self.anonymous or self.authenticated):
            raise ConfigError(f"[[access]] for {list(self.repositories)} names nobody: add users, groups, "
                              "robots, anonymous = true or authenticated = true")
        robots = tuple(r if r.startswith("robot$") else f"robot${r}" for r in self.robots)
        object.__setattr__(self, "robots", robots)

    def applies_to(self, principal: Principal) -> bool:
        if self.anonymous:
            return True
        if principal.is_anonymous:
            return False
        if self.authenticated:
            return True
        if principal.kind == "robot":
            return principal.name in self.robots
        return principal.name in self.users or not principal.groups.isdisjoint(self.groups)


@dataclass(frozen=True, slots=True)
class Need:
    """One thing a request needs: ``action`` on ``repository`` (``None`` for registry-wide needs)."""

    repository: str | None
    action: str

    def scope(self) -> str:
        """The token scope a client should ask for to satisfy this need."""
        if self.repository is None:
            return "registry:catalog:*"
        actions = "pull,push" if self.action == "push" else self.action
        if self.action == "admin":
            actions = "*"
        return f"repository:{self.repository}:{actions}"


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer for one request: allowed, or the needs that were not met."""

    allowed: bool
    missing: tuple[Need, ...] = ()


# Routes of the seed's API and the action each method needs on the route's repository.
_ROUTE_ACTIONS: dict[tuple[str, str], str] = {
    ("blob", "GET"): "pull",
    ("blob", "HEAD"): "pull",
    ("chunks", "GET"): "pull",
    ("grant", "GET"): "pull",
    ("grant", "HEAD"): "pull",
    ("chunks", "HEAD"): "pull",
    ("manifest", "GET"): "pull",
    ("manifest", "HEAD"): "pull",
    ("tags", "GET"): "pull",
    ("tags", "HEAD"): "pull",
    ("referrers", "GET"): "pull",
    ("referrers", "HEAD"): "pull",
    ("signatures", "GET"): "pull",
    ("signatures", "HEAD"): "pull",
    ("verdict", "GET"): "pull",  # the signature policy's verdict on an image one may pull
    ("verdict", "HEAD"): "pull",
    ("scan", "GET"): "pull",
    ("scan", "HEAD"): "pull",
    ("upload", "POST"): "push",
    ("upload", "PATCH"): "push",
    ("upload", "PUT"): "push",
    ("upload", "GET"): "push",
    ("upload", "HEAD"): "push",
    ("upload", "DELETE"): "push",
    ("manifest", "PUT"): "push",
    ("signatures", "PUT"): "push",
    ("scan", "POST"): "push",  # asks for a rescan: work on the seed, as a push causes
    ("manifest", "DELETE"): "delete",
    ("blob", "DELETE"): "delete",
    ("signatures", "DELETE"): "delete",
}


def needs_for(route: str, method: str, name: str | None, query: Mapping[str, list[str]]) -> tuple[Need, ...]:
    """What a request needs, from its route, method, repository name and query.

    The base route ``/v2/`` and the catalog need only a caller (``Need(None, "login")`` /
    ``Need(None, "catalog")``); the catalog is then filtered per repository. A cross-repository
    mount (``POST .../uploads/?mount=D&from=SRC``) needs pull on the source as well. A method
    the table does not know needs ``admin`` (deny by default).
    """
    if route == "base":
        return (Need(None, "login"),)
    if route == "catalog":
        return (Need(None, "catalog"),)
    if name is None:
        return (Need(None, "admin"),)
    action = _ROUTE_ACTIONS.get((route, method), "admin")
    needs = [Need(name, action)]
    if route == "upload" and method == "POST":
        sources = query.get("from") or []
        if query.get("mount") and sources and sources[0]:
            needs.append(Need(sources[0], "pull"))
    return tuple(needs)


class AccessPolicy:
    """The ``[[access]]`` rules of one configuration (replaced whole on reload).

    Args:
        rules: the access rules, in any order (they only add rights).
        open_mode: no access control at all (a seed with no ``[auth]`` on loopback):
            everyone may do everything.
    """

    def __init__(self, rules: Iterable[AccessRule], *, open_mode: bool = False) -> None:
        self.rules = tuple(rules)
        self.open_mode = open_mode

    @property
    def has_public(self) -> bool:
        """Whether anything is readable without logging in."""
        return self.open_mode or any(rule.anonymous for rule in self.rules)

    def actions_for(self, principal: Principal, repository: str) -> frozenset[str]:
        """Everything ``principal`` may do to ``repository`` under the current rules."""
        if self.open_mode:
            return frozenset(ACTIONS)
        granted: set[str] = set()
        for rule in self.rules:
            if rule.applies_to(principal) and _matches(rule.repositories, repository):
                granted |= rule.actions
        if principal.kind == "robot":
            granted |= _grants_for(principal.grants, repository)
        return frozenset(granted)

    def decide(self, principal: Principal, needs: Iterable[Need],
               token_access: Mapping[str, frozenset[str]] | None = None) -> Decision:
        """The one decision of a request.

        Args:
            principal: who is asking (``ANONYMOUS`` without credentials).
            needs: from ``needs_for``.
            token_access: for a bearer token, its granted actions per repository (a ceiling).
        """
        missing = tuple(need for need in needs if not self._meets(principal, need, token_access))
        return Decision(allowed=not missing, missing=missing)

    def _meets(self, principal: Principal, need: Need,
               token_access: Mapping[str, frozenset[str]] | None) -> bool:
        if need.repository is None:
            if need.action in ("login", "catalog"):
                # Anyone with credentials (or an anonymous token) may say hello and list what
                # they can pull. A request without any is asked to log in, even when some
                # repositories are public: that 401 is how docker, podman and skopeo learn the
                # realm — they would never send their credentials after a 200 — and clients
                # without credentials then fetch an anonymous token (distribution does the same).
                return self.open_mode or not principal.is_anonymous or token_access is not None
            return False
        allowed = self.actions_for(principal, need.repository)
        if token_access is not None:
            allowed = allowed & token_access.get(need.repository, frozenset())
        return need.action in allowed

    def visible(self, principal: Principal, repositories: Iterable[str]) -> list[str]:
        """The repositories ``principal`` may pull (catalog filtering)."""
        return [name for name in repositories if "pull" in self.actions_for(principal, name)]

    def grantable(self, principal: Principal, repository: str, requested: Iterable[str]) -> frozenset[str]:
        """Token service: requested ∩ allowed, spelled as requested (``*`` stays ``*``)."""
        allowed = self.actions_for(principal, repository)
        return frozenset(a for a in requested if _SCOPE_ALIASES.get(a, a) in allowed)


def _grants_for(grants: Iterable[Grant], repository: str) -> frozenset[str]:
    result: set[str] = set()
    for grant in grants:
        if compile_glob(grant.pattern).fullmatch(repository):
            result |= expand_actions(grant.actions)
    return frozenset(result)
