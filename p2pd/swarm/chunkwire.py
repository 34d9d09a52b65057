"""Chunk downloads and peer messages on blocking keep-alive connections, run in worker threads.

Why not the async client: a 1 MiB chunk over TLS arrives as 64 TLS records, and every record
went through six layers of async generators (httpx, httpcore, h11, trio's SSLStream), which
made receiving chunks the largest CPU cost of a swarm node. Here one worker thread does the
whole exchange in C-level calls: send the request, read the head with ``http.client``,
``readinto`` the body straight into a buffer of the chunk's size and hash it (``hashlib``
releases the GIL), so the event loop sees one wake-up per chunk instead of dozens.

Rules:
- One exchange per call; the caller (``PeerClient.fetch_chunk``) bounds the whole call and
  turns statuses into peer errors. Bodies of error answers are read (bounded) so the
  connection can be reused; a connection is pooled again only after a complete exchange.
- A pooled connection the peer has meanwhile closed (cleanly, with a reset or an SSL EOF) fails
  before any answer byte: the request is retried once on a fresh connection (GETs and peer
  messages are idempotent). A fresh connection refused, reset or closed before any answer is
  *unreachable* (``ChunkWireError.unreachable``): nothing answers there.
- ``Exchange.abort`` (called from the event loop when the caller is cancelled) shuts the
  socket down, so the thread's blocked read ends at once and the connection is dropped.
- Every socket wait is bounded by ``read_timeout`` (no byte for that long fails the exchange;
  the caller bounds the whole); a body of another length than asked is an error. A relayed
  answer (a chunk still arriving at the peer, ``relay_header``) is read with
  ``relay_read_timeout``: its bytes come as fast as they reach the peer, and the peer's own
  source may go quiet for longer than a silent peer would (see ``ChunkWire``).
- A chunk body is read a TLS record at a time, and the thread sleeps until a record's worth is
  there (``SO_RCVLOWAT``) instead of waking for every few packets: at a tenth of a slow link
  a 16 KiB record comes in 3-4 pieces, and each wake-up takes the GIL from the event loop. The
  wait is never for bytes that may not come: the mark stays below what the answer still owes
  the socket, and after ``_GATHER_PATIENCE`` without a full record the thread takes what is
  there (a trickle still resets the read timeout).
- A new TLS connection to a peer resumes the session of the last full handshake with it, for
  ``_SESSION_REUSE`` seconds after that handshake: a full mutual handshake costs ~3.3 ms of CPU
  for both ends together, a resumed one ~1.9 (in-process, P-256 peer certificates), and a node
  opens dozens of connections per pull. Every request is still authenticated by the cluster key;
  a peer that restarted cannot resume (its ticket keys are new) and the handshake is a full one.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["ChunkAnswer", "ChunkWire", "ChunkWireError", "Exchange"]

_MAX_ERROR_BODY = 64 * 1024
_READ_STEP = 64 * 1024
# Reading a body a record at a time (see the module's rules). _UNDELIVERED bounds the body bytes
# already taken from the socket but not yet returned to us: the head reader's buffer (8 KiB),
# one decrypted TLS record (16 KiB) and one partly read (16 KiB and its framing).
_GATHER = 16 * 1024
_UNDELIVERED = 48 * 1024
_GATHER_PATIENCE = 0.5  # seconds a read waits for a record's worth before it takes what is there
_MAX_IDLE_PER_PEER = 16
_IDLE_EXPIRY = 30.0  # below the peer server's keep-alive idle timeout (75 s)
_SESSION_REUSE = 60.0  # seconds a full handshake's TLS session is resumed for new connections
_MAX_SESSIONS = 4096  # peers whose sessions are kept


class ChunkWireError(Exception):
    """The exchange failed on the wire (connection, TLS, timeout, malformed answer).

    ``relay_cut``: the peer had answered with a relay of a chunk still arriving there (its
    answer carried ``relay_header``), and the body stopped short or stalled: the chunk failed
    or stopped coming at the peer, which is not a fault of the peer itself.

    ``unreachable``: nothing answered at the address — a new connection was refused, reset or
    closed before any answer: the peer's process is gone or restarting. Not a timeout: a peer
    slow to answer may be overloaded and still at work.

    ``timed_out``: no byte came for the read timeout (or the connect timeout): the peer may be
    gone, stopped, or alive behind an uplink so congested that its packets wait out TCP's
    retransmission timeouts (the caller tells these apart: ``p2pd.swarm.engine``)."""

    def __init__(self, reason: str, *, relay_cut: bool = False, unreachable: bool = False,
                 timed_out: bool = False) -> None:
        super().__init__(reason)
        self.relay_cut = relay_cut
        self.unreachable = unreachable
        self.timed_out = timed_out


@dataclass(frozen=True, slots=True)
class ChunkAnswer:
    """A peer's answer: for 206 the body (exactly the bytes asked for) and its SHA-256."""

    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytearray
    sha256: bytes | None


