"""``p2pd`` command line: ``serve``, ``cache ls|gc|pin|unpin``, ``containerd-config``."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import signal
import sys
from functools import partial
from pathlib import Path

import trio

from . import __version__, containerd_config
from .config import AgentConfig, load_config
from .daemon import serve_agent
from .errors import P2PDError
from .oci.digest import Digest
from .oci.errors import OCIError
from .sdnotify import notify
from .store import BlobStore

__all__ = ["main"]

log = logging.getLogger("p2pd")


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
    parser = argparse.ArgumentParser(prog="p2pd", description="p2pd node agent: a registry mirror for containerd.")
    parser.add_argument("--version", action="version", version=f"p2pd {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the agent")
    serve.add_argument("--config", type=Path, help="TOML configuration file")
    serve.add_argument("--listen", help="HOST:PORT for containerd (default 127.0.0.1:5080)")
    serve.add_argument("--data", type=Path, help="data directory (default /var/lib/p2pd)")
    serve.add_argument("--upstream", action="append", default=[], metavar="NS=URL",
                       help="map containerd's ns= value to an upstream registry (repeatable)")
    serve.add_argument("--default-upstream", metavar="URL", help="upstream for registries without --upstream")
    serve.add_argument("--cache-max-bytes", type=_size, help="evict least-recently-used blobs above this size")

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
    return parser


async def _serve(config: AgentConfig) -> None:
    notify_socket = os.environ.get("NOTIFY_SOCKET")
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    notify("STOPPING=1", notify_socket)
                    shutdown.set()
                    return

        nursery.start_soon(on_signals)
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO; our own logs say what matters.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        if args.command == "serve":
            config = load_config(args.config, listen=args.listen, data=args.data, upstreams=args.upstream,
                                 default_upstream=args.default_upstream, cache_max_bytes=args.cache_max_bytes)
            trio.run(_serve, config)
            return 0
        if args.command == "cache":
            return _cache(args)
        return containerd_config.run(args)
    except (P2PDError, OCIError) as exc:
        print(f"p2pd: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
