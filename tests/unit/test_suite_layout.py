"""The test suite's own layout (docs/testing.md): every test module sits in one of the groups,
and no test module imports another (what they share lives in tests/helpers/ and conftest.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
GROUPS = ("unit", "distributed_mpi", "distributed_ray", "faults", "bench", "conformance")


def _test_modules() -> list[Path]:
    return sorted(TESTS.rglob("test_*.py"))


def test_every_test_module_is_in_a_group():
    stray = [str(p.relative_to(TESTS)) for p in _test_modules() if p.parent.name not in GROUPS]
    assert not stray, f"test modules outside the groups {GROUPS} (see docs/testing.md): {stray}"
    assert not [p for p in (TESTS / "helpers").glob("test_*.py")], "helpers/ holds no tests"


def test_no_test_module_imports_another():
    offenders = []
    for path in [*_test_modules(), *(TESTS / "helpers").glob("*.py"), TESTS / "conftest.py"]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0].startswith("test_") or name.startswith("tests."):
                    offenders.append(f"{path.relative_to(TESTS)}:{node.lineno} imports {name}")
    assert not offenders, "shared code belongs in tests/helpers/: " + "; ".join(offenders)