class _Connection(http.client.HTTPConnection):
    """http.client over TLS with the given context and no host name check (peers are reached by
    address and authenticated by the cluster CA), or over plain TCP."""

    def __init__(self, address: str, tls: ssl.SSLContext | None, connect_timeout: float,
                 session: ssl.SSLSession | None = None) -> None:
        super().__init__(address, timeout=connect_timeout)
        self._tls = tls
        self._session = session
        self.idle_since = 0.0

    def connect(self) -> None:
        super().connect()
        if self._tls is not None:
            self.sock = self._tls.wrap_socket(self.sock, server_hostname=None, session=self._session)


class Exchange:
    """One request in flight; ``abort`` may be called from another thread, ``received`` (body
    bytes so far) read from any: a slow chunk that is still arriving is not a stalled one.

    ``buffer``: where a chunk's body is read (a bytearray of its length, given by the caller so
    that it can pass the bytes on while they arrive: ``p2pd.swarm.engine.Arrival``); ``progress``
    is called in the reading thread after every read with the body bytes so far;
    ``last_byte_at`` is the ``time.monotonic()`` of the last read that brought body bytes."""

    def __init__(self, buffer: bytearray | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.aborted = False
        self.received = 0
        self.last_byte_at = -math.inf
        self.buffer = buffer
        self.progress = progress

    def _advance(self, received: int) -> None:
        self.received = received
        self.last_byte_at = time.monotonic()
        if self.progress is not None:
            self.progress(received)

    def _attach(self, conn: _Connection) -> None:
        with self._lock:
            self._sock = conn.sock
            if self.aborted:
                self._shutdown()

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            self._shutdown()

    def unless_aborted(self, action: Callable[[], None]) -> bool:
        """Runs ``action`` (in the calling thread) unless the exchange was aborted; False if it
        was. An ``abort`` waits for an action under way, so none runs once ``abort`` returns:
        the caller may then close what the action writes to."""
        with self._lock:
            if self.aborted:
                return False
            action()
            return True

    def _shutdown(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)


class ChunkWire:
    """A pool of keep-alive connections per peer address, used from worker threads."""

    def __init__(self, *, tls: ssl.SSLContext | None, connect_timeout: float, read_timeout: float,
                 relay_header: str | None = None, relay_read_timeout: float | None = None,
                 on_connect: Callable[[str], None] | None = None) -> None:
        """``relay_read_timeout`` (default ``read_timeout``): how long a relayed answer may go
        without a byte. A relay's bytes come at its source's pace, and that source (a range
        holder's upstream flow, or a relay in turn) may pause in TCP loss recovery for seconds
        and then flow again: the peer then still has the chunk on its way, and cutting the
        answer throws away what came and cuts the relays this node passes it on to."""
        self._tls = tls
        # Told of every new connection ("full" or "resumed" TLS handshake, or "plain"): each
        # costs CPU at both ends, so operators can see how well connections are reused.
        self._on_connect = on_connect
        self._relay_header = relay_header
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._relay_read_timeout = read_timeout if relay_read_timeout is None else relay_read_timeout
        self._idle: dict[str, list[_Connection]] = {}
        self._sessions: dict[str, tuple[ssl.SSLSession, float]] = {}  # address → (session, full handshake at)
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def _take(self, address: str) -> _Connection | None:
        now = time.monotonic()
        with self._lock:
            conns = self._idle.get(address, [])
            while conns:
                conn = conns.pop()
                if now - conn.idle_since < _IDLE_EXPIRY:
                    return conn
                conn.close()
        return None

    def _session(self, address: str) -> ssl.SSLSession | None:
        with self._lock:
            entry = self._sessions.get(address)
        if entry is None or time.monotonic() - entry[1] > _SESSION_REUSE:
            return None
        return entry[0]

    def _remember_session(self, address: str, conn: _Connection) -> None:
        """After a complete exchange (a TLS 1.3 ticket arrives after the handshake): the session of
        a full handshake, to resume; a resumed one does not extend the reuse period."""
        sock = conn.sock
        if not isinstance(sock, ssl.SSLSocket) or sock.session_reused:
            return
        # Read once: each read of SSLSocket.session copies the session through its DER form,
        # peer certificates included (CPython's workaround for an OpenSSL 1.1.0 bug). Three
        # reads per new connection were 71 of 1,119 GIL samples of a node in 20 s of an N = 16
        # pull (py-spy); one read, 4 of 672.
        session = sock.session
        if session is None or not session.has_ticket:
            return
        with self._lock:
            self._sessions.pop(address, None)
            self._sessions[address] = (session, time.monotonic())
            while len(self._sessions) > _MAX_SESSIONS:
                self._sessions.pop(next(iter(self._sessions)))

    def _give_back(self, address: str, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        with self._lock:
            conns = self._idle.setdefault(address, [])
            if not self._closed and len(conns) < _MAX_IDLE_PER_PEER:
                conns.append(conn)
                return
        conn.close()

    def get_range(self, address: str, target: str, headers: Mapping[str, str], start: int, length: int,
                  exchange: Exchange) -> ChunkAnswer:
        """GET ``target`` bytes ``start..start+length-1`` from ``address`` (blocking).

        Raises:
            ChunkWireError: on any failure of the connection or the answer's framing.
        """
        ranged = {**headers, "Range": f"bytes={start}-{start + length - 1}"}
        return self._exchange(address, "GET", target, ranged, b"", exchange,
                              lambda response, timeout: self._read(response, length, exchange, timeout))

    def request(self, address: str, method: str, target: str, headers: Mapping[str, str], body: bytes,
                max_body: int, exchange: Exchange) -> ChunkAnswer:
        """A small exchange (a peer message, a hello, a chunk map) on the same pooled connections
        as chunks (blocking): one connection and TLS handshake per peer serves both, and a
        message costs one wake-up of the event loop instead of a pass through the async client's
        layers. A POST is sent again on a fresh connection if a pooled one turns out closed
        before any answer byte: the peer did not read it, and peer messages are idempotent.

        Raises:
            ChunkWireError: on any failure of the connection or the answer's framing, or a body
            over ``max_body`` bytes.
        """
        return self._exchange(address, method, target, headers, body, exchange,
                              lambda response, _timeout: self._read_small(response, max_body))

    def _exchange(self, address: str, method: str, target: str, headers: Mapping[str, str], body: bytes,
                  exchange: Exchange,
                  read: Callable[[http.client.HTTPResponse, float], ChunkAnswer]) -> ChunkAnswer:
        pooled = self._take(address)
        for attempt in (0, 1):
            conn = pooled if attempt == 0 and pooled is not None else _Connection(
                address, self._tls, self._connect_timeout, self._session(address) if self._tls else None)
            reused = conn is pooled
            try:
                if conn.sock is None:
                    conn.connect()
                    if self._on_connect is not None:
                        self._on_connect(_handshake(conn))
                conn.sock.settimeout(self._read_timeout)
                exchange._attach(conn)
                conn.putrequest(method, target, skip_accept_encoding=True)
                for name, value in headers.items():
                    conn.putheader(name, value)
                if method not in ("GET", "HEAD"):
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body if body else None)
                # http.client forgets the socket (conn.sock = None) when an answer says it closes
                # the connection; the answer still reads from it, with the timeout set below.
                sock = conn.sock
                response = conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ssl.SSLEOFError) as exc:
                conn.close()
                if reused and not exchange.aborted:
                    # The peer closed the idle connection (an unclean TLS close is an SSL EOF):
                    # once more, on a new one.
                    continue
                raise ChunkWireError(_reason(exc, exchange), unreachable=not exchange.aborted) from None
            except (OSError, http.client.HTTPException, ValueError) as exc:
                conn.close()
                # (A reset or a close before any answer is the branch above.)
                refused = isinstance(exc, ConnectionRefusedError | ConnectionAbortedError)
                raise ChunkWireError(_reason(exc, exchange), unreachable=refused and not exchange.aborted,
                                     timed_out=_timed_out(exc, exchange)) from None
            relay = self._relay_header is not None and response.getheader(self._relay_header) is not None
            timeout = self._relay_read_timeout if relay else self._read_timeout
            try:
                sock.settimeout(timeout)  # the buffered reads wait on the socket's own timeout
                answer = read(response, timeout)
            except (OSError, http.client.HTTPException, ValueError, ChunkWireError) as exc:
                conn.close()
                reason = str(exc) if isinstance(exc, ChunkWireError) else _reason(exc, exchange)
                raise ChunkWireError(reason, relay_cut=relay and not exchange.aborted,
                                     timed_out=_timed_out(exc, exchange)) from None
            if not reused:
                self._remember_session(address, conn)
            if exchange.aborted or response.will_close:
                conn.close()
            else:
                self._give_back(address, conn)
            return answer
        raise ChunkWireError("connection closed")  # not reached: the second attempt returns or raises

    @staticmethod
    def _read_small(response: http.client.HTTPResponse, max_body: int) -> ChunkAnswer:
        headers = {name.lower(): value for name, value in response.getheaders()}
        declared = response.length
        if declared is not None and declared > max_body:
            raise ChunkWireError(f"answer of {declared} bytes, more than {max_body}")
        data = response.read(max_body + 1) if declared is None else response.read()
        if len(data) > max_body:
            raise ChunkWireError(f"answer over {max_body} bytes")
        return ChunkAnswer(response.status, headers, bytearray(data), None)

    @staticmethod
    def _read(response: http.client.HTTPResponse, length: int, exchange: Exchange,
              read_timeout: float) -> ChunkAnswer:
        headers = {name.lower(): value for name, value in response.getheaders()}
        if response.status != 206:
            declared = response.length
            if declared is None or declared > _MAX_ERROR_BODY:
                response.will_close = True  # not worth reading: drop the connection instead
                return ChunkAnswer(response.status, headers, bytearray(), None)
            response.read()
            return ChunkAnswer(response.status, headers, bytearray(), None)
        if response.length != length:
            raise ChunkWireError(f"Content-Length {response.length} for a chunk of {length} bytes")
        body = exchange.buffer if exchange.buffer is not None and len(exchange.buffer) == length \
            else bytearray(length)
        view = memoryview(body)
        # The socket under the head reader (``SocketIO._sock`` in CPython); without it, or for a
        # body too small to gather, the buffered reads below.
        sock = getattr(getattr(response.fp, "raw", None), "_sock", None)
        if isinstance(sock, socket.socket) and length > _GATHER + _UNDELIVERED:
            _gather_body(response, sock, view, exchange, read_timeout)
        else:
            got = 0
            # In steps: a buffered readinto returns only when its buffer is full, and the caller
            # watches ``received`` to tell a slow chunk from a stalled one; a record at a time
            # when the bytes are passed on as they arrive.
            step = _GATHER if exchange.progress is not None else _READ_STEP
            while got < length:
                n = response.readinto(view[got:got + step])
                if not n:
                    raise ChunkWireError(f"connection closed after {got} of {length} bytes")
                got += n
                exchange._advance(got)
        return ChunkAnswer(206, headers, body, hashlib.sha256(body).digest())


