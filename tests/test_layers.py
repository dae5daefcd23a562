"""The package's layers, checked: every module imports only from its own layer or the layers below,
the module graph has no cycle, and diffmem modules are imported at module level (a late import
would hide who depends on whom)."""

import ast
import pathlib

import pytest

import diffmem

ROOT = pathlib.Path(diffmem.__file__).parent
# bottom to top; a module may import from its own layer and from every layer listed before it
LAYERS = ("core", "io", "viz", "models", "evaluate", "study", "report", "experiments", "bench", "cli")
# third-party packages that may be imported inside a function: optional extras (ray, faiss) and
# heavy imports needed by few paths (diffusers for U-Nets, scikit-learn for the bundled digits,
# torch.distributed for DDP), each costing seconds on every start of the command line
LATE_IMPORTS_ALLOWED = {"ray", "faiss", "diffusers", "sklearn", "torch.distributed"}


def module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    """Index of a diffmem module's layer in LAYERS; None for the top-level package."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    if parts[1] == "__main__":  # python -m diffmem: the command line
        return LAYERS.index("cli")
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else -1


def imports(tree: ast.AST, module: str) -> list[tuple[str, int, bool]]:
    """(imported diffmem module or third-party name, line, inside a function) for every import."""
    out = []
    inner = {
        id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) for n in ast.walk(f)
    }
    package = module if module.count(".") == 0 else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [base]
        else:
            continue
        names += [f"{names[0]}.{a.name}" for a in getattr(node, "names", []) if isinstance(node, ast.ImportFrom)]
        for name in names:
            out.append((name, node.lineno, id(node) in inner))
    return out


def import_graph(root: pathlib.Path = ROOT) -> dict[str, list[tuple[str, int, bool]]]:
    """Every module of the package with the diffmem modules it imports (submodule names resolved to
    the module that exists) and its other imports."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        edges = []
        for name, line, late in imports(ast.parse(path.read_text(), filename=str(path)), mod):
            if name.split(".")[0] != "diffmem":
                edges.append((name, line, late))
            elif name in files and name != mod:
                edges.append((name, line, late))
        graph[mod] = edges
    return graph


def layer_violations(graph) -> list[str]:
    problems = []
    for mod, edges in graph.items():
        mine = layer_of(mod)
        for name, line, late in edges:
            if not name.startswith("diffmem"):
                if late and not any(name == a or name.startswith(a + ".") for a in LATE_IMPORTS_ALLOWED):
                    top = name.split(".")[0]
                    if top not in LATE_IMPORTS_ALLOWED:
                        problems.append(f"{mod}:{line} imports {name} inside a function")
                continue
            theirs = layer_of(name)
            if late:
                problems.append(f"{mod}:{line} imports {name} inside a function")
            if mine is None or theirs is None:
                if mine is not None:  # only the top-level package re-exports, nothing imports it back
                    problems.append(f"{mod}:{line} imports the top-level package {name}")
                continue
            if mine == -1 or theirs == -1:
                problems.append(f"{mod}:{line}: {name if theirs == -1 else mod} is in no layer of {LAYERS}")
            elif theirs > mine:
                problems.append(f"{mod}:{line} imports {name}: {LAYERS[mine]} may not import {LAYERS[theirs]}")
    return problems


def cycles(graph) -> list[list[str]]:
    """The import cycles among diffmem modules (one per strongly connected component)."""
    adj = {m: sorted({n for n, _, _ in e if n in graph}) for m, e in graph.items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in adj[v]:
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
            # a package importing its own submodules (__init__ re-exports) is not a cycle
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in adj:
        if v not in index:
            visit(v)
    return out


def test_every_module_is_in_a_layer():
    graph = import_graph()
    assert len(graph) > 40
    unplaced = [m for m in graph if layer_of(m) == -1]
    assert not unplaced, f"modules outside the layers {LAYERS}: {unplaced}"


def test_no_upward_or_late_import():
    problems = layer_violations(import_graph())
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def _fake_package(tmp_path, files: dict[str, str]) -> pathlib.Path:
    root = tmp_path / "diffmem"
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # the core importing the study layer: upward
        (
            {"core/a.py": "from diffmem.study.runner import run\n", "study/runner.py": "def run(): pass\n"},
            "core may not import study",
        ),
        # a late import of a diffmem module hides the dependency
        (
            {"study/runner.py": "def f():\n    from diffmem.core.a import x\n", "core/a.py": "x = 1\n"},
            "inside a function",
        ),
        # a late import of a third-party package that is not optional
        ({"io/files.py": "def f():\n    import numpy\n"}, "imports numpy inside a function"),
        # a module outside every layer
        ({"misc/util.py": "from diffmem.core.a import x\n", "core/a.py": "x = 1\n"}, "is in no layer"),
    ],
)
def test_dependency_check_catches_violations(tmp_path, files, expected):
    root = _fake_package(tmp_path, {"__init__.py": "", **files})
    problems = layer_violations(import_graph(root))
    assert any(expected in p for p in problems), problems


def test_dependency_check_accepts_downward_and_optional_imports(tmp_path):
    root = _fake_package(
        tmp_path,
        {
            "__init__.py": "",
            "core/a.py": "x = 1\n",
            "study/runner.py": "from diffmem.core.a import x\n\ndef f():\n    import ray\n",
        },
    )
    assert layer_violations(import_graph(root)) == []


def test_cycle_check_catches_a_cycle(tmp_path):
    root = _fake_package(
        tmp_path,
        {
            "__init__.py": "",
            "study/a.py": "from diffmem.study.b import y\nx = 1\n",
            "study/b.py": "from diffmem.study.a import x\ny = 1\n",
        },
    )
    assert cycles(import_graph(root)) == [["diffmem.study.a", "diffmem.study.b"]]
