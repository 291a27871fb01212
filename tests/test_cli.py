"""The ``loopgate`` command line, run as its users run it: a process of its own."""

from __future__ import annotations

import base64
import importlib
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import PROJECT, ROOT, WAIT, Server, Topic, clean_exits, wait_until_up

from devtools.emulators import PubSubEmulator, free_port
from service.server import commands

BODY = {"messages": [{"data": base64.b64encode(b"from-the-cli").decode()}]}


def cli_env(tmp_path: Path, **variables: str) -> dict[str, str]:
    """The environment of a ``loopgate`` process: no ``LOOPGATE_*`` variable but ``variables``,
    this checkout on the path, and temporary files under ``tmp_path``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LOOPGATE_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop("PORT", None)
    env.update({"PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)})
    env.update(variables)
    return env


def loopgate(
    *args: str, env: dict[str, str], cwd: Path = ROOT, prelude: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m service.cli ARGS`` (``prelude``: Python run first, in the same process)."""
    if prelude:
        command = [
            sys.executable, "-c",
            f"{prelude}\nimport sys\nfrom service.cli import main\n"
            "raise SystemExit(main(sys.argv[1:]))",
            *args,
        ]  # fmt: skip
    else:
        command = [sys.executable, "-m", "service.cli", *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=WAIT)


def test_the_console_script_names_a_callable_main() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["loopgate"].partition(":")
    assert module == "service.cli"
    assert callable(getattr(importlib.import_module(module), name))


# -- check ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variables", "says"),
    [
        ({}, "LOOPGATE_PROJECT: Field required"),
        ({"LOOPGATE_PROJECT": "p", "LOOPGATE_TOPCS": "orders"}, "unknown setting LOOPGATE_TOPCS"),
        (
            {"LOOPGATE_PROJECT": "p", "LOOPGATE_STREAM_QUEUE_SIZE": "many"},
            "LOOPGATE_STREAM_QUEUE_SIZE",
        ),
        ({"LOOPGATE_PROJECT": "p"}, "authentication is on but nothing to authenticate with"),
        (
            {"LOOPGATE_PROJECT": "p", "LOOPGATE_AUTH_FILE": "/nonexistent/tokens.toml"},
            "LOOPGATE_AUTH_FILE: cannot read token file /nonexistent/tokens.toml",
        ),
        (
            {"LOOPGATE_PROJECT": "p", "LOOPGATE_JWT_SECRET": "short"},
            "LOOPGATE_JWT_SECRET must be at least 32 characters",
        ),
    ],
)
def test_check_says_what_is_wrong_and_exits_1(
    tmp_path: Path, variables: dict[str, str], says: str
) -> None:
    result = loopgate("check", env=cli_env(tmp_path, **variables))
    assert result.returncode == 1, result
    assert result.stderr.startswith("loopgate check: the configuration is not usable: ")
    assert says in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_check_finds_a_bad_token_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text('[[token]]\nname = "a"\nsha256 = "not-a-digest"\n')
    result = loopgate(
        "check", env=cli_env(tmp_path, LOOPGATE_PROJECT="p", LOOPGATE_AUTH_FILE=str(path))
    )
    assert result.returncode == 1
    assert "sha256 must be the 64-character hex digest of the token" in result.stderr


