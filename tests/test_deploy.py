"""Packaging and deployment files, checked without a container engine (none runs here).

- Kubernetes manifests (deploy/k8s) validated offline against the Kubernetes JSON schemas that
  the ``kubernetes-validate`` package bundles, strictly (unknown fields are errors), for the
  oldest and newest versions we claim; plus the cross-references a schema cannot see (selectors,
  probe paths, the drain budget, names of ConfigMaps and Secrets, every EVENTBUS_* name).
- compose.yaml parsed: services, healthchecks, depends_on, the load balancer config.
- Dockerfile parsed: stages, non-root USER, exec-form ENTRYPOINT, HEALTHCHECK, EXPOSE, and
  .dockerignore.
- The image's commands executed outside a container: the gateway is started exactly as the image's
  ENTRYPOINT and ENV would start it, the image's HEALTHCHECK command is run against it, and it
  must stop cleanly on SIGTERM. The demo image's entrypoint and healthcheck likewise.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import kubernetes_validate
import msgspec
import pytest
import yaml

from gateway.config import GatewayConfig
from tests.support.gateway_client import REQUIRED_METRICS
from tests.support.redis_server import free_port

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
#: Oldest Kubernetes we claim to support (policy/v1 PDB, autoscaling/v2 HPA, seccompProfile are
#: all GA there), and the newest schemas the package has.
K8S_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
GATEWAY_FIELDS = {f.name: f for f in msgspec.structs.fields(GatewayConfig)}
DEFAULT_PORT = GATEWAY_FIELDS["port"].default
LABEL = {"app.kubernetes.io/name": "eventbus-gateway"}


def env_field(name: str) -> str:
    """The GatewayConfig field an EVENTBUS_* variable sets (fails for an unknown one)."""
    assert name.startswith("EVENTBUS_"), name
    field_name = name.removeprefix("EVENTBUS_").lower()
    assert field_name in GATEWAY_FIELDS, f"{name} is not a gateway setting"
    return field_name


# --- Dockerfile ---------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    parent: str  # another stage's name, or an image
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(path: Path = ROOT / "Dockerfile") -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages in order). Handles comments and line continuations."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "dangling line continuation"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, flags=re.IGNORECASE)
            assert match, line
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], match.group(1))
            stages.append(Stage(match.group(2) or str(len(stages)), image))
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def chain(stages: list[Stage], stage: Stage) -> list[Stage]:
    """The stage and its ancestors within the file, oldest first."""
    by_name = {s.name: s for s in stages}
    out = [stage]
    while out[0].parent in by_name:
        out.insert(0, by_name[out[0].parent])
    return out


def effective(stages: list[Stage], stage: Stage, keyword: str) -> list[str]:
    return [args for s in chain(stages, stage) for args in s.all(keyword)]


def image_env(stages: list[Stage], stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in effective(stages, stage, "ENV"):
        for item in shlex.split(args):
            name, sep, value = item.partition("=")
            assert sep, f"use ENV name=value, not the legacy form: {args}"
            env[name] = value
    return env


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), args
    return value


def healthcheck_command(stage_args: str) -> list[str]:
    options, sep, command = stage_args.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {stage_args}"
    for option in options.split():
        assert re.fullmatch(r"--(interval|timeout|start-period|retries)=\w+", option), option
    return exec_form(command)


def last_user(stages: list[Stage], stage: Stage) -> str:
    users = effective(stages, stage, "USER")
    assert users, f"stage {stage.name} runs as root (no USER)"
    return users[-1]


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile()


def stage_named(stages: list[Stage], name: str) -> Stage:
    return next(s for s in stages if s.name == name)


def test_dockerfile_is_multi_stage_on_slim_python(dockerfile) -> None:
    _, stages = dockerfile
    assert [s.name for s in stages] == ["build", "base", "demo", "gateway"]
    images = {s.parent for s in stages if s.parent not in {t.name for t in stages}}
    assert len(images) == 1
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", images.pop())
    # Only the finished virtualenv crosses from the build stage; no source tree, no pip cache.
    copies = [c for s in stages[1:] for c in s.all("COPY") if "--from=" in c]
    assert copies == ["--from=build /opt/eventbus /opt/eventbus"]


def test_gateway_stage_is_the_default_target_and_runs_unprivileged(dockerfile) -> None:
    _, stages = dockerfile
    final = stages[-1]
    assert final.name == "gateway", "the last stage is what `docker build .` produces"
    for stage in (final, stage_named(stages, "demo")):
        user = last_user(stages, stage).split(":")[0]
        assert user not in ("root", "0", ""), f"{stage.name} runs as root"
        assert user.isdigit(), "a numeric uid lets Kubernetes' runAsNonRoot verify it"
    deployment = load_k8s()["Deployment"]
    pod_user = deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert str(pod_user) == last_user(stages, final).split(":")[0]


def test_gateway_entrypoint_is_exec_form_so_sigterm_reaches_python(dockerfile) -> None:
    _, stages = dockerfile
    final = stages[-1]
    entrypoints = final.all("ENTRYPOINT")
    assert len(entrypoints) == 1
    assert exec_form(entrypoints[0]) == ["python", "-m", "gateway"]
    assert not effective(stages, final, "CMD"), "flags come from `docker run IMAGE --flag`"
    assert final.all("STOPSIGNAL") == ["SIGTERM"]


def test_gateway_image_listens_on_the_default_port_with_a_healthcheck(dockerfile) -> None:
    _, stages = dockerfile
    final = stages[-1]
    env = image_env(stages, final)
    assert final.all("EXPOSE") == [str(DEFAULT_PORT)]
    assert env["EVENTBUS_PORT"] == str(DEFAULT_PORT)
    assert env["EVENTBUS_HOST"] == "0.0.0.0", "127.0.0.1 would be unreachable from outside"
    assert env["EVENTBUS_LOG_FORMAT"] == "json"
    for name in env:
        if name.startswith("EVENTBUS_"):
            env_field(name)
    (check,) = final.all("HEALTHCHECK")
    command = healthcheck_command(check)
    assert command[0] == "python" and "/healthz" in command[-1]
    assert "curl" not in check and "wget" not in check, "slim images have neither"


def test_dockerignore_admits_exactly_what_the_dockerfile_copies(dockerfile) -> None:
    _, stages = dockerfile
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", ".dockerignore should be an allowlist"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    for stage in stages:
        for copy in stage.all("COPY"):
            if copy.startswith("--from="):
                continue
            *sources, _destination = copy.split()
            for source in sources:
                matches = list(ROOT.glob(source))
                if "[" not in source:  # a wildcard may match nothing (README.m[d])
                    assert matches, f"COPY source {source} does not exist"
                top = re.sub(r"\[.*", "*", source).split("/")[0]
                assert any(re.fullmatch(top.replace("*", ".*"), a) for a in allowed), source
    for secretish in (".venv", ".git", "tests", "examples/dashboard/data/"):
        assert secretish not in allowed


# --- Kubernetes -----------------------------------------------------------------------------


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def load_k8s() -> dict[str, dict]:
    """kind -> manifest, for deploy/k8s/*.yaml (what kustomization applies + the Secret example;
    optional/ holds alternatives, loaded where needed)."""
    docs: dict[str, dict] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in docs, f"two {doc['kind']}s"
            docs[doc["kind"]] = doc
    return docs


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", k8s_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_matches_the_kubernetes_schema(path: Path, version: str) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents, f"{path} is empty"
    for document in documents:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            location = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name} ({document['kind']}) at {location}: {exc.message}")


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    top_level = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == top_level - {"secret.example.yaml"}
    assert "Secret" not in {yaml.safe_load((K8S / r).read_text())["kind"] for r in listed}


def test_selectors_and_references_line_up() -> None:
    docs = load_k8s()
    deployment, service = docs["Deployment"], docs["Service"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        service["spec"]["selector"],
        docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector == LABEL and selector.items() <= pod_labels.items()
    assert service["spec"].get("sessionAffinity", "None") == "None", "no sticky sessions"
    optional_hpa = yaml.safe_load((K8S / "optional" / "hpa-connections.yaml").read_text())
    for hpa in (docs["HorizontalPodAutoscaler"], optional_hpa):
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
        assert hpa["spec"]["minReplicas"] >= 2
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (port,) = container["ports"]
    assert port["containerPort"] == DEFAULT_PORT
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    sources = {
        ("ConfigMap" if "configMapRef" in ref else "Secret"): next(iter(ref.values()))["name"]
        for ref in container["envFrom"]
    }
    assert sources == {
        "ConfigMap": docs["ConfigMap"]["metadata"]["name"],
        "Secret": docs["Secret"]["metadata"]["name"],
    }


def test_gateway_pod_probes_drain_and_hardening() -> None:
    docs = load_k8s()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # The preStop sleep and the drain must both fit in the grace period, with a margin.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(docs["ConfigMap"]["data"]["EVENTBUS_DRAIN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + drain + 5
    assert drain < GATEWAY_FIELDS["drain_timeout"].default * 10  # a number, and sane
    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False


def test_every_eventbus_variable_in_the_manifests_is_a_gateway_setting() -> None:
    docs = load_k8s()
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    names = {e["name"] for e in container["env"]}
    names |= set(docs["ConfigMap"]["data"]) | set(docs["Secret"]["stringData"])
    assert {"EVENTBUS_REDIS_URL", "EVENTBUS_AUTH_SECRET"} <= set(docs["Secret"]["stringData"])
    for name in names:
        env_field(name)


def test_autoscaling_uses_cpu_and_optionally_connections() -> None:
    hpa = load_k8s()["HorizontalPodAutoscaler"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    optional = yaml.safe_load((K8S / "optional" / "hpa-connections.yaml").read_text())
    pods_metrics = [m["pods"]["metric"]["name"] for m in optional["spec"]["metrics"] if "pods" in m]
    assert pods_metrics == ["eventbus_connections"]
    assert optional["metadata"]["name"] == hpa["metadata"]["name"], "meant to replace hpa.yaml"


# --- compose.yaml ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_services_and_their_order(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "gateway-1", "gateway-2", "lb", "demo"}
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        assert service["healthcheck"]["test"][0] == "CMD", "exec form: no shell in the images"
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services
            assert condition == {"condition": "service_healthy"}, (name, dependency)
    assert set(services["lb"]["depends_on"]) == {"gateway-1", "gateway-2"}
    assert set(services["demo"]["depends_on"]) == {"redis", "lb"}
    for gateway in ("gateway-1", "gateway-2"):
        assert set(services[gateway]["depends_on"]) == {"redis"}
        assert "ports" not in services[gateway], "clients reach gateways only through the lb"
    assert services["lb"]["ports"] == [f"{DEFAULT_PORT}:{DEFAULT_PORT}"]


def test_compose_gateways_match_the_image(compose: dict, dockerfile) -> None:
    _, stages = dockerfile
    (image_check,) = stages[-1].all("HEALTHCHECK")
    (demo_check,) = stage_named(stages, "demo").all("HEALTHCHECK")
    services = compose["services"]
    for name in ("gateway-1", "gateway-2"):
        gateway = services[name]
        assert gateway["build"] == {"context": ".", "target": "gateway"}
        assert gateway["healthcheck"]["test"] == ["CMD", *healthcheck_command(image_check)]
        env = gateway["environment"]
        for variable in env:
            env_field(variable)
        assert env["EVENTBUS_REDIS_URL"] == "redis://redis:6379/0"
        assert "EVENTBUS_AUTH_SECRET" in env and "EVENTBUS_NO_AUTH" not in env
        grace = int(gateway["stop_grace_period"].removesuffix("s"))
        assert grace > float(env["EVENTBUS_DRAIN_TIMEOUT"]), "a stop must drain, not SIGKILL"
        assert gateway["read_only"] is True and gateway["cap_drop"] == ["ALL"]
    demo = services["demo"]
    assert demo["build"]["target"] == "demo"
    assert demo["healthcheck"]["test"] == ["CMD", *healthcheck_command(demo_check)]
    assert demo["environment"]["EVENTBUS_AUTH_SECRET"] == env["EVENTBUS_AUTH_SECRET"]


def test_compose_demo_reaches_the_gateways_from_inside_its_container(compose: dict) -> None:
    """The page is told the load balancer's address as the host publishes it (localhost); the
    backend's own consumer, through which the simulated agents learn of answers, runs inside the
    demo container, where localhost is the container itself: it must be given the balancer's
    service name. Without it the consumer dialled ws://127.0.0.1:<gateway port>/ in the demo
    container for ever, and no agent ever resumed after an answer."""
    env = compose["services"]["demo"]["environment"]
    assert env["EVENTBUS_DASHBOARD_GATEWAY_URL"] == f"ws://localhost:{DEFAULT_PORT}/"
    assert env["EVENTBUS_DASHBOARD_GATEWAY_HTTP_URL"] == f"http://localhost:{DEFAULT_PORT}"
    assert env.get("EVENTBUS_DASHBOARD_CONSUMER_URL") == f"ws://lb:{DEFAULT_PORT}/"


def test_compose_load_balancer_config(compose: dict) -> None:
    lb = compose["services"]["lb"]
    (mount,) = lb["volumes"]
    source, _target, mode = mount.split(":")
    config = (ROOT / source).read_text()
    assert mode == "ro"
    assert re.search(rf"^\s*bind :{DEFAULT_PORT}$", config, re.M)
    servers = re.findall(r"^\s*server (\S+) (\S+)$", config, re.M)
    assert servers == [(g, f"{g}:{DEFAULT_PORT}") for g in ("gateway-1", "gateway-2")]
    assert "option httpchk GET /readyz" in config, "route only to ready (non-draining) gateways"
    assert re.search(r"^\s*timeout tunnel \d+[smh]$", config, re.M), "WebSockets need it"
    assert "balance leastconn" in config
    assert "monitor-uri /lb-healthz" in config and "/lb-healthz" in lb["healthcheck"]["test"][-1]
    assert not re.search(r"^\s*(cookie|stick|hash-type)\b", config, re.M), "no sticky sessions"


# --- docs/operations.md ---------------------------------------------------------------------

OPERATIONS = ROOT / "docs" / "operations.md"


def doc_section(title: str) -> str:
    text = OPERATIONS.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def documented_metrics() -> set[str]:
    table = [line for line in doc_section("Metrics and alerts").splitlines() if "| " in line]
    rows = [line for line in table if re.search(r"\| (gauge|counter|histogram) \|", line)]
    return {name for row in rows for name in re.findall(r"`(eventbus_\w+)(?:\{\w+\})?`", row)}


def test_operations_doc_lists_every_setting() -> None:
    table = doc_section("Configuration")
    for name in GATEWAY_FIELDS:
        env, flag = f"EVENTBUS_{name.upper()}", "--" + name.replace("_", "-")
        assert f"| `{env}` | `{flag}` |" in table, f"{env} is missing from docs/operations.md"


def test_operations_doc_has_the_required_sections() -> None:
    text = OPERATIONS.read_text()
    for title in (
        "Configuration",
        "Deployment",
        "Redis Cluster",
        "Retention and how long a client may be offline",
        "Capacity",
        "When to add pods",
        "When to move to a Redis Cluster",
        "Metrics and alerts",
        "What was not run here",
    ):
        assert re.search(rf"^##+ {re.escape(title)}$", text, re.M), title
    capacity = doc_section("Capacity")
    assert "PLACEHOLDER" not in capacity and "deliveries/s" in capacity, "measured figures"
    assert set(REQUIRED_METRICS) <= documented_metrics()


# --- the image's commands, run outside a container -----------------------------------------


def run_healthcheck(command: list[str], env: dict[str, str]) -> int:
    argv = [sys.executable if part == "python" else part for part in command]
    return subprocess.run(argv, env=env, timeout=10, capture_output=True).returncode


def wait_healthy(command: list[str], env: dict[str, str], process: subprocess.Popen, log: Path):
    deadline = time.monotonic() + 20
    while run_healthcheck(command, env) != 0:
        assert process.poll() is None, f"exited with {process.returncode}: {log.read_text()}"
        assert time.monotonic() < deadline, f"never healthy: {log.read_text()}"
        time.sleep(0.2)


def container_env(image: dict[str, str], **overrides: str) -> dict[str, str]:
    """The environment a container of the image would have: the image's ENV (PATH aside: the
    venv is this interpreter), the test's settings on top, nothing EVENTBUS_* from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
    env.update({k: v for k, v in image.items() if k != "PATH"})
    env.update(overrides)
    return env


def test_gateway_image_commands_outside_a_container(
    dockerfile, redis_url: str, tmp_path: Path
) -> None:
    _, stages = dockerfile
    final = stages[-1]
    entrypoint = exec_form(final.all("ENTRYPOINT")[0])
    check = healthcheck_command(final.all("HEALTHCHECK")[0])
    port = free_port()
    env = container_env(
        image_env(stages, final),
        EVENTBUS_PORT=str(port),
        EVENTBUS_REDIS_URL=redis_url,
        EVENTBUS_AUTH_SECRET="deploy-test-secret",
        EVENTBUS_DRAIN_TIMEOUT="2",
    )
    assert run_healthcheck(check, env) != 0, "nothing listens yet: the check must fail"
    log = tmp_path / "gateway.log"
    with log.open("wb") as output:
        # cwd is an empty directory, like the image's WORKDIR: the installed package runs.
        process = subprocess.Popen(
            [sys.executable if p == "python" else p for p in entrypoint],
            env=env,
            cwd=tmp_path,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_healthy(check, env, process, log)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            assert response.status == 200
            assert json.loads(response.read())["ready"] is True
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            exported = {
                re.sub(r"_(bucket|sum|count)$", "", line.split("{")[0].split()[0])
                for line in response.read().decode().splitlines()
                if line.startswith("eventbus_")
            }
        assert exported == documented_metrics(), "docs/operations.md's metrics table is stale"

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    assert run_healthcheck(check, env) != 0, "the check must fail once the gateway is gone"
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines, "the gateway logged nothing"
    for line in lines:  # EVENTBUS_LOG_FORMAT=json from the image: one JSON object per line
        assert isinstance(json.loads(line), dict), line


def test_demo_image_commands_outside_a_container(
    dockerfile, redis_url: str, tmp_path: Path
) -> None:
    _, stages = dockerfile
    demo = stage_named(stages, "demo")
    entrypoint = exec_form(demo.all("ENTRYPOINT")[0])
    check = healthcheck_command(demo.all("HEALTHCHECK")[0])
    image = image_env(stages, demo)
    source = "\n".join(p.read_text() for p in (ROOT / "examples").rglob("*.py"))
    for name in image:
        if name.startswith("EVENTBUS_DASHBOARD_"):
            assert f'"{name.removeprefix("EVENTBUS_")}"' in source, f"the demo ignores {name}"
    env = container_env(
        image,
        EVENTBUS_DASHBOARD_PORT=str(free_port()),
        EVENTBUS_DASHBOARD_DB=str(tmp_path / "dashboard.sqlite3"),
        EVENTBUS_DASHBOARD_NO_AGENTS="1",
        EVENTBUS_REDIS_URL=redis_url,
        EVENTBUS_AUTH_SECRET="deploy-test-secret",
    )
    log = tmp_path / "demo.log"
    with log.open("wb") as output:
        # cwd = the repository root, which is what the image's WORKDIR /app holds (examples/).
        process = subprocess.Popen(
            [sys.executable if p == "python" else p for p in entrypoint],
            env=env,
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_healthy(check, env, process, log)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
