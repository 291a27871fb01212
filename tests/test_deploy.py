"""deploy/: the manifests and the Dockerfile, checked against the service's own settings.

No container is built or run here (there is no container daemon): each test reads the files and
compares what they say with the defaults, routes and command lines of the code, so that a changed
default that a manifest depends on fails here.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, WAIT, make_settings

from service import create_app
from service.cli import _parser
from service.config import Settings, SettingsError, load_settings
from service.server import commands
from service.server.granian import shutdown as granian_shutdown
from service.server.hypercorn import close as hypercorn_close
from service.server.uvicorn import shutdown as uvicorn_shutdown

DEPLOY = ROOT / "deploy"
DOCUMENTED_COMMAND = ["loopgate", "serve", "--server", "uvicorn"]
DEFAULTS = Settings.model_fields


def documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert isinstance(document, dict), f"{path}: not a mapping"
            yield path, document


def manifest(kind: str, api_version: str | None = None) -> dict[str, Any]:
    (found,) = [
        document
        for _, document in documents()
        if document["kind"] == kind and api_version in (None, document["apiVersion"])
    ]
    return found


def deployment() -> dict[str, Any]:
    return manifest("Deployment")


def cloud_run() -> dict[str, Any]:
    return manifest("Service", "serving.knative.dev/v1")


def pod_spec(document: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = document["spec"]["template"]["spec"]
    return spec


def container(document: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod_spec(document)["containers"]
    assert isinstance(only, dict)
    return only


def both() -> list[dict[str, Any]]:
    return [deployment(), cloud_run()]


def test_every_manifest_parses_and_names_its_kind() -> None:
    kinds = {(path.relative_to(DEPLOY).parts[0], doc["kind"]) for path, doc in documents()}
    assert kinds >= {
        ("kubernetes", "Deployment"),
        ("kubernetes", "Service"),
        ("kubernetes", "PodDisruptionBudget"),
        ("kubernetes", "HorizontalPodAutoscaler"),
        ("kubernetes", "ServiceAccount"),
        ("cloudrun", "Service"),
    }
    for path, document in documents():
        assert document.get("apiVersion"), path
    kustomization = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    manifests = {path.name for path in (DEPLOY / "kubernetes").glob("*.yaml")}
    assert listed == manifests - {"kustomization.yaml"}


# -- probes -----------------------------------------------------------------------------------


def routes() -> dict[str, str]:
    """Each GET path of the app and its endpoint."""
    app = create_app(make_settings())
    return {
        rule.rule: rule.endpoint
        for rule in app.url_map.iter_rules()
        if rule.methods is not None and "GET" in rule.methods
    }


def test_probes_ask_the_routes_meant_for_them() -> None:
    endpoints = routes()
    for document in both():
        probes = {name: container(document).get(name) for name in ("startupProbe", "livenessProbe")}
        for name, probe in probes.items():
            assert probe is not None, name
            # Liveness never asks a backend (service/routes/health.py): only /healthz.
            assert endpoints[probe["httpGet"]["path"]] == "health.healthz", name
    readiness = container(deployment())["readinessProbe"]
    assert endpoints[readiness["httpGet"]["path"]] == "health.readyz"
    # The probe waits longer than /readyz's own backend calls may take.
    assert readiness["timeoutSeconds"] > DEFAULTS["ready_timeout"].default


def port_number(document: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (named,) = [p for p in container(document)["ports"] if p["name"] == port]
    return int(named["containerPort"])


def test_probes_and_the_service_use_the_container_port() -> None:
    for document in both():
        (port,) = container(document)["ports"]
        for name in ("startupProbe", "livenessProbe", "readinessProbe"):
            if name in container(document):
                probe_port = container(document)[name]["httpGet"]["port"]
                assert port_number(document, probe_port) == port["containerPort"], name
    service = manifest("Service", "v1")
    (service_port,) = service["spec"]["ports"]
    assert port_number(deployment(), service_port["targetPort"]) == 8080


# -- the command and its port -----------------------------------------------------------------


def served(args: list[str], **env: str) -> list[str]:
    """The server's command line that ``loopgate ARGS`` runs (``--dry-run``) in ``env``."""
    environ = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **env}
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", *args, "--dry-run"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=True,
    )
    return result.stdout.split()


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_container_listens_on_its_declared_port() -> None:
    cmd = dockerfile().final.cmd
    for document in both():
        assert "command" not in container(document) and "args" not in container(document)
        (port,) = container(document)["ports"]
        env = {item["name"]: item["value"] for item in container(document).get("env", [])}
        # Kubernetes sets no PORT (unless the manifest does); Cloud Run sets it to containerPort.
        if document["apiVersion"] == "serving.knative.dev/v1":
            env["PORT"] = str(port["containerPort"])
        command = served(cmd[1:], **{k: v for k, v in env.items() if k == "PORT"})
        assert int(flag(command, "--port")) == port["containerPort"]
        assert flag(command, "--host") == "0.0.0.0"


