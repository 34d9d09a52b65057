"""A helper that runs inside one testbed namespace and does the controller's network work there.

The controller (root namespace) cannot reach addresses inside the namespaces — by design, the
root namespace has no route to them — so each host of the testbed runs one of these:
``ip netns exec NS python -m tests.bench.nsworker``. It reads one JSON command per line on
stdin and answers one JSON line on stdout, one command at a time:

- ``{"op": "ping"}`` → ``{"pid"}``
- ``{"op": "get", "url", "timeout_s"}`` → ``{"status", "text"}`` (status 0 and ``error`` on failure)
- ``{"op": "pull", "at", "hosts", "repo", "reference", "ns", "max_time"}``: a containerd-like
  pull (below), started at monotonic time ``at`` → ``{"start", "end", "ok", "blobs", "errors",
  "cpu_s"}``
- ``{"op": "run", "argv", "at", "timeout_s"}``: runs a command (e.g. ``ctr images pull``) at
  ``at`` → ``{"start", "end", "rc", "stdout", "stderr", "cpu_s"}`` (``cpu_s`` = the command's CPU)
- ``{"op": "exit"}``

Times are ``time.monotonic()`` (CLOCK_MONOTONIC, the same clock in every process of the
machine), so the controller compares them with its own.

The pull does what containerd 1.6 does with a hosts.toml (see shared/notes/containerd-mirror.md):
HEAD the manifest by tag, GET the manifest by digest, then GET all blobs in parallel and verify
their sha256. ``hosts`` are tried in order (``{"url", "mirror"}``; mirrors get ``?ns=``): a status
above 399 or a connection error moves to the next host; a body cut short is resumed with
``Range`` on the same host. Bytes are counted per host, so a fallback to the upstream shows.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import threading
import time
from typing import Any

import httpx

MANIFEST_ACCEPT = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "*/*",
])
_MAX_RESUMES = 5


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _wait_until(at: float | None) -> None:
    if at is not None:
        delay = at - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def _params(host: dict[str, Any], ns: str | None) -> dict[str, str]:
    return {"ns": ns} if host.get("mirror") and ns else {}


class Pull:
    """One containerd-like pull of ``repo:reference`` through ``hosts``."""

    def __init__(self, client: httpx.Client, hosts: list[dict[str, Any]], repo: str, reference: str,
                 ns: str | None, deadline: float) -> None:
        self.client = client
        self.hosts = hosts
        self.repo = repo
        self.reference = reference
        self.ns = ns
        self.deadline = deadline
        self.errors: list[str] = []
        self.blobs: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def _late(self) -> bool:
        return time.monotonic() > self.deadline

    def _manifest_request(self, method: str, reference: str) -> tuple[httpx.Response, str] | None:
        for host in self.hosts:
            url = f"{host['url']}/v2/{self.repo}/manifests/{reference}"
            try:
                response = self.client.request(method, url, params=_params(host, self.ns),
                                               headers={"Accept": MANIFEST_ACCEPT})
            except httpx.HTTPError as exc:
                self.errors.append(f"{method} manifest {reference} at {host['url']}: {type(exc).__name__}")
                continue
            if response.status_code < 400:
                return response, host["url"]
            self.errors.append(f"{method} manifest {reference} at {host['url']}: HTTP {response.status_code}")
        return None

    def _fetch_blob(self, descriptor: dict[str, Any]) -> None:
        digest, size = str(descriptor["digest"]), int(descriptor["size"])
        sha = hashlib.sha256()
        got = 0
        by_host: dict[str, int] = {}
        requests = 0
        started = last_byte = time.monotonic()
        longest_wait = 0.0  # the longest stretch without a body byte, from the first request on
        wait_ended = (0, 0.0)  # the byte offset it ended at, and when (seconds from the blob's start)
        for host in self.hosts:
            url = f"{host['url']}/v2/{self.repo}/blobs/{digest}"
            resumes = 0
            while got < size and resumes <= _MAX_RESUMES and not self._late():
                headers = {"Range": f"bytes={got}-"} if got else {}
                progressed = False
                requests += 1
                try:
                    with self.client.stream("GET", url, params=_params(host, self.ns), headers=headers) as response:
                        if response.status_code != (206 if got else 200):
                            self.errors.append(f"GET {digest[:19]} at {host['url']} from byte {got}: "
                                               f"HTTP {response.status_code}")
                            break  # next host
                        # Each piece as it comes off the socket: ``iter_raw(size)`` would hold bytes
                        # back until ``size`` had come, and the wait measured below would be the
                        # time between such pieces, not a stretch without a byte.
                        for piece in response.iter_raw():
                            now = time.monotonic()
                            if now - last_byte > longest_wait:
                                longest_wait, wait_ended = now - last_byte, (got, now - started)
                            last_byte = now
                            sha.update(piece)
                            got += len(piece)
                            by_host[host["url"]] = by_host.get(host["url"], 0) + len(piece)
                            progressed = True
                            if self._late():
                                break
                except httpx.HTTPError as exc:
                    self.errors.append(f"GET {digest[:19]} at {host['url']} at byte {got}: {type(exc).__name__}")
                    if not progressed:
                        break  # nothing came from this host: next host
                resumes += 1
            if got >= size:
                break
        ok = got == size and f"sha256:{sha.hexdigest()}" == digest
        if not ok:
            self.errors.append(f"blob {digest[:19]}: {got} of {size} bytes" + (", digest mismatch" if got == size
                                                                                else ""))
            now = time.monotonic()
            if now - last_byte > longest_wait:
                longest_wait, wait_ended = now - last_byte, (got, now - started)
        with self._lock:
            self.blobs.append({"digest": digest, "size": size, "ok": ok, "bytes_by_host": by_host,
                               "requests": requests, "seconds": round(time.monotonic() - started, 3),
                               "longest_wait_s": round(longest_wait, 2), "longest_wait_at_byte": wait_ended[0],
                               "longest_wait_ended_s": round(wait_ended[1], 2)})

    def run(self) -> bool:
        head = self._manifest_request("HEAD", self.reference)
        if head is None:
            return False
        digest = head[0].headers.get("docker-content-digest", "")
        got = self._manifest_request("GET", digest or self.reference)
        if got is None:
            return False
        body = got[0].content
        if digest and f"sha256:{hashlib.sha256(body).hexdigest()}" != digest:
            self.errors.append(f"manifest from {got[1]} does not match {digest}")
            return False
        manifest = json.loads(body)
        descriptors = [manifest["config"], *manifest["layers"]]
        threads = [threading.Thread(target=self._fetch_blob, args=(d,), daemon=True) for d in descriptors]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(self.deadline - time.monotonic(), 0) + 5)
        return len(self.blobs) == len(descriptors) and all(b["ok"] for b in self.blobs)


def op_pull(cmd: dict[str, Any]) -> dict[str, Any]:
    max_time = float(cmd.get("max_time", 300))
    timeout = httpx.Timeout(30.0, connect=10.0)
    with httpx.Client(trust_env=False, timeout=timeout, limits=httpx.Limits(max_connections=16)) as client:
        _wait_until(cmd.get("at"))
        cpu0 = _cpu_self()
        start = time.monotonic()
        pull = Pull(client, cmd["hosts"], cmd["repo"], cmd["reference"], cmd.get("ns"), start + max_time)
        try:
            ok = pull.run()
        except Exception as exc:  # report, never die: the controller waits for an answer
            pull.errors.append(f"{type(exc).__name__}: {exc}")
            ok = False
        end = time.monotonic()
    return {"start": start, "end": end, "ok": ok, "blobs": pull.blobs, "errors": pull.errors[:20],
            "cpu_s": round(_cpu_self() - cpu0, 3)}


def op_run(cmd: dict[str, Any]) -> dict[str, Any]:
    _wait_until(cmd.get("at"))
    cpu0 = _cpu_children()
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd["argv"], capture_output=True, timeout=float(cmd.get("timeout_s", 300)),
                              stdin=subprocess.DEVNULL, check=False)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = -1, exc.stdout or b"", (exc.stderr or b"") + b"\n(timed out)"
    end = time.monotonic()
    return {"start": start, "end": end, "rc": rc, "stdout": out.decode(errors="replace")[-4000:],
            "stderr": err.decode(errors="replace")[-2000:], "cpu_s": round(_cpu_children() - cpu0, 3)}


def op_get(cmd: dict[str, Any]) -> dict[str, Any]:
    try:
        response = httpx.get(cmd["url"], timeout=float(cmd.get("timeout_s", 5)), trust_env=False)
    except httpx.HTTPError as exc:
        return {"status": 0, "text": "", "error": f"{type(exc).__name__}: {exc}"}
    return {"status": response.status_code, "text": response.text}


def main() -> int:
    ops = {"ping": lambda cmd: {"pid": os.getpid()}, "get": op_get, "pull": op_pull, "run": op_run}
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") == "exit":
            break
        try:
            reply = {"ok": True, "result": ops[cmd["op"]](cmd)}
        except Exception as exc:
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
