"""Training: the ``fit`` loop, callbacks, checkpoints, stage pipelines, demo and reports."""

from distnet.train.callbacks import (
    Callback,
    CSVLogger,
    EarlyStopping,
    History,
    JSONLLogger,
    ModelCheckpoint,
    ProgressBar,
    ReduceLROnPlateau,
)
from distnet.train.checkpoint import (
    CheckpointError,
    is_complete,
    latest_checkpoint,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from distnet.train.fit import NonFiniteError, evaluate, fit, make_optimizer, predict
from distnet.train.pipeline import Pipeline, Stage, StageContext

__all__ = [
    "fit",
    "evaluate",
    "predict",
    "make_optimizer",
    "NonFiniteError",
    "History",
    "Callback",
    "EarlyStopping",
    "ModelCheckpoint",
    "ReduceLROnPlateau",
    "CSVLogger",
    "JSONLLogger",
    "ProgressBar",
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointError",
    "read_manifest",
    "is_complete",
    "latest_checkpoint",
    "Pipeline",
    "Stage",
    "StageContext",
]
