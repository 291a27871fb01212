"""What the registry raises: plain exceptions, for the app to map to its own answers."""

from __future__ import annotations


class ClientError(Exception):
    """Base of the registry's errors about one client."""

    def __init__(self, client: str, message: str) -> None:
        super().__init__(message)
        self.client = client
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.client!r}, {self.message!r})"


class ClientUnavailable(ClientError):
    """A client could not be created, or the registry is closing.

    ``retry_after`` is the number of seconds until a creation will be tried again; an HTTP app
    answers 503 with a ``Retry-After`` header.
    """

    def __init__(self, client: str, reason: str, *, retry_after: float = 1.0) -> None:
        super().__init__(client, f"client {client!r} is unavailable: {reason}")
        self.reason = reason
        self.retry_after = retry_after


class ForeignLoopError(ClientError, RuntimeError):
    """A registry made on one event loop was used from another one."""

    def __init__(self, client: str) -> None:
        super().__init__(
            client,
            f"client {client!r} belongs to another event loop: clients are per event loop; "
            "reach it through its accessor inside the loop that serves the request",
        )
