"""Deprecated alias of `distnet.parallel` (kept for one release).

The package was renamed because `dist/` is the conventional build-output folder: the common
Python `.gitignore` template ignores it at any depth, pytest's default `norecursedirs` skips it,
and tools that follow `.gitignore` skip it silently. `import distnet.dist` and
`import distnet.dist.comm` keep working and give the very same module objects as
`distnet.parallel` (no second copy of any class).
"""

import importlib
import pkgutil
import sys
import warnings

import distnet.parallel as _parallel

warnings.warn(
    "distnet.dist was renamed to distnet.parallel; the alias goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)

for _info in pkgutil.iter_modules(_parallel.__path__):
    _module = importlib.import_module(f"distnet.parallel.{_info.name}")
    sys.modules[f"{__name__}.{_info.name}"] = _module
sys.modules[__name__] = _parallel
