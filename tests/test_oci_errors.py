"""OCI error codes, statuses and the error JSON body (p2pd.oci.errors): pure, no I/O."""

from __future__ import annotations

import json

import pytest

from p2pd.oci.errors import ERROR_STATUS, OCIError, error_body

SPEC_CODES = {
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
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    "UNSUPPORTED": 405,
    "TOOMANYREQUESTS": 429,
}


@pytest.mark.parametrize(("code", "status"), sorted(SPEC_CODES.items()))
def test_spec_codes_and_statuses(code: str, status: int) -> None:
    assert ERROR_STATUS[code] == status
    assert OCIError(code, "x").status == status


def test_error_body_shape() -> None:
    document = json.loads(error_body("BLOB_UNKNOWN", "blob unknown to registry", {"digest": "sha256:ab"}))
    assert document == {
        "errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown to registry", "detail": {"digest": "sha256:ab"}}]
    }
    # Without detail the key is omitted, which the spec allows.
    assert json.loads(error_body("DENIED", "no")) == {"errors": [{"code": "DENIED", "message": "no"}]}
    # Falsy details other than None are kept.
    assert json.loads(error_body("DENIED", "no", []))["errors"][0]["detail"] == []


def test_oci_error_fields_and_body() -> None:
    exc = OCIError("RANGE_INVALID", "nope", status=416, headers=[("Content-Range", "bytes */9")], detail={"s": 9})
    assert exc.code == "RANGE_INVALID"
    assert exc.message == "nope"
    assert exc.status == 416
    assert exc.headers == [("Content-Range", "bytes */9")]
    assert "RANGE_INVALID" in str(exc)
    body = json.loads(exc.body())
    assert list(body) == ["errors"]
    assert len(body["errors"]) == 1
    entry = body["errors"][0]
    assert set(entry) == {"code", "message", "detail"}
    assert entry == {"code": "RANGE_INVALID", "message": "nope", "detail": {"s": 9}}


def test_status_override_and_unknown_code() -> None:
    assert OCIError("SIZE_INVALID", "too big", status=413).status == 413
    assert OCIError("NO_SUCH_CODE", "?").status == 500
    assert OCIError("UNKNOWN", "?").status == 500
    assert OCIError("DENIED", "x").headers == []


def test_body_is_compact_utf8_json() -> None:
    body = error_body("NAME_INVALID", "invalid repository name", {"name": "é\x00/../"})
    assert isinstance(body, bytes)
    assert b"\n" not in body
    assert json.loads(body.decode("utf-8"))["errors"][0]["detail"]["name"] == "é\x00/../"
