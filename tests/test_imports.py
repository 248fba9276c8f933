"""The house rules for imports: no cycles (any module can be imported first, in any
order), components never import recipes, recipes never import each other (the one
exception: let_pretrain extends pretrain's recipe class), and nothing imports a top-level
`components` package (it is installed as letrecipes.components)."""

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, Set

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"letrecipes.pretrain", "letrecipes.let_pretrain", "letrecipes.eval"}
ALLOWED_RECIPE_EDGES = {("letrecipes.let_pretrain", "letrecipes.pretrain")}


def project_modules() -> Dict[str, Path]:
    """Module name -> file, for letrecipes/ and components/ (installed as letrecipes.components)."""
    found = {}
    for folder, package in (("letrecipes", "letrecipes"), ("components", "letrecipes.components")):
        for path in sorted((REPO / folder).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def top_level_imports(path: Path, modules: Set[str]) -> Set[str]:
    """Project modules imported when ``path`` is imported (module level, not inside functions)."""
    deps = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        deps.update(name for name in names if name in modules)
    return deps


def test_the_module_graph_has_no_cycles():
    modules = project_modules()
    graph = {name: top_level_imports(path, set(modules)) - {name} for name, path in modules.items()}
    # a package's __init__ importing its own submodules is not a cycle: importing a
    # submodule runs the __init__ first, which finds the half-imported submodule by name
    graph["letrecipes.components"] = set()
    state: Dict[str, int] = {}

    def visit(name, trail):
        if state.get(name) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(name):] + [name]))
        if state.get(name) == 2:
            return
        state[name] = 1
        for dep in sorted(graph[name]):
            visit(dep, trail + [name])
        state[name] = 2

    for name in sorted(graph):
        visit(name, [])


def test_components_never_import_recipes_and_recipes_never_import_recipes():
    modules = project_modules()
    for name, path in modules.items():
        deps = top_level_imports(path, set(modules))
        if name.startswith("letrecipes.components"):
            assert all(d.startswith("letrecipes.components") for d in deps), (name, deps)
        if name in RECIPES:
            assert {(name, d) for d in deps & RECIPES} <= ALLOWED_RECIPE_EDGES, (name, deps & RECIPES)


def test_nothing_imports_a_top_level_components_package():
    offenders = []
    for path in REPO.rglob("*.py"):
        if any(part in (".venv", "outputs", ".git") for part in path.relative_to(REPO).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                offenders += [f"{path}: import {a.name}" for a in node.names if a.name.split(".")[0] == "components"]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "components":
                offenders.append(f"{path}: from {node.module}")
    assert not offenders, offenders


IMPORT_IN_EVERY_ORDER = """
import importlib, random, sys
modules = sys.argv[1:]
def fresh():
    for name in [m for m in sys.modules if m == "letrecipes" or m.startswith("letrecipes.")]:
        del sys.modules[name]
for first in modules:  # each module imported first into a fresh letrecipes
    fresh()
    importlib.import_module(first)
for seed in range(5):  # and everything, in shuffled orders
    fresh()
    order = modules[:]
    random.Random(seed).shuffle(order)
    for name in order:
        importlib.import_module(name)
print("ok", len(modules))
"""


def test_every_module_imports_first_and_in_any_order():
    modules = sorted(m for m in project_modules() if m != "letrecipes.__main__")
    result = subprocess.run([sys.executable, "-c", IMPORT_IN_EVERY_ORDER, *modules], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", str(len(modules))]


USERS_OWN_COMPONENTS = """
from letrecipes.components.registry import build
import components.my_losses
loss = build("alignment_loss", "components.my_losses.L1", key="alignment.loss")
print(type(loss).__module__, type(loss).__name__, components.__file__.startswith(sys.argv[1]))
"""


def test_a_users_own_components_package_is_neither_shadowed_nor_refused(tmp_path):
    """ML projects often have a `components/` package of their own: it keeps its name, and a
    dotted path into it builds (only our own pre-0.2 names get the rename error)."""
    package = tmp_path / "components"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "my_losses.py").write_text(
        "from letrecipes.components.alignment import AlignmentLoss\n\n"
        "class L1(AlignmentLoss):\n"
        "    def per_token(self, pred, target):\n"
        "        return (pred - target).abs().mean(-1)\n")
    result = subprocess.run([sys.executable, "-c", "import sys\n" + USERS_OWN_COMPONENTS, str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["components.my_losses", "L1", "True"]


def test_torchaos_incompatible_torch_notice_is_dropped_and_nothing_else(caplog):
    # in a fresh interpreter, torchtune first (as `tune run` does): the .pth that setup.sh writes
    done = subprocess.run([sys.executable, "-c", "import torchtune, torchao"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "incompatible torch version" not in done.stderr and "pth" not in done.stderr
    import logging

    from letrecipes import _torchao_notice

    with caplog.at_level(logging.WARNING, logger="torchao"):
        logging.getLogger("torchao").warning(_torchao_notice.MESSAGE + " 2.13.0+cpu for torchao version 0.15.0")
        logging.getLogger("torchao").warning("Some other torchao warning")
    assert [r.getMessage() for r in caplog.records] == ["Some other torchao warning"]


def test_a_working_directory_that_was_removed_is_said_before_torch_fails_to_load(tmp_path):
    """torch cannot load in a removed working directory; its own last word, "Intel oneMKL
    FATAL ERROR: Cannot load .../libtorch_cpu.so", reads as a broken install."""
    gone = tmp_path / "gone"
    gone.mkdir()
    done = subprocess.run(["bash", "-c", f"cd {gone} && rmdir {gone} && exec {sys.executable} -c 'import torch'"],
                          capture_output=True, text=True, timeout=300)
    assert done.stderr.startswith("warning: this process's working directory no longer exists (removed while a shell "
                                  "stood in it, or its mount was lost): torch cannot load there"), done.stderr
    assert "Fix: cd to a folder that exists, then run the command again.\n" in done.stderr
    done = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0 and "working directory" not in done.stderr, done.stderr


def test_the_tests_that_conftest_keeps_apart_still_exist():
    # conftest.py names the tests that start several processes; a renamed one would silently
    # run beside another such test on the second worker
    from tests.conftest import SEVERAL_PROCESSES_MODULES, SEVERAL_PROCESSES_TESTS

    tests = Path(__file__).resolve().parent
    sources = "\n".join(p.read_text(encoding="utf-8") for p in tests.glob("test_*.py"))
    assert all((tests / module).is_file() for module in SEVERAL_PROCESSES_MODULES)
    assert [name for name in SEVERAL_PROCESSES_TESTS if f"def {name}(" not in sources] == []
