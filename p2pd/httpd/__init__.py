"""A small HTTP/1.1 server on trio + h11, shared by seed and p2pd.

Keep-alive, HEAD, streamed request and response bodies (Content-Length and chunked),
``Expect: 100-continue``, header-size and idle/read/send timeouts, graceful shutdown, and
``os.sendfile`` for file bodies when the transport is a plain socket, optional TLS
(reloadable contexts, optional client certificates), and an egress rate shared by the
responses in progress, kept by the kernel's pacing of their connections (``SharedPacing``),
and the TCP congestion control of the connections a server accepts.
"""

from ._congestion import check_congestion_control
from ._pacing import SharedPacing
from ._server import (
    FileBody,
    Handler,
    Headers,
    Request,
    RequestBody,
    Response,
    ServerInfo,
    ServerLimits,
    serve_http,
)
from ._tls import TlsContextProvider, TlsFiles

__all__ = [
    "FileBody",
    "Handler",
    "Headers",
    "Request",
    "RequestBody",
    "Response",
    "ServerInfo",
    "ServerLimits",
    "SharedPacing",
    "TlsContextProvider",
    "TlsFiles",
    "check_congestion_control",
    "serve_http",
]
