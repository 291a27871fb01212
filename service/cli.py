"""``loopgate``: serve the gateway, make API tokens, and check a configuration.

``loopgate serve [--server S] [--bind HOST:PORT] [--workers N]`` replaces itself (``os.execvp``)
with the production command line of the chosen server (:mod:`service.server.commands`), so the
server is the process that receives the signals of its supervisor.

``loopgate token create NAME SCOPE... [--file PATH]`` prints a new token and its token-file entry,
or adds the entry to the token file.

``loopgate check`` reads the ``LOOPGATE_*`` settings, the token file and the JWT key as the service
does at startup, and says what is wrong (exit 1) or what it found (exit 0).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .auth.access import Authenticator
from .auth.tokens import TokenFileError, entry_toml, load_token_file, new_token
from .config import Settings, SettingsError, load_settings
from .server import commands

SCOPE_ACTIONS = ("publish", "subscribe", "storage:read", "storage:write")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``loopgate`` command line; returns its exit code (``serve`` does not return)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except CommandError as exc:
        print(f"loopgate {args.command}: {exc}", file=sys.stderr)
        return 1
    return code


class CommandError(Exception):
    """What a command says when it cannot do what was asked (exit 1)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loopgate", description="Async gateway to Google Cloud Pub/Sub and Cloud Storage."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the service under a production server")
    serve.add_argument(
        "--server",
        choices=commands.SERVERS,
        help="the ASGI server (default: uvicorn if installed, else hypercorn)",
    )
    serve.add_argument(
        "--bind",
        metavar="HOST:PORT",
        help=f"where to listen (default: 0.0.0.0:$PORT, or port {commands.DEFAULT_PORT})",
    )
    serve.add_argument(
        "--workers", type=_positive, metavar="N", help="worker processes (default: 2)"
    )
    serve.add_argument(
        "--config-dir",
        type=Path,
        metavar="DIR",
        help="where hypercorn.toml and the *-log.json files are (default: the checkout, else .)",
    )
    serve.add_argument(
        "--dry-run", action="store_true", help="print the command line instead of running it"
    )
    serve.set_defaults(run=_serve)

    token = sub.add_parser("token", help="API tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    create = token_sub.add_parser(
        "create",
        help="make a new API token",
        description="Make a new API token. The token itself is printed once and stored nowhere; "
        "the token file holds only its digest.",
    )
    create.add_argument("name", help="the token's name (e.g. the calling service)")
    create.add_argument(
        "scopes", nargs="+", metavar="SCOPE", help="publish:TOPIC, subscribe:TOPIC, "
        "storage:read:BUCKET, storage:write:BUCKET; '*' for any resource or a trailing '*'",
    )  # fmt: skip
    create.add_argument(
        "--file",
        type=Path,
        metavar="PATH",
        help="add the entry to this token file (LOOPGATE_AUTH_FILE) and print only the token",
    )
    create.set_defaults(run=_token_create)

    check = sub.add_parser(
        "check", help="check the LOOPGATE_* settings, the token file and the JWT key"
    )
    check.set_defaults(run=_check)
    return parser


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {value!r}")
    return number


# -- serve ------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    server: str = args.server or commands.default_server()
    if not commands.installed(server):
        raise CommandError(
            f"the {server} server is not installed: pip install 'loopgate[{server}]'"
        )
    bind: str = args.bind or commands.default_bind()
    host, sep, port = bind.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise CommandError(f"--bind must be HOST:PORT, not {bind!r}")
    directory: Path = args.config_dir or commands.config_dir()
    missing = [str(path) for path in commands.config_files(server, directory) if not path.is_file()]
    if missing:
        raise CommandError(
            f"{', '.join(missing)} not found: run from a directory holding loopgate's "
            "hypercorn.toml, uvicorn-log.json and granian-log.json, or pass --config-dir"
        )
    command = commands.server_command(server, bind, workers=args.workers, directory=directory)
    if args.dry_run:
        print(" ".join(command))
        return 0
    _fresh_metrics_dir()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(command[0], command)