def _gather_body(response: http.client.HTTPResponse, sock: socket.socket, view: memoryview, exchange: Exchange,
                 read_timeout: float) -> None:
    """Reads the body into ``view`` straight from the socket, a record's worth per wake-up.

    What the head's reader already holds comes first (no socket read when it holds any); then
    each read waits for ``SO_RCVLOWAT`` bytes, at most ``_GATHER`` and never more than the
    answer still owes the socket (its remaining bytes less ``_UNDELIVERED``), for at most
    ``_GATHER_PATIENCE``; a wait that ends short takes what is there with the mark at 1.
    """
    length = len(view)
    got = len(first := response.fp.read1(length))
    if not first:
        raise ChunkWireError(f"connection closed after 0 of {length} bytes")
    view[:got] = first
    exchange._advance(got)
    last_byte = time.monotonic()
    gather = True
    mark = 1
    try:
        while got < length:
            want = max(1, min(_GATHER, length - got - _UNDELIVERED)) if gather else 1
            if want != mark:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
                mark = want
            # Bytes that came while a gathering read waited count: the read after it (mark 1)
            # takes them at once, so only a socket with no byte for read_timeout times out.
            left = read_timeout - (time.monotonic() - last_byte)
            sock.settimeout(max(0.001, min(_GATHER_PATIENCE, left) if mark > 1 else left))
            try:
                n = sock.recv_into(view[got:], length - got)
            except TimeoutError:
                if mark == 1:
                    raise
                gather = False  # not a record's worth in time: take what is there
                continue
            if not n:
                raise ChunkWireError(f"connection closed after {got} of {length} bytes")
            got += n
            exchange._advance(got)
            last_byte = time.monotonic()
            gather = True
    finally:
        with contextlib.suppress(OSError):
            if mark != 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            sock.settimeout(read_timeout)
    # The whole body is read: mark the answer complete so the connection may carry the next request.
    response.length = 0
    response.read()


def _handshake(conn: _Connection) -> str:
    sock = conn.sock
    if not isinstance(sock, ssl.SSLSocket):
        return "plain"
    return "resumed" if sock.session_reused else "full"


def _timed_out(exc: BaseException, exchange: Exchange) -> bool:
    return isinstance(exc, TimeoutError) and not exchange.aborted


def _reason(exc: BaseException, exchange: Exchange) -> str:
    if exchange.aborted:
        return "aborted"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timeout"
    return str(exc) or type(exc).__name__
