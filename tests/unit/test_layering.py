"""The layers of docs/design.md, checked statically: every ``import`` in distnet/ (at module level
or inside a function) points only to a layer above the importing module's, or within its own
package. Layers, top first: backend < core < nn < optim < data < parallel < train < cli.

Besides the packages of the table: ``trace`` (the timeline, beside backend: every layer
marks its phases with it); ``viz`` (pictures from arrays) uses only backend;
``functional`` is core's public face; ``bench`` is a
command of the CLI. The package ``distnet/__init__.py`` is the composition root: it wires the
layers (it gives nn the training loop lazily, see distnet/nn/training.py) and is not checked.
Imports by name at run time (the CLI's table of subcommands) are not imports of code.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "distnet"

LAYER = {
    "backend": 0,
    "suggest": 0,  # 'did you mean': imports nothing of distnet, every layer's errors use it
    "trace": 0,  # the timeline and step timers: imports nothing of distnet, every layer may use it
    "viz": 0.5,
    "kernels": 0.7,  # the kernel table and its implementations (numba, cupy, oneMKL, oneDNN)
    "core": 1,
    "functional": 1.5,  # re-exports core's ops: a face of core, just above it
    "nn": 2,
    "optim": 3,
    "data": 4,
    "parallel": 5,
    "train": 6,
    "bench": 7,
    "cli": 7,
}


def unit_of(dotted: str) -> str:
    """'distnet.nn.module' -> 'nn'; 'distnet' (the root, which re-exports core) -> 'core'."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "core"


def imported_modules(path: Path, module: str) -> list[tuple[str, int]]:
    """(distnet module, line) for every import of distnet code in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("distnet")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = (
                    module.split(".")[: -node.level]
                    if not path.name == "__init__.py"
                    else (module.split(".")[: len(module.split(".")) - node.level + 1])
                )
                base = ".".join([*pkg, *([base] if base else [])])
            if base == "distnet":  # from distnet import nn, backend, Tensor, ...
                for a in node.names:
                    is_unit = a.name in LAYER
                    found.append((f"distnet.{a.name}" if is_unit else "distnet", node.lineno))
            elif base.startswith("distnet."):
                found.append((base, node.lineno))
    return found


def violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        if module == "distnet":
            continue  # the composition root
        unit = unit_of(module)
        assert unit in LAYER, f"{path}: not in any layer; add it to LAYER with a reason"
        for target, line in imported_modules(path, module):
            other = unit_of(target)
            assert other in LAYER, f"{path}:{line} imports {target}, which is in no layer"
            if other != unit and LAYER[other] >= LAYER[unit]:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {unit} imports {target}")
    return bad


def test_no_module_imports_a_lower_layer():
    assert not violations(), "imports against the layers:\n" + "\n".join(violations())


def test_the_checker_sees_an_upward_import(tmp_path):
    """The check itself can fail: an import of train inside a function of nn is caught."""
    fake = tmp_path / "distnet" / "nn" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(
        "def f():\n    from distnet.train.loop.fit import fit\n    from distnet import cli\n"
    )
    assert imported_modules(fake, "distnet.nn.bad") == [
        ("distnet.train.loop.fit", 2),
        ("distnet.cli", 3),
    ]


def test_model_fit_works_in_a_fresh_process_that_never_imported_train():
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from distnet import nn\n"
        "assert 'distnet.train' not in sys.modules\n"
        "m = nn.Sequential(nn.Dense(3, 2))\n"
        "h = m.fit(np.ones((8, 3), np.float32), np.zeros(8, np.int64), epochs=1)\n"
        "print(sorted(h.history))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "['accuracy', 'loss', 'lr']" in out.stdout


# --- inside parallel: engines apart, the parameter server and the loop engine-free ------------
def _is_mpi_only(target: str) -> bool:
    """``distnet.parallel.mpi`` holds what only the MPI engine uses (``MPICommunicator`` in
    ``mpi/communicator.py``); ``parallel/comm.py`` is the engine-neutral base both engines'
    communicators derive from."""
    return target == "distnet.parallel.mpi" or target.startswith("distnet.parallel.mpi.")


LOOP = PACKAGE / "train" / "loop"
"""The training loop (``distnet/train/loop``): it talks to the optimiser's protocol."""


