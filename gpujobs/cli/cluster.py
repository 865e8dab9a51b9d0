"""`gpujobs cluster status|nodes|scale`: the gpujobs deployment in Kubernetes, from anywhere a
kubeconfig reaches it (or from a pod, with its service account). The logic is gpujobs/cluster.py;
this module parses and draws. The kubernetes client (~0.4 s to import) is imported only when a
`cluster` command runs, not by every `gpujobs` call (the liveness probe is one).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.columns import Columns
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from gpujobs import cluster

console = Console()
DEFAULT_NAMESPACE = "gpujobs"
GPU_RESOURCE = "nvidia.com/gpu"

cluster_app = typer.Typer(
    name="cluster",
    help="The gpujobs deployment in Kubernetes: GPU nodes, pods, queues, vLLM replicas.",
    no_args_is_help=True,
)

KubeconfigOption = Annotated[
    Path | None,
    typer.Option(
        "--kubeconfig",
        help="Kubeconfig file. Default: $KUBECONFIG, else ~/.kube/config, else the pod's "
        "service account.",
    ),
]
ContextOption = Annotated[
    str | None, typer.Option("--context", help="Kubeconfig context. Default: the current one.")
]
NamespaceOption = Annotated[
    str, typer.Option("--namespace", "-n", help="Where k8s/ deployed gpujobs.")
]


class Target(StrEnum):
    """What `scale` scales: inference = the vLLM Deployment (4 GPUs and one worker each)."""

    INFERENCE = "inference"


def _cluster(kubeconfig: Path | None, context: str | None, namespace: str) -> cluster.Cluster:
    from gpujobs import cluster

    return cluster.Cluster(cluster.connect_api(kubeconfig, context), namespace)


def _labels(labels: dict[str, str]) -> str:
    """The labels worth reading: not the kubernetes.io/ ones every node has."""
    shown = [f"{k}={v}" for k, v in sorted(labels.items())
             if not k.startswith(("kubernetes.io/", "beta.kubernetes.io/"))]  # fmt: skip
    return escape("\n".join(shown)) or "-"


def nodes_table(nodes: list[cluster.GpuNode]) -> Table:
    table = Table(title="GPU nodes", title_justify="left")
    for column in ("node", "ready", GPU_RESOURCE, "labels"):
        table.add_column(column, overflow="fold")
    for node in nodes:
        ready = "[green]yes[/]" if node.ready else "[red]no[/]"
        table.add_row(escape(node.name), ready, str(node.gpus), _labels(node.labels))
    return table


def pods_table(pods: list[cluster.PodState]) -> Table:
    table = Table(title="Pods", title_justify="left")
    for column in ("pod", "component", "node", "phase", "ready", "restarts"):
        table.add_column(column, overflow="fold")
    for pod in pods:
        ready = f"{pod.ready}/{pod.containers}"
        colour = "green" if pod.ready == pod.containers else "yellow"
        table.add_row(escape(pod.name), pod.component, escape(pod.node or "(not bound)"),
                      pod.phase, f"[{colour}]{ready}[/]", str(pod.restarts))  # fmt: skip
    if not pods:
        table.add_row("(none)", "", "", "", "", "")
    return table


def queues_table(queues: dict[str, int]) -> Table:
    table = Table(title="Queues (waiting)", title_justify="left")
    table.add_column("queue", overflow="fold")
    table.add_column("waiting", justify="right")
    for name, depth in queues.items():
        table.add_row(escape(name), str(depth))
    return table


@cluster_app.command("status")
def status(
    kubeconfig: KubeconfigOption = None,
    context: ContextOption = None,
    namespace: NamespaceOption = DEFAULT_NAMESPACE,
) -> None:
    """GPU nodes (allocatable nvidia.com/gpu, labels), the worker and vLLM pods (readiness,
    restarts) and, beside them, the queue depths from Redis (GPUJOBS_BROKER_URL)."""
    from gpujobs.config import Settings

    state = _cluster(kubeconfig, context, namespace).status(Settings())
    console.print(nodes_table(state.nodes))
    if state.queues_error is None:
        console.print(Columns([pods_table(state.pods), queues_table(state.queues)]))
    else:
        console.print(pods_table(state.pods))
        console.print(f"queues: not read: {state.queues_error}", markup=False)


@cluster_app.command("nodes")
def nodes(
    kubeconfig: KubeconfigOption = None,
    context: ContextOption = None,
) -> None:
    """What each GPU node lacks to run gpujobs: the label, the RuntimeClass nvidia, a ready
    device plugin pod, allocatable GPUs. Exits 1 when any node lacks something."""
    checks = _cluster(kubeconfig, context, DEFAULT_NAMESPACE).node_checks()
    table = Table(title="GPU nodes", title_justify="left")
    for column in ("node", GPU_RESOURCE, "missing"):
        table.add_column(column, overflow="fold")
    for check in checks:
        missing = "\n".join(f"[red]{escape(m)}[/]" for m in check.missing) or "[green]nothing[/]"
        table.add_row(escape(check.node.name), str(check.node.gpus), missing)
    console.print(table)
    if any(check.missing for check in checks):
        raise typer.Exit(1)


# ignore_unknown_options: "-1" reaches the command as a number (and is refused there, saying
# why) instead of reading as an unknown option.
@cluster_app.command("scale", context_settings={"ignore_unknown_options": True})
def scale(
    target: Annotated[Target, typer.Argument(help="What to scale: inference (vLLM replicas).")],
    replicas: Annotated[int, typer.Argument(help="Replicas wanted, 0 or more.")],
    kubeconfig: KubeconfigOption = None,
    context: ContextOption = None,
    namespace: NamespaceOption = DEFAULT_NAMESPACE,
) -> None:
    """Set the number of vLLM replicas (each takes 4 GPUs of one node and brings its own
    inference worker)."""
    from gpujobs.cluster import INFERENCE_DEPLOYMENT, InvalidReplicas

    if replicas < 0:  # before any connection: nothing is asked or changed
        raise InvalidReplicas(f"replicas must be 0 or more, got {replicas}")
    before, note = _cluster(kubeconfig, context, namespace).scale_inference(replicas)
    console.print(f"{INFERENCE_DEPLOYMENT}: {before} -> {replicas} replicas", markup=False)
    if note:
        console.print(f"note: {note}", markup=False)


def register(app: typer.Typer) -> None:
    """Add `cluster` (status, nodes, scale) to the gpujobs command."""
    app.add_typer(cluster_app)
