"""deploy/kubernetes, checked without a cluster.

Every manifest is validated against what a cluster would check it with (kubernetes-validate's
strict Kubernetes 1.30 schemas; KEDA's published ScaledObject CRD), then read for what it
promises about sd35: probes on the real routes and port, a shutdown grace the pod really gets,
secrets by reference, a shared image store once there can be several replicas, autoscaling on
the metric that `/metrics` really exports. Finally the pod itself is emulated: `bentoml serve`
with the manifests' environment, as the image's uid, on a read-only root where only the pod's
volumes are writable (a private mount namespace, which needs root; elsewhere a plain server).
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml
from bentoml._internal.container.generate import BENTO_USER
from prometheus_client.parser import text_string_to_metric_families
from referencing import Registry, Resource

from bench.harness import free_port
from sd35.config import Settings, load_settings
from tests.conftest import CONFIG_VARS, ROOT
from tests.server import moto_s3, running_server, stop_process_group

K8S = ROOT / "deploy" / "kubernetes"
KEDA_CRD = K8S / "schemas" / "keda.sh_scaledobjects.yaml"
ADAPTER_VALUES = K8S / "hpa" / "prometheus-adapter-values.yaml"
# Validated like the rest, but not applied by `kubectl apply -k`: the Secret's placeholders must
# never overwrite a real one, and the HPA replaces the ScaledObject rather than joining it.
EXAMPLES = {"secret.example.yaml", "hpa/hpa.yaml"}
KUBERNETES = "1.30"
CHECKOV_VENV = ROOT / ".cache" / "checkov"

# The image runs as the user deploy/Dockerfile.template creates.
DOCKERFILE = (ROOT / "deploy" / "Dockerfile.template").read_text()
IMAGE_UID = int(re.search(r"^ARG BENTO_USER_UID=(\d+)$", DOCKERFILE, re.MULTILINE)[1])
IMAGE_HOME = f"/home/{BENTO_USER}"

SECRET_VARS = {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
# Read by the libraries under sd35 rather than by sd35.config.
LIBRARY_VARS = {
    "HOME": "the process",
    "TMPDIR": "Python's tempfile (BentoML's sockets, torch's caches)",
    "PYTHONDONTWRITEBYTECODE": "Python",
    "HF_HOME": "huggingface_hub",
    "BENTOML_HOME": "BentoML (its metrics files)",
    "BENTOML_DO_NOT_TRACK": "BentoML",
    "TRITON_HOME": "Triton, under torch.compile",
    "AWS_ACCESS_KEY_ID": "boto3",
    "AWS_SECRET_ACCESS_KEY": "boto3",
    "AWS_DEFAULT_REGION": "boto3",
}
# The trigger metadata KEDA v2.20's Prometheus scaler reads (pkg/scalers/prometheus_scaler.go);
# any other key is ignored silently, so a typo would go unnoticed on a real cluster too.
KEDA_PROMETHEUS_KEYS = {
    "serverAddress",
    "query",
    "queryParameters",
    "threshold",
    "activationThreshold",
    "namespace",
    "customHeaders",
    "ignoreNullValues",
    "unsafeSsl",
    "awsRegion",
    "timeout",
    "identityOwner",
}


# --- reading the manifests -------------------------------------------------------------


def load_documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def manifest_files() -> dict[str, list[dict[str, Any]]]:
    """Every Kubernetes object under deploy/kubernetes, by file (relative path)."""
    skip = {K8S / "kustomization.yaml", KEDA_CRD, ADAPTER_VALUES}
    paths = sorted(path for path in K8S.rglob("*.yaml") if path not in skip)
    return {str(path.relative_to(K8S)): load_documents(path.read_text()) for path in paths}


MANIFESTS = manifest_files()
OBJECTS = [(name, doc) for name, docs in MANIFESTS.items() for doc in docs]


def the(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in OBJECTS if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def named(kind: str, name: str) -> dict[str, Any]:
    found = [doc for _, doc in OBJECTS if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert found, f"no {kind} named {name} in deploy/kubernetes"
    return found[0]


def container() -> dict[str, Any]:
    containers = the("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def pod_spec() -> dict[str, Any]:
    return the("Deployment")["spec"]["template"]["spec"]


def container_env() -> dict[str, str]:
    """The environment the kubelet gives the container, secrets from the example Secret."""
    env: dict[str, str] = {}
    for source in container().get("envFrom", []):
        assert "prefix" not in source
        if "configMapRef" in source:
            env.update(named("ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            env.update(named("Secret", source["secretRef"]["name"])["stringData"])
    for var in container().get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"].get("configMapKeyRef") or var["valueFrom"]["secretKeyRef"]
        kind = "ConfigMap" if "configMapKeyRef" in var["valueFrom"] else "Secret"
        values = named(kind, ref["name"]).get("data" if kind == "ConfigMap" else "stringData", {})
        assert ref["key"] in values or ref.get("optional"), f"{var['name']}: {kind} {ref['name']} has no {ref['key']}"
        if ref["key"] in values:
            env[var["name"]] = values[ref["key"]]
    return env


def settings_of(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """sd35's settings from this environment (HOME too: `~` in defaults expands with it)."""
    monkeypatch.setenv("HOME", env["HOME"])
    return load_settings(env)


