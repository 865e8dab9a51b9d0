"""The Kubernetes manifests under k8s/ and the worker image: valid, and keeping their promises.

Every YAML document under k8s/ is loaded and each Kubernetes object is validated (strictly: an
unknown field fails) against the API schemas that kubernetes-validate ships, offline. Then the
promises of the deployment (shared DESIGN.md, "Kubernetes"; docs/operations.md) are asserted on
the objects themselves: no secret in a manifest, Redis with AOF and a password from a Secret, a
NetworkPolicy around Redis, Flower behind auth and in-cluster only, the GPU worker's resources,
probe and grace period, vLLM with its inference worker, the WSL2 overlay's patch applied to the
base. No kustomize or kubectl binary is needed: the overlay's JSON 6902 patch is applied here.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is in the dev extra")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is in the dev extra"
)

from typer.testing import CliRunner  # noqa: E402

from gpujobs import keys  # noqa: E402
from gpujobs.cli.main import app as cli_app  # noqa: E402
from gpujobs.config import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
# Schemas to validate against: the oldest release we support (native sidecar containers, used by
# the vLLM pod, are on by default from 1.29) and the newest that kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
# The wsl2 overlay's recursiveReadOnly mount needs 1.31 (beta, on by default).
WSL2_KUBERNETES_VERSIONS = ("1.31", kubernetes_validate.utils.latest_version())
# Kinds without a namespace, and where the objects that are not in `gpujobs` live.
CLUSTER_SCOPED = {"Namespace", "PriorityClass", "RuntimeClass"}
OTHER_NAMESPACES = {"device-plugin": "kube-system"}
GPUJOBS_IMAGE = "gpujobs-worker"
# Env names that hold a secret: they must come from a Secret (valueFrom.secretKeyRef).
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|API_?KEY|AUTH", re.I)
# A URL with a password in it (scheme://user:password@host).
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]*:[^/\s@]+@", re.I)


@dataclass(frozen=True)
class Doc:
    """One YAML document: its file (relative to k8s/), its place in the file, its data."""

    path: Path
    index: int
    data: Any

    @property
    def id(self) -> str:
        if isinstance(self.data, dict) and "kind" in self.data:
            name = self.data.get("metadata", {}).get("name", "?")
            return f"{self.path}:{self.data['kind']}/{name}"
        return f"{self.path}#{self.index}"


def load_documents() -> list[Doc]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        for index, data in enumerate(yaml.safe_load_all(path.read_text())):
            if data is not None:
                docs.append(Doc(path.relative_to(K8S), index, data))
    return docs


DOCS = load_documents()


def is_kustomization(doc: Doc) -> bool:
    return isinstance(doc.data, dict) and doc.data.get("kind") == "Kustomization"


def is_patch(doc: Doc) -> bool:
    """A JSON 6902 patch: a list of operations."""
    return isinstance(doc.data, list)


# API groups of custom resources the manifests use, and whose CRDs they are. kubernetes-validate
# has the built-in schemas only; any other unknown group fails validation (SchemaNotFoundError).
CUSTOM_RESOURCE_GROUPS = {"keda.sh": "KEDA"}


def custom_resource_owner(doc: Doc) -> str | None:
    """Whose CRD defines this object (say, KEDA for a ScaledObject); None for built-in kinds."""
    group, slash, _ = str(doc.data["apiVersion"]).partition("/")
    return CUSTOM_RESOURCE_GROUPS.get(group) if slash else None


RESOURCES = [d for d in DOCS if isinstance(d.data, dict) and not is_kustomization(d)]
BASE = [d.data for d in RESOURCES if d.path.parts[0] == "base"]


def find(kind: str, name: str, docs: list[Any] | None = None) -> dict[str, Any]:
    """The one object of that kind and name (in the base unless docs are given)."""
    found = [d for d in (BASE if docs is None else docs) if d["kind"] == kind]
    found = [d for d in found if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """Every container of a workload, init (and native sidecar) containers included."""
    spec = pod_spec(obj)
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def container(obj: dict[str, Any], name: str) -> dict[str, Any]:
    [found] = [c for c in containers(obj) if c["name"] == name]
    return found


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def env_value(c: dict[str, Any], name: str) -> str:
    """A literal env value of a container, also looked up in its ConfigMaps."""
    entry = env_of(c).get(name)
    if entry is not None:
        assert "value" in entry, f"{name} is not a literal value in {c['name']}"
        return str(entry["value"])
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            data = find("ConfigMap", source["configMapRef"]["name"]).get("data", {})
            if name in data:
                return str(data[name])
    raise AssertionError(f"{name} is not set in container {c['name']}")


def secret_ref(c: dict[str, Any], name: str) -> tuple[str, str]:
    """(Secret name, key) that env var `name` of container c comes from."""
    entry = env_of(c).get(name)
    assert entry is not None, f"{name} is not set in container {c['name']}"
    assert "value" not in entry, f"{name} is a literal in container {c['name']}"
    ref = entry["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def mount_of(obj: dict[str, Any], c: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume mounted at `path` in container c."""
    mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == path]
    assert mounts, f"nothing is mounted at {path} in {c['name']}"
    [volume] = [v for v in pod_spec(obj)["volumes"] if v["name"] == mounts[0]["name"]]
    return volume


