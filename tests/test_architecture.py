"""The house rules, checked on the source: no import cycles inside btx_core or flows/, the
library never imports Prefect or flows/ (only its CLI layer may, for `btx run`), and each
btx_core package imports only from the layers below it. Every import counts, also one inside
a function: a lazy import is still a dependency a reader has to follow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("btx_core", "flows")
# Bottom to top: a package may import from its own layer and the ones before it; a module is in
# the layer of the longest prefix that names it. The families (which architectures btx mixes, as
# data) sit under the config's value types (config.base, values, checks, execution, method), which
# the store and the models may take (a Store's TransferPolicy). The pipeline's config itself
# (config.schema: BTXConfig and its stage settings; config.load: reading and validating it) sits
# above the store and the models: stages hand them values (a run's folder, a model's shape).
LAYERS = ("btx_core.errors", "btx_core.logs", "btx_core.model.families", "btx_core.config", "btx_core.store",
          "btx_core.model", "btx_core.config.schema", "btx_core.config.load", "btx_core.data",
          "btx_core.training", "btx_core.moe", "btx_core.evaluation", "btx_core.stages", "btx_core.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every module `path` imports (top-level or lazily), as dotted names; `from a import b`
    counts as `a.b` when that is a module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: {m for m in imports_of(path, known) if m in known and m != name}
            for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layer(module: str) -> int | None:
    named = [i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + ".")]
    return max(named, key=lambda i: len(LAYERS[i])) if named else None


def test_no_import_cycles_in_btx_core_or_flows():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_cli_layer_of_the_library_imports_prefect_or_flows():
    mods = modules()
    offenders = []
    for name, path in mods.items():
        if not name.startswith("btx_core") or name.startswith("btx_core.cli"):
            continue
        for imported in imports_of(path, set(mods)):
            if imported.split(".")[0] in {"prefect", "flows"}:
                offenders.append(f"{name} imports {imported}")
    assert offenders == []


def test_each_library_package_imports_only_from_the_layers_below_it():
    edges = graph()
    upward = [f"{a} ({LAYERS[layer(a)]}) imports {b} ({LAYERS[layer(b)]})"
              for a, targets in edges.items() if layer(a) is not None
              for b in sorted(targets) if layer(b) is not None and layer(b) > layer(a)]
    assert upward == []


def test_every_library_module_is_in_a_layer_and_says_what_it_is_for():
    unplaced = [m for m in modules() if m.startswith("btx_core.") and layer(m) is None]
    assert unplaced == []
    undocumented = [name for name, path in modules().items()
                    if not (ast.get_docstring(ast.parse(path.read_text())) or "").strip()
                    and path.read_text().strip()]
    assert undocumented == []
