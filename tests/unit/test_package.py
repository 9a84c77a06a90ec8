"""The package's public face: subpackages reachable from `import distnet`, the renamed engine."""

import subprocess
import sys


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out.stdout + out.stderr


def test_subpackages_reachable_from_top_level_lazily():
    out = _run(
        "import sys, distnet as dn\n"
        "assert 'distnet.nn' not in sys.modules, 'subpackages load on first use'\n"
        "print(dn.nn.Dense(2, 3).weight.shape, dn.optim.Adam.__name__,"
        " dn.data.StreamLoader.__name__, dn.train.fit.__name__,"
        " dn.parallel.DistributedOptimizer.__name__)\n"
    )
    assert "(2, 3) Adam StreamLoader fit DistributedOptimizer" in out, out


def test_unknown_attribute_is_an_attribute_error():
    out = _run(
        "import distnet as dn\ntry:\n    dn.nope\nexcept AttributeError as e:\n    print('AE', e)"
    )
    assert "AE module 'distnet' has no attribute 'nope'" in out
