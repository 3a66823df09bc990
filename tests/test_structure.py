"""The package's shape, read from its source with `ast` (nothing is imported, well under a second).

- no import cycles among `meditron_jax` modules, counting imports inside functions too (a local
  import that breaks a cycle at import time still ties the two modules together);
- no module imports another module's `_private` name (`from m import _x`, or `m._x` on an
  imported module);
- no file in `meditron_jax/` over 450 lines;
- the data layer (`meditron_jax.data`) does not import `meditron_jax.eval`;
- no cycles between the package's folders either (`models/`, `training/`, ...: each folder is one
  node, each module at the root its own), so the folders stack in layers;
- at most 8 modules at the package root (errors, console and the entry points);
- no `jax._src` (JAX's private modules) anywhere in the package.

Run `python tests/test_structure.py` to print every violation, not only the first.
"""

from __future__ import annotations

import ast
import functools
import os
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "meditron_jax")
PACKAGE = "meditron_jax"
MAX_LINES = 450


def modules(root: str = ROOT, package: str = PACKAGE) -> dict[str, str]:
    """Dotted module name -> file path, for every .py file of the package at `root`."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        for f in sorted(filenames):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), root)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join([package] + rel)] = os.path.join(dirpath, f)
    return out


MODULES = modules()


@functools.lru_cache(maxsize=None)
def _parsed(text: str, path: str) -> ast.AST:
    return ast.parse(text, path)


def _tree(path: str) -> ast.AST:
    with open(path) as f:
        return _parsed(f.read(), path)


def _runtime_nodes(tree: ast.AST):
    """Every node, except the bodies of `if TYPE_CHECKING:` blocks (not run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def _resolve(module: str, node: ast.ImportFrom, mods: dict[str, str]) -> str | None:
    if not node.level:
        return node.module
    base = module.split(".")
    base = base if mods[module].endswith("__init__.py") else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, mods: dict[str, str] = MODULES) -> list[tuple[str, int, str | None, str]]:
    """(imported package module, line, imported name or None, local name) for each import in
    `module`. `from pkg import sub` names the submodule `pkg.sub` where it is one."""
    out = []
    for node in _runtime_nodes(_tree(mods[module])):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, None, a.asname or a.name) for a in node.names if a.name in mods]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node, mods)
            if target not in mods:
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub, node.lineno, None, a.asname or a.name) if sub in mods
                           else (target, node.lineno, a.name, a.asname or a.name))
    return out


def graph(mods: dict[str, str] = MODULES) -> dict[str, set[str]]:
    return {m: {t for t, *_ in imports(m, mods) if t != m} for m in mods}


def folder_graph(mods: dict[str, str] = MODULES) -> dict[str, set[str]]:
    """The import graph with each top-level folder of the package as one node (`pkg.training`)
    and each module at the root as its own."""
    def node(m):
        return ".".join(m.split(".")[:2])
    out: dict[str, set[str]] = {}
    for m, targets in graph(mods).items():
        out.setdefault(node(m), set()).update(node(t) for t in targets if node(t) != node(m))
    return out