def test_check_summarizes_a_usable_configuration(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    env = cli_env(tmp_path, LOOPGATE_PROJECT="my-project", LOOPGATE_TOPICS="orders,audit")
    created = loopgate(
        "token", "create", "orders", "publish:orders", "--file", str(tokens), env=env
    )
    assert created.returncode == 0, created.stderr
    env["LOOPGATE_AUTH_FILE"] = str(tokens)
    result = loopgate("check", env=env)
    assert result.returncode == 0, result.stderr
    assert "the configuration is usable" in result.stdout
    assert "project:       my-project" in result.stdout
    assert "topics:        orders, audit" in result.stdout
    assert f"1 API tokens from {tokens}" in result.stdout


# -- token create -----------------------------------------------------------------------------


async def test_a_created_token_is_accepted_by_a_real_server(
    tmp_path: Path, start_server: Any, topic: Topic, admin: Any
) -> None:
    tokens = tmp_path / "tokens.toml"
    env = cli_env(tmp_path)
    scope = f"publish:{topic.name}"
    created = loopgate("token", "create", "orders", scope, "--file", str(tokens), env=env)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("lg_") and token not in tokens.read_text()
    assert tokens.stat().st_mode & 0o777 == 0o600
    # A second token joins the file; a name already there is refused and leaves it as it was.
    other = loopgate("token", "create", "audit", "publish:*", "--file", str(tokens), env=env)
    assert other.returncode == 0, other.stderr
    before = tokens.read_text()
    again = loopgate("token", "create", "orders", "publish:x", "--file", str(tokens), env=env)
    assert again.returncode == 1 and "already has a token named 'orders'" in again.stderr
    assert tokens.read_text() == before

    server = await start_server({"LOOPGATE_AUTH": "enabled", "LOOPGATE_AUTH_FILE": str(tokens)})
    elsewhere = admin.create_topic()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        async with session.post(f"{server.url}/v1/topics/{topic.name}:publish", json=BODY) as r:
            assert r.status == 200, await r.text()
        async with session.post(f"{server.url}/v1/topics/{elsewhere}:publish", json=BODY) as r:
            assert r.status == 403  # the token has only the scope it was made with
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{server.url}/v1/topics/{topic.name}:publish", json=BODY) as r:
            assert r.status == 401
    assert [message.data for message in topic.received(1)] == [b"from-the-cli"]


def test_token_create_prints_the_token_and_its_entry(tmp_path: Path) -> None:
    result = loopgate("token", "create", "billing", "storage:read:*", env=cli_env(tmp_path))
    assert result.returncode == 0, result.stderr
    first, *entry = result.stdout.splitlines()
    token = first.rsplit(" ", 1)[1]
    assert token.startswith("lg_") and first.startswith("#")
    (parsed,) = tomllib.loads("\n".join(entry))["token"]
    assert parsed["name"] == "billing" and parsed["scopes"] == ["storage:read:*"]


def test_token_create_refuses_a_scope_no_route_checks(tmp_path: Path) -> None:
    result = loopgate("token", "create", "x", "storage:*", env=cli_env(tmp_path))
    assert result.returncode == 1
    assert "bad scope 'storage:*'" in result.stderr


def test_the_module_entry_still_makes_tokens(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.auth.tokens", "billing", "publish:invoices"],
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert result.returncode == 0, result.stderr
    assert 'name = "billing"' in result.stdout


# -- serve ------------------------------------------------------------------------------------


def test_serve_runs_the_command_line_of_devtools(tmp_path: Path) -> None:
    from devtools.servers import server_command

    env = cli_env(tmp_path)
    for server in commands.SERVERS:
        args = ["--server", server, "--bind", "127.0.0.1:9999", "--workers", "3"]
        result = loopgate("serve", *args, "--dry-run", env=env)
        assert result.returncode == 0, result.stderr
        expected = server_command(server, "127.0.0.1:9999", workers=3)
        assert result.stdout.split() == expected


def test_serve_defaults_to_uvicorn_on_port_from_the_environment(tmp_path: Path) -> None:
    result = loopgate("serve", "--dry-run", env=cli_env(tmp_path, PORT="9123"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == commands.server_command("uvicorn", "0.0.0.0:9123")


def test_serve_names_the_extra_of_a_server_that_is_not_installed(tmp_path: Path) -> None:
    result = loopgate(
        "serve", "--server", "granian", env=cli_env(tmp_path),
        prelude="import sys; sys.modules['granian'] = None",
    )  # fmt: skip
    assert result.returncode == 1
    assert "granian server is not installed: pip install 'loopgate[granian]'" in result.stderr
    without_uvicorn = loopgate(
        "serve", "--dry-run", env=cli_env(tmp_path), prelude="import sys; sys.modules['uvicorn'] = None"
    )  # fmt: skip
    assert without_uvicorn.returncode == 0
    assert "-m hypercorn" in without_uvicorn.stdout  # the default without uvicorn


def test_serve_says_where_its_configuration_files_are_missing(tmp_path: Path) -> None:
    result = loopgate(
        "serve", "--server", "uvicorn", "--config-dir", str(tmp_path), env=cli_env(tmp_path)
    )
    assert result.returncode == 1
    assert f"{tmp_path / 'uvicorn-log.json'} not found" in result.stderr


def proc_entries(pid: int, name: str) -> list[bytes]:
    """``/proc/PID/NAME`` (``cmdline``, ``environ``): its NUL-separated entries."""
    return Path(f"/proc/{pid}/{name}").read_bytes().split(b"\0")


@pytest.mark.server
async def test_serve_starts_the_server_in_its_own_process_and_sigterm_ends_it(
    tmp_path: Path, pubsub_emulator: PubSubEmulator, server_name: str
) -> None:
    port = free_port()
    env = cli_env(tmp_path, LOOPGATE_PROJECT=PROJECT, LOOPGATE_AUTH="disabled")
    args = ["--server", server_name, "--bind", f"127.0.0.1:{port}", "--workers", "1"]
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", *args],
            env=env,
            cwd=tmp_path,  # the configuration files are found in the checkout, not the cwd
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(port, process, log_path, metrics_dir="")
    try:
        await wait_until_up(server)
        # The server replaced the command (os.execvp): it is the process that gets the signals.
        cmdline = proc_entries(process.pid, "cmdline")
        assert cmdline[1:3] == [b"-m", server_name.encode()]
        environ = proc_entries(process.pid, "environ")
        (metrics_dir,) = [v for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
        # A directory of this server's own, not the one named after the command's parent.
        assert metrics_dir.startswith(f"PROMETHEUS_MULTIPROC_DIR={tmp_path}/".encode())
        assert not metrics_dir.endswith(f"loopgate-metrics-{os.getpid()}".encode())
    finally:
        code = server.stop(signal.SIGTERM)
    assert code in clean_exits(server_name), server.log()
