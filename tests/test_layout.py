"""The package's wings: `core < data < model < train, predict`. Every module imports only from its own wing or
the wings below it, `train` and `predict` do not import each other, and no two modules import each other in a
circle (checked on the source, including imports inside functions). Above the wings stand only the entry
modules listed in ENTRY (the offline Kaggle kit), which never import `train`."""

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pref_lightning"
WINGS = ["core", "data", "model", "train", "predict"]
# the wings a module of each wing may import from (its own included)
ALLOWED = {"core": {"core"}, "data": {"core", "data"}, "model": {"core", "data", "model"},
           "train": {"core", "data", "model", "train"}, "predict": {"core", "data", "model", "predict"}}
# modules above the wings: what each may import
ENTRY = {"pref_lightning.kaggle": {"core", "data", "model", "predict"}}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(path: Path) -> set[str]:
    """Every `pref_lightning...` module a file imports, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("pref_lightning")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pref_lightning"):
            known = modules()
            for alias in node.names:  # `from pref_lightning.data import records` imports a module
                full = f"{node.module}.{alias.name}"
                names.add(full if full in known else node.module)
    return names


def wing(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in WINGS else None


def test_the_package_has_the_five_wings_and_nothing_loose():
    loose = [m for m in modules() if m.count(".") == 1 and wing(m) is None and m not in ENTRY]
    assert not loose, f"modules outside a wing: {loose}"
    assert {wing(m) for m in modules() if wing(m)} == set(WINGS)


@pytest.mark.parametrize("module", sorted(modules()))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_imports_go_only_downward():
    upward = []
    for module, path in modules().items():
        here = wing(module)
        allowed = ENTRY.get(module) or ALLOWED.get(here)
        if allowed is None:
            continue
        for target in imports_of(path):
            there = wing(target)
            if (there is not None and there not in allowed) or target in ENTRY and module not in ENTRY:
                upward.append(f"{module} ({here}) imports {target} ({there})")
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    graph = {m: {t for t in imports_of(p) if t in modules() and t != m} for m, p in modules().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import circle: " + " -> ".join(cycle))


CLASS_LINES = 300


def test_no_class_over_300_lines_without_a_reason_at_its_top():
    """A class longer than CLASS_LINES names itself and its size ("... lines") in its module's docstring."""
    unexplained = []
    for module, path in modules().items():
        tree = ast.parse(path.read_text())
        doc = ast.get_docstring(tree) or ""
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > CLASS_LINES:
                if node.name not in doc or "lines" not in doc:
                    unexplained.append(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not unexplained, unexplained
