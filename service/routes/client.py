"""The browser and Node client, ``loopgate.js``, served at ``GET /client/loopgate.js``.

A page imports it from the loopgate it talks to, so that client and server always match::

    import { subscribe, publish } from "https://loopgate.example.com/client/loopgate.js";

The file is an ES module installed with the package (``service/web/loopgate.js``), read once.
It is answered with ``Cache-Control: no-cache`` and a strong ``ETag``: a browser revalidates it
at each load (a 304 without body once it has it), and takes a new one as soon as a new loopgate
serves it. Cross-origin ``import`` needs CORS, which :mod:`service.cors` adds for the origins of
``LOOPGATE_ALLOWED_ORIGINS``. No authentication: the file holds no secret.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

from quart import Blueprint, Response, request
from quart_schema import hide

blueprint = Blueprint("client", __name__)

CONTENT_TYPE = "text/javascript; charset=utf-8"


@functools.cache
def client_source() -> tuple[bytes, str]:
    """The module's bytes and their strong ETag (quoted)."""
    source = resources.files("service").joinpath("web", "loopgate.js").read_bytes()
    return source, '"' + hashlib.sha256(source).hexdigest()[:32] + '"'


@blueprint.get("/client/loopgate.js")
@hide
async def loopgate_js() -> Response:
    """The JavaScript client, for browsers (``import``) and Node."""
    source, etag = client_source()
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if request.if_none_match.contains(etag.strip('"')):
        return Response(b"", 304, headers)
    return Response(source, 200, headers, content_type=CONTENT_TYPE)
