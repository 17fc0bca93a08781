"""The package's layers hold: imports run one way (engine <- methods <- data/viz <- demo/cli), no
module imports the package root, the C extension is reached only through engine/core.py, and
module-level imports have no cycle. Read from the source (ast), so nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "clipdecomp"
#: a module may import its own layer and the layers of lower rank
RANK = {"assets": 0, "_core": 0, "engine": 1, "toy": 1, "methods": 2, "data": 3, "viz": 3,
        "demo": 4, "cli": 5, "__main__": 6}


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(tree: ast.Module) -> list[tuple[str, bool]]:
    """(imported clipdecomp module, at module level?) for every import in a file; imports under
    ``if TYPE_CHECKING:`` are left out (they never run)."""
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0 \
                    and child.module.split(".")[0] == "clipdecomp":
                if child.module == "clipdecomp":
                    out.extend((f"clipdecomp.{a.name}", top) for a in child.names)
                else:
                    out.append((child.module, top))
            elif isinstance(child, ast.Import):
                out.extend((a.name, top) for a in child.names
                           if a.name.split(".")[0] == "clipdecomp")
            is_scope = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, top and not is_scope)

    visit(tree, True)
    return out


def graph() -> dict[str, list[tuple[str, bool]]]:
    return {module_name(p): imports(ast.parse(p.read_text(encoding="utf-8")))
            for p in PKG.rglob("*.py")}


def test_no_relative_imports_and_no_package_root():
    for p in PKG.rglob("*.py"):
        tree = ast.parse(p.read_text(encoding="utf-8"))
        name = module_name(p)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0 or name == "clipdecomp", f"{name}: relative import"
            if isinstance(node, ast.Import) and name != "clipdecomp":
                assert all(a.name != "clipdecomp" for a in node.names), \
                    f"{name} imports the package root"


def test_imports_run_down_the_layers():
    wrong = []
    for mod, deps in graph().items():
        if mod == "clipdecomp":
            continue
        for dep, top in deps:
            if dep == "clipdecomp._core" and mod != "clipdecomp.engine.core":
                wrong.append(f"{mod} imports the C extension (use clipdecomp.engine.core)")
            a, b = RANK.get(layer(mod), 9), RANK.get(layer(dep), 9)
            if top and b > a:
                wrong.append(f"{mod} imports {dep}, a higher layer")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    g = graph()

    def resolve(name: str) -> str:
        while name not in g and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    edges = {m: {resolve(d) for d, top in deps if top} - {m, "clipdecomp"}
             for m, deps in g.items()}
    state: dict[str, int] = {}
    cycles: list[str] = []

    def dfs(u: str, stack: list[str]) -> None:
        state[u] = 1
        stack.append(u)
        for v in edges.get(u, ()):
            if state.get(v) == 1:
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif not state.get(v):
                dfs(v, stack)
        stack.pop()
        state[u] = 2

    for m in edges:
        if not state.get(m):
            dfs(m, [])
    assert not cycles, "\n".join(cycles)


def test_the_check_sees_a_violation():
    """The checks above are not vacuous: an upward import is found."""
    tree = ast.parse("from clipdecomp.viz.plots import plot_head_table\n"
                     "def f():\n    from clipdecomp.methods import spatial\n")
    assert imports(tree) == [("clipdecomp.viz.plots", True), ("clipdecomp.methods", False)]
