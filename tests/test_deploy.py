"""docker-compose.yml and deploy/, validated offline: schemas, and names against the settings object."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from keychain.cli import main as keychain_cli
from streams.settings import WorkerSettings

ROOT = Path(__file__).parent.parent
SETTING_NAMES = {f.validation_alias.choices[0] for f in WorkerSettings.model_fields.values()}
GOOGLE_NAMES = {"GOOGLE_APPLICATION_CREDENTIALS"}  # read by the Google client libraries themselves
STREAMS_COMMANDS = {"worker", "plan", "schema"}
DEVTOOLS_COMMANDS = {"demo", "stack", "pubsub-init", "produce-demo"}


def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def resolve(value: str) -> str:
    """Compose's ${NAME:-default} with the variable unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))


def test_compose_file_follows_the_compose_specification():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
         str(ROOT / "docker-compose.yml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_publishes_ports_to_this_machine_only_and_says_its_secrets_are_demo_values():
    text = (ROOT / "docker-compose.yml").read_text()
    published = [str(p) for s in compose()["services"].values() for p in s.get("ports") or []]
    assert published and all(p.startswith("127.0.0.1:") for p in published), published
    assert "DEMO VALUES ONLY" in text and "demo password" in text


def test_compose_services_commands_and_variables_match_the_code():
    services = compose()["services"]
    ours = {name: s for name, s in services.items() if s.get("build") == "."}
    assert {"migrate", "worker", "secret-manager", "pubsub-init", "demo-producer", "worker-gcp"} <= set(ours)
    for name, service in ours.items():
        environment = {k: resolve(v) for k, v in (service.get("environment") or {}).items()}
        unknown = set(environment) - SETTING_NAMES - GOOGLE_NAMES
        assert not unknown, f"{name}: variables unknown to the settings object: {unknown}"
        WorkerSettings(**{k: v for k, v in environment.items() if k in SETTING_NAMES})  # values validate too
        entrypoint, command = service.get("entrypoint"), service.get("command", ["worker"])
        if entrypoint == ["keychain"]:
            assert command[0] in keychain_cli.commands, f"{name}: no `keychain {command[0]}`"
        elif entrypoint == ["python", "-m", "devtools"]:
            assert command[0] in DEVTOOLS_COMMANDS, f"{name}: no `python -m devtools {command[0]}`"
        elif entrypoint:
            assert entrypoint == ["python", "-m", "keychain.testing.secret_manager_server"]
            help_text = subprocess.run([sys.executable, "-m", "keychain.testing.secret_manager_server", "--help"],
                                       capture_output=True, text=True).stdout
            for option in (c for c in command if c.startswith("--")):
                assert option in help_text, f"{name}: unknown option {option}"
        else:
            assert command[0] in STREAMS_COMMANDS, f"{name}: no `python -m streams {command[0]}`"
    # Start-up order: every dependency exists, and waits on a health check only where one is defined.
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no health check"
    worker_needs = services["worker"]["depends_on"]
    assert worker_needs["migrate"]["condition"] == "service_completed_successfully"
    assert services["worker"]["environment"]["KEYCHAIN_ROTATION_SUBSCRIPTION"]


@pytest.fixture(scope="module")
def rendered():
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed here: cannot render the kustomize overlay")
    result = subprocess.run(["kubectl", "kustomize", str(ROOT / "deploy/overlays/example")],
                            capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_manifests_validate_against_the_kubernetes_schemas(rendered):
    kinds = sorted(doc["kind"] for doc in rendered)
    assert kinds == sorted(["ServiceAccount", "ConfigMap", "Secret", "Job", "Deployment", "Service",
                            "PodDisruptionBudget", "ServiceMonitor", "ScaledObject"])
    for doc in rendered:
        if doc["kind"] in ("ServiceMonitor", "ScaledObject"):
            continue  # CRDs: checked below
        kubernetes_validate.validate(doc, "1.32.0", strict=True)
        assert doc["metadata"]["namespace"] == "noetl"


def by_kind(rendered, kind):
    return next(doc for doc in rendered if doc["kind"] == kind)


def test_worker_deployment_is_hardened_and_probed(rendered):
    deployment = by_kind(rendered, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert container["image"].endswith(":0.1.0")
    assert pod["serviceAccountName"] == by_kind(rendered, "ServiceAccount")["metadata"]["name"]
    config = by_kind(rendered, "ConfigMap")["data"]
    assert str(container["ports"][0]["containerPort"]) == config["KEYCHAIN_WEB_PORT"]
    job = by_kind(rendered, "Job")["spec"]["template"]["spec"]["containers"][0]
    assert job["command"] == ["keychain", "migrate"]


def test_configuration_names_are_the_settings_names(rendered):
    config = by_kind(rendered, "ConfigMap")["data"]
    secret = by_kind(rendered, "Secret")["stringData"]
    assert set(config) | set(secret) <= SETTING_NAMES
    assert {"KEYCHAIN_DSN", "KEYCHAIN_KEYS"} <= set(secret) and not {"KEYCHAIN_DSN", "KEYCHAIN_KEYS"} & set(config)
    WorkerSettings(**config)


def test_custom_resources_are_well_formed_and_consistent(rendered):
    deployment, service = by_kind(rendered, "Deployment"), by_kind(rendered, "Service")
    config = by_kind(rendered, "ConfigMap")["data"]
    scaled = by_kind(rendered, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["spec"]["maxReplicaCount"] <= int(config["KEYCHAIN_TOPIC_PARTITIONS"])
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["topic"] == config["KEYCHAIN_EVENTS_TOPIC"]
    assert trigger["metadata"]["consumerGroup"] == config["KEYCHAIN_APP_ID"]
    assert trigger["metadata"]["bootstrapServers"] == config["KAFKA_BOOTSTRAP_SERVERS"]
    monitor = by_kind(rendered, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    labels = service["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    assert monitor["spec"]["endpoints"][0] == {"port": "http", "path": "/metrics", "interval": "30s"}
    selector = service["spec"]["selector"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in selector.items())
    pdb = by_kind(rendered, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_compose_services_reached_by_name_do_not_bind_loopback():
    """A service the others reach as `name:port` must listen beyond its own loopback (the Secret Manager test
    server bound 127.0.0.1 while its in-container health check passed), and its health check goes by that name."""
    services = compose()["services"]
    environments = [" ".join(str(v) for v in (s.get("environment") or {}).values()) for s in services.values()]
    anchors = compose().get("x-local-google", {})
    reached = " ".join(environments + [str(v) for v in anchors.values()])
    for name, service in services.items():
        if f"{name}:" not in reached or service.get("build") != ".":
            continue
        command = [str(c) for c in service.get("command") or []]
        assert "--host" in command and command[command.index("--host") + 1] == "0.0.0.0", name
        assert name in " ".join(service["healthcheck"]["test"]), f"{name}: health check not through the network"


def test_postgres_health_check_goes_over_tcp_and_no_fixed_replicas_fight_keda(rendered):
    postgres = compose()["services"]["postgres"]
    assert "-h 127.0.0.1" in " ".join(postgres["healthcheck"]["test"])
    assert "replicas" not in by_kind(rendered, "Deployment")["spec"]
    assert by_kind(rendered, "Job")["metadata"]["name"].endswith("0-1-0")  # versioned with the image
