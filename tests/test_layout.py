"""The layout is a decision: the wings' import rules, no import circles, modules that fit on a
few screens, and the public surface (the SDK's `__all__`, the CLI's commands) pinned, so that a
rename or a new export is made on purpose (as httpx pins its own)."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import grimp
import typer.main

import gpujobs
from gpujobs.cli.lazy import COMMANDS as LAZY_COMMANDS
from gpujobs.cli.main import app

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 600

SDK = [
    "BrokerUnreachable",
    "Client",
    "GpujobsError",
    "InferenceSpec",
    "InvalidSpec",
    "Job",
    "JobFailed",
    "JobNotFound",
    "JobRecord",
    "JobState",
    "LadderSpec",
    "Progress",
    "Settings",
    "TranscodeSpec",
    "get_job",
    "submit_inference",
    "submit_ladder",
    "submit_many",
    "submit_transcode",
]

COMMANDS = [
    "submit",
    "status",
    "watch",
    "ls",
    "cancel",
    "worker",
    "up",
    "down",
    "demo",
    "gpus",
    "doctor",
    "flower",
    "metrics",
    "top",
    "infer",
    "results",
    "api",
    "logs",
    "retry",
    "clean",
    "cluster",  # a group (typer lists groups after plain commands)
]


def test_the_sdk_exports_exactly_its_public_names() -> None:
    assert sorted(gpujobs.__all__) == SDK
    for name in SDK:
        assert getattr(gpujobs, name) is not None


def test_the_cli_has_exactly_its_commands_in_order() -> None:
    """`--help` lists the commands from gpujobs/cli/lazy.py's table without importing them:
    the table must name every real command, in order, with the help its docstring gives."""
    group = typer.main.get_command(app)
    assert group.list_commands(None) == COMMANDS  # type: ignore[attr-defined, arg-type]
    for name in COMMANDS:
        command = group.get_command(None, name)  # type: ignore[attr-defined, arg-type]
        assert command is not None, name
        assert command.get_short_help_str(10**6) == LAZY_COMMANDS[name][1], name
    # Loading every module added no command the table does not name.
    assert sorted(group.commands) == sorted(COMMANDS)  # type: ignore[attr-defined]


def test_the_submit_functions_say_what_they_take() -> None:
    """Keywords with defaults an IDE shows, not `**params`."""
    for function in (gpujobs.submit_transcode, gpujobs.Client.submit_transcode):
        params = inspect.signature(function).parameters
        assert not any(p.kind is p.VAR_KEYWORD for p in params.values()), function
        for name in ("width", "height", "codec", "preset", "cq", "audio", "priority", "gpu"):
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
            assert params[name].default is None, name
    for function in (gpujobs.submit_ladder,):
        params = inspect.signature(function).parameters
        assert not any(p.kind is p.VAR_KEYWORD for p in params.values()), function
        for name in ("renditions", "package", "segment_s", "preset", "cq", "audio", "gpu"):
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
            assert params[name].default is None, name
    for function in (gpujobs.submit_inference, gpujobs.Client.submit_inference):
        params = inspect.signature(function).parameters
        assert not any(p.kind is p.VAR_KEYWORD for p in params.values()), function
        for name in ("endpoint", "model", "max_concurrency", "chunk_size", "priority"):
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name


def test_the_wings_keep_their_import_rules() -> None:
    """The contracts in pyproject.toml ([tool.importlinter]), lazy imports included."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_importing_the_sdk_loads_no_cli_monitor_or_worker_code() -> None:
    wings = ("gpujobs.cli", "gpujobs.monitor", "workers", "imageio_ffmpeg", "rich", "typer")
    code = (
        f"import sys, gpujobs; wings = {wings!r}; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in wings "
        "or '.'.join(m.split('.')[:2]) in wings))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def find_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def test_there_is_no_import_circle() -> None:
    graph = grimp.build_graph("gpujobs", "workers", cache_dir=None)
    assert len(graph.modules) > 40  # every wing was found, not just the top level
    assert find_cycles(graph) == []


def test_find_cycles_finds_one() -> None:
    """The checker itself: a circle made on purpose is reported."""
    graph = grimp.ImportGraph()
    for name in ("a", "a.one", "a.two", "a.three"):
        graph.add_module(name)
    graph.add_import(importer="a.one", imported="a.two")
    graph.add_import(importer="a.two", imported="a.one")
    graph.add_import(importer="a.three", imported="a.one")
    assert find_cycles(graph) == [["a.one", "a.two"]]


def test_no_module_is_over_600_lines() -> None:
    sources = [*ROOT.glob("gpujobs/**/*.py"), *ROOT.glob("workers/**/*.py")]
    too_long = {
        str(path.relative_to(ROOT)): count
        for path in sources
        if (count := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert too_long == {}


def private_names_used_elsewhere() -> list[str]:
    """`module:line name` for each use of another module's private name: an attribute `_x` read
    off anything but self or cls where only other modules define `_x`, or `from m import _x`."""
    sources = [*ROOT.glob("gpujobs/**/*.py"), *ROOT.glob("workers/**/*.py")]
    trees = {path: ast.parse(path.read_text()) for path in sources}

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    defined: dict[str, set[Path]] = {}
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = node.name
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                name = node.attr
            else:
                continue
            if private(name):
                defined.setdefault(name, set()).add(path)
    found = []
    for path, tree in trees.items():
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and private(node.attr):
                base = node.value
                if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                    continue
                owners = defined.get(node.attr, set())
                if owners and path not in owners:
                    found.append(f"{where}:{node.lineno} {ast.unparse(node)}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
                "gpujobs",
                "workers",
            ):
                found += [f"{where}:{node.lineno} {node.module}.{alias.name}"
                          for alias in node.names if private(alias.name)]  # fmt: skip
    return found


def test_no_module_uses_another_modules_private_name() -> None:
    assert private_names_used_elsewhere() == []


def test_every_core_module_is_under_the_core_contract() -> None:
    """A new module at the top of gpujobs/ is core: the contract must name it, or the import
    rules would silently not apply to it."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    core = next(c for c in contracts if c["name"].startswith("The core imports"))
    on_disk = {
        f"gpujobs.{path.stem}"
        for path in (ROOT / "gpujobs").glob("*.py")
        if path.stem not in ("__init__", "__main__")
    }
    assert set(core["source_modules"]) == on_disk
