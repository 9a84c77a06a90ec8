"""Modules stay under ~400 lines (docs/design.md, "Style"): a module that outgrows that holds
more than one thing, and is split by what it holds, not cut at a line number.

``ALLOWED`` names the modules that may stay longer for now, each with its reason; an entry
that no longer exists or has come back under the limit fails too, so the list only shrinks.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "distnet"
MAX_LINES = 400

# path under distnet/ -> why it may be longer (keep this list short, and say when it goes)
ALLOWED: dict[str, str] = {}


def line_counts() -> dict[str, int]:
    """Lines of every module under distnet/, by path relative to the package."""
    return {
        path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines())
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def test_every_module_is_at_most_400_lines():
    too_long = {
        path: n for path, n in line_counts().items() if n > MAX_LINES and path not in ALLOWED
    }
    assert not too_long, (
        f"modules over {MAX_LINES} lines (split them by what they hold, or add them to "
        f"ALLOWED with the reason): {too_long}"
    )


def test_the_allow_list_names_only_long_modules_that_exist():
    counts = line_counts()
    stale = {
        path: counts.get(path, "missing") for path in ALLOWED if counts.get(path, 0) <= MAX_LINES
    }
    assert not stale, f"ALLOWED entries that are gone or short now (remove them): {stale}"
