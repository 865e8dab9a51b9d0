"""gpujobs in a Kubernetes cluster, through the API server (the kubernetes client): its GPU nodes
and what each lacks, its worker and vLLM pods, its queues, and the number of vLLM replicas.

What it looks for is what k8s/ deploys: GPU nodes labelled `node-role.kubernetes.io/worker-gpu=
true`, advertising `nvidia.com/gpu` (the NVIDIA device plugin, pods labelled
`app.kubernetes.io/name=nvidia-device-plugin` in any namespace), the RuntimeClass `nvidia`, and in
the gpujobs namespace the pods labelled `app.kubernetes.io/component=transcode-worker|vllm` and the
Deployment `gpujobs-vllm`. The CLI is `gpujobs cluster status|nodes|scale`.

Every failure is a ClusterError with one line: no kubeconfig, a namespace that does not exist, a
bad replica count, no GPU nodes, an API server that cannot be reached or refuses (its reason).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from urllib3.exceptions import HTTPError as Urllib3Error

from gpujobs import keys
from gpujobs.app import INFERENCE_QUEUE, TRANSCODE_QUEUE, node_queue
from gpujobs.config import Settings
from gpujobs.connection import broker_url, connect
from gpujobs.errors import GpujobsError

GPU_LABEL = "node-role.kubernetes.io/worker-gpu"
GPU_RESOURCE = "nvidia.com/gpu"
RUNTIME_CLASS = "nvidia"
DEVICE_PLUGIN_SELECTOR = "app.kubernetes.io/name=nvidia-device-plugin"
INFERENCE_DEPLOYMENT = "gpujobs-vllm"
COMPONENTS = ("transcode-worker", "vllm")
DEFAULT_NAMESPACE = "gpujobs"
# Seconds one API call may take (connect and read): a dead server fails fast, not after minutes.
API_TIMEOUT_S = 15.0


class ClusterError(GpujobsError):
    """Something about the cluster or the request that the user must fix; one line."""

    exit_code = 1


class InvalidReplicas(ClusterError):
    """`scale` to a number of replicas that cannot be (below 0)."""

    exit_code = 2


@dataclass(frozen=True)
class GpuNode:
    """A node gpujobs can use or should: labelled, or advertising GPUs (allocatable count)."""

    name: str
    gpus: int
    labelled: bool
    ready: bool
    labels: dict[str, str]


@dataclass(frozen=True)
class PodState:
    """A worker or vLLM pod: where it is bound, its phase, containers ready of all, restarts."""

    name: str
    component: str
    node: str | None
    phase: str
    ready: int
    containers: int
    restarts: int


@dataclass(frozen=True)
class NodeCheck:
    """One GPU node and what it lacks to run gpujobs (empty: nothing)."""

    node: GpuNode
    missing: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Status:
    """`gpujobs cluster status`: nodes, pods, and queue depths or why they could not be read."""

    nodes: list[GpuNode]
    pods: list[PodState]
    queues: dict[str, int]
    queues_error: str | None


def _kubeconfig_path(kubeconfig: Path | None) -> Path:
    if kubeconfig is not None:
        return kubeconfig
    first = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    return Path(first).expanduser() if first else Path.home() / ".kube" / "config"


def connect_api(kubeconfig: Path | None = None, context: str | None = None) -> client.ApiClient:
    """An API client from the kubeconfig (--kubeconfig, else $KUBECONFIG, else ~/.kube/config),
    or, in a pod with no kubeconfig, from the pod's service account.

    Raises ClusterError when there is neither, or the kubeconfig cannot be used.
    """
    path = _kubeconfig_path(kubeconfig)
    if not path.is_file():
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call,unused-ignore]
            except ConfigException as exc:
                raise ClusterError(f"in-cluster config: {exc}") from None
            return client.ApiClient()
        raise ClusterError(
            f"no kubeconfig: {path} does not exist and this is not a pod "
            "(set KUBECONFIG or pass --kubeconfig)"
        )
    try:
        api = config.new_client_from_config(  # type: ignore[no-untyped-call,unused-ignore]
            config_file=str(path), context=context
        )
        return cast(client.ApiClient, api)
    except (ConfigException, ValueError, OSError, yaml.YAMLError) as exc:
        reason = " ".join(str(exc).split())  # YAML's errors span lines
        raise ClusterError(f"kubeconfig {path}: {reason}") from None


def _refusal(exc: ApiException) -> str:
    """The API server's reason, from its Status body: `Forbidden: deployments.apps ... is
    forbidden: ...` rather than the whole HTTP exchange."""
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    reason = (body.get("reason") if isinstance(body, dict) else None) or exc.reason
    return f"{exc.status} {reason}: {message}" if message else f"{exc.status} {reason}"


class Cluster:
    """The gpujobs deployment in one namespace of one cluster.

    api: a kubernetes ApiClient (connect_api). namespace: where k8s/ put gpujobs (default
    gpujobs).
    """

    def __init__(self, api: client.ApiClient, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.api = api
        self.namespace = namespace
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.node_api = client.NodeV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    @property
    def server(self) -> str:
        return str(self.api.configuration.host)

    def _call(
        self,
        what: str,
        fn: Callable[..., Any],
        *args: Any,
        not_found: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """fn(*args), with the API server's refusal or absence as one ClusterError line;
        a 404 says not_found instead, where given."""
        # Any: the client types every field Optional; what the server sends is read as sent.
        try:
            return fn(*args, _request_timeout=API_TIMEOUT_S, **kwargs)
        except ApiException as exc:
            if exc.status == 404 and not_found is not None:
                raise ClusterError(not_found) from None
            if not exc.status:
                reason = exc.reason
                raise ClusterError(
                    f"cannot reach the API server at {self.server}: {reason}"
                ) from None
            raise ClusterError(f"the API server refused {what}: {_refusal(exc)}") from None
        except (Urllib3Error, OSError) as exc:
            reason = str(getattr(exc, "reason", None) or exc).splitlines()[0]
            # urllib3 wraps the socket's words in its own: keep the socket's.
            reason = reason.partition("Failed to establish a new connection: ")[2] or reason
            raise ClusterError(f"cannot reach the API server at {self.server}: {reason}") from None

    def check_namespace(self) -> None:
        """ClusterError unless the namespace exists."""
        self._call(
            f"reading namespace {self.namespace}",
            self.core.read_namespace,
            self.namespace,
            not_found=f"namespace {self.namespace} does not exist in the cluster at "
            f"{self.server} (deploy k8s/ first, or pass --namespace)",
        )

    # --- nodes ---------------------------------------------------------------------------------

    def gpu_nodes(self) -> list[GpuNode]:
        """Nodes labelled for gpujobs or advertising nvidia.com/gpu; ClusterError if none."""
        nodes = self._call("listing nodes", self.core.list_node).items
        found = []
        for node in nodes:
            labels = dict(node.metadata.labels or {})
            allocatable = (node.status.allocatable or {}) if node.status else {}
            gpus = int(allocatable.get(GPU_RESOURCE, "0") or 0)
            labelled = labels.get(GPU_LABEL) == "true"
            if not labelled and gpus == 0:
                continue
            conditions = (node.status.conditions or []) if node.status else []
            ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
            found.append(GpuNode(node.metadata.name, gpus, labelled, ready, labels))
        if not found:
            raise ClusterError(
                f"no GPU nodes: no node of the cluster at {self.server} is labelled "
                f"{GPU_LABEL}=true or offers {GPU_RESOURCE} (scripts/wsl2/setup-node.sh labels one)"
            )
        return sorted(found, key=lambda n: n.name)

    def node_checks(self) -> list[NodeCheck]:
        """Each GPU node and what it lacks: the label, the RuntimeClass nvidia (or its node
        selector matching the node), allocatable GPUs, a ready device plugin pod."""
        nodes = self.gpu_nodes()
        runtimes = self._call("listing RuntimeClasses", self.node_api.list_runtime_class).items
        runtime = next((r for r in runtimes if r.metadata.name == RUNTIME_CLASS), None)
        plugins = self._call(
            "listing device plugin pods",
            self.core.list_pod_for_all_namespaces,
            label_selector=DEVICE_PLUGIN_SELECTOR,
        ).items
        by_node: dict[str, list[Any]] = {}
        for pod in plugins:
            if pod.spec.node_name and pod.metadata.deletion_timestamp is None:
                by_node.setdefault(pod.spec.node_name, []).append(pod)
        checks = []
        for node in nodes:
            missing = []
            if not node.labelled:
                missing.append(f"label {GPU_LABEL}=true")
            if runtime is None:
                missing.append(f"RuntimeClass {RUNTIME_CLASS} (apply k8s/device-plugin)")
            else:
                wanted = (runtime.scheduling.node_selector or {}) if runtime.scheduling else {}
                if any(node.labels.get(k) != v for k, v in wanted.items()):
                    missing.append(f"the labels RuntimeClass {RUNTIME_CLASS} selects: {wanted}")
            if node.gpus == 0:
                missing.append(f"allocatable {GPU_RESOURCE} (the device plugin registers them)")
            pods = by_node.get(node.name, [])
            if not pods:
                missing.append("a device plugin pod")
            elif not any(_pod_ready(p) for p in pods):
                missing.append(f"a ready device plugin pod ({pods[0].status.phase})")
            if not node.ready:
                missing.append("Ready condition")
            checks.append(NodeCheck(node, missing))
        return checks

    # --- pods and queues -----------------------------------------------------------------------

    def pods(self) -> list[PodState]:
        """The transcode worker and vLLM pods of the namespace, by component then name."""
        self.check_namespace()
        selector = f"app.kubernetes.io/component in ({','.join(COMPONENTS)})"
        items = self._call(
            f"listing pods in {self.namespace}",
            self.core.list_namespaced_pod,
            self.namespace,
            label_selector=selector,
        ).items
        found = []
        for pod in items:
            statuses = [*(pod.status.init_container_statuses or []),
                        *(pod.status.container_statuses or [])]  # fmt: skip
            spec = pod.spec
            sidecars = [c for c in spec.init_containers or [] if c.restart_policy == "Always"]
            found.append(
                PodState(
                    name=pod.metadata.name,
                    component=pod.metadata.labels.get("app.kubernetes.io/component", "?"),
                    node=spec.node_name,
                    phase=pod.status.phase or "?",
                    ready=sum(1 for s in statuses if s.ready),
                    containers=len(spec.containers) + len(sidecars),
                    restarts=sum(s.restart_count or 0 for s in statuses),
                )
            )
        return sorted(found, key=lambda p: (p.component, p.name))

    def status(self, settings: Settings) -> Status:
        """Nodes, pods and queue depths (Redis through GPUJOBS_BROKER_URL, as producers reach it;
        where it cannot be read, queues_error says why and the rest still comes back)."""
        pods = self.pods()
        nodes = self.gpu_nodes()
        queues: dict[str, int] = {}
        error = None
        try:
            queues = queue_depths(settings, [n.name for n in nodes])
        except GpujobsError as exc:
            error = str(exc)
        return Status(nodes, pods, queues, error)

    # --- scaling -------------------------------------------------------------------------------

    def scale_inference(self, replicas: int) -> tuple[int, str | None]:
        """Set gpujobs-vllm's replicas (each 4 GPUs and one inference worker).

        Returns (the replicas before, a note when KEDA's ScaledObject manages the Deployment
        and will move it again). InvalidReplicas below 0, before anything is asked.
        """
        if replicas < 0:
            raise InvalidReplicas(f"replicas must be 0 or more, got {replicas}")
        self.check_namespace()
        scale = self._call(
            f"reading the scale of {INFERENCE_DEPLOYMENT}",
            self.apps.read_namespaced_deployment_scale,
            INFERENCE_DEPLOYMENT,
            self.namespace,
            not_found=f"deployment {INFERENCE_DEPLOYMENT} not found in namespace {self.namespace}",
        )
        before = int(scale.spec.replicas or 0)
        self._call(
            f"scaling deployment {INFERENCE_DEPLOYMENT}",
            self.apps.patch_namespaced_deployment_scale,
            INFERENCE_DEPLOYMENT,
            self.namespace,
            {"spec": {"replicas": replicas}},
        )
        return before, self._keda_note()

    def _keda_note(self) -> str | None:
        scaled: Any
        try:
            scaled = self.custom.get_namespaced_custom_object(
                "keda.sh", "v1alpha1", self.namespace, "scaledobjects", INFERENCE_DEPLOYMENT,
                _request_timeout=API_TIMEOUT_S,
            )  # fmt: skip
        except ApiException:  # no KEDA, or no ScaledObject: nobody else scales it
            return None
        spec = scaled.get("spec", {})
        low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        return (
            f"KEDA's ScaledObject {INFERENCE_DEPLOYMENT} also scales it ({low} to {high} "
            "replicas, on the inference queue) and will change this"
        )


def _pod_ready(pod: Any) -> bool:
    conditions = pod.status.conditions or [] if pod.status else []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def queue_depths(settings: Settings, nodes: list[str]) -> dict[str, int]:
    """Waiting messages per queue, every priority summed: transcode, inference and each GPU
    node's transcode queue. Needs GPUJOBS_BROKER_URL (say, through `kubectl port-forward
    svc/gpujobs-redis 6379`); BrokerUnreachable (a GpujobsError) when it cannot be read."""
    if not settings.broker_url:
        raise ClusterError(
            "GPUJOBS_BROKER_URL is not set (kubectl -n gpujobs port-forward svc/gpujobs-redis "
            "6379, then point it at redis://127.0.0.1:6379/0)"
        )
    redis_client = connect(broker_url(settings, start_local=False), settings)
    queues = [TRANSCODE_QUEUE, INFERENCE_QUEUE, *(node_queue(n) for n in nodes)]
    with redis_client.pipeline(transaction=False) as pipe:
        for queue in queues:
            for name in keys.queue_lists(queue):
                pipe.llen(name)
        lengths = pipe.execute()
    steps = len(keys.PRIORITY_STEPS)
    return {q: int(sum(lengths[i * steps : (i + 1) * steps])) for i, q in enumerate(queues)}
