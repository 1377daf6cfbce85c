"""The package's structure: no module reaches into another's private names, and the
module-level imports inside src/bnkit form no cycle (dependencies point one way).

Both are read from the source with `ast`, without importing anything.
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "bnkit"

# Files another change owns (the compiled-extension and benchmark rewrites); their remaining
# offenders are expected to go when those changes are merged. Only they may be listed here.
# the compiled extension, named `_C` as torch's is: a module, not a private name
EXTENSIONS = {"bnkit._C"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py" if name in MODULES else False


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _base(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    package = module if _is_package(module) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _imports(module: str, tree: ast.Module):
    """(node, target module, imported name or None, bound name) for every import in the
    module's tree; target modules outside bnkit are skipped."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "bnkit" or alias.name.startswith("bnkit."):
                    # `import bnkit.x as y` binds y to bnkit.x; `import bnkit.x` binds bnkit
                    yield node, alias.name, None, alias.asname or "bnkit"
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, node)
            if base == "bnkit" or base.startswith("bnkit."):
                for alias in node.names:
                    yield node, base, alias.name, alias.asname or alias.name


def _parse(module: str) -> ast.Module:
    return ast.parse(MODULES[module].read_text(encoding="utf-8"), str(MODULES[module]))


def private_uses(module: str) -> list[str]:
    """Where `module` imports another bnkit module's private name, or reads `mod._name` from
    a bnkit module it imported. A private submodule imported from its own package is allowed
    (`from . import _run` inside bnkit.tools)."""
    tree = _parse(module)
    found, module_aliases = [], {}
    own_package = module if _is_package(module) else module.rpartition(".")[0]
    for node, target, name, bound in _imports(module, tree):
        full = f"{target}.{name}" if name else target
        if name is None or full in MODULES:  # the name is a module: track attribute reads
            module_aliases[bound] = full if name or bound != "bnkit" else "bnkit"
            if name and _private(name) and target != own_package:
                found.append(f"{module}:{node.lineno} imports private module {full}")
            continue
        if _private(name) and target != module and full not in EXTENSIONS:
            found.append(f"{module}:{node.lineno} imports {name} from {target}")
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _private(node.attr)):
            continue
        target = _module_of(node.value, module_aliases)
        if target is None or (f"{target}.{node.attr}" in MODULES and target == own_package):
            continue
        found.append(f"{module}:{node.lineno} reads {ast.unparse(node)} ({target})")
    return found


def _module_of(node: ast.expr, module_aliases: dict[str, str]) -> str | None:
    """The bnkit module an expression names (`F`, `bnkit.kernels`), or None."""
    if isinstance(node, ast.Name):
        return module_aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _module_of(node.value, module_aliases)
        if base is not None and f"{base}.{node.attr}" in MODULES:
            return f"{base}.{node.attr}"
    return None


def _module_level(tree: ast.Module):
    """Import statements run when the module is imported: not inside a function, nor under
    `if TYPE_CHECKING:`."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(child for child in ast.iter_child_nodes(node)
                         if isinstance(child, ast.stmt) or hasattr(child, "body"))


def import_graph() -> dict[str, set[str]]:
    """module -> the bnkit modules its module-level imports name (a from-import of a
    submodule counts as an edge to the submodule)."""
    graph = {}
    for module in MODULES:
        tree = _parse(module)
        edges = set()
        for node in _module_level(tree):
            for _, target, name, _ in _imports(module, ast.Module(body=[node], type_ignores=[])):
                full = f"{target}.{name}" if name else target
                edges.add(full if full in MODULES else target)
        graph[module] = {e for e in edges if e in MODULES and e != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    for root in sorted(graph):
        if state.get(root):
            continue
        path, iters = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(graph.get(nxt, ()))))
    return None


# ----------------------------------------------------------------------------- the checks


def test_the_checks_see_what_they_should():
    """The AST readers themselves, on known code: a private import, a private attribute read
    and a two-module cycle are found; a dunder, an own private name and a function-level
    import are not."""
    assert "bnkit.nn.registry" in MODULES and _is_package("bnkit.nn")
    node = ast.parse("from ..functional import _validate").body[0]
    assert _base("bnkit.nn.ghost", node) == "bnkit.functional"
    tree = ast.parse("def f():\n    import bnkit.lab\nif TYPE_CHECKING:\n    import bnkit.nn\n"
                     "try:\n    from . import sync\nexcept ImportError:\n    pass\n")
    assert [ast.unparse(n) for n in _module_level(tree)] == ["from . import sync"]
    aliases = {"F": "bnkit.functional", "bnkit": "bnkit"}
    assert _module_of(ast.parse("bnkit.kernels.cpu", mode="eval").body, aliases) \
        == "bnkit.kernels.cpu"
    assert _module_of(ast.parse("F.batch_norm", mode="eval").body, aliases) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def _all_private_uses() -> list[str]:
    return [use for module in MODULES for use in private_uses(module)]


def test_no_module_uses_another_modules_private_names():
    uses = _all_private_uses()
    assert not uses, "private names used across modules:\n" + "\n".join(uses)


def test_no_import_cycle_among_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


# ------------------------------------------------- one owner of the running-statistics step

OWNER = "bnkit.functional.running"  # record_step: the blend and the step counter
BLEND = "update_running"


def step_writes(module: str) -> list[str]:
    """Where `module` writes what only the owner may: a call of the blend (`update_running`)
    or an in-place increment of a step counter (`x.num_batches_tracked.add_(..)`,
    `counter.add_(..)`, `... += ` on a num_batches_tracked). Conversions that copy or zero a
    counter (freeze, reset_running_stats) are not steps and are not reported."""
    tree = ast.parse(MODULES[module].read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name == BLEND:
                found.append(f"{module}:{node.lineno} calls {BLEND}")
            if name == "add_" and isinstance(f, ast.Attribute) and \
                    _counts_steps(ast.unparse(f.value)):
                found.append(f"{module}:{node.lineno} {ast.unparse(node)}")
        elif isinstance(node, ast.AugAssign) and _counts_steps(ast.unparse(node.target)):
            found.append(f"{module}:{node.lineno} {ast.unparse(node)}")
    return found


def _counts_steps(expr: str) -> bool:
    return "num_batches_tracked" in expr or expr.split(".")[-1].startswith("counter")


def test_the_step_reader_sees_a_counter_write_and_a_blend(tmp_path, monkeypatch):
    src = tmp_path / "m.py"
    src.write_text("def f(self, counter, rm):\n    self.num_batches_tracked.add_(1)\n"
                   "    self.num_batches_tracked[s] += 1\n    counter.add_(1)\n"
                   "    F.update_running(rm, rm, rm, rm, 2, 0.1)\n"
                   "    self.num_batches_tracked.zero_()\n    x.add_(1)\n")
    monkeypatch.setitem(MODULES, "m", src)
    assert sorted(w.split(" ", 1)[0] for w in step_writes("m")) == ["m:2", "m:3", "m:4", "m:5"]


def test_only_the_owner_blends_running_statistics_or_advances_step_counters():
    """Every layer of the family and every functional path records a training step through
    `functional.running.record_step`; nothing else re-implements it."""
    writes = [w for module in MODULES if module != OWNER for w in step_writes(module)]
    assert not writes, "running statistics or step counters written outside " \
                       f"{OWNER}.record_step:\n" + "\n".join(writes)
