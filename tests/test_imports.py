"""The import graph of firewall/, gateways/ and tunnel/: no circles, one composition root, layers kept.

Read from the files with ``ast`` (every import, at module level or in a
function) and checked in fresh interpreters (``python -c``), so that a
circle hidden behind a function-level import, or a gateway that pulls in
the router's internals, fails here rather than in a late, partial import.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("firewall", "gateways", "tunnel")

# None left: the processor's rulebook no longer imports its core (issue 9,
# item 5: it returns commands as data). Any circle fails the test.
KNOWN_CIRCLES: list[set[str]] = []

# Files whose function-level imports belong to their owners' issues (none
# left: the config loader's late ``import re`` went with the pydantic models).
OWNED_ELSEWHERE: tuple[str, ...] = ()

# What the gateways and the tunnel must never import: a gateway knows its
# manifest and the signalling contract, not the router's internals
# (DESIGN.md invariant 6).
ROUTER_INTERNALS = ("firewall.processor", "firewall.supervisor")


@dataclass(frozen=True)
class Import:
    module: str  # who imports
    target: str  # the project module it loads
    line: int
    module_level: bool  # False: inside a function


def project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = project_modules()


def _resolve(name: str) -> str | None:
    """The project module that ``import name`` loads (the longest known prefix)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, base] if base else package)
    for alias in node.names:
        yield f"{base}.{alias.name}"  # a submodule, or a name _resolve trims back to base


def project_imports() -> list[Import]:
    """Every import of a project module. ``if TYPE_CHECKING:`` blocks count as
    module level: they are how a circle hides from the interpreter but not
    from the reader."""
    out: list[Import] = []
    for module, path in MODULES.items():
        is_package = path.name == "__init__.py"

        def visit(node: ast.AST, module_level: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for name in _names(child, module, is_package):
                        target = _resolve(name)
                        if target is not None and target != module:
                            out.append(Import(module, target, child.lineno, module_level))
                elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    visit(child, False)
                else:
                    visit(child, module_level)

        visit(ast.parse(path.read_text(), str(path)), True)
    return out


def module_graph() -> dict[str, set[str]]:
    """Module-level edges. Loading ``a.b.c`` runs ``a`` and ``a.b`` first, so
    those are edges too, except the importer's own ancestors (already running)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in project_imports():
        if not imp.module_level:
            continue
        parts = imp.target.split(".")
        for i in range(1, len(parts) + 1):
            loaded = ".".join(parts[:i])
            if loaded in MODULES and loaded != imp.module and not imp.module.startswith(loaded + "."):
                graph[imp.module].add(loaded)
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def fresh_import(modules: list[str]) -> list[str]:
    """Import ``modules`` in a new interpreter; the project modules it then holds."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {PACKAGES!r})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_the_graph_reader_sees_what_it_must() -> None:
    graph = module_graph()
    assert "tunnel.session" in graph["tunnel.server"]  # from X import Y
    assert "firewall.backend" in graph["firewall.cli"]  # from package import module as alias
    assert "firewall.signalling" in graph["gateways.layer.core"]  # a package's __init__ runs
    assert "tunnel.publish" in graph["tunnel.gateway"]  # under TYPE_CHECKING only
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_module_level_import_circles() -> None:
    new = [sorted(c) for c in circles(module_graph()) if c not in KNOWN_CIRCLES]
    assert new == []


def test_gateways_and_tunnel_never_import_the_router_internals() -> None:
    static = [
        f"{imp.module}:{imp.line} imports {imp.target}"
        for imp in project_imports()
        if imp.module.split(".")[0] in ("gateways", "tunnel") and imp.target.startswith(ROUTER_INTERNALS)
    ]
    assert static == []
    everything = sorted(m for m in MODULES if m.split(".")[0] in ("gateways", "tunnel"))
    loaded = fresh_import(everything)
    assert [m for m in loaded if m.startswith(ROUTER_INTERNALS)] == []


def test_gateways_and_tunnel_never_import_the_config() -> None:
    """A gateway reads its manifest, and validates its settings with its own
    model (its kind's module: gateways/kind.py); the tunnel's own files are
    read with the shared field types (firewall.fields)."""
    static = [
        f"{imp.module}:{imp.line} imports {imp.target}"
        for imp in project_imports()
        if imp.module.split(".")[0] in ("gateways", "tunnel") and imp.target.startswith("firewall.config")
    ]
    assert static == []


def test_the_signalling_contract_imports_neither_config_nor_gateways() -> None:
    """firewall/signalling/ is the wire contract between the two sides: it
    stands on its own, checked statically and in a fresh interpreter."""
    static = [
        f"{imp.module}:{imp.line} imports {imp.target}"
        for imp in project_imports()
        if imp.module.startswith("firewall.signalling") and imp.target.startswith(("firewall.config", "gateways", "tunnel"))
    ]
    assert static == []
    loaded = fresh_import(["firewall.signalling"])
    assert [m for m in loaded if m.startswith(("firewall.config", "gateways", "tunnel"))] == []


def test_only_the_command_line_hosts_the_command_groups() -> None:
    """firewall/cli.py is the composition root: ``nfgate lab``, ``nfgate tunnel``
    and the gateway launcher are hosted by it, or run on their own, and never
    import it back."""
    assert {"firewall.lab.cli", "tunnel.cli"} <= module_graph()["firewall.cli"]
    loaded = fresh_import(["firewall.lab.cli", "tunnel.cli", "gateways.__main__"])
    assert "firewall.cli" not in loaded


def test_a_function_level_import_says_why() -> None:
    """Only an optional dependency is imported inside a function, with a
    comment (on the line, or just above it) saying why."""
    silent = []
    for module, path in MODULES.items():
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith(OWNED_ELSEWHERE):
            continue
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines), relative)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for child in ast.walk(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    here = lines[child.lineno - 1]
                    above = lines[child.lineno - 2].strip() if child.lineno > 1 else ""
                    if "#" not in here and not above.startswith("#"):
                        silent.append(f"{relative}:{child.lineno}: {here.strip()}")
    assert silent == []
