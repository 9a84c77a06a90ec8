"""Training: the ``fit`` loop, callbacks, checkpoints, stage pipelines, demo and reports."""

from distnet.optim.factory import make_optimizer
from distnet.train.loop.callbacks import (
    Callback,
    CSVLogger,
    EarlyStopping,
    History,
    JSONLLogger,
    ModelCheckpoint,
    ProgressBar,
    ReduceLROnPlateau,
)
from distnet.train.loop.checkpoint import (
    CheckpointError,
    is_complete,
    latest_checkpoint,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from distnet.train.loop.fit import NonFiniteError, evaluate, fit, predict
from distnet.train.loop.metrics import MetricsLogger
from distnet.train.loop.pipeline import Pipeline, Stage, StageContext
from distnet.train.loop.progress import StageProgress

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
    "MetricsLogger",
    "StageProgress",
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
