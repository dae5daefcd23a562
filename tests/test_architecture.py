"""The pure core stays pure: torch only, no file I/O, no global RNG, no default device."""

import ast
import pathlib

import pytest

import diffmem

CORE = pathlib.Path(diffmem.__file__).parent / "core"
CORE_FILES = sorted(CORE.glob("*.py"))
ALLOWED_IMPORTS = {"__future__", "math", "dataclasses", "typing", "collections", "torch", "diffmem"}
FORBIDDEN_CALLS = {
    "open",  # file I/O
    "print",
    "manual_seed",  # global RNG state (a passed Generator's .manual_seed is fine: see below)
    "seed",
    "set_default_device",
    "set_default_dtype",
    "save",
    "load",
}
RNG_METHODS = {"normal_", "uniform_", "bernoulli_", "random_", "exponential_", "cauchy_", "geometric_"}
RNG_FUNCS = {"randn", "rand", "randint", "randperm", "normal", "bernoulli", "multinomial", "randn_like", "rand_like"}


def _tree(path):
    return ast.parse(path.read_text(), filename=str(path))


def test_core_files_found():
    assert {p.name for p in CORE_FILES} >= {"memory.py", "noise.py", "denoisers.py", "samplers.py"}


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.name)
def test_core_imports_only_torch_and_itself(path):
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            assert top in ALLOWED_IMPORTS, f"{path.name} imports {name}: the core may use torch only"
            if top == "diffmem":
                assert name.startswith("diffmem.core"), f"{path.name} imports {name}: the core never imports the rest"


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.name)
def test_core_has_no_io_global_rng_or_default_device(path):
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value if isinstance(func, ast.Attribute) else None
            owner_name = getattr(owner, "id", None) or getattr(owner, "attr", None)
            if name == "manual_seed" and owner_name != "torch":
                continue  # seeding a Generator object the caller asked for
            assert name not in FORBIDDEN_CALLS, f"{path.name}:{node.lineno} calls {name}()"
            if (name in RNG_FUNCS and owner_name == "torch") or name in RNG_METHODS:
                kws = {k.arg for k in node.keywords}
                assert "generator" in kws, f"{path.name}:{node.lineno} draws {name}() without an explicit generator"
            for kw in node.keywords:
                if kw.arg == "device" and isinstance(kw.value, ast.Constant):
                    pytest.fail(f"{path.name}:{node.lineno} hard-codes device={kw.value.value!r}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("cuda"):
            pytest.fail(f"{path.name}:{node.lineno} mentions a CUDA device literal")


def test_outer_layers_import_core_not_the_reverse():
    """Every non-core module may import the core; the core never imports them (checked above), and
    the top-level package exposes the core's API."""
    import diffmem.core as core

    for name in core.__all__:
        assert getattr(diffmem, name) is getattr(core, name)
