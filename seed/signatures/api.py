"""HTTP handlers of the signature endpoints; the registry routes to them after ``Gate.admit``.

- ``GET /extensions/v2/<name>/signatures/<digest>``: ``{"signatures": [...]}`` (pull right);
- ``PUT`` the same path: one signature, 201 (push right);
- ``DELETE`` the same path: all of the manifest's signatures, or one with ``?name=`` (delete right);
- ``GET /extensions/v2/<name>/verdict/<tag or digest>``: the signatures found, which keys
  verified them, and the policy's verdict (pull right). Documented in docs/operations.md.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from p2pd.httpd import Request, Response
from p2pd.oci.digest import Digest
from p2pd.oci.errors import OCIError
from p2pd.oci.grammar import validate_reference
from p2pd.signing.extension import MAX_BODY_BYTES, SUPPORTS_SIGNATURES_HEADER

from .service import SignatureService

__all__ = ["SUPPORTS_SIGNATURES_HEADER", "delete_signatures", "get_signatures", "get_verdict", "put_signature"]



def _json(status: int, document: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, [("Content-Type", "application/json"), *(headers or [])],
                    json.dumps(document, separators=(",", ":")).encode())


async def get_signatures(service: SignatureService, request: Request, name: str, digest: str) -> Response:
    parsed = Digest.parse(digest)
    signatures = await service.list_signatures(name, parsed)
    return _json(200, {"signatures": [signature.to_json() for signature in signatures]})


async def put_signature(service: SignatureService, request: Request, name: str, digest: str,
                        actor: Mapping[str, Any]) -> Response:
    parsed = Digest.parse(digest)
    body = await request.body.read(MAX_BODY_BYTES)
    await service.add_signature(name, parsed, body, actor)
    return Response(201, [("Location", f"/extensions/v2/{name}/signatures/{parsed}")])


async def delete_signatures(service: SignatureService, request: Request, name: str, digest: str,
                            actor: Mapping[str, Any]) -> Response:
    parsed = Digest.parse(digest)
    removed = await service.remove_signatures(name, parsed, request.query_one("name"), actor)
    if not removed:
        raise OCIError("NOT_FOUND", "no such signature", detail={"digest": str(parsed)})
    return _json(202, {"removed": removed})


async def get_verdict(service: SignatureService, request: Request, name: str, reference: str,
                      actor: Mapping[str, Any]) -> Response:
    validate_reference(reference)
    digest = service.storage.stat_manifest(name, reference).digest
    tag = None if ":" in reference else reference
    verdict = await service.verdict(name, digest, tag, actor)
    return _json(200, verdict.to_json(), [("Docker-Content-Digest", str(digest))])
