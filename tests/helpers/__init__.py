"""What the test modules share (no test module imports another): ``tests/`` is on ``sys.path``
because ``tests/conftest.py`` lives there, so a test imports ``from helpers.mpi import launch``.

- ``helpers.mpi``: the repository's paths, ``MPI_MARKS`` and the one ``launch`` (``distnet
  launch`` of a Python command under real mpiexec, with a timeout); ``start_job`` for a job a
  test acts on while it runs;
- ``helpers.jobs``: the one job builder (``job_text``, ``write_job``, ``mlp_job``, ``sae_job``);
- ``helpers.params``: a run's final parameters and the one-process reference they must equal;
- ``helpers.data``: small stores whose samples say which they are, IDX files, chunk files, the
  in-memory digits split;
- ``helpers.matrix``: the conformance matrix's stores and its run of one job on one rank;
- ``helpers.sample_counts``: counting a Ray job's samples from its per-rank logs;
- ``helpers.hosts``: two "hosts" on one machine (a network namespace);
- ``helpers.processes``, ``helpers.listening``, ``helpers.ray_client``: waiting for processes
  to go, the TCP addresses a process tree listens on, a separate Ray client;
- ``helpers.gradcheck``, ``helpers.conv``: the float64 finite-difference checker, the
  convolution reference and its cases.

Fixtures (``digits``, ``ray_cluster``, ``two_hosts``) are in ``tests/conftest.py``; how the
tests are grouped is in docs/testing.md.
"""
