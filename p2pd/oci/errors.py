"""OCI Distribution error codes, their HTTP statuses, and the error JSON body.

``OCIError`` is the one exception that request handlers turn into a response; every layer
raises it with the spec's code and lets the HTTP shell format it.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["ERROR_STATUS", "OCIError", "error_body"]

# Status codes follow the distribution spec's error table; TAG_INVALID, RANGE_INVALID,
# TOO_LARGE and METHOD_NOT_ALLOWED are ours for cases the table leaves open.
ERROR_STATUS: dict[str, int] = {
    "BLOB_UNKNOWN": 404,
    "BLOB_UPLOAD_INVALID": 400,
    "BLOB_UPLOAD_UNKNOWN": 404,
    "DIGEST_INVALID": 400,
    "MANIFEST_BLOB_UNKNOWN": 400,
    "MANIFEST_INVALID": 400,
    "MANIFEST_UNKNOWN": 404,
    "NAME_INVALID": 400,
    "NAME_UNKNOWN": 404,
    "SIZE_INVALID": 400,
    "TAG_INVALID": 400,
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    "UNSUPPORTED": 405,
    "TOOMANYREQUESTS": 429,
    "RANGE_INVALID": 416,
    "TOO_LARGE": 413,
    "PAGINATION_NUMBER_INVALID": 400,
    "METHOD_NOT_ALLOWED": 405,
    "NOT_FOUND": 404,
    "BAD_REQUEST": 400,
    "UNAVAILABLE": 503,
    "UNKNOWN": 500,
}


class OCIError(Exception):
    """A request failed in a way the client should be told about.

    Args:
        code: one of ``ERROR_STATUS``'s keys.
        message: a short human-readable sentence.
        detail: optional JSON-serialisable details.
        status: overrides the code's default status.
        headers: extra response headers (e.g. ``Retry-After``, ``Content-Range``).
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        detail: Any = None,
        status: int | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.detail = detail
        self.status = status if status is not None else ERROR_STATUS.get(code, 500)
        self.headers = headers or []

    def body(self) -> bytes:
        return error_body(self.code, self.message, self.detail)


def error_body(code: str, message: str, detail: Any = None) -> bytes:
    entry: dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        entry["detail"] = detail
    return json.dumps({"errors": [entry]}, separators=(",", ":")).encode()
