"""Every Python example in README.md and docs/*.md runs as written (on real digits data).

The blocks run in one namespace, README's first, then the docs in DOC_ORDER (later blocks may
use the names earlier ones define, as a reader going through the docs in that order would).
A block fenced as ```py is a sketch of an interface (a Protocol's shape), shown, not run."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from distnet.data import convert_digits

pytest.importorskip("sklearn")
ROOT = Path(__file__).parents[2]
DOC_ORDER = ["python-api.md", "data.md", "engines.md", "convolutions.md"]
DOCS = [ROOT / "README.md"] + [ROOT / "docs" / name for name in DOC_ORDER]
DOCS += sorted(p for p in (ROOT / "docs").glob("*.md") if p.name not in DOC_ORDER)
BLOCKS = [
    (doc.relative_to(ROOT).as_posix(), code)
    for doc in DOCS
    for code in re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
]


@pytest.fixture(scope="module")
def namespace(tmp_path_factory):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = tmp_path_factory.mktemp("readme")
    convert_digits(root / "digits", chunk_samples=64)
    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    return {
        "x_train": x_train, "y_train": y_train, "x_val": x_test, "y_val": y_test,
        "x_test": x_test, "y_test": y_test, "r": 0, "n": 1, "root": root,
        "batches": [(x_train[i : i + 32], y_train[i : i + 32]) for i in range(0, 320, 32)],
        "store": str(root / "digits" / "train"),
    }  # fmt: skip


def test_readme_and_docs_have_python_examples():
    assert len(BLOCKS) >= 7
    assert any(name == "README.md" for name, _ in BLOCKS)


@pytest.mark.parametrize(
    "index", range(len(BLOCKS)), ids=[f"{n}:{i}" for i, (n, _) in enumerate(BLOCKS)]
)
def test_readme_example_runs(index, namespace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name, code = BLOCKS[index]
    # examples name real data sets; here they read the digits store instead
    code = code.replace('"data/fashion-mnist/train"', "store")
    code = re.sub(r"epochs=(\d+)", lambda m: f"epochs={min(int(m.group(1)), 2)}", code)
    code = re.sub(r"range\(10\)", "range(2)", code)
    code = code.replace("for x, y in loader: ...", "for x, y in loader: pass")
    exec(compile(code, f"{name} python block {index}", "exec"), namespace)  # noqa: S102