def _fresh_metrics_dir() -> None:
    """Give the server an empty metrics directory of its own, unless one is configured.

    Importing :mod:`service`, as this command did, sets ``PROMETHEUS_MULTIPROC_DIR`` to a
    directory named after this process's parent (see :mod:`service.metrics`): the server that
    replaces this process would share it with every other server that parent starts, and with the
    files of earlier runs.
    """
    variable = "PROMETHEUS_MULTIPROC_DIR"
    inherited = os.path.join(tempfile.gettempdir(), f"loopgate-metrics-{os.getppid()}")
    if os.environ.get(variable) != inherited:
        return  # set by the caller: theirs to manage
    with contextlib.suppress(OSError):
        os.rmdir(inherited)  # made by the import, and still empty
    os.environ[variable] = tempfile.mkdtemp(prefix="loopgate-metrics-")


# -- token create -----------------------------------------------------------------------------


def _token_create(args: argparse.Namespace) -> int:
    name: str = args.name
    scopes: list[str] = args.scopes
    for scope in scopes:
        _check_scope(scope)
    token = new_token()
    entry = entry_toml(name, token, scopes)
    path: Path | None = args.file
    if path is None:
        print(f"# token (give it to the caller; it is not stored anywhere): {token}")
        print(entry, end="")
        return 0
    _add_entry(path, name, entry)
    print(token)
    print(f"added token {name!r} to {path}", file=sys.stderr)
    return 0


def _check_scope(scope: str) -> None:
    if scope == "*":
        return
    action, sep, resource = scope.rpartition(":")
    if not sep or action not in SCOPE_ACTIONS or not resource:
        raise CommandError(
            f"bad scope {scope!r}: a scope is '*' or ACTION:RESOURCE, with ACTION one of "
            f"{', '.join(SCOPE_ACTIONS)} (e.g. publish:orders, storage:read:*)"
        )


def _add_entry(path: Path, name: str, entry: str) -> None:
    """Add ``entry`` to the token file at ``path`` (made if missing), replacing the file at once so
    that a running service re-reads either the old file or the new one, never half of it."""
    try:
        existing = path.read_text() if path.exists() else ""
        if existing:
            if any(old.name == name for old in load_token_file(path)):
                raise CommandError(f"{path} already has a token named {name!r}")
            existing = existing if existing.endswith("\n") else existing + "\n"
            existing += "\n"
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as file:
                file.write(existing + entry)
            os.chmod(temporary, mode)
            load_token_file(Path(temporary))  # what the service will read
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except TokenFileError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc}") from None


# -- check ------------------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    try:
        settings = load_settings()
        authenticator = Authenticator(settings)
    except SettingsError as exc:
        print(f"loopgate check: the configuration is not usable: {exc}", file=sys.stderr)
        return 1
    for line in _summary(settings, authenticator):
        print(line)
    return 0


def _summary(settings: Settings, authenticator: Authenticator) -> list[str]:
    def listed(values: tuple[str, ...]) -> str:
        return ", ".join(values) if values else "(none)"

    if not authenticator.enabled:
        auth = "disabled (development only)"
    else:
        ways = []
        if authenticator.tokens is not None:
            ways.append(f"{len(authenticator.tokens)} API tokens from {settings.auth_file}")
        if authenticator.jwt is not None:
            ways.append(f"JWTs ({authenticator.jwt.algorithm})")
        auth = "; ".join(ways)
    backends = [
        f"Pub/Sub emulator at {os.environ['PUBSUB_EMULATOR_HOST']}"
        if os.environ.get("PUBSUB_EMULATOR_HOST")
        else "Google Cloud Pub/Sub",
        f"storage emulator at {os.environ['STORAGE_EMULATOR_HOST']}"
        if os.environ.get("STORAGE_EMULATOR_HOST")
        else "Google Cloud Storage",
    ]
    return [
        "loopgate check: the configuration is usable",
        f"  project:       {settings.project}",
        f"  topics:        {listed(settings.topics)}",
        f"  subscriptions: {listed(settings.subscriptions)}",
        f"  buckets:       {listed(settings.buckets)}",
        f"  auth:          {auth}",
        f"  backends:      {', '.join(backends)}",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
