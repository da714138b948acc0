"""The library's layers (DESIGN.md) hold: nothing imports upward, and no private name crosses a module boundary.

Imports are read from the source (those inside functions too), so a lazy import counts. A package
(``tf``, ``comm``) is one unit here: its files may share private names among themselves. Modules that the
open issues are still bringing (``runtime``, ``roofline``) are placed already and simply absent until then.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parent.parent / "workshop_lib"

# DESIGN's order, bottom first; a unit may import units of lower levels, and of its own level
LEVELS = [
    {"__init__", "data", "sysinfo", "_validate", "runtime"},
    {"kernels", "jit_conv", "int8", "int8_layers", "bf16", "amx"},
    {"quantization", "roofline"},
    {"placement"},
    {"tf"},
    {"models"},
    {"job"},
    {"comm"},
    {"timeline"},
    {"hvd", "d4p", "elastic", "sharded", "compression"},
    {"bench", "scaling", "figures", "board", "launch", "course", "expected", "warm"},
    {"cli", "__main__"},
]
LEVEL = {unit: i for i, units in enumerate(LEVELS) for unit in units}
# one API in several files, as Horovod's own horovod/tensorflow/{__init__,elastic,compression}.py: hvd's parts share
# its private state (the initialized job, the stall inspector's entry) as a package's files do
FAMILY = {"elastic": "hvd", "sharded": "hvd", "compression": "hvd"}
# the rules DESIGN states besides the order
NEVER = {
    "comm": {"tf", "hvd", "d4p", "models"},
    **{unit: {"placement", "job", "comm", "hvd", "d4p"}  # kernels know no MPI
       for unit in ("kernels", "jit_conv", "int8", "int8_layers", "bf16", "amx", "quantization", "runtime")},
}
# known exceptions (none: kernels' sliced GEMM now lives in runtime)
ALLOWED = set()


def _unit(path):
    rel = path.relative_to(LIB).with_suffix("")
    return rel.parts[0]


def _imports(path):
    """(line, unit imported, names imported from it) for every workshop_lib import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = list(path.relative_to(LIB).parent.parts)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "workshop_lib":
                target = node.module.split(".")[1:]
            else:
                continue
            if target:
                found.append((node.lineno, target[0], [a.name for a in node.names]))
            else:  # from . import kernels, placement
                found.extend((node.lineno, a.name, []) for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "workshop_lib" and len(parts) > 1:
                    found.append((node.lineno, parts[1], []))
    return tree, found


def _modules():
    return sorted(p for p in LIB.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_relative_import_of_the_library_names_a_module_that_exists():
    """A lazy ``from .comm import ...`` inside a function only fails when it runs: find it here."""
    broken = []
    for path in _modules():
        package = list(path.relative_to(LIB).parent.parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level and node.module:
                if node.level > len(package) + 1:
                    broken.append(f"{path.relative_to(LIB.parent)}:{node.lineno}: beyond the package")
                    continue
                base = package[: len(package) - (node.level - 1)]
                target = LIB.joinpath(*base, *node.module.split("."))
                if not (target.with_suffix(".py").exists() or (target / "__init__.py").exists()):
                    broken.append(f"{path.relative_to(LIB.parent)}:{node.lineno}: {'.' * node.level}{node.module}")
    assert not broken, "\n".join(broken)


def test_every_module_has_a_place_in_the_layers():
    unplaced = sorted({_unit(p) for p in _modules()} - set(LEVEL))
    assert not unplaced, f"place these in DESIGN's layers (and in LEVELS here): {unplaced}"


def test_nothing_imports_upward_and_kernels_know_no_mpi():
    problems = []
    for path in _modules():
        unit = _unit(path)
        if unit not in LEVEL:
            continue
        for line, target, _ in _imports(path)[1]:
            if target == unit or target not in LEVEL or (unit, target) in ALLOWED:
                continue
            where = f"{path.relative_to(LIB.parent)}:{line}"
            if LEVEL[target] > LEVEL[unit]:
                problems.append(f"{where}: {unit} (level {LEVEL[unit]}) imports {target} (level {LEVEL[target]})")
            elif target in NEVER.get(unit, ()):
                problems.append(f"{where}: {unit} must never import {target}")
    assert not problems, "\n".join(problems)


def test_no_private_name_crosses_a_module_boundary():
    """``from .x import _name`` and ``x._name`` (x another unit's module) are both reported; ``_validate`` is a
    package-private module by design (its functions are public to the package)."""
    problems = []
    for path in _modules():
        unit = FAMILY.get(_unit(path), _unit(path))
        tree, imports = _imports(path)
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("workshop_lib")):
                for a in node.names:
                    aliases[a.asname or a.name] = a.name
        for line, target, names in imports:
            if FAMILY.get(target, target) == unit:
                continue
            for name in names:
                if name.startswith("_") and name != "_validate" and not name.startswith("__"):
                    problems.append(f"{path.relative_to(LIB.parent)}:{line}: imports {target}.{name}")
        others = {alias for alias, name in aliases.items() if name in LEVEL and FAMILY.get(name, name) != unit}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in others
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                problems.append(f"{path.relative_to(LIB.parent)}:{node.lineno}: uses {node.value.id}.{node.attr}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("package", ["comm"])
def test_no_module_of_the_distributed_wing_is_above_700_lines(package):
    wing = [LIB / f"{m}.py" for m in ("placement", "job", "hvd", "d4p", "timeline")] + sorted((LIB / package).glob("*.py"))
    long = {str(p.relative_to(LIB)): n for p in wing if p.exists() and (n := len(p.read_text().splitlines())) > 700}
    assert not long, long
