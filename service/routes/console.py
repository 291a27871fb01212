"""The live console: a page that subscribes to a topic, shows its messages and publishes.

``GET /console`` is a static page (``service/web/console/``: HTML, one ES module, one style
sheet) that imports ``/client/loopgate.js`` from this loopgate and talks only to it. The token a
user pastes stays in the page (``sessionStorage``); the page calls the API with it like any other
client. ``GET /console/topics`` tells the page, for the token it sends, the topics it may use.

Every answer of the console carries a strict Content-Security-Policy (this origin only, no inline
script or style), ``X-Content-Type-Options: nosniff`` and ``Referrer-Policy: no-referrer``.
"""

from __future__ import annotations

import functools
import hashlib
import re
from importlib import resources

from quart import Blueprint, Response, jsonify, request
from quart_schema import hide

from ..auth.access import authorize, current_authenticator, current_identity
from ..config import current_settings
from ..errors import Forbidden, NotFound

blueprint = Blueprint("console", __name__)

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# A Host header fit to be named in the policy (anything else is left out of it).
_HOST = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


@functools.cache
def console_files() -> dict[str, tuple[bytes, str]]:
    """The console's files by name, each with its strong ETag (quoted); read once."""
    folder = resources.files("service").joinpath("web", "console")
    files = {}
    for entry in folder.iterdir():
        if entry.is_file() and any(entry.name.endswith(suffix) for suffix in CONTENT_TYPES):
            body = entry.read_bytes()
            files[entry.name] = (body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return files


def content_security_policy(host: str) -> str:
    """The policy of the console's answers: this origin only; its websockets named outright
    (``'self'`` covers ``ws:`` only in browsers that follow CSP Level 3)."""
    connect = "'self'"
    if _HOST.fullmatch(host):
        connect += f" ws://{host} wss://{host}"
    return (
        f"default-src 'self'; connect-src {connect}; script-src 'self'; style-src 'self'; "
        "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    )


@blueprint.after_request
async def secure_headers(response: Response) -> Response:
    """Every console answer, errors included: the policy and the headers that go with it."""
    response.headers["Content-Security-Policy"] = content_security_policy(request.host)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def _file(name: str) -> Response:
    found = console_files().get(name)
    if found is None:
        raise NotFound(f"the console has no file {name[:100]!r}", resource=name)
    body, etag = found
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if request.if_none_match.contains(etag.strip('"')):
        return Response(b"", 304, headers)
    content_type = CONTENT_TYPES[name[name.rindex(".") :]]
    return Response(body, 200, headers, content_type=content_type)


@blueprint.get("/console")
@hide
async def console_page() -> Response:
    """The console's page."""
    return _file("index.html")


@blueprint.get("/console/")
@hide
async def console_slash() -> Response:
    """The page's own address has no trailing slash (its files are named relative to it)."""
    return Response(b"", 308, {"Location": "../console"})


@blueprint.get("/console/<name>")
@hide
async def console_file(name: str) -> Response:
    """One of the page's files (``app.js``, ``console.css``...).

    Raises:
        NotFound: the console has no such file.
    """
    return _file(name)


@blueprint.get("/console/topics")
@hide
async def console_topics() -> Response:
    """The topics the caller's token may use: ``{"identity": name, "anyTopic": bool, "topics":
    [{"name", "subscribe", "publish"}], "websocketOrigin": bool | null}``. The topics are those
    of ``LOOPGATE_TOPICS``, or when that allows any topic, those the token's scopes name;
    ``anyTopic`` says others may be typed. ``websocketOrigin`` says whether websockets from the
    page's origin (``?origin=``; null without it) pass ``LOOPGATE_ALLOWED_ORIGINS``.

    Raises:
        Unauthenticated: missing or invalid credentials (401): how the page checks a token.
    """
    settings = current_settings()
    await _allowed("subscribe", "*")  # authenticates once, or raises Unauthenticated
    identity = current_identity()
    any_topic = "*" in settings.topics
    if any_topic:
        names = {
            scope.rpartition(":")[2]
            for scope in identity.scopes
            if scope.rpartition(":")[0] in ("subscribe", "publish")
            and not scope.endswith("*")
            and settings.topic_allowed(scope.rpartition(":")[2])
        }
    else:
        names = set(settings.topics)
    topics = [
        {
            "name": name,
            "subscribe": await _allowed("subscribe", name),
            "publish": await _allowed("publish", name),
        }
        for name in sorted(names)
    ]
    origin = request.args.get("origin")
    return jsonify(
        {
            "identity": identity.name,
            "anyTopic": any_topic,
            "topics": topics,
            "websocketOrigin": None
            if origin is None
            else current_authenticator().origin_allowed(origin),
        }
    )


async def _allowed(action: str, topic: str) -> bool:
    try:
        await authorize(action, topic)
    except Forbidden:
        return False
    return True
