"""`GET /v1/documents/{collection}/{document}`: the document a citation points at, for people.

Citation links (`gateway.citations.document_url`) end in `#chunk-ID`; the page marks that passage
(CSS `:target`, or `?chunk=ID` for a link without a fragment). Served to keys that may use the
collection (`KeyInfo.may_use`): a Bearer key, or a reviewer's session cookie when a person opens
the link in a browser (no cookie and a browser asking for HTML: sent to sign in first). Any
other key gets 403; an unknown collection or document 404. `Accept: application/json` gets the
chunks as JSON.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import msgspec
from litestar import Request, Response, get
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.response import Redirect, Template

from gateway.auth import OPEN_MODE_KEY, KeyInfo
from gateway.errors import AuthenticationFailed, InvalidRequest, NotFound, PermissionDenied
from gateway.review import SESSION_COOKIE
from gateway.services import Services
from retrieval import UnknownCollection
from retrieval.errors import InvalidCollectionName


async def _reader(request: Request[Any, Any, Any], services: Services) -> KeyInfo:
    if services.settings.open_mode:
        return OPEN_MODE_KEY
    authorization = request.headers.get("authorization")
    if authorization:
        return await services.keys.authenticate(authorization)
    key = await services.sessions.check(request.cookies.get(SESSION_COOKIE))
    if key is None:
        raise AuthenticationFailed(
            "Missing API key: send it as 'Authorization: Bearer YOUR_KEY', or sign in at /review/login."
        )
    return key


@get("/v1/documents/{collection:str}/{document:path}", include_in_schema=False)
async def document_view(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    collection: FromPath[str],
    document: FromPath[str],
) -> Response[Any]:
    wants_html = "application/json" not in request.headers.get("accept", "")
    try:
        key = await _reader(request, services)
    except AuthenticationFailed:
        if wants_html and "text/html" in request.headers.get("accept", ""):
            return Redirect("/review/login?" + urlencode({"next": str(request.url.path)}), status_code=303)
        raise
    if not key.may_use(collection):
        raise PermissionDenied(f"this key may not read the documents of collection {collection!r}")
    store = services.store
    if store is None:
        raise InvalidRequest("retrieval is turned off on this gateway (rag = false)", param="collection")
    document_id = document.lstrip("/")
    try:
        chunks = await store.document(collection, document_id)
        info = await store.info(collection)
    except (UnknownCollection, InvalidCollectionName):
        raise NotFound(f"no collection {collection!r}", param="collection", code="unknown_collection") from None
    if not chunks:
        raise NotFound(f"no document {document_id!r} in collection {collection!r}", param="document")
    context = {
        "collection": collection,
        "document": document_id,
        "version": info["version"],
        "title": chunks[0]["title"] or document_id,
        "source": chunks[0]["source"],
        "chunks": chunks,
        "cited": request.query_params.get("chunk"),
    }
    if not wants_html:
        return Response(msgspec.json.encode(context), media_type="application/json")
    return Template("documents/view.html", context=context, headers={"cache-control": "private, no-store"})


DOCUMENT_ROUTES = [document_view]