def cycles(mods: dict[str, str] = MODULES, g: dict[str, set[str]] | None = None) -> list[list[str]]:
    """The strongly connected components of the import graph (`g`, default the modules of
    `mods`) with more than one node, each as a sorted list (Tarjan's algorithm, iterative)."""
    g = graph(mods) if g is None else g
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    for start in sorted(g):
        if start in index:
            continue
        work = [(start, iter(sorted(g[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(g[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return sorted(out)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _where(mods: dict[str, str], m: str, line: int | None = None) -> str:
    root = os.path.dirname(mods[m.split(".")[0]])
    return os.path.relpath(mods[m], root) + (f":{line}" if line else "")


def private_imports(mods: dict[str, str] = MODULES) -> list[str]:
    """`file:line: module imports other._name` for every use of another module's private name."""
    out = []
    for m, path in mods.items():
        aliases = {}  # local name -> package module it is bound to
        for target, line, name, local in imports(m, mods):
            if name is None:
                aliases[local] = target
            elif _private(name) and target != m:
                out.append(f"{_where(mods, m, line)}: {m} imports {target}.{name}")
        for node in _runtime_nodes(_tree(path)):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                target = aliases.get(ast.unparse(node.value))
                if target is not None and target != m:
                    out.append(f"{_where(mods, m, node.lineno)}: {m} uses {target}.{node.attr}")
    return sorted(set(out))


def long_files(mods: dict[str, str] = MODULES, limit: int = MAX_LINES) -> list[str]:
    out = []
    for m in sorted(mods):
        with open(mods[m]) as f:
            n = sum(1 for _ in f)
        if n > limit:
            out.append(f"{_where(mods, m)}: {n} lines")
    return out


def layer_imports(low: str, high: str, mods: dict[str, str] = MODULES) -> list[str]:
    """Every import of package `high` (or its submodules) by package `low` (or its submodules)."""
    def inside(name, pkg):
        return name == pkg or name.startswith(pkg + ".")
    return [f"{_where(mods, m, line)}: {m} imports {t}"
            for m in mods if inside(m, low) for t, line, *_ in imports(m, mods) if inside(t, high)]


def data_imports_eval() -> list[str]:
    return layer_imports(f"{PACKAGE}.data", f"{PACKAGE}.eval")


def root_modules(mods: dict[str, str] = MODULES) -> list[str]:
    return sorted(m for m, path in mods.items() if m.count(".") == 1 and not path.endswith("__init__.py"))


def private_jax(mods: dict[str, str] = MODULES) -> list[str]:
    """`file:line` of every mention of `jax._src` in the package's code (imports or strings)."""
    out = []
    for m, path in mods.items():
        with open(path) as f:
            out += [f"{_where(mods, m, i)}" for i, line in enumerate(f, 1) if "jax._src" in line]
    return out


# One test per rule, so a failure names the rule it breaks.
def test_no_import_cycles():
    assert cycles() == []


def test_no_private_names_across_modules():
    assert private_imports() == []


def test_no_file_over_450_lines():
    assert long_files() == []


def test_data_does_not_import_eval():
    assert data_imports_eval() == []


def test_no_cycles_between_folders():
    assert cycles(g=folder_graph()) == []


def test_package_root_holds_at_most_8_modules():
    assert len(root_modules()) <= 8, root_modules()


def test_no_private_jax_modules():
    assert private_jax() == []


def test_the_arrows_that_hold_point_down():
    """design.md: data never imports model (nor the loop); the model imports no loop, files, gin
    parsing or evaluation (it declares its value ranges with config.checks, a leaf); errors sits at
    the bottom. These hold today: keep them."""
    down = [("data", h) for h in ("models", "training", "storage.checkpoint", "plan", "distributed")]
    down += [("models", h) for h in ("training", "storage", "data", "eval", "plan", "config.gin_files", "cli",
                                     "distributed.meshes", "distributed.multihost")]
    down += [(lo, "cli") for lo in ("training", "plan", "eval", "convert", "data", "storage", "distributed")]
    found = [r for lo, hi in down for r in layer_imports(f"{PACKAGE}.{lo}", f"{PACKAGE}.{hi}")]
    assert found == []
    assert graph()[f"{PACKAGE}.errors"] == set()


def test_the_checks_on_a_made_up_package(tmp_path):
    """Each check finds what was planted in a small package, and nothing once it is removed."""
    files = {
        "__init__.py": "",
        "errors.py": "class UserError(Exception):\n    pass\n",
        "a.py": "from pkg import b\n_x = 1\n",
        "b.py": "def f():\n    from . import a  # local: a imports us\n    return a._x\n",
        "c.py": "import pkg.a as alias\nfrom pkg.a import _x\nfrom pkg.errors import UserError\n"
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n" + "y = 0\n" * 5,
        "d.py": "from pkg import c\nfrom jax._src import xla_bridge\n",
        "data/__init__.py": "",
        "data/cli.py": "def main():\n    from ..eval.tasks import read\n    return read\n",
        "eval/__init__.py": "",
        "eval/tasks.py": "from pkg.data import cli\nread = None\n",
    }
    for name, text in files.items():
        os.makedirs(os.path.dirname(tmp_path / "pkg" / name), exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    mods = modules(str(tmp_path / "pkg"), "pkg")
    assert cycles(mods) == [["pkg.a", "pkg.b"], ["pkg.data.cli", "pkg.eval.tasks"]]  # not c <-> d
    assert private_imports(mods) == ["b.py:3: pkg.b uses pkg.a._x", "c.py:2: pkg.c imports pkg.a._x"]
    assert long_files(mods, limit=10) == ["c.py: 11 lines"]
    assert cycles(mods, g=folder_graph(mods)) == [["pkg.a", "pkg.b"], ["pkg.data", "pkg.eval"]]
    assert private_jax(mods) == ["d.py:2"] and root_modules(mods) == ["pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.errors"]
    assert layer_imports("pkg.data", "pkg.eval", mods) == ["data/cli.py:2: pkg.data.cli imports pkg.eval.tasks"]
    assert layer_imports("pkg.eval", "pkg.data", mods) == ["eval/tasks.py:1: pkg.eval.tasks imports pkg.data.cli"]
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    return 1\n")
    (tmp_path / "pkg" / "c.py").write_text("import pkg.a as alias\nfrom pkg.errors import UserError\n")
    (tmp_path / "pkg" / "data" / "cli.py").write_text("def main():\n    return None\n")
    (tmp_path / "pkg" / "d.py").write_text("from pkg import c\n")
    assert cycles(mods) == [] and private_imports(mods) == [] and long_files(mods, limit=10) == []
    assert cycles(mods, g=folder_graph(mods)) == [] and private_jax(mods) == []
    assert layer_imports("pkg.data", "pkg.eval", mods) == []


def test_the_checks_see_the_package():
    """The probes are not blind: the graph has the arrows everyone knows are there."""
    g = graph()
    assert len(MODULES) > 40 and f"{PACKAGE}.data.tokenizer" in MODULES and f"{PACKAGE}.eval" in MODULES
    assert sum(f"{PACKAGE}.errors" in v for v in g.values()) > 10  # the one user-error type
    assert f"{PACKAGE}.models.llama" in g[f"{PACKAGE}.training.step"]  # `from meditron_jax.models.llama import ...`
    assert f"{PACKAGE}.plan.hlo_text" in g[f"{PACKAGE}.plan.hlo_stats"]
    fg = folder_graph()
    assert f"{PACKAGE}.models" in fg[f"{PACKAGE}.training"] and f"{PACKAGE}.errors" in fg[f"{PACKAGE}.storage"]


if __name__ == "__main__":
    report = {"import cycles": [" <-> ".join(c) for c in cycles()], "private names": private_imports(),
              f"files over {MAX_LINES} lines": long_files(), "data imports eval": data_imports_eval(),
              "folder cycles": [" <-> ".join(c) for c in cycles(g=folder_graph())],
              "root modules": root_modules(), "jax._src": private_jax()}
    for title, rows in report.items():
        print(f"{title}: {len(rows)}")
        for r in rows:
            print("  " + r)
    sys.exit(1 if any(report.values()) else 0)
