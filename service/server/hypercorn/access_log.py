"""Hypercorn's access log, each atom computed only when the line's format or formatter reads it.

For every access line Hypercorn (0.18) builds ``AccessLogAtoms``, a dict of every atom a format
could name: one entry per request header, per response header and per environment variable
(``%({NAME}e)s``; pgjones/hypercorn#359 asks for that atom to read the ASGI scope instead). With a
container's environment that is most of the line's cost, while loopgate's JSON line
(``service/logs.py``) reads eight atoms. :class:`AccessLogAtoms` here is a mapping with the same
keys and values, each computed when it is read; :class:`AccessLogger` is Hypercorn's ``Logger``
with ``atoms()``, the method Hypercorn documents for overriding, returning it.

:func:`use_lean_atoms` makes :class:`AccessLogger` the default ``logger_class`` of Hypercorn's
``Config`` (a class of your own set there is kept). A Hypercorn worker builds its logger when it
first logs, after it has loaded the app, so every worker of ``hypercorn service:create_app()``
gets it. With ``statsd_host`` set, the logger is Hypercorn's statsd logger with these atoms.
tests/test_access_log.py checks the atoms against the installed Hypercorn's, key by key.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from hypercorn.config import Config
from hypercorn.logging import Logger

if TYPE_CHECKING:
    from hypercorn.typing import ResponseSummary, WWWScope

log = logging.getLogger("loopgate.server")


def _headers(pairs: Any) -> dict[str, str]:
    # The last of repeated headers wins, as in Hypercorn's dict.
    return {name.decode("latin1").lower(): value.decode("latin1") for name, value in pairs}


class AccessLogAtoms(Mapping[str, Any]):
    """What Hypercorn's ``AccessLogAtoms`` holds for one access line, computed when read: the
    atoms of ``access_log_format`` (``h``, ``r``, ``s``, ``{name}i``, ``{name}o``, ``{name}e``...,
    ``"-"`` for an unknown one), the time of the line included."""

    __slots__ = ("_in", "_now", "_out", "_request", "_request_time", "_response")

    def __init__(
        self, request: WWWScope, response: ResponseSummary | None, request_time: float
    ) -> None:
        self._request = request
        self._response = response
        self._request_time = request_time
        self._now = time.time()
        self._in: dict[str, str] | None = None
        self._out: dict[str, str] | None = None

    def __getitem__(self, key: str) -> Any:
        atom = _ATOMS.get(key)
        if atom is not None:
            return atom(self)
        if key.startswith("{") and key[-2:-1] == "}":
            value = self._braced(key[1:-2].lower(), key[-1].lower())
            if value is not None:
                return value
        return "-"

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        if key in _ATOMS:
            return True
        # Hypercorn's dict holds braced names in lower case, and only what is there.
        return (
            key.startswith("{")
            and key[-2:-1] == "}"
            and key == key.lower()
            and self._braced(key[1:-2], key[-1]) is not None
        )

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __bool__(self) -> bool:
        return True  # logging takes a record's only argument as its mapping when it is truthy

    def __repr__(self) -> str:
        return f"<loopgate access atoms {self['r']!r} {self['s']}>"

    def _all(self) -> dict[str, Any]:
        # Everything Hypercorn's dict would hold, for whoever iterates (a rare formatter).
        names: dict[str, Any] = {f"{{{name}}}i": None for name in self._request_headers()}
        names.update({f"{{{name.lower()}}}e": None for name in os.environ})
        names.update({f"{{{name}}}o": None for name in self._response_headers()})
        names.update(dict.fromkeys(_ATOMS))
        return {name: self[name] for name in names}

    def _braced(self, name: str, kind: str) -> str | None:
        if kind == "i":
            return self._request_headers().get(name)
        if kind == "o":
            return self._response_headers().get(name)
        if kind == "e":
            found = None
            for variable, value in os.environ.items():
                if variable.lower() == name:
                    found = value  # the last one, as in Hypercorn's dict
            return found
        return None

    def _request_headers(self) -> dict[str, str]:
        if self._in is None:
            self._in = _headers(self._request["headers"])
        return self._in

    def _response_headers(self) -> dict[str, str]:
        if self._out is None:
            self._out = {} if self._response is None else _headers(self._response["headers"])
        return self._out

    # The atoms, as Hypercorn computes them.
    def _remote(self) -> str | None:
        client = self._request.get("client")
        if client is None:
            return None
        if len(client) == 2:
            return f"{client[0]}:{client[1]}"
        if len(client) == 1:
            return str(client[0])
        return f"<???{client}???>"

    def _method(self) -> str:
        return self._request["method"] if self._request["type"] == "http" else "GET"

    def _protocol(self) -> str:
        return self._request.get("http_version", "ws")

    def _query(self) -> str:
        return self._request["query_string"].decode()

    def _path_with_query(self) -> str:
        query = self._query()
        return self._request["path"] + ("?" + query if query else "")

    def _status(self) -> str:
        return "-" if self._response is None else str(self._response["status"])

    def _phrase(self) -> str:
        if self._response is None:
            return "-"
        try:
            return HTTPStatus(self._response["status"]).phrase
        except ValueError:
            return f"<???{self._response['status']}???>"

    def _length(self) -> str:
        return self._response_headers().get("content-length", "-")


_ATOMS: dict[str, Callable[[AccessLogAtoms], Any]] = {
    "h": AccessLogAtoms._remote,
    "l": lambda atoms: "-",
    "t": lambda atoms: time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(atoms._now)),
    "r": lambda atoms: f"{atoms._method()} {atoms._request['path']} {atoms._protocol()}",
    "R": lambda atoms: f"{atoms._method()} {atoms._path_with_query()} {atoms._protocol()}",
    "s": AccessLogAtoms._status,
    "st": AccessLogAtoms._phrase,
    "S": lambda atoms: atoms._request["scheme"],
    "m": AccessLogAtoms._method,
    "U": lambda atoms: atoms._request["path"],
    "Uq": AccessLogAtoms._path_with_query,
    "q": AccessLogAtoms._query,
    "H": AccessLogAtoms._protocol,
    "b": AccessLogAtoms._length,
    "B": AccessLogAtoms._length,
    "f": lambda atoms: atoms._request_headers().get("referer", "-"),
    "a": lambda atoms: atoms._request_headers().get("user-agent", "-"),
    "T": lambda atoms: int(atoms._request_time),
    "D": lambda atoms: int(atoms._request_time * 1_000_000),
    "L": lambda atoms: f"{atoms._request_time:.6f}",
    "p": lambda atoms: f"<{os.getpid()}>",
}


class AccessLogger(Logger):
    """Hypercorn's logger, whose access lines compute only the atoms they read."""

    def __new__(cls, config: Config) -> AccessLogger:
        # Hypercorn picks its statsd logger only while logger_class is its own: keep that choice.
        if cls is AccessLogger and getattr(config, "statsd_host", None) is not None:
            statsd = _statsd_logger(getattr(config, "worker_class", "asyncio"))
            if statsd is not None:
                return super().__new__(statsd)
        return super().__new__(cls)

    def atoms(
        self, request: WWWScope, response: ResponseSummary | None, request_time: float
    ) -> Mapping[str, Any]:
        return AccessLogAtoms(request, response, request_time)


_STATSD: dict[str, type[AccessLogger]] = {}


def _statsd_logger(worker_class: str) -> type[AccessLogger] | None:
    if worker_class not in _STATSD:
        try:
            if worker_class == "trio":
                from hypercorn.trio.statsd import StatsdLogger
            else:
                from hypercorn.asyncio.statsd import StatsdLogger  # type: ignore[assignment]
        except ImportError:
            return None
        _STATSD[worker_class] = type("StatsdAccessLogger", (AccessLogger, StatsdLogger), {})
    return _STATSD[worker_class]


def use_lean_atoms() -> None:
    """Make :class:`AccessLogger` the logger of every Hypercorn ``Config`` whose ``logger_class``
    is Hypercorn's own (once per process)."""
    current = getattr(Config, "logger_class", None)
    if current is AccessLogger or (current is not None and current is not Logger):
        return  # already done, or a logger class of the user's own
    if current is None or not callable(getattr(Logger, "atoms", None)):
        log.warning("this Hypercorn builds its access log in a way loopgate does not know")
        return
    Config.logger_class = AccessLogger
