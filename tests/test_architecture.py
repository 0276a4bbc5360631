"""The layering rules of docs/architecture.rst, checked on the source (no import, no broker)."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "carrot_kombu"

#: Outside _pyamqp/, the only modules that may import from it (and why).
MAY_IMPORT_PYAMQP = {
    "carrot_kombu._link",  # the Outbound and Waiter values of the fence
    "carrot_kombu._connect",  # the one factory of links
    "carrot_kombu.options",  # the ssl option names py-amqp accepts
    "carrot_kombu.transport",  # kombu's _default_channel, fenced in _pyamqp.kombu_client
    "carrot_kombu.urls",  # kombu's _initial_params (failover switch), fenced in _pyamqp.kombu_client
    "carrot_kombu.topology",  # _pyamqp.fields: py-amqp's table encoder checks what declare() registers
}

#: py-amqp/kombu private names we rely on: only inside _pyamqp/.
PRIVATE_NAMES = {"_connection_factory", "_connection", "_default_channel", "_transport", "_read_buffer",
                 "_carrot_established", "_initial_params", "_is_owned", "_release_save", "_acquire_restore"}


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """The package's modules ``name`` imports at run time (also inside functions; not under TYPE_CHECKING)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    deps: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                self.generic_visit(node)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                full = ".".join(base + ([node.module] if node.module else []))
            else:
                full = node.module or ""
            for alias in node.names:
                candidate = f"{full}.{alias.name}"
                if candidate in modules:
                    deps.add(candidate)
                elif full in modules:
                    deps.add(full)

        def visit_Import(self, node: ast.Import) -> None:
            deps.update(alias.name for alias in node.names if alias.name in modules)

    Visitor().visit(ast.parse(path.read_text()))
    deps.discard(name)
    return deps


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_import_graph_has_no_circle():
    graph = _graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_only_the_fence_imports_the_pyamqp_layer():
    offenders = {
        name: sorted(dep for dep in deps if dep.startswith("carrot_kombu._pyamqp"))
        for name, deps in _graph().items()
        if not name.startswith("carrot_kombu._pyamqp") and name not in MAY_IMPORT_PYAMQP
    }
    assert {name: deps for name, deps in offenders.items() if deps} == {}


def test_no_carrot_state_or_private_pyamqp_name_outside_the_fenced_layer():
    found = []
    for name, path in _modules().items():
        if name.startswith("carrot_kombu._pyamqp") or name == "carrot_kombu._sync":
            continue  # _sync: the one helper for CPython's RLock hand-over
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and (node.attr == "carrot" or node.attr in PRIVATE_NAMES):
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
            elif isinstance(node, ast.Constant) and node.value in PRIVATE_NAMES:  # getattr(x, "_name")
                found.append(f"{path.name}:{node.lineno} {node.value!r}")
    assert found == []


def test_the_rules_catch_what_they_are_about(tmp_path):
    """The checks above can fail: a module reaching into .carrot and a circle are both found."""
    tree = ast.parse("x = chan.carrot.error\n")
    assert any(isinstance(n, ast.Attribute) and n.attr == "carrot" for n in ast.walk(tree))
    graph = {"a": {"b"}, "b": {"a"}}
    seen: set[str] = set()

    def has_cycle(node: str, stack: tuple[str, ...]) -> bool:
        if node in stack:
            return True
        if node in seen:
            return False
        seen.add(node)
        return any(has_cycle(dep, stack + (node,)) for dep in graph[node])

    assert has_cycle("a", ())
