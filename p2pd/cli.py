"""``p2pd`` command line: ``serve``, ``cache ls|gc|pin|unpin``, ``containerd-config``, ``registries-config``,
``ca init|issue``, ``status``, ``prefetch``, ``preheat``, ``keygen``."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import sys
from functools import partial
from pathlib import Path

import httpx
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from rich.console import Console

from . import __version__, containerd_config, prefetch_cli, registries_config
from .config import AgentConfig, load_config
from .daemon import serve_agent
from .errors import P2PDError
from .lifecycle import shutdown_on_signals
from .logformat import add_logging_arguments, configure_logging
from .oci.digest import Digest
from .oci.errors import OCIError
from .sdnotify import notify
from .status_view import render_status
from .store import BlobStore
from .swarm import tls as peer_tls
from .swarm.auth import generate_key

__all__ = ["main"]

log = logging.getLogger("p2pd")

_NODE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}")


def _size(text: str) -> int:
    """``123``, ``10G``, ``512MiB`` → bytes."""
    units = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1] if value and value[-1] in units else ""
    number = value[: -1] if unit else value
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2pd",
                                     description="p2pd node agent: a registry mirror for containerd, CRI-O and podman.")
    parser.add_argument("--version", action="version", version=f"p2pd {__version__}")
    add_logging_arguments(parser)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the agent")
    serve.add_argument("--config", type=Path, help="TOML configuration file")
    serve.add_argument("--listen", help="HOST:PORT for containerd (default 127.0.0.1:5080)")
    serve.add_argument("--data", type=Path, help="data directory (default /var/lib/p2pd)")
    serve.add_argument("--upstream", action="append", default=[], metavar="NS=URL",
                       help="map containerd's ns= value to an upstream registry (repeatable)")
    serve.add_argument("--default-upstream", metavar="URL", help="upstream for registries without --upstream")
    serve.add_argument("--allow-registry", action="append", default=[], metavar="PATTERN",
                       help="without a default upstream, also serve ns values matching this host pattern "
                            "(docker.io, *.example.com, *) from https://<ns> (repeatable)")
    serve.add_argument("--allow-network", action="append", default=[], metavar="CIDR",
                       help="private range that such registries and redirect targets may resolve to (repeatable)")
    serve.add_argument("--cache-max-bytes", type=_size, help="evict least-recently-used blobs above this size")
    peers = serve.add_argument_group("peer-to-peer (off unless --peer-listen is given)")
    peers.add_argument("--peer-listen", metavar="HOST:PORT", help="endpoint for other nodes (separate from --listen)")
    peers.add_argument("--advertise", metavar="HOST:PORT", help="address other nodes use (default: --peer-listen)")
    peers.add_argument("--peer", action="append", default=[], metavar="HOST:PORT", help="static peer (repeatable)")
    peers.add_argument("--peer-dns", action="append", default=[], metavar="NAME[:PORT]",
                       help="DNS name resolved periodically to peer addresses (repeatable)")
    peers.add_argument("--cluster-key-file", type=Path, help="shared secret of the cluster ('p2pd keygen')")
    peers.add_argument("--insecure-peers", action="store_true", default=None,
                       help="run the swarm without peer authentication (testing only)")
    peers.add_argument("--no-peer-tls", dest="peer_tls", action="store_false", default=None,
                       help="speak plain HTTP to peers instead of mutual TLS (only on a trusted network)")
    peers.add_argument("--site", help="locality label (default: the advertised address's /24)")
    peers.add_argument("--node-id", help="node id (default: generated once, kept in the data directory)")
    peers.add_argument("--no-mdns", dest="mdns", action="store_false", default=None, help="do not use mDNS")
    peers.add_argument("--mdns-interface", metavar="IPV4", help="address to run mDNS on (default: advertised host)")
    peers.add_argument("--upload-rate", type=_size, help="bytes per second served to peers (0: unlimited)")
    peers.add_argument("--max-uploads", type=int, help="concurrent chunk uploads before answering 429")
    peers.add_argument("--peer-congestion-control", metavar="NAME",
                       help="TCP congestion control of the peer port's connections (default reno; '' for the host's)")
    peers.add_argument("--site-upstream-rate", type=_size,
                       help="bytes per second the whole site fetches from upstreams (0: unlimited)")

    keygen = commands.add_parser("keygen", help="create a cluster key file")
    keygen.add_argument("--out", type=Path, help="write the key here (mode 0600) instead of printing it")

    ca = commands.add_parser("ca", help="an operator CA for mutual TLS on the peer port (instead of deriving "
                                        "certificates from the cluster key)")
    ca_commands = ca.add_subparsers(dest="ca_command", required=True)
    ca_init = ca_commands.add_parser("init", help="create the CA: DIR/ca.pem and DIR/ca.key (0600)")
    ca_init.add_argument("--dir", type=Path, required=True, help="where the CA lives (keep ca.key off the nodes)")
    ca_init.add_argument("--name", default="p2pd cluster CA", help="the CA's common name")
    ca_init.add_argument("--days", type=int, default=3650, help="validity of the CA certificate")
    ca_issue = ca_commands.add_parser("issue", help="a node's certificate: DIR/NODE.pem and DIR/NODE.key (0600)")
    ca_issue.add_argument("node", help="the node id (its --node-id)")
    ca_issue.add_argument("--dir", type=Path, required=True, help="the CA directory of 'p2pd ca init'")
    ca_issue.add_argument("--days", type=int, default=365, help="validity of the node certificate")
    ca_issue.add_argument("--address", action="append", default=[], metavar="IP_OR_NAME",
                          help="also name this address in the certificate (repeatable; informational: peers "
                               "check the chain, not host names)")

    status = commands.add_parser("status", help="peers, sites, transfers in flight, bytes by source, cache use")
    status.add_argument("--endpoint", default="http://127.0.0.1:5080", help="the agent's --listen URL")
    status.add_argument("--json", action="store_true", help="print the raw JSON document (for scripts)")

    cache = commands.add_parser("cache", help="inspect and manage the local cache")
    cache.add_argument("--config", type=Path, help="TOML configuration file")
    cache.add_argument("--data", type=Path, help="data directory")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True)
    cache_commands.add_parser("ls", help="list cached blobs, most recently used first")
    gc = cache_commands.add_parser("gc", help="evict down to the cache size and drop stale partial downloads")
    gc.add_argument("--max-bytes", type=_size, help="evict down to this size instead of the configured one")
    gc.add_argument("--partials-older-than", type=float, default=24 * 3600.0, metavar="SECONDS",
                    help="remove partial downloads untouched for this long (default one day)")
    for name, text in (("pin", "never evict this digest"), ("unpin", "allow this digest to be evicted")):
        command = cache_commands.add_parser(name, help=text)
        command.add_argument("digest")

    containerd = commands.add_parser("containerd-config", help="write containerd hosts.toml files for this agent")
    containerd_config.add_arguments(containerd)

    prefetch = commands.add_parser("prefetch", help="fetch images into the local agent's cache before a rollout")
    prefetch_cli.add_arguments(prefetch)
    preheat = commands.add_parser("preheat", help="make every live member (or one site) prefetch images")
    prefetch_cli.add_preheat_arguments(preheat)

    registries = commands.add_parser("registries-config",
                                     help="write a registries.conf drop-in for podman and CRI-O pointing at this agent")
    registries_config.add_arguments(registries)
    return parser


async def _serve(config: AgentConfig) -> None:
    notify_socket = os.environ.get("NOTIFY_SOCKET")
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(shutdown_on_signals, shutdown, notify_socket)
        agent = await nursery.start(partial(serve_agent, config, shutdown=shutdown))
        log.info("p2pd listening on %s, data in %s", agent.info.url, config.data)
        print(f"p2pd listening on {agent.info.url}", flush=True)
        notify(f"READY=1\nSTATUS=serving on {agent.info.url}", notify_socket)
        await shutdown.wait()
    log.info("p2pd stopped")


def _cache(args: argparse.Namespace) -> int:
    config = load_config(args.config, data=args.data)
    store = BlobStore(config.data, max_bytes=config.cache.max_bytes, pinned=config.cache.pinned)
    if args.cache_command == "ls":
        entries = store.entries()
        for entry in entries:
            used = datetime.datetime.fromtimestamp(entry.last_used).isoformat(timespec="seconds")
            flags = "pinned" if entry.pinned else ""
            print(f"{entry.digest}  {entry.size:>14}  {used}  {flags}".rstrip())
        for digest, size in store.list_partials():
            print(f"{digest}  {size:>14}  (partial download)")
        print(f"{len(entries)} blobs, {store.total_bytes} bytes (limit {store.max_bytes})")
        return 0
    if args.cache_command == "gc":
        removed = store.evict(args.max_bytes)
        partials = store.discard_stale_partials(args.partials_older_than)
        for digest in removed:
            print(f"evicted {digest}")
        for digest in partials:
            print(f"removed partial {digest}")
        print(f"evicted {len(removed)} blobs and {len(partials)} partial downloads; {store.total_bytes} bytes left")
        return 0
    digest = Digest.parse(args.digest)
    if args.cache_command == "pin":
        store.pin(digest)
        present = "" if store.size(digest) is not None else " (not cached yet; kept once fetched)"
        print(f"pinned {digest}{present}")
        return 0
    if not store.unpin(digest):
        print(f"p2pd: {digest} is not pinned with 'p2pd cache pin' (pins in the config file stay)",
              file=sys.stderr)
        return 1
    print(f"unpinned {digest}")
    return 0


def _keygen(out: Path | None) -> int:
    key = generate_key()
    if out is None:
        print(key)
        return 0
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:  # an existing key is never overwritten
        print(f"p2pd: cannot create {out}: {exc.strerror}", file=sys.stderr)
        return 1
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    print(f"wrote a new cluster key to {out}; copy it to every node (mode 0600)")
    return 0


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Creates ``path``; an existing key or certificate is never overwritten."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise P2PDError(f"{path} exists; remove it first to replace it") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _ca(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    if args.ca_command == "init":
        directory.mkdir(parents=True, exist_ok=True)
        key, certificate = peer_tls.new_ca(args.name, days=args.days)
        _write_new(directory / "ca.key", peer_tls.pem_private_key(key), 0o600)
        _write_new(directory / "ca.pem", peer_tls.pem_certificate(certificate), 0o644)
        print(f"created {directory / 'ca.pem'} (give it to every node as tls_ca_file) and {directory / 'ca.key'} "
              "(keep it off the nodes)")
        return 0
    node = args.node
    if not _NODE_NAME_RE.fullmatch(node):
        raise P2PDError(f"not a node id: {node!r} (1-63 letters, digits and '-')")
    try:
        ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    except (OSError, ValueError) as exc:
        raise P2PDError(f"cannot read the CA in {directory} ('p2pd ca init --dir {directory}' first): {exc}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise P2PDError(f"{directory / 'ca.key'} is not an EC key made by 'p2pd ca init'")
    key, certificate = peer_tls.issue_node_certificate(ca_key, ca_cert, node, addresses=tuple(args.address),
                                                       days=args.days)
    _write_new(directory / f"{node}.key", peer_tls.pem_private_key(key), 0o600)
    _write_new(directory / f"{node}.pem", peer_tls.pem_certificate(certificate), 0o644)
    print(f"issued {directory / (node + '.pem')} and {directory / (node + '.key')} for node {node}, valid "
          f"{args.days} days: set [swarm] tls_ca_file, tls_cert_file and tls_key_file on that node")
    return 0


def _status(endpoint: str, raw: bool) -> int:
    try:
        response = httpx.get(endpoint.rstrip("/") + "/debug/status", timeout=5, trust_env=False)
        response.raise_for_status()
        status = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        print(f"p2pd: cannot read status from {endpoint}: {exc}", file=sys.stderr)
        return 1
    if raw or not isinstance(status, dict):
        print(json.dumps(status, indent=2))
        return 0
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # piped or redirected: whole node ids and addresses, no wrapping at 80
    console.print(render_status(status))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    # httpx logs every request at INFO; our own logs say what matters.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        if args.command == "serve":
            swarm = {"peer_listen": args.peer_listen, "advertise": args.advertise, "peers": tuple(args.peer),
                     "peer_dns": tuple(args.peer_dns),
                     "cluster_key_file": str(args.cluster_key_file) if args.cluster_key_file else None,
                     "insecure_peers": args.insecure_peers, "site": args.site, "node_id": args.node_id,
                     "mdns": args.mdns, "mdns_interface": args.mdns_interface, "upload_rate": args.upload_rate,
                     "max_uploads": args.max_uploads, "peer_tls": args.peer_tls,
                     "peer_congestion_control": args.peer_congestion_control,
                     "site_upstream_rate": args.site_upstream_rate}
            config = load_config(args.config, listen=args.listen, data=args.data, upstreams=args.upstream,
                                 default_upstream=args.default_upstream, allow_registries=args.allow_registry,
                                 allow_networks=args.allow_network, cache_max_bytes=args.cache_max_bytes,
                                 swarm=swarm)
            trio.run(_serve, config)
            return 0
        if args.command == "keygen":
            return _keygen(args.out)
        if args.command == "ca":
            return _ca(args)
        if args.command == "status":
            return _status(args.endpoint, args.json)
        if args.command == "cache":
            return _cache(args)
        if args.command == "prefetch":
            return prefetch_cli.run(args)
        if args.command == "preheat":
            return prefetch_cli.run_preheat(args)
        if args.command == "registries-config":
            return registries_config.run(args)
        return containerd_config.run(args)
    except (P2PDError, OCIError) as exc:
        print(f"p2pd: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
