"""The package's layout: imports run one way (a module imports from its own layer and those below,
never above), modules stay small, and the scripts at the root are thin callers."""
import ast
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = "reverse_voicefilter"
# from the ground up; packages of the same rank are siblings that do not import each other
RANKS = {"core": 0, "model": 1, "prepare": 1, "data": 2, "separation": 3, "evaluation": 4, "training": 5,
         "embedding": 5, "commands": 6, "bench": 7}
MAX_LINES = 450
ROOT_SCRIPTS = ("generator", "trainer", "inference", "evaluate", "embedder_trainer", "evaluate_embedder", "demo")


def package_modules():
    return sorted(p for p in (ROOT / PACKAGE).rglob("*.py"))


def layer_of(module):
    """``reverse_voicefilter.training.train`` -> ``training``; None outside the package's layers."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == PACKAGE and parts[1] in RANKS else None


def imported_modules(path):
    """The dotted names a file imports (``from X import Y`` gives X.Y where X.Y is a module, else X)."""
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [f"{node.module}.{alias.name}" if (ROOT / Path(*node.module.split("."), alias.name)).exists()
                      or (ROOT / Path(*node.module.split("."), alias.name + ".py")).exists() else node.module
                      for alias in node.names]
    return names


def upward_imports(path, importer_layer):
    """The imports of ``path`` that leave its layer for a higher one or a sibling."""
    bad = []
    for name in imported_modules(path):
        layer = layer_of(name)
        if layer is None or layer == importer_layer:
            continue
        if RANKS[layer] >= RANKS[importer_layer]:
            bad.append(name)
    return bad


def test_every_package_has_a_rank():
    folders = {p.name for p in (ROOT / PACKAGE).iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(RANKS)


@pytest.mark.parametrize("path", package_modules(), ids=lambda p: str(p.relative_to(ROOT / PACKAGE)))
def test_imports_run_one_way(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    layer = parts[1] if len(parts) > 2 else None
    if layer is None:
        assert not [n for n in imported_modules(path) if n.startswith(PACKAGE)], "the package's __init__ imports"
        return
    assert upward_imports(path, layer) == []


def test_the_layer_check_catches_an_upward_import(tmp_path):
    module = tmp_path / "upward.py"
    module.write_text("from reverse_voicefilter.training.train import run_training\nimport torch\n"
                      "from reverse_voicefilter.core.audio import Audio\n")
    assert upward_imports(module, "data") == ["reverse_voicefilter.training.train"]
    assert upward_imports(module, "training") == []
    assert upward_imports(module, "embedding") == ["reverse_voicefilter.training.train"]  # a sibling


@pytest.mark.parametrize("path", package_modules(), ids=lambda p: str(p.relative_to(ROOT / PACKAGE)))
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


@pytest.mark.parametrize("name", ROOT_SCRIPTS)
def test_root_scripts_are_thin_callers(name):
    path = ROOT / f"{name}.py"
    assert imported_modules(path) == [f"{PACKAGE}.commands.{name}.console"] or \
        imported_modules(path) == [f"{PACKAGE}.commands.{name}"]
    assert len(path.read_text().splitlines()) <= 12


def test_no_top_level_package_but_the_one():
    """Installed, top-level packages named utils, datasets, model or bench would clash with others."""
    for name in ("utils", "datasets", "model", "bench", "embedding", "prepare"):
        assert not (ROOT / name / "__init__.py").exists(), name
