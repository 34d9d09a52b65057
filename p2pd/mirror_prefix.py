"""The upstream named in the request path, for clients that send no ``ns=`` (podman, CRI-O, skopeo).

containers/image (podman, CRI-O, skopeo, buildah) rewrites an image reference for a
``[[registry.mirror]]`` by replacing the registry part with the mirror's ``location``, and sends no
``ns=``. A location with a path, ``127.0.0.1:5080/p2pd-ns/seed.local__5000``, therefore turns
``seed.local:5000/team/app:v1`` into requests for ``/v2/p2pd-ns/seed.local__5000/team/app/...``: the
first two path components name the upstream, the rest is the repository.

Rules/invariants:

* ``p2pd-ns`` marks the prefix, so a request without it keeps its old meaning (the default upstream
  for ``/v2/<name>/...`` without ``ns=``), and the prefix cannot be mistaken for a repository.
* The namespace is written as one repository path component: the host as it is (DNS labels and IPv4
  addresses are valid components) and ``:port`` as ``__port``. A host never contains ``_``, so the
  mapping is reversible and one namespace has exactly one component. IPv6 addresses (``[::1]:5000``)
  have no such spelling; ``p2pd registries-config`` refuses them.
* Pure: no I/O. Whether the agent serves a decoded namespace is ``UpstreamPool.check_namespace``'s
  business (a namespace it does not serve is a fast 404, nothing contacted).
"""

from __future__ import annotations

import re

from p2pd.oci.errors import OCIError

__all__ = ["PREFIX_MARKER", "namespace_component", "prefix_path", "split_prefixed_name"]

PREFIX_MARKER = "p2pd-ns"

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_PORT_RE = re.compile(rf"(?P<host>{_LABEL}(?:\.{_LABEL})*)(?::(?P<port>[0-9]{{1,5}}))?")
_COMPONENT_RE = re.compile(rf"(?P<host>{_LABEL}(?:\.{_LABEL})*)(?:__(?P<port>[0-9]{{1,5}}))?")


def namespace_component(namespace: str) -> str:
    """``seed.local:5000`` → ``seed.local__5000``; ``docker.io`` → ``docker.io``.

    Args:
        namespace: a registry host in normal form: lower-case DNS name or IPv4 address, optional port.

    Raises:
        ValueError: upper case, an IPv6 address, a port out of range, or not a host at all.
    """
    match = _HOST_PORT_RE.fullmatch(namespace)
    port = match["port"] if match else None
    if match is None or (port is not None and not 0 < int(port) <= 65535):
        raise ValueError(f"{namespace!r} cannot be named in a mirror path (a lower-case host[:port] without "
                         "IPv6 brackets is needed)")
    return match["host"] if port is None else f"{match['host']}__{port}"


def prefix_path(namespace: str) -> str:
    """The path a mirror location carries for ``namespace``: ``p2pd-ns/seed.local__5000``."""
    return f"{PREFIX_MARKER}/{namespace_component(namespace)}"


def split_prefixed_name(name: str) -> tuple[str, str] | None:
    """Splits the repository part of a request path into ``(namespace, repository)``.

    Args:
        name: everything between ``/v2/`` and ``/manifests/`` or ``/blobs/``.

    Returns:
        ``("seed.local:5000", "team/app")`` for ``p2pd-ns/seed.local__5000/team/app``; None when
        ``name`` does not start with the marker (the request names no upstream in its path).

    Raises:
        OCIError: NAME_INVALID when the marker is followed by something that is not a namespace
            component and a repository.
    """
    marker, sep, rest = name.partition("/")
    if marker != PREFIX_MARKER or not sep:
        return None
    component, sep, repository = rest.partition("/")
    match = _COMPONENT_RE.fullmatch(component)
    if match is None or not sep or not repository:
        raise OCIError("NAME_INVALID", f"{PREFIX_MARKER}/ must be followed by <registry>/<repository>",
                       detail={"name": name[:300]})
    namespace = match["host"] if match["port"] is None else f"{match['host']}:{match['port']}"
    return namespace, repository
