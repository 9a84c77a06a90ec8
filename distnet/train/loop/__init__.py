"""The training loop: ``fit``/``evaluate``/``predict`` (fit.py) over an epoch's batches
(batches.py), the ranks' agreed non-finite decision (finite.py), callbacks and learning-rate
callbacks, checkpoints, resumable stage pipelines, progress and per-rank metrics.

The loop talks to the optimiser through its protocol (``distnet.optim.protocol``) and knows no
engine, job file or report; ``distnet.train`` re-exports its public names.
"""