# -- settings ---------------------------------------------------------------------------------


def test_the_environment_of_the_manifests_is_loopgates() -> None:
    for document in both():
        env = {item["name"]: item["value"] for item in container(document)["env"]}
        names = {name for name in env if name.startswith("LOOPGATE_")}
        assert names, "the manifests configure loopgate through LOOPGATE_* variables"
        unknown = {name for name in names if name[len("LOOPGATE_") :].lower() not in DEFAULTS}
        assert not unknown
        settings = load_settings(env)  # what the service does at startup
        assert settings.auth == "enabled" and settings.auth_file is not None
        mounts = [mount["mountPath"] for mount in container(document)["volumeMounts"]]
        assert str(settings.auth_file.parent) in mounts  # the token file's volume


def test_kubernetes_adds_no_variables_that_loopgate_refuses() -> None:
    # A Service named loopgate would give every pod LOOPGATE_PORT and friends, which stop startup.
    with pytest.raises(SettingsError, match="unknown setting LOOPGATE_PORT"):
        load_settings({"LOOPGATE_PROJECT": "p", "LOOPGATE_PORT": "tcp://10.0.0.1:80"})
    assert manifest("Service", "v1")["metadata"]["name"].upper().replace("-", "_") == "LOOPGATE"
    assert pod_spec(deployment())["enableServiceLinks"] is False


# -- shutdown ---------------------------------------------------------------------------------


def pre_stop_seconds() -> float:
    command = container(deployment())["lifecycle"]["preStop"]["exec"]["command"]
    assert Path(command[0]).name == "sleep"
    return float(command[1])


def test_the_grace_period_covers_the_pre_stop_wait_the_drain_and_the_graceful_timeout() -> None:
    grace = pod_spec(deployment())["terminationGracePeriodSeconds"]
    pre_stop = pre_stop_seconds()
    assert pre_stop >= 5  # long enough for the endpoints to be removed before SIGTERM
    close = DEFAULTS["client_close_timeout"].default  # the app's shutdown closes its clients
    needs = {
        # uvicorn's signal handler drains the streams first, then uvicorn waits its graceful timeout.
        "uvicorn": uvicorn_shutdown.DRAIN_SECONDS + commands.graceful_timeout("uvicorn") + close,
        # granian's master kills a worker at its timeout, drain and app shutdown included.
        "granian": granian_shutdown.DRAIN_SECONDS + commands.graceful_timeout("granian"),
        # Hypercorn drains within its graceful timeout, then resets what is left.
        "hypercorn": commands.graceful_timeout("hypercorn", ROOT)
        + hypercorn_close.FLUSH_SECONDS
        + close,
    }
    for server, seconds in needs.items():
        assert grace > pre_stop + seconds, server
    served_by = dockerfile().final.cmd[dockerfile().final.cmd.index("--server") + 1]
    assert served_by in needs


# -- Cloud Run --------------------------------------------------------------------------------


