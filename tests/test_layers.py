"""The package's layers, read from the code (an AST walk, nothing imported): every import of our own modules
goes down the data flow that lib/llmbench/__init__.py describes, no import cycle, and imports inside
functions only in the two registries (engines, executors) and the CLI's command table.

The checker is also run on a copy of the package with a planted upward import, which it must report.
"""
import ast
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lib" / "llmbench"

# layer -> the layers its modules may import (their own included). Top (cli.py, __init__.py): anything.
ALLOWED = {
    "core": {"core"},
    "system": {"core", "system"},
    "model": {"core", "system", "model"},
    "engines": {"core", "system", "model", "engines"},
    "measure": {"core", "system", "model", "engines", "measure"},
    "experiments": {"core", "system", "model", "engines", "measure", "experiments"},
    "orchestration": {"core", "system", "model", "orchestration"},
    "results": {"core", "system", "model", "measure", "results"},
    "claims": {"core", "system", "model", "measure", "results", "claims"},
    "report": {"core", "system", "model", "measure", "results", "claims", "report"},
}
# Single modules a layer may take from a layer it otherwise does not import: a grid is validated against
# the notebooks' parameter vocabulary.
EXCEPTIONS = {"orchestration": {"llmbench.experiments.params"}}
# Where an import inside a function is the design: registries that import what was chosen, by name.
DEFERRED_OK = {"llmbench.cli", "llmbench.engines", "llmbench.orchestration.runner"}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def own_imports(path: Path, root: Path):
    """(imported module, line, deferred) for each import of the package's own modules in one file."""
    me = module_name(path, root)
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = me.split(".") if is_pkg else me.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith(root.name):
                continue
            for alias in node.names:  # `from pkg import module` names a module
                sub = f"{mod}.{alias.name}"
                target = sub if (root.parent / sub.replace(".", "/")).with_suffix(".py").is_file() \
                    or (root.parent / sub.replace(".", "/")).is_dir() else mod
                yield target, node.lineno, id(node) not in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(root.name + ".") or alias.name == root.name:
                    yield alias.name, node.lineno, id(node) not in top


def layer(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def graph(root: Path) -> dict[str, list[tuple[str, int, bool]]]:
    return {module_name(p, root): [(m, line, d) for m, line, d in own_imports(p, root) if m != module_name(p, root)]
            for p in sorted(root.rglob("*.py"))}


def cycles(g: dict) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), or a module importing itself."""
    edges = {m: {t for t, _, _ in imps if t in g} for m, imps in g.items()}
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in edges:
        if v not in index:
            visit(v)
    return out


def violations(root: Path) -> list[str]:
    g = graph(root)
    out = []
    for mod, imps in g.items():
        src = layer(mod)
        for target, line, deferred in imps:
            dst = layer(target)
            if src and dst and dst not in ALLOWED[src] and target not in EXCEPTIONS.get(src, ()):
                out.append(f"{mod}:{line} imports {target}: {src} may import only {sorted(ALLOWED[src])}")
            if src and src != "engines" and dst == "engines" and target != f"{root.name}.engines":
                out.append(f"{mod}:{line} imports {target}: outside engines/, only the engine interface "
                           f"({root.name}.engines) is imported")
            if src and target == root.name:
                out.append(f"{mod}:{line} imports the package root")
            if deferred and mod not in DEFERRED_OK:
                out.append(f"{mod}:{line} imports {target} inside a function (only registries may)")
    out += [f"import cycle: {' -> '.join(c)}" for c in cycles(g)]
    return out


def test_the_package_keeps_its_layers():
    assert violations(PACKAGE) == []


def test_every_module_lives_in_a_layer():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "cli.py")]
    assert loose == [], f"modules outside the stage folders: {loose}"
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()} >= set(ALLOWED)


@pytest.mark.parametrize("where, planted, expect", [
    ("core/stats.py", "from llmbench.report import sections\n", "core may import only"),
    ("orchestration/grid.py", "from llmbench.engines import eager\n", "orchestration may import only"),
    ("report/fmt_extra.py", "from llmbench.experiments import latency\n", "report may import only"),
    ("model/costmodel.py", "def f():\n    from llmbench.model import llama\n", "inside a function"),
    ("core/keys.py", "from llmbench.core import stats\n", "import cycle"),
    ("measure/timing.py", "from llmbench.engines import compiled\n", "only the engine interface"),
])
def test_a_planted_violation_is_reported(tmp_path, where, planted, expect):
    copy = tmp_path / "llmbench"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.c", "template"))
    target = copy / where
    if where == "core/keys.py":  # a cycle: keys -> stats and stats -> keys
        (copy / "core/stats.py").write_text((copy / "core/stats.py").read_text() + "\nfrom llmbench.core import keys\n")
    target.write_text((target.read_text() if target.is_file() else "") + "\n" + planted)
    found = violations(copy)
    assert any(expect in v for v in found), found
