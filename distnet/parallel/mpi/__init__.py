"""What only the MPI engine uses: ``distnet launch`` and the processes it starts, and the
hierarchical allreduce of several nodes.

- ``launcher``: ``distnet launch`` (checks, then mpiexec; like ``horovodrun``);
- ``launchrun``: one run of mpiexec: start it, watch it, end it, say how it ended;
- ``lifetime``: how the launcher, mpiexec, each rank's parent and the rank end together;
- ``rankexec``: each rank's small parent (``python -m distnet.parallel.mpi.rankexec``): names a
  rank that failed, passes interrupts on;
- ``rankstatus``: how a rank tells the launcher why it stopped, on any host;
- ``hierarchical``: allreduce inside each node, then among the nodes' leaders (host buffers);
- ``nccl_hierarchical``: the same for GPU buffers with NCCL.

Nothing is imported here: the package costs nothing to a process that never launches.
"""
