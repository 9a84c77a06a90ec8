"""What the test modules share (no test module imports another): ``tests/`` is on ``sys.path``
because ``tests/conftest.py`` lives there, so a test imports ``from helpers.mpi import launch``.

- ``helpers.mpi``: the repository's paths, ``MPI_MARKS`` and ``launch`` (``distnet launch``
  of a Python command under real mpiexec, with a timeout);
- ``helpers.data``: small stores whose samples say which they are, IDX files, chunk files;
- ``helpers.jobs``: the text of job files (TOML), and runs' final parameters;
- ``helpers.matrix``: the conformance matrix's stores and its run of one job on one rank;
- ``helpers.sample_counts``: counting a Ray job's samples from its per-rank logs;
- ``helpers.listening``: which TCP addresses a tree of processes listens on;
- ``helpers.gradcheck``: the float64 finite-difference gradient checker.

Fixtures (``digits``, ``ray_cluster``) are in ``tests/conftest.py``.
"""
