"""Run under 2 ranks: ``distnet train JOB`` (argv[1]) in which rank 0's epoch checkpoint write
takes ``STALL_SLEEP`` seconds (a slow disk), longer than the stall limits in the environment,
while rank 1 waits in the next collective. The pipeline declares the write as work
(``comm.working``): no stall report, the job ends normally."""

import os
import sys
import time

from distnet import cli
from distnet.train.loop import pipeline

real_save = pipeline.save_checkpoint


def slow_save(*args, **kwargs):
    time.sleep(float(os.environ.get("STALL_SLEEP", "6")))  # only the writer (rank 0) saves
    return real_save(*args, **kwargs)


pipeline.save_checkpoint = slow_save
sys.exit(cli.main(["train", sys.argv[1], "--quiet"]))