def resolve_port(port: int | str) -> int:
    if isinstance(port, int):
        return port
    (match,) = [p["containerPort"] for p in container()["ports"] if p.get("name") == port]
    return match


def mount_for(path: str) -> dict[str, Any] | None:
    """The volume mount a path is written through: the deepest mountPath at or above it."""
    candidates = [m for m in container()["volumeMounts"] if Path(path).is_relative_to(m["mountPath"])]
    return max(candidates, key=lambda m: len(Path(m["mountPath"]).parts), default=None)


def volume(name: str) -> dict[str, Any]:
    (match,) = [v for v in pod_spec()["volumes"] if v["name"] == name]
    return match


def max_replicas() -> int:
    counts = [the("Deployment")["spec"].get("replicas", 1), the("ScaledObject")["spec"]["maxReplicaCount"]]
    counts += [doc["spec"]["maxReplicas"] for _, doc in OBJECTS if doc["kind"] == "HorizontalPodAutoscaler"]
    return max(counts)


def metric_names(promql: str) -> set[str]:
    """Metric names in a PromQL selector: the identifiers right before a `{...}` matcher."""
    return set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", promql))


def autoscaler_metrics() -> set[str]:
    """Every metric name the autoscalers and prometheus-adapter refer to."""
    (trigger,) = the("ScaledObject")["spec"]["triggers"]
    names = metric_names(trigger["metadata"]["query"])
    (hpa_metric,) = the("HorizontalPodAutoscaler")["spec"]["metrics"]
    names.add(hpa_metric["pods"]["metric"]["name"])
    for rule in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]:
        names |= metric_names(rule["seriesQuery"]) | {rule["name"]["as"]}
    return names


# --- schemas ---------------------------------------------------------------------------


def kubernetes_definitions() -> dict[str, Any]:
    root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    return json.loads((root / f"v{KUBERNETES}.0-local-strict" / "_definitions.json").read_text())