def _imports_of(paths: list[Path]) -> list[tuple[Path, str, int]]:
    found = []
    for path in paths:
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        found += [(path, target, line) for target, line in imported_modules(path, module)]
    return found


def _where(path: Path, target: str, line: int) -> str:
    return f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"


def test_the_mpi_engine_and_the_ray_engine_never_import_each_other():
    parallel = PACKAGE / "parallel"
    ray_files = sorted((parallel / "rayengine").rglob("*.py"))
    mpi_files = sorted((parallel / "mpi").rglob("*.py"))
    assert len(mpi_files) >= 7 and ray_files
    bad = [_where(p, t, n) for p, t, n in _imports_of(ray_files) if _is_mpi_only(t)]
    bad += [_where(p, t, n) for p, t, n in _imports_of(mpi_files) if ".rayengine" in t]
    assert not bad, "\n".join(bad)


ENGINE_NEUTRAL = ["shares.py", "steptime.py", "rebalance.py"]
"""Batch shares that follow measured speed, used by both engines (``rebalance.py`` is the MPI
ranks' rule, kept beside the shares rather than in ``mpi/`` because it runs on any
``ProcessEngine`` communicator)."""


def _is_engine(target: str) -> bool:
    return any(target == p or target.startswith(p + ".") for p in (
        "distnet.parallel.mpi", "distnet.parallel.rayengine", "distnet.parallel.ps"))  # fmt: skip


def test_the_batch_shares_import_no_engine():
    files = [PACKAGE / "parallel" / name for name in ENGINE_NEUTRAL]
    assert all(f.exists() for f in files), "the shares moved: point ENGINE_NEUTRAL at them"
    bad = [_where(p, t, n) for p, t, n in _imports_of(files) if _is_engine(t)]
    assert not bad, "\n".join(bad)
    assert _is_engine("distnet.parallel.rayengine.rank") and not _is_engine("distnet.parallel.sync")


def test_the_parameter_server_imports_neither_the_ray_engine_nor_nn():
    ps_files = sorted((PACKAGE / "parallel" / "ps").rglob("*.py"))
    bad = [
        _where(p, t, n)
        for p, t, n in _imports_of(ps_files)
        if ".rayengine" in t or unit_of(t) == "nn" or t == "distnet.nn"
    ]
    assert not bad, "\n".join(bad)


def test_the_training_loop_imports_no_engine():
    loop = sorted(LOOP.rglob("*.py"))
    assert len(loop) >= 9, "the loop's modules moved: point LOOP at them"
    bad = [_where(p, t, n) for p, t, n in _imports_of(loop) if unit_of(t) == "parallel"]
    assert not bad, "\n".join(bad)


def test_the_training_loop_imports_neither_jobs_nor_reports():
    """``train/loop`` sits below ``train/jobs`` and ``train/report``: a job is built on the loop,
    the loop knows no job file, command or report."""
    loop = sorted(LOOP.rglob("*.py"))
    above = ("distnet.train.jobs", "distnet.train.report")
    bad = [_where(p, t, n) for p, t, n in _imports_of(loop) if t.startswith(above)]
    assert not bad, "\n".join(bad)


def test_the_engine_checks_can_fail(tmp_path):
    """A Ray module importing the MPI launcher is seen by the same reading of imports."""
    fake = tmp_path / "distnet" / "parallel" / "rayengine" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(
        "from distnet.parallel.mpi.launcher import main\nfrom distnet.nn import Dense\n"
    )
    got = imported_modules(fake, "distnet.parallel.rayengine.bad")
    assert [t for t, _ in got] == ["distnet.parallel.mpi.launcher", "distnet.nn"]
    assert _is_mpi_only(got[0][0]) and unit_of(got[1][0]) == "nn"