def arg_after(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def workloads(docs: list[Any] | None = None) -> list[dict[str, Any]]:
    kinds = {"Deployment", "StatefulSet", "DaemonSet"}
    return [d for d in (BASE if docs is None else docs) if d["kind"] in kinds]


def gpujobs_containers() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for obj in workloads():
        for c in containers(obj):
            if c["image"].split(":")[0].rsplit("/", 1)[-1] == GPUJOBS_IMAGE:
                yield obj, c


def walk(value: Any) -> Iterator[Any]:
    """Every dict, list and scalar inside value."""
    yield value
    children = value.values() if isinstance(value, dict) else value
    if isinstance(value, dict | list):
        for child in children:
            yield from walk(child)


def apply_json6902(doc: dict[str, Any], operations: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 `add` and `replace` (what the overlays use), as kustomize applies them."""
    result = copy.deepcopy(doc)
    for operation in operations:
        kind = operation["op"]
        assert kind in ("add", "replace"), f"this test applies add/replace only, not {kind}"
        parts = [p.replace("~1", "/").replace("~0", "~") for p in operation["path"].split("/")]
        assert parts[0] == "", f"not a JSON pointer: {operation['path']}"
        *parents, last = parts[1:]
        target = result
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        value = copy.deepcopy(operation["value"])
        if isinstance(target, list):
            if last == "-" and kind == "add":
                target.append(value)
            elif kind == "add":
                target.insert(int(last), value)
            else:
                target[int(last)] = value
        else:
            assert kind == "add" or last in target, f"replace of a missing {operation['path']}"
            target[last] = value
    return result


# --- Every document: parsed, known, valid -----------------------------------------------------


def test_every_yaml_document_is_an_object_a_kustomization_or_a_patch() -> None:
    assert DOCS, "no YAML under k8s/"
    for doc in DOCS:
        if is_patch(doc):
            assert all({"op", "path"} <= set(op) for op in doc.data), doc.id
            continue
        assert isinstance(doc.data, dict), doc.id
        assert {"apiVersion", "kind"} <= set(doc.data), doc.id
        if is_kustomization(doc):
            assert doc.path.name == "kustomization.yaml", doc.id
        else:
            metadata = doc.data["metadata"]
            if doc.data["kind"] == "Namespace":
                assert metadata["name"] == "gpujobs", doc.id
            elif doc.data["kind"] in CLUSTER_SCOPED:
                assert "namespace" not in metadata, doc.id
            else:
                namespace = OTHER_NAMESPACES.get(doc.path.parts[0], "gpujobs")
                assert metadata.get("namespace") == namespace, f"{doc.id} names no namespace"
            assert doc.data["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == (
                "gpujobs"
            ), f"{doc.id} lacks the app.kubernetes.io/part-of: gpujobs label"


@pytest.mark.parametrize("doc", RESOURCES, ids=lambda d: d.id)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_object_validates_against_the_kubernetes_schema(doc: Doc, version: str) -> None:
    owner = custom_resource_owner(doc)
    if owner is not None:
        pytest.skip(
            f"{doc.data['apiVersion']} {doc.data['kind']} is a custom resource ({owner}'s CRD); "
            "kubernetes-validate ships only the built-in API schemas"
        )
    kubernetes_validate.validate(doc.data, version, strict=True)


def test_kustomizations_name_existing_files_and_every_manifest_is_used() -> None:
    used: set[Path] = set()
    for doc in filter(is_kustomization, DOCS):
        folder = K8S / doc.path.parent
        for entry in doc.data.get("resources", []):
            target = (folder / entry).resolve()
            assert target.is_file() or (target / "kustomization.yaml").is_file(), (doc.id, entry)
            used.add(target)
        for patch in doc.data.get("patches", []):
            target = (folder / patch["path"]).resolve()
            assert target.is_file(), (doc.id, patch["path"])
            used.add(target)
    manifests = {(K8S / d.path).resolve() for d in DOCS if not is_kustomization(d)}
    assert manifests - used == set(), "YAML files that no kustomization applies"


def test_secret_files_are_git_ignored() -> None:
    """k8s/secrets generates the Secrets from files that must never be committed."""
    [doc] = [d for d in DOCS if is_kustomization(d) and d.path.parts[0] == "secrets"]
    generated = {g["name"]: g for g in doc.data["secretGenerator"]}
    assert set(generated) == {"gpujobs-redis", "gpujobs-flower", "gpujobs-vllm"}
    assert doc.data["generatorOptions"]["disableNameSuffixHash"] is True  # the base's names
    files = [f.partition("=")[2] for g in generated.values() for f in g["files"]]
    assert {f.partition("=")[0] for f in generated["gpujobs-redis"]["files"]} == {"password"}
    keys_ = {f.partition("=")[0] for f in generated["gpujobs-flower"]["files"]}
    assert keys_ == {"user", "password"}
    assert {f.partition("=")[0] for f in generated["gpujobs-vllm"]["files"]} == {"api-key"}
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: cannot ask git what it ignores")
    for name in files:
        path = K8S / "secrets" / name
        ignored = subprocess.run([git, "check-ignore", "-q", str(path)], cwd=ROOT, check=False)
        assert ignored.returncode == 0, f"{path} is not git-ignored"


# --- No secret in any manifest -----------------------------------------------------------------


def test_no_literal_secret_in_any_manifest() -> None:
    for doc in DOCS:
        if isinstance(doc.data, dict):
            assert doc.data.get("kind") != "Secret", f"{doc.id}: a Secret with its values"
        for value in walk(doc.data):
            if isinstance(value, str):
                assert not URL_WITH_PASSWORD.search(value), f"{doc.id}: password in URL {value}"
            if isinstance(value, dict) and {"name", "value"} <= set(value):
                name = str(value["name"])
                assert not SECRET_NAME.search(name), f"{doc.id}: literal value for {name}"
            if isinstance(value, dict) and value.get("kind") == "ConfigMap":
                for key in value.get("data", {}):
                    assert not SECRET_NAME.search(key), f"{doc.id}: {key} in a ConfigMap"


def test_every_password_comes_from_a_secret() -> None:
    for obj in workloads():
        for c in containers(obj):
            for name in env_of(c):
                if SECRET_NAME.search(name):
                    secret, key = secret_ref(c, name)
                    assert secret.startswith("gpujobs-") and key, (c["name"], name)
            args = [*c.get("command", []), *c.get("args", [])]
            for flag in ("--requirepass", "--password", "-a", "--pass", "--api-key"):
                if flag in args:
                    reference = re.fullmatch(r"\$\((\w+)\)", arg_after(args, flag))
                    assert reference, f"{c['name']}: {flag} is not a $(VAR) reference"
                    secret_ref(c, reference.group(1))


def test_gpujobs_containers_reach_redis_with_a_password_from_the_secret() -> None:
    for _, c in gpujobs_containers():
        url = urlsplit(env_value(c, "GPUJOBS_BROKER_URL"))
        assert url.scheme == "redis" and url.password is None
        assert url.hostname == find("Service", "gpujobs-redis")["metadata"]["name"]
        assert url.port == 6379
        assert secret_ref(c, "GPUJOBS_REDIS_PASSWORD") == ("gpujobs-redis", "password")


def test_every_gpujobs_setting_named_in_a_manifest_exists() -> None:
    """A misspelt GPUJOBS_* variable is silently ignored by the app: catch it here."""
    fields = {f"GPUJOBS_{name.upper()}" for name in Settings.model_fields}
    named = set()
    for _, c in gpujobs_containers():
        named |= {name for name in env_of(c) if name.startswith("GPUJOBS_")}
        for source in c.get("envFrom", []):
            named |= set(find("ConfigMap", source["configMapRef"]["name"])["data"])
    assert named, "no GPUJOBS_ setting in any manifest"
    assert named - fields == set(), "not a field of gpujobs.config.Settings"


def test_gpujobs_commands_in_the_manifests_are_valid_cli_invocations() -> None:
    """Each container's args and each exec probe parse as `gpujobs ...` (flags included)."""
    runner = CliRunner()
    commands = []
    for _, c in gpujobs_containers():
        commands.append(c["args"])
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            exec_ = c.get(probe, {}).get("exec")
            if exec_:
                assert exec_["command"][0] == "gpujobs", exec_
                commands.append(exec_["command"][1:])
    assert commands
    for args in commands:
        result = runner.invoke(cli_app, [*args, "--help"])
        assert result.exit_code == 0, f"gpujobs {' '.join(args)}: {result.output}"


# --- Redis -------------------------------------------------------------------------------------


def test_redis_keeps_an_append_only_file_and_requires_the_password_from_the_secret() -> None:
    redis = find("StatefulSet", "gpujobs-redis")
    [c] = containers(redis)
    args = c["args"]
    assert arg_after(args, "--appendonly") == "yes"
    reference = re.fullmatch(r"\$\((\w+)\)", arg_after(args, "--requirepass"))
    assert reference
    assert secret_ref(c, reference.group(1)) == ("gpujobs-redis", "password")
    assert arg_after(args, "--maxmemory-policy") == "noeviction"  # a queue never drops keys
    data_dir = arg_after(args, "--dir")
    [claim] = redis["spec"]["volumeClaimTemplates"]
    [mount] = [m for m in c["volumeMounts"] if m["mountPath"] == data_dir]
    assert mount["name"] == claim["metadata"]["name"]
    service = find("Service", "gpujobs-redis")
    pod_labels = redis["spec"]["template"]["metadata"]["labels"]
    assert labels_match(service["spec"]["selector"], pod_labels)
    assert [p["port"] for p in service["spec"]["ports"]] == [6379]


def test_a_network_policy_admits_only_gpujobs_pods_to_redis() -> None:
    redis_labels = find("StatefulSet", "gpujobs-redis")["spec"]["template"]["metadata"]["labels"]
    policies = [
        p
        for p in BASE
        if p["kind"] == "NetworkPolicy"
        and "Ingress" in p["spec"]["policyTypes"]
        and "ingress" in p["spec"]  # the default deny has no rule
        and p["spec"]["podSelector"].get("matchLabels")
        and labels_match(p["spec"]["podSelector"]["matchLabels"], redis_labels)
    ]
    assert policies, "no NetworkPolicy selects the Redis pods"
    selectors = []
    for policy in policies:
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"]["ingress"]:
            assert [p["port"] for p in rule["ports"]] == [6379]
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, "only pods of this namespace"
                labels = peer["podSelector"]["matchLabels"]
                assert labels.get("app.kubernetes.io/part-of") == "gpujobs"
                selectors.append(labels)
    # ... and every pod that talks to Redis is one the policy admits.
    for obj, _ in gpujobs_containers():
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert any(labels_match(s, labels) for s in selectors), obj["metadata"]["name"]


# --- Flower ------------------------------------------------------------------------------------


def test_flower_has_basic_auth_from_a_secret_and_only_a_cluster_ip_service() -> None:
    flower = find("Deployment", "gpujobs-flower")
    [c] = containers(flower)
    assert c["args"][0] == "flower"
    for field in ("flower_user", "flower_password"):
        assert field in Settings.model_fields
        secret, _ = secret_ref(c, f"GPUJOBS_{field.upper()}")
        assert secret == "gpujobs-flower"
    assert env_value(c, "GPUJOBS_FLOWER_ADDRESS") == "0.0.0.0"  # inside the pod
    labels = flower["spec"]["template"]["metadata"]["labels"]
    services = [
        s for s in BASE if s["kind"] == "Service" and labels_match(s["spec"]["selector"], labels)
    ]
    assert services, "no Service for Flower"
    for service in services:
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    every = [d.data for d in RESOURCES]
    assert not [d for d in every if d["kind"] == "Ingress"], "Flower's /metrics is open: no Ingress"
    for service in (d for d in every if d["kind"] == "Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]


# --- Transcode workers -------------------------------------------------------------------------


def worker_daemonset(docs: list[Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    daemonset = find("DaemonSet", "gpujobs-worker", docs)
    return daemonset, container(daemonset, "worker")


def test_worker_daemonset_runs_on_gpu_nodes_with_the_gpu_and_video_capability() -> None:
    daemonset, c = worker_daemonset()
    assert pod_spec(daemonset)["nodeSelector"] == {"node-role.kubernetes.io/worker-gpu": "true"}
    assert pod_spec(daemonset)["runtimeClassName"] == "nvidia"
    assert c["args"] == ["worker", "--gpus", "all"]
    # It shares the cards vLLM holds (docs/operations.md, "GPU sharing"): no GPU request.
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert "nvidia.com/gpu" not in c["resources"].get("requests", {})
    capabilities = env_value(c, "NVIDIA_DRIVER_CAPABILITIES").split(",")
    assert {"compute", "video", "utility"} <= set(capabilities)
    assert env_value(c, "NVIDIA_VISIBLE_DEVICES") == "all"
    node = env_of(c)["GPUJOBS_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert node == "spec.nodeName"


def test_worker_liveness_probe_reads_the_heartbeat() -> None:
    _, c = worker_daemonset()
    assert c["livenessProbe"]["exec"]["command"] == ["gpujobs", "worker", "--check"]


def test_worker_grace_period_outlasts_the_workers_shutdown_grace() -> None:
    """The worker requeues running jobs after GPUJOBS_SHUTDOWN_GRACE_S; the kubelet must not
    SIGKILL it before that and the few seconds ffmpeg and the pool need to stop."""
    for obj in workloads():
        for c in containers(obj):
            if "GPUJOBS_SHUTDOWN_GRACE_S" in env_of(c):
                grace = float(env_value(c, "GPUJOBS_SHUTDOWN_GRACE_S"))
                period = pod_spec(obj)["terminationGracePeriodSeconds"]
                assert period >= grace + 10, (obj["metadata"]["name"], grace, period)
    daemonset, c = worker_daemonset()
    assert float(env_value(c, "GPUJOBS_SHUTDOWN_GRACE_S")) == 25
    assert pod_spec(daemonset)["terminationGracePeriodSeconds"] == 40


def test_worker_mounts_the_media_root_and_a_memory_dev_shm() -> None:
    daemonset, c = worker_daemonset()
    media = mount_of(daemonset, c, env_value(c, "GPUJOBS_MEDIA_ROOT"))
    claim = media["persistentVolumeClaim"]["claimName"]
    pvc = find("PersistentVolumeClaim", claim)
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]  # every GPU node mounts it
    assert mount_of(daemonset, c, "/dev/shm")["emptyDir"]["medium"] == "Memory"


def test_gpujobs_containers_run_as_non_root_without_privileges() -> None:
    for obj, c in gpujobs_containers():
        merged = {**pod_spec(obj).get("securityContext", {}), **c.get("securityContext", {})}
        assert merged.get("runAsNonRoot") is True, c["name"]
        assert merged.get("runAsUser") == 10001, c["name"]  # the image's USER
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], c["name"]
        assert not c["securityContext"].get("privileged"), c["name"]
    for obj in workloads():
        for c in containers(obj):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], c["name"]


# --- vLLM and its inference worker -------------------------------------------------------------


def test_vllm_serves_tp4_on_port_9999_with_nccl_settings_for_no_p2p() -> None:
    vllm = find("Deployment", "gpujobs-vllm")
    server = container(vllm, "vllm")
    args = server["args"]
    assert arg_after(args, "--port") == "9999"
    assert arg_after(args, "--tensor-parallel-size") == "4"
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert env_value(server, "NCCL_CUMEM_ENABLE") == "0"
    shm = mount_of(vllm, server, "/dev/shm")["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"] == "16G"
    for probe in ("readinessProbe", "startupProbe"):
        assert server[probe]["httpGet"]["path"] == "/health"
        assert server[probe]["httpGet"]["port"] in ("http", 9999)
    assert [p["containerPort"] for p in server["ports"]] == [9999]


def test_each_vllm_replica_brings_its_own_inference_worker() -> None:
    vllm = find("Deployment", "gpujobs-vllm")
    server, worker = container(vllm, "vllm"), container(vllm, "inference-worker")
    # vLLM is a native sidecar: it starts (startupProbe) before the worker and stops after it.
    assert server in pod_spec(vllm)["initContainers"] and server["restartPolicy"] == "Always"
    assert worker in pod_spec(vllm)["containers"]
    assert worker["args"] == ["worker", "--queues", "inference", "--concurrency", "1"]
    endpoint = urlsplit(env_value(worker, "GPUJOBS_VLLM_ENDPOINT"))
    assert (endpoint.hostname, endpoint.port, endpoint.path) == ("localhost", 9999, "/v1")
    max_num_seqs = arg_after(server["args"], "--max-num-seqs")
    assert max_num_seqs == "10"
    assert env_value(worker, "GPUJOBS_INFERENCE_CONCURRENCY") == max_num_seqs
    # Its own heartbeat name: the node's is the transcode supervisor's.
    assert env_of(worker)["GPUJOBS_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.name"
    )
    assert mount_of(vllm, worker, env_value(worker, "GPUJOBS_MEDIA_ROOT"))
    assert worker["livenessProbe"]["exec"]["command"] == ["gpujobs", "worker", "--check"]


# --- The WSL2 overlay --------------------------------------------------------------------------


def overlay_patches(overlay: str) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(target object in the base, patched object) for each patch of the overlay."""
    [kustomization] = [
        d for d in DOCS if is_kustomization(d) and d.path.parent == Path("overlays", overlay)
    ]
    assert "../../base" in kustomization.data["resources"]
    patches = kustomization.data["patches"]
    assert patches
    for patch in patches:
        target = patch["target"]
        base = find(target["kind"], target["name"])
        group, _, version = base["apiVersion"].rpartition("/")
        assert (target.get("group", ""), target["version"]) == (group, version)
        operations = yaml.safe_load((K8S / kustomization.path.parent / patch["path"]).read_text())
        assert isinstance(operations, list), "a JSON 6902 patch: a list of operations"
        yield base, apply_json6902(base, operations)


def test_wsl2_overlay_mounts_usr_lib_wsl_into_the_worker() -> None:
    patched = {obj["metadata"]["name"]: obj for _, obj in overlay_patches("wsl2")}
    assert "gpujobs-worker" in patched
    daemonset, c = worker_daemonset([patched["gpujobs-worker"]])
    assert pod_spec(daemonset)["containers"][0]["name"] == "worker"  # the patch's index
    for version in WSL2_KUBERNETES_VERSIONS:
        kubernetes_validate.validate(daemonset, version, strict=True)
    volume = mount_of(daemonset, c, "/usr/lib/wsl")
    assert volume["hostPath"]["path"] == "/usr/lib/wsl"
    [mount] = [m for m in c["volumeMounts"] if m["mountPath"] == "/usr/lib/wsl"]
    assert mount["readOnly"] is True
    assert mount["recursiveReadOnly"] == "Enabled"
    assert "/usr/lib/wsl/lib" in env_value(c, "LD_LIBRARY_PATH").split(":")
    # The rest of the worker is the base's.
    assert c["livenessProbe"] == worker_daemonset()[1]["livenessProbe"]


# --- Optional: KEDA ----------------------------------------------------------------------------


def test_keda_scales_vllm_on_the_sum_of_every_priority_list_of_the_inference_queue() -> None:
    optional = [d.data for d in RESOURCES if d.path.parts[:2] == ("optional", "keda")]
    scaled = find("ScaledObject", "gpujobs-vllm", optional)
    target = scaled["spec"]["scaleTargetRef"]
    assert find(target["kind"], target["name"])["kind"] == "Deployment"
    triggers = scaled["spec"]["triggers"]
    assert [t["metadata"]["listName"] for t in triggers] == keys.queue_lists("inference")
    redis_host = "gpujobs-redis.gpujobs.svc:6379"
    assert {t["metadata"]["address"] for t in triggers} == {redis_host}
    # KEDA takes the largest of several triggers; the formula adds them up instead.
    formula = scaled["spec"]["advanced"]["scalingModifiers"]["formula"]
    terms = sorted(term.strip() for term in formula.split("+"))
    assert terms == sorted(t["name"] for t in triggers)
    [auth_name] = {t["authenticationRef"]["name"] for t in triggers}
    auth = find("TriggerAuthentication", auth_name, optional)
    [ref] = auth["spec"]["secretTargetRef"]
    assert (ref["parameter"], ref["name"], ref["key"]) == ("password", "gpujobs-redis", "password")


# --- The worker image --------------------------------------------------------------------------


def test_worker_image_is_slim_python_non_root_with_the_gpujobs_entrypoint() -> None:
    dockerfile = (ROOT / "workers" / "Dockerfile").read_text()
    lines = [line.strip() for line in dockerfile.splitlines() if not line.strip().startswith("#")]
    [base] = [line for line in lines if line.startswith("FROM ")]
    assert base.startswith("FROM python:3.11-slim")
    assert 'ENTRYPOINT ["gpujobs"]' in lines
    assert 'CMD ["worker", "--gpus", "all"]' in lines
    [user] = [line for line in lines if line.startswith("USER ")]
    assert user == "USER 10001:10001"
    assert 'pip install ".[worker]"' in dockerfile
    assert not re.search(r"(?im)^\s*(ENV|ARG)\s+\S*(PASSWORD|SECRET|TOKEN)", dockerfile)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)