def structural(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's OpenAPI schema as the API server enforces it: unknown fields are errors
    (kubectl's strict field validation) unless the schema preserves them."""
    preserve = schema.get("x-kubernetes-preserve-unknown-fields", False)
    schema = {key: value for key, value in schema.items() if not key.startswith("x-kubernetes-")}
    for key in ("properties", "patternProperties"):
        if key in schema:
            schema[key] = {name: structural(sub) for name, sub in schema[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            schema[key] = structural(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [structural(sub) for sub in schema[key]]
    if "properties" in schema and "additionalProperties" not in schema and not preserve:
        schema["additionalProperties"] = False
    return schema


def keda_validator() -> jsonschema.Validator:
    (crd,) = load_documents(KEDA_CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    schema = structural(version["schema"]["openAPIV3Schema"])
    definitions = kubernetes_definitions()
    schema["properties"]["metadata"] = {
        "$ref": f"{definitions['$id']}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    }
    schema["properties"]["apiVersion"]["enum"] = [f"{crd['spec']['group']}/{version['name']}"]
    schema["properties"]["kind"]["enum"] = [crd["spec"]["names"]["kind"]]
    schema["required"] = [*schema.get("required", []), "apiVersion", "kind", "metadata"]
    registry = Resource.from_contents(definitions) @ Registry()
    return jsonschema.Draft202012Validator(schema, registry=registry)


def is_keda(doc: dict[str, Any]) -> bool:
    return doc["apiVersion"].startswith("keda.sh/")


# --- the files and the kustomization ---------------------------------------------------


def test_kustomization_lists_every_manifest_but_the_examples() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    assert set(resources) == set(MANIFESTS) - EXAMPLES
    assert set(MANIFESTS) >= EXAMPLES


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_kustomize_builds_exactly_the_listed_manifests() -> None:
    built = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True)
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]

    def key(doc: dict[str, Any]) -> tuple[str, str]:
        return doc["kind"], doc["metadata"]["name"]

    expected = [doc for name in listed for doc in MANIFESTS[name]]
    assert sorted(load_documents(built.stdout), key=key) == sorted(expected, key=key)


def test_everything_is_in_one_namespace_of_its_own() -> None:
    namespace = the("Namespace")["metadata"]["name"]
    assert namespace != "default"
    for name, doc in OBJECTS:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, name


# --- schemas: Kubernetes 1.30 and KEDA ---------------------------------------------------


@pytest.mark.parametrize(
    "name, doc",
    [pytest.param(name, doc, id=f"{name}:{doc['kind']}") for name, doc in OBJECTS if not is_keda(doc)],
)
def test_manifest_is_valid_for_kubernetes_1_30_strictly(name: str, doc: dict[str, Any]) -> None:
    assert kubernetes_validate.validate(doc, KUBERNETES, strict=True) == KUBERNETES


def test_the_kubernetes_schemas_reject_an_unknown_field() -> None:
    deployment = copy.deepcopy(the("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="livenessprobe"):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


def test_scaled_object_is_valid_for_kedas_crd() -> None:
    validator = keda_validator()
    keda = [(name, doc) for name, doc in OBJECTS if is_keda(doc)]
    assert [name for name, _ in keda] == ["scaledobject.yaml"]
    for _, doc in keda:
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors
        # The CRD's one CEL rule, which JSON Schema cannot express, checked by hand.
        spec = doc["spec"]
        assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)
    assert [rule["rule"] for rule in cel_rules(load_documents(KEDA_CRD.read_text())[0])] == [
        "!has(self.minReplicaCount) || self.minReplicaCount <= (has(self.maxReplicaCount) ? self.maxReplicaCount : 100)"
    ]


def cel_rules(node: Any) -> list[dict[str, str]]:
    if isinstance(node, list):
        return [rule for item in node for rule in cel_rules(item)]
    if not isinstance(node, dict):
        return []
    own = node.get("x-kubernetes-validations", [])
    return own + [rule for key, value in node.items() if key != "x-kubernetes-validations" for rule in cel_rules(value)]


@pytest.mark.parametrize(
    "path, value",
    [
        (("spec", "maxReplicas"), 4),
        (("spec", "triggers", 0, "metadta"), {}),
        (("spec", "fallback", "behavior"), "sometimes"),
        (("metadata", "label"), {}),
    ],
)
def test_the_keda_schema_rejects_what_keda_would(path: tuple[Any, ...], value: Any) -> None:
    doc = copy.deepcopy(the("ScaledObject"))
    target = doc
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    assert list(keda_validator().iter_errors(doc))


# --- what the manifests promise about sd35 -----------------------------------------------


def test_one_gpu_per_pod_on_gpu_nodes_from_the_image_make_containerize_tags(monkeypatch: pytest.MonkeyPatch) -> None:
    makefile = (ROOT / "Makefile").read_text()
    (image,) = re.findall(r"^IMAGE\s*\?=\s*(\S+)", makefile, flags=re.M)
    assert container()["image"] == image
    resources = container()["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"].get("nvidia.com/gpu", 1) == 1
    # One BentoML worker per GPU (service.py): more would wait for GPUs the pod does not have.
    assert settings_of(container_env(), monkeypatch).workers == 1
    assert pod_spec()["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod_spec()["tolerations"])


def test_probes_and_service_use_the_port_sd35_listens_on(monkeypatch: pytest.MonkeyPatch) -> None:
    port = settings_of(container_env(), monkeypatch).port
    assert [p["containerPort"] for p in container()["ports"]] == [port]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert resolve_port(container()[probe]["httpGet"]["port"]) == port, probe
    (service_port,) = the("Service")["spec"]["ports"]
    assert resolve_port(service_port["targetPort"]) == port
    assert int(the("Deployment")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]) == port
    (ingress,) = the("NetworkPolicy")["spec"]["ingress"]
    assert [resolve_port(p["port"]) for p in ingress["ports"]] == [port]


def test_probes_wait_for_the_model_and_allow_the_first_download() -> None:
    assert container()["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container()["livenessProbe"]["httpGet"]["path"] == "/livez"
    startup = container()["startupProbe"]
    assert startup["httpGet"]["path"] == "/readyz"
    allowed = startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"]
    assert allowed >= 20 * 60


def test_a_rollout_lets_queued_work_finish(monkeypatch: pytest.MonkeyPatch) -> None:
    grace = settings_of(container_env(), monkeypatch).shutdown_grace_seconds
    pre_stop = container().get("lifecycle", {}).get("preStop")
    delay = 0
    if pre_stop:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep" and len(command) == 2
        delay = int(command[1])
    # SIGTERM comes after preStop; then the drain; then the running batch and the exit.
    assert pod_spec()["terminationGracePeriodSeconds"] >= delay + grace + 10


def test_secrets_come_from_the_secret_by_reference() -> None:
    secret = the("Secret")
    assert set(secret["stringData"].values()) == {"REPLACE_ME"}
    assert "data" not in secret
    for var in container()["env"]:
        if var["name"] in SECRET_VARS:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"], var
    referenced = {var["name"] for var in container()["env"] if "secretKeyRef" in var.get("valueFrom", {})}
    assert {"HF_TOKEN", "API_KEY"} <= referenced
    for configmap in (doc for _, doc in OBJECTS if doc["kind"] == "ConfigMap"):
        assert not SECRET_VARS & set(configmap["data"])


def test_every_variable_is_one_that_something_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    env = container_env()
    assert set(env) <= set(CONFIG_VARS) | set(LIBRARY_VARS), set(env) - set(CONFIG_VARS) - set(LIBRARY_VARS)
    settings_of(env, monkeypatch)  # raises ConfigError on a value sd35 would refuse at start


def test_several_replicas_share_an_s3_image_store(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_of(container_env(), monkeypatch)
    if max_replicas() > 1:
        assert settings.image_store == "s3" and settings.image_store_s3_bucket
    # Settings an operator edits per cluster live in the ConfigMap, not in the Deployment.
    literal = {var["name"] for var in container()["env"] if "value" in var}
    assert not literal & {"IMAGE_STORE", "IMAGE_STORE_S3_BUCKET", "IMAGE_STORE_S3_PREFIX", "MODEL_ID"}


def test_the_model_cache_is_a_shared_volume() -> None:
    mount = mount_for(container_env()["HF_HOME"])
    assert mount is not None and mount["mountPath"] == container_env()["HF_HOME"]
    claim = named("PersistentVolumeClaim", volume(mount["name"])["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_pod_runs_as_the_images_user_with_a_read_only_root(monkeypatch: pytest.MonkeyPatch) -> None:
    pod = pod_spec()["securityContext"]
    assert pod["runAsNonRoot"] and pod["runAsUser"] == IMAGE_UID and pod["fsGroup"] == IMAGE_UID
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    own = container()["securityContext"]
    assert own["allowPrivilegeEscalation"] is False and own["readOnlyRootFilesystem"] is True
    assert own["capabilities"]["drop"] == ["ALL"]
    env = container_env()
    assert env["HOME"] == IMAGE_HOME
    settings = settings_of(env, monkeypatch)
    # Every place sd35, BentoML, huggingface_hub and torch write to (found by running the
    # server on a read-only root: test_the_emulated_pod_writes_only_to_its_volumes).
    writable = [env["HF_HOME"], env["BENTOML_HOME"], env["TMPDIR"], env["TRITON_HOME"], str(settings.image_store_dir)]
    for path in writable:
        mount = mount_for(path)
        assert mount is not None and not mount.get("readOnly"), path
        kind = volume(mount["name"])
        assert "emptyDir" in kind or "persistentVolumeClaim" in kind


def test_readme_names_every_writable_path() -> None:
    readme = (ROOT / "README.md").read_text()
    section = re.split(r"\n##+ ", readme.split("\n### Kubernetes\n", 1)[1], maxsplit=1)[0]
    for mount in container()["volumeMounts"]:
        assert f"`{mount['mountPath']}`" in section, mount["mountPath"]


def test_pdb_service_and_autoscalers_target_the_deployment() -> None:
    deployment = the("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert the("Service")["spec"]["selector"].items() <= labels.items()
    assert the("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert the("NetworkPolicy")["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    for kind in ("ScaledObject", "HorizontalPodAutoscaler"):
        target = the(kind)["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"]), kind
    # The autoscaler owns the replica count: an apply must not reset it.
    assert "replicas" not in deployment["spec"]


def test_autoscaling_follows_the_queue_with_a_threshold_the_queue_can_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_of(container_env(), monkeypatch)
    spec = the("ScaledObject")["spec"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger.get("metricType", "AverageValue") == "AverageValue"
    metadata = trigger["metadata"]
    assert set(metadata) <= KEDA_PROMETHEUS_KEYS and {"serverAddress", "query", "threshold"} <= set(metadata)
    assert metadata["query"].startswith("sum(")  # over every pod: KEDA divides by the threshold
    threshold = float(metadata["threshold"])
    # A pod's queue stops at MAX_QUEUE_IMAGES (429 beyond), so a threshold near it could never
    # add a pod; below a batch, one full batch waiting would already add one.
    assert settings.max_batch_images <= threshold <= settings.max_queue_images / 2
    # No scale to zero: the queue is measured by the pods, so none could ever wake one.
    assert spec["minReplicaCount"] >= 1
    hpa = the("HorizontalPodAutoscaler")["spec"]
    (hpa_metric,) = hpa["metrics"]
    assert hpa_metric["type"] == "Pods" and hpa_metric["pods"]["target"]["type"] == "AverageValue"
    assert float(hpa_metric["pods"]["target"]["averageValue"]) == threshold
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (spec["minReplicaCount"], spec["maxReplicaCount"])
    assert hpa["behavior"] == spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert len(autoscaler_metrics()) == 1


# --- checkov -------------------------------------------------------------------------------


def test_checkov_fails_nothing_it_was_not_told_why_to_skip() -> None:
    subprocess.run(["make", "-s", "checkov", f"CHECKOV_VENV={CHECKOV_VENV}"], cwd=ROOT, check=True, timeout=900)
    checkov = [str(CHECKOV_VENV / "bin" / "checkov"), "--directory", str(K8S), "--framework", "kubernetes", "secrets"]
    # --skip-download: no calls to Prisma Cloud, which this machine cannot reach anyway.
    scan = subprocess.run([*checkov, "--skip-download", "-o", "json"], capture_output=True, text=True, timeout=300)
    reports = json.loads(scan.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    # checkov leaves out a framework with nothing to report: the secrets scan, once no
    # placeholder looks like a real credential.
    assert {report["check_type"] for report in reports} <= {"kubernetes", "secrets"}
    for report in reports:
        failed = [(c["check_id"], c["file_path"], c["check_name"]) for c in report["results"]["failed_checks"]]
        assert not failed, report["check_type"]
        assert report["summary"]["parsing_errors"] == 0
        for skipped in report["results"]["skipped_checks"]:
            assert len(skipped["check_result"].get("suppress_comment", "")) > 20, skipped["check_id"]
    assert scan.returncode == 0, scan.stderr[-2000:]
    (kubernetes,) = [r for r in reports if r["check_type"] == "kubernetes"]
    passed = {c["check_id"] for c in kubernetes["results"]["passed_checks"]}
    # The security context, the probes and the resource limits were really read.
    assert {"CKV_K8S_8", "CKV_K8S_9", "CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_28", "CKV_K8S_13"} <= passed


# --- the pod, emulated --------------------------------------------------------------------


@dataclass
class Pod:
    url: str
    log: Path
    volumes: dict[str, Path]
    read_only_root: bool
    pid: int | None = None

    def host_path(self, path: str) -> Path:
        """Where a path inside the container lies on this machine: in its volume's directory."""
        mount = mount_for(path)
        assert mount is not None, f"{path} is on no volume"
        return self.volumes[mount["name"]] / Path(path).relative_to(mount["mountPath"])


def can_emulate_a_pod() -> bool:
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("setpriv")):
        return False
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=10).returncode == 0


def pod_script(env: dict[str, str], volumes: dict[str, Path], workdir: Path) -> str:
    """Shell for a private mount namespace: the host's root read-only, the image's home on top,
    each volume bound at its mountPath, then `bentoml serve` as the image's user."""
    home = Path(env["HOME"])
    lines = ["set -eu"]
    # The interpreter may live where the image's user cannot reach it (pyenv under /root):
    # lend it through a world-readable tmpfs.
    prefix = Path(sys.base_prefix).resolve()
    closed = next((p for p in reversed(prefix.parents) if p != Path("/") and not os.stat(p).st_mode & 0o001), None)
    if closed is not None:
        staging = workdir / "python"
        staging.mkdir()
        lines += [
            f"mount --bind {prefix} {staging}",
            f"mount -t tmpfs -o mode=0755 tmpfs {closed}",
            f"mkdir -p {prefix}",
            f"mount --bind {staging} {prefix}",
        ]
    lines += [f"mount -t tmpfs -o mode=0755 tmpfs {home.parent}", f"mkdir -p {home}", f"chown {IMAGE_UID} {home}"]
    # Parents before children; a mount that hides the volumes' own directories (/tmp) last.
    mounts = sorted(container()["volumeMounts"], key=lambda m: len(Path(m["mountPath"]).parts))
    mounts.sort(key=lambda m: workdir.is_relative_to(m["mountPath"]))
    # A checkout under a volume's path (a clone in /tmp) would be hidden by it: keep it
    # reachable through the image's home tmpfs and put it back, read-only, on top.
    repo_hidden = any(ROOT.is_relative_to(m["mountPath"]) for m in mounts)
    # A checkout only its owner may enter (a clone into `mktemp -d`) is lent to the image's user as a
    # world-readable tmpfs holding its entries, each bound read-only.
    repo_closed = not ROOT.stat().st_mode & 0o001
    repo_stage = home.parent / ".checkout"
    if repo_hidden or repo_closed:
        lines += [f"mkdir -p {repo_stage}", f"mount --bind {ROOT} {repo_stage}"]
    for mount in mounts:
        path = Path(mount["mountPath"])
        assert path == Path("/tmp") or path.is_relative_to(home), path
        lines += [f"mkdir -p {path}", f"mount --bind {volumes[mount['name']]} {path}"]
    if repo_closed:
        lines += [f"mkdir -p {ROOT}", f"mount -t tmpfs -o mode=0755 tmpfs {ROOT}"]
        for entry in sorted(ROOT.iterdir()):
            make = "mkdir" if entry.is_dir() else "touch"
            lines += [f"{make} {entry}", f"mount --bind {repo_stage / entry.name} {entry}"]
            lines.append(f"mount -o remount,bind,ro {entry}")
        lines.append(f"mount -o remount,ro {ROOT}")
    elif repo_hidden:
        lines += [f"mkdir -p {ROOT}", f"mount --bind {repo_stage} {ROOT}", f"mount -o remount,bind,ro {ROOT}"]
    lines += [f"mount -o remount,ro {home.parent}", "mount -o remount,bind,ro /"]
    if closed is not None:
        lines.append(f"mount -o remount,ro {closed}")
    serve = [str(Path(sys.executable).with_name("bentoml")), "serve", "service:SD35"]
    variables = [f"{name}={value}" for name, value in {"PATH": "/usr/bin:/bin", **env}.items()]
    ids = [f"--reuid={IMAGE_UID}", f"--regid={IMAGE_UID}", f"--groups={IMAGE_UID}"]  # runAsUser/Group, fsGroup
    lines += [f"cd {ROOT}", shlex.join(["exec", "setpriv", *ids, "--", "env", "-i", *variables, *serve])]
    return "\n".join(lines)


def wait_until_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise AssertionError(f"the pod exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"the pod is not ready after {timeout} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.25)


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """moto's S3 server on loopback, with the ConfigMap's bucket."""
    env = container_env()
    credentials = {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }
    with moto_s3(env["IMAGE_STORE_S3_BUCKET"], **credentials) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def pod(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, s3: str) -> Iterator[Pod]:
    """sd35 started as the Deployment starts it, with what cannot be real here replaced: the
    model (the tiny one, in the cache volume), loopback and a free port, moto for the bucket."""
    workdir = tmp_path_factory.mktemp("pod")
    volumes = {}
    for spec in pod_spec()["volumes"]:
        volumes[spec["name"]] = workdir / "volumes" / spec["name"]
        volumes[spec["name"]].mkdir(parents=True)
    port = free_port()
    env = container_env()
    env |= {
        "MODEL_ID": f"{env['HF_HOME']}/tiny-sd3",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "IMAGE_STORE_S3_ENDPOINT_URL": s3,
        "HF_HUB_OFFLINE": "1",
    }
    emulated = can_emulate_a_pod()
    pod = Pod(f"http://127.0.0.1:{port}", workdir / "server.log", volumes, read_only_root=emulated)
    shutil.copytree(tiny_model_dir, pod.host_path(env["MODEL_ID"]))
    if not emulated:
        # The same environment, its paths moved to where the volumes lie on this machine.
        paths = ("HF_HOME", "MODEL_ID", "TMPDIR", "BENTOML_HOME", "TRITON_HOME")
        plain = env | {name: str(pod.host_path(env[name])) for name in paths} | {"HOME": str(workdir)}
        del plain["HOST"], plain["PORT"]  # running_server picks them
        with running_server(plain, workdir) as server:
            yield Pod(server.url, server.log, volumes, read_only_root=False)
        return
    for path in volumes.values():
        for item in [path, *path.rglob("*")]:
            os.chown(item, IMAGE_UID, IMAGE_UID)
    with open(pod.log, "wb") as out:
        process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", pod_script(env, volumes, workdir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    pod.pid = process.pid
    try:
        wait_until_ready(pod.url, process, pod.log)
        yield pod
    finally:
        stop_process_group(process)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {container_env()['API_KEY']}"}


def gauges(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    families = text_string_to_metric_families(text)
    return {sample.name: sample.value for family in families if family.type == "gauge" for sample in family.samples}


@pytest.mark.server
def test_the_probe_routes_answer_on_the_ready_pod(pod: Pod) -> None:
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        response = httpx.get(pod.url + container()[probe]["httpGet"]["path"], timeout=10)
        assert response.status_code == 200, (probe, response.text)


@pytest.mark.server
def test_the_autoscalers_metric_is_the_queue_that_metrics_exports(pod: Pod) -> None:
    (metric,) = autoscaler_metrics()
    assert gauges(pod.url)[metric] == 0
    statuses: list[int] = []

    def generate(size: str, n: int, steps: int) -> None:
        body = {"prompt": "a lighthouse", "size": size, "n": n, "num_inference_steps": steps}
        response = httpx.post(f"{pod.url}/v1/images/generations", json=body, headers=auth(), timeout=120)
        statuses.append(response.status_code)

    # Different sizes never share a GPU call: the second request's two images wait while the
    # first runs, and the metric must count them.
    first = threading.Thread(target=generate, args=("1024x1024", 1, 4))
    second = threading.Thread(target=generate, args=("256x256", 2, 1))
    first.start()
    time.sleep(0.3)
    second.start()
    seen = set()
    while first.is_alive() or second.is_alive():
        seen.add(gauges(pod.url)[metric])
        time.sleep(0.05)
    first.join()
    second.join()
    assert statuses == [200, 200]
    assert 2 in seen, seen
    assert gauges(pod.url)[metric] == 0


@pytest.mark.server
def test_the_emulated_pod_writes_only_to_its_volumes(pod: Pod) -> None:
    if not pod.read_only_root:
        pytest.skip("a read-only root needs a private mount namespace (root and unshare)")
    body = {"prompt": "a kite", "size": "256x256", "response_format": "url", "num_inference_steps": 2}
    response = httpx.post(f"{pod.url}/v1/images/generations", json=body, headers=auth(), timeout=60)
    assert response.status_code == 200, response.text
    (item,) = response.json()["data"]
    image = httpx.get(item["url"], timeout=30)  # presigned, into the (moto) bucket
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    # Seen from inside the pod's mount namespace, as root (who may write anywhere writable).
    inside = ["nsenter", f"--target={pod.pid}", "--mount", "--", "test", "-w"]
    for path in ("/", container_env()["HOME"], str(ROOT)):
        assert subprocess.run([*inside, path], timeout=10).returncode == 1, f"{path} is writable"
    for mount in container()["volumeMounts"]:
        assert subprocess.run([*inside, mount["mountPath"]], timeout=10).returncode == 0, mount
    log = pod.log.read_text(errors="replace")
    assert "Read-only file system" not in log and "Permission denied" not in log, log[-4000:]
    # BentoML's metrics files lie where BENTOML_HOME points, written by the image's user.
    written = list((pod.host_path(container_env()["BENTOML_HOME"]) / "prometheus_multiproc_dir").glob("*.db"))
    assert written and all(path.stat().st_uid == IMAGE_UID for path in written)
