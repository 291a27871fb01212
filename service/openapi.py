"""The OpenAPI description (quart-schema) with loopgate's tweaks, and responses converted only when
they hold something to convert."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, cast

from quart import Quart
from quart_schema import Info, OpenAPIProvider, QuartSchema
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Rule
from werkzeug.sansio.response import Response as SansIOResponse

# quart-schema's own pattern lets a converter's name run across an earlier variable, turning
# "/v1/buckets/<bucket>/objects/<object:name>" into "/v1/buckets/{name}".
_PATH_VARIABLE = re.compile(r"<(?:[^:<>]*:)?([^<>]+)>")

_MakeResponse = Callable[[Any], Awaitable[Any]]


class LoopgateOpenAPIProvider(OpenAPIProvider):
    """Names every path variable of a rule, whatever converters it uses."""

    def build_paths(self, rule: Rule) -> tuple[dict[str, Any], dict[str, Any]]:
        paths, components = super().build_paths(rule)
        correct = _PATH_VARIABLE.sub(r"{\1}", rule.rule)
        (operations,) = paths.values()  # one path per rule
        return {correct: operations}, components


def init_openapi(app: Quart, *, security_schemes: dict[str, Any]) -> QuartSchema:
    """Describe ``app`` at ``/openapi.json`` with quart-schema, whose conversion of what a view
    returns (models, dataclasses, typed dicts, into JSON-ready values) is kept for the results
    that need it.

    quart-schema wraps ``app.make_response`` so that every result passes through its conversion:
    for a finished ``Response``, which is what loopgate's routes and error handlers return, that is
    two conversions that change nothing (one for the body, one for the headers), each a series of
    type checks and app config lookups, on every request. Such results go to Quart's own
    ``make_response`` directly.
    """
    app.config["QUART_SCHEMA_CONVERT_CASING"] = False
    quart_make_response: _MakeResponse = app.make_response
    schema = QuartSchema(
        app,
        info=Info(title="loopgate", version="0.1.0"),
        security_schemes=security_schemes,
        openapi_provider_class=LoopgateOpenAPIProvider,
    )
    converting_make_response: _MakeResponse = app.make_response

    async def make_response(result: Any) -> Any:
        if _nothing_to_convert(result):
            return await quart_make_response(result)
        return await converting_make_response(result)

    app.make_response = make_response  # type: ignore[method-assign]  # as quart-schema does
    return schema


_SCALARS = frozenset({str, int, float, bool, type(None)})
# Values of a dict or list result looked at before it is left to quart-schema: a small result
# (a health check's) is checked in microseconds, a large one (a page of a thousand objects) would
# cost about as much to check as to convert.
_PLAIN_BUDGET = 256


def _plain_json(value: Any) -> bool:
    """Whether ``value`` is a dict or list of only dicts with ``str`` keys, lists and scalars, at
    most ``_PLAIN_BUDGET`` values in all: what quart-schema would pass through a pydantic
    ``TypeAdapter`` made for the occasion, to get the same value back."""
    if type(value) is not dict and type(value) is not list:
        return False
    pending = [value]
    budget = _PLAIN_BUDGET
    while pending:
        item = pending.pop()
        budget -= 1
        if budget < 0:
            return False
        kind = type(item)
        if kind is dict:
            mapping = cast(dict[Any, Any], item)
            if any(type(key) is not str for key in mapping):
                return False
            pending.extend(mapping.values())
        elif kind is list:
            pending.extend(cast(list[Any], item))
        elif kind not in _SCALARS:
            return False
    return True


def _nothing_to_convert(result: Any) -> bool:
    """Whether quart-schema's conversion would return ``result`` unchanged: a response, text,
    bytes or a small plain JSON value (:func:`_plain_json`), alone or with a status and headers
    given as ``Headers`` or as a dict of strings whose names have no ``_`` (which it would turn
    into ``-``)."""
    headers: Any = None
    if isinstance(result, tuple):
        if len(result) == 3:
            value, _, headers = result
        elif len(result) == 2:
            value, status_or_headers = result
            if not isinstance(status_or_headers, int):
                headers = status_or_headers
        else:
            return False
    else:
        value = result
    if not isinstance(value, (SansIOResponse, str, bytes, HTTPException)) and not _plain_json(
        value
    ):
        return False
    if headers is None or isinstance(headers, Headers):
        return True
    return type(headers) is dict and all(
        type(name) is str and "_" not in name and type(text) is str
        for name, text in headers.items()
    )