def test_cloud_run_keeps_streams_and_their_cpu() -> None:
    service = cloud_run()
    template = service["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["run.googleapis.com/sessionAffinity"] == "true"
    assert annotations["run.googleapis.com/cpu-throttling"] == "false"
    assert template["spec"]["timeoutSeconds"] == 3600
    assert template["spec"]["serviceAccountName"].endswith(".iam.gserviceaccount.com")
    # A stream may last as long as Cloud Run lets a request last.
    assert DEFAULTS["stream_idle_timeout"].default <= template["spec"]["timeoutSeconds"]
    (port,) = container(service)["ports"]
    assert port["name"] == "http1"  # websockets need HTTP/1.1 to the container


# -- Kubernetes -------------------------------------------------------------------------------


def test_the_budget_and_the_autoscaler_target_the_deployment() -> None:
    deploy = deployment()
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    selector = deploy["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    budget = manifest("PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"] == selector
    assert manifest("Service", "v1")["spec"]["selector"] == selector
    target = manifest("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deploy["metadata"]["name"])
    assert target["apiVersion"] == deploy["apiVersion"]


def test_the_pods_run_as_the_workload_identity_account_and_the_images_user() -> None:
    account = manifest("ServiceAccount")
    email = account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
    assert email.endswith(".iam.gserviceaccount.com")
    spec = pod_spec(deployment())
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    user = dockerfile().final.user.split(":")[0]
    assert str(spec["securityContext"]["runAsUser"]) == user


# -- the Dockerfile ---------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, name: str) -> list[str]:
        return [args for instruction, args in self.instructions if instruction == name]

    @property
    def user(self) -> str:
        users = self.all("USER")
        assert users, "the final stage sets no USER: it would run as root"
        return users[-1]

    @property
    def cmd(self) -> list[str]:
        (*_, cmd) = self.all("CMD")
        command = json.loads(cmd)  # the exec form: the server gets the signals, not a shell
        assert isinstance(command, list)
        return command


@dataclass
class Dockerfile:
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def dockerfile() -> Dockerfile:
    """deploy/Dockerfile's instructions, stage by stage (comments dropped, continuations joined)."""
    stages: list[Stage] = []
    logical = ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        instruction, _, args = logical.strip().partition(" ")
        logical = ""
        if instruction.upper() == "FROM":
            stages.append(Stage(args.split()[0]))
        elif stages:
            stages[-1].instructions.append((instruction.upper(), args.strip()))
    return Dockerfile(stages)


def test_the_image_runs_the_documented_command_as_an_unprivileged_user() -> None:
    image = dockerfile()
    assert len(image.stages) >= 2  # the wheel is built in a stage of its own
    assert image.final.cmd == DOCUMENTED_COMMAND
    assert image.final.all("ENTRYPOINT") == []
    user = image.final.user.split(":")[0]
    # Numeric, so that Kubernetes' runAsNonRoot can tell it is not root.
    assert user.isdigit() and int(user) != 0
    # The command parses, and is the server's production command line (as devtools builds it).
    args = _parser().parse_args(image.final.cmd[1:])
    assert args.server == "uvicorn" and args.bind is None and args.workers is None
    assert served(image.final.cmd[1:]) == commands.server_command("uvicorn", "0.0.0.0:8080")
    readme = (ROOT / "README.md").read_text() + (DEPLOY / "README.md").read_text()
    assert shlex.join(DOCUMENTED_COMMAND) in readme


def test_the_image_has_the_servers_configuration_where_loopgate_serve_looks() -> None:
    final = dockerfile().final
    (workdir, *_) = final.all("WORKDIR")
    copied = " ".join(args for args in final.all("COPY") if not args.startswith("--from"))
    for server in commands.SERVERS:
        for path in commands.config_files(server, Path(workdir)):
            assert path.name in copied.split(), path
            assert (ROOT / path.name).is_file()
    # The wheel's stage builds from the package and its metadata only.
    build = dockerfile().stages[0]
    assert any("uvicorn" in args for args in build.all("RUN"))


def test_the_image_installs_no_emulator_nor_development_tools() -> None:
    text = " ".join(args for stage in dockerfile().stages for _, args in stage.instructions)
    for word in ("emulator", "[dev]", ",dev]", "gcloud", "google-cloud-cli", "openjdk", "pytest"):
        assert word not in text.lower(), word
