"""``distnet train JOB.toml``: one job, the same in one process and across N ranks.

A job names its data (distnet Zarr stores), its model (an MLP, or a stacked autoencoder that
is pretrained greedily layer by layer and then fine-tuned), its optimisers and its engine.
Under ``distnet launch -np N`` every rank streams its own shard of each global batch through
``StreamLoader`` and a ``DistributedOptimizer`` averages gradients; rank 0 alone writes the
run directory and prints. Every stage is a resumable unit of work (``Pipeline``): run the
same job again and finished stages are skipped, an interrupted one resumes from its last
epoch. Example (every key: docs/jobs.md)::

    [data]
    train = "runs/digits/data/train"    # written by `distnet data convert digits ...`
    test = "runs/digits/data/test"
    batch_size = 32                     # global: each of N ranks takes batch_size / N

    [model]
    type = "stacked_autoencoder"        # or "mlp"
    hidden = [100, 100]

    [pretrain]
    epochs = 20

    [finetune]
    epochs = 60

Reading and checking the file is ``load.py``'s (the schema: ``jobspec.py``), the model and its
stages ``stages.py``'s, a store's samples as arrays and pictures ``samples.py``'s; this module
runs a loaded job on one rank (``run_job``) and is the ``distnet train`` command (``run``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from distnet.parallel.mpi import lifetime
from distnet.train.jobs import jobfile, jobspec
from distnet.train.jobs.arguments import add_arguments, command_overrides  # CLI: add_arguments
from distnet.train.jobs.jobspec import JobError
from distnet.train.jobs.load import load_for_engine, load_job
from distnet.train.jobs.samples import (
    as_images,
    draw_pictures,
    flatten,
    read_store,
    sample_image_shape,
)
from distnet.train.jobs.stages import (  # noqa: F401  (where tests and tools find them)
    EpochPrinter,
    RankNoise,
    _make_optimizer,
    build_model,
    build_stages,
    per_layer,
)

# load_job (load.py) and the samples' helpers (samples.py) are imported here for the command,
# and found here by tools and tests as before the split
__all__ = ["JobError", "add_arguments", "load_job", "read_store", "run", "run_job"]


def run_job(
    job: dict,
    log: Callable[[str], None] = print,
    *,
    engine: Any = None,
    trace: bool = False,
    progress: str | None = None,
) -> dict[str, Any]:
    """Runs a loaded job on this process's rank; returns the report (written by rank 0).

    ``engine``: this rank's ``distnet.parallel.engine.Engine`` (its communicator, device,
    batch shares, each stage's synchronising optimiser, stage resumption); None: the engine
    of one process or of MPI ranks (``ProcessEngine``). Engines that start the ranks
    themselves (Ray actors) pass theirs.
    ``trace``: write ``trace.json`` (see ``distnet.trace``); ``progress``: 'bar', 'lines' or
    'off' for rank 0's progress display (None: a bar on a terminal, lines otherwise).
    """
    from distnet import backend  # noqa: PLC0415
    from distnet.data import StreamLoader  # noqa: PLC0415
    from distnet.parallel import stall  # noqa: PLC0415
    from distnet.parallel.engine import ProcessEngine  # noqa: PLC0415
    from distnet.train.jobs import datacheck, runguard  # noqa: PLC0415
    from distnet.train.jobs.observe import RunObserver  # noqa: PLC0415
    from distnet.train.loop.pipeline import Pipeline, Stage  # noqa: PLC0415

    started = time.perf_counter()
    engine = engine if engine is not None else ProcessEngine()
    engine.start(job, log)
    comm = engine.comm
    rank, size = comm.rank, comm.size
    out = Path(job["run"]["out"])
    stall.set_report_dir(out)  # report.html shows where a stalled job's ranks were
    say = log if rank == 0 else (lambda line: None)
    train = datacheck.check_data(job, size)  # the stores and the batch, before the first step
    n_val = len(train)
    train, x_val, y_val = _hold_out(job, train, rank, size)
    n_val -= len(train)
    global_batch = int(job["data"]["batch_size"])
    backend.seed(job["run"]["seed"])
    n_in = int(np.prod(train.shape[1:]))
    images = job["model"]["type"] == "cnn"  # (N, C, H, W) samples instead of flat vectors
    input_shape = sample_image_shape(train.shape[1:])
    model = build_model(job, n_in, int(train.num_classes), input_shape)
    device = engine.place(model, job["run"]["device"])  # and the flat buffers, explicitly
    loader = StreamLoader(
        train,
        global_batch_size=global_batch,  # each rank streams global_batch / size
        rank=rank,
        world_size=size,
        seed=job["run"]["seed"],
        shuffle_chunks=job["data"]["shuffle_chunks"],
        transform=as_images if images else flatten if len(train.shape) > 2 else None,
        device=device,
    )

    def wrap(opt: Any, feed: Any = None) -> Any:
        return engine.wrap(opt, loader if feed is None else feed)

    m = job["model"]
    layout = (
        f"{'x'.join(map(str, input_shape or ()))} [{', '.join(m['layers'])}] {train.num_classes}"
        if images
        else f"{n_in}-{'-'.join(map(str, m['hidden']))}-{train.num_classes}"
    )
    say(
        f"{type(model).__name__} {layout} on {len(train)} samples, {size} rank(s) x batch "
        f"{global_batch // size} (engine {type(comm).__name__})"
    )
    x_test, y_test = read_store(job["data"]["test"]) if job["data"]["test"] else (None, None)
    observe = RunObserver(job, out, comm, device, say, trace, progress, engine.stands_in)
    if images and x_test is not None:
        x_test = x_test.reshape(len(x_test), *input_shape)
    validation = None
    if x_val is not None:
        validation = (x_val.reshape(len(x_val), *input_shape) if images else flatten(x_val), y_val)

    def after_pretraining(k: int) -> None:  # the pretrained filters, before fine-tuning
        if k == 0 and job["run"]["pictures"] and x_test is not None:
            draw_pictures(model, x_test, out)
        if job["run"]["pictures"] and x_test is not None:
            observe.layer_pictures(model, k, x_test)

    layer_loader = _codes_loaders(job, model, train, loader, comm, out) if hasattr(
        model, "autoencoders"
    ) else None  # fmt: skip
    stages = build_stages(
        job, model, loader, wrap, say, after_pretraining, rank,
        watch=observe.watch, layer_loader=layer_loader, validation=validation,
    )  # fmt: skip
    stages = [Stage(st.name, engine.in_stage(st.name, st.fn)) for st in stages]  # for errors
    try:
        # rank 0 reads the run directory and broadcasts: others' may be node-local and empty;
        # the engine may resume a stage mid-epoch (Ray: after a lost worker)
        table = Pipeline(out, model, runguard.planned(job, stages), writer=rank == 0, log=say,
                         comm=comm, resume=engine.resume_stage,
                         record=runguard.segment(job, comm, device),
                         stands_in=engine.stands_in).run()  # fmt: skip
    finally:
        loader.close()
        observe.close()
    report: dict[str, Any] = {
        "config": {"model": f"{m['type']} {layout}", "batch_size": global_batch,
                   "seed": job["run"]["seed"],
                   "train": job["data"]["train"],
                   "validation_samples": n_val},
        "job": job, "workers": size, "engine": type(comm).__name__, "stages": table,
        "input_wait_fraction": loader.stats().get("wait_fraction"),
    }  # fmt: skip
    if x_test is not None:
        net = model
        report.update({f"test_{k}": v for k, v in net.evaluate(x_test, y_test).items()})
        report["confusion_matrix"] = observe.confusion(net, x_test, y_test, train.num_classes)
        if rank == 0 and job["run"]["pictures"]:
            draw_pictures(model, x_test, out, "-final", reconstructions=False)
    # listed from disk: a resumed run skips the stages that drew them
    names = ("filters", "reconstructions", "filters-final")
    report["pictures"] = {n: str(out / f"{n}.png") for n in names if (out / f"{n}.png").exists()}
    report["seconds"] = round(time.perf_counter() - started, 3)
    if rank == 0:  # the others wait in the barrier meanwhile: not a stall
        with comm.working("writing the report"):
            (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
            observe.finished(report["seconds"])
            # a Ray engine with parameter servers draws the page once it added their stats
            if job["run"]["report"] and not engine.draws_report:
                report["html"] = observe.html()
    comm.barrier()
    report["rank"] = rank
    return report


def _hold_out(job: dict, train: Any, rank: int, size: int) -> tuple[Any, Any, Any]:
    """(the store's training part, this rank's validation x (n, ...) float32 and y (n,), or
    None, None): ``[data] validation_fraction`` of the store's last samples, rank r taking
    every size-th from r (``fit`` averages over all ranks)."""
    from distnet.data.holdout import hold_out, read_range  # noqa: PLC0415

    fraction = job["data"]["validation_fraction"]
    try:
        part, held = hold_out(train, fraction)
    except ValueError as e:
        raise JobError(f"[data] validation_fraction {fraction}: {e}") from None
    if not len(held):
        return train, None, None
    if job["data"]["batch_size"] > len(part):
        raise JobError(f"[data] batch_size {job['data']['batch_size']} is larger than the "
                       f"{len(part)} samples left to train on after validation_fraction "
                       f"{fraction} of {train.path}")  # fmt: skip
    x_val, y_val = read_range(train, held)
    return part, x_val[rank::size], y_val[rank::size]


def _codes_loaders(job: dict, model: Any, train: Any, loader: Any, comm: Any, out: Path) -> Any:
    """``layer_loader(k)`` for build_stages: a StreamLoader over the codes store of layer k
    (written once, see ``distnet.train.jobs.codes``) when [pretrain] cache_codes says so, with
    the input loader's global batch, seed and order (an engine that splits batches unevenly
    gives it the split with the stage's optimiser); None to recompute the codes every batch."""
    from distnet.data import StreamLoader  # noqa: PLC0415
    from distnet.train.jobs.codes import CodesCache, shared_by_all_ranks, should_cache  # noqa: PLC0415

    cache = CodesCache(model, train, out / "codes", comm, loader.transform)
    shared: list[bool] = []  # whether every rank sees the run directory (probed once)

    def layer_loader(k: int) -> Any:
        choice = job["pretrain"]["cache_codes"]
        if choice is not False and not shared:
            shared.append(shared_by_all_ranks(out, comm))
        if choice is True and not shared[0]:
            raise JobError(
                f"[pretrain] cache_codes = true needs a run directory every rank sees ({out} is "
                "node-local here); set it to 'auto' or false"
            )
        if choice == "auto":  # rank 0 decides: free disk may differ between nodes
            epochs = per_layer(job["pretrain"]["epochs"], k)
            width = int(model.layer_sizes[k])
            mine = should_cache(epochs, len(train), width, out, loader.device)
            choice = comm.allgather(mine)[0] and shared[0]
        if not choice:
            return None
        return StreamLoader(
            cache.store(k), rank=comm.rank, world_size=comm.size, seed=loader.seed,
            shuffle_chunks=loader.shuffle_chunks, device=loader.device,
            global_batch_size=loader.global_batch_size,
        )  # fmt: skip

    return layer_loader


def run(args: argparse.Namespace) -> int:
    """``distnet train``: exit 0; 2 with a one-line reason for a job that cannot run; 130
    when interrupted. The console is kept in the run directory (``train.jobs.console``)."""
    with contextlib.ExitStack() as console:
        return _run(args, console)


def _run(args: argparse.Namespace, console: contextlib.ExitStack) -> int:
    overrides = command_overrides(args)
    from distnet.data import DatasetError  # noqa: PLC0415
    from distnet.parallel.rayengine import RayEngineError  # noqa: PLC0415
    from distnet.train.jobs.console import configure_logging, keep_console  # noqa: PLC0415
    from distnet.train.jobs.rayjob import run_ray_job  # noqa: PLC0415
    from distnet.train.jobs.runguard import preflight  # noqa: PLC0415
    from distnet.train.loop.callbacks import process_rank  # noqa: PLC0415
    from distnet.train.loop.checkpoint import CheckpointError  # noqa: PLC0415

    configure_logging(getattr(args, "log_level", None))
    log = (lambda line: None) if args.quiet else logging.getLogger("distnet.train").info
    try:
        for text in args.set:
            section, key, value = jobspec.parse_override(text)
            overrides = jobspec.merge(overrides, {section: {key: value}})
        if getattr(args, "print_config", False):
            from distnet.train.jobs.jobtoml import print_job  # noqa: PLC0415

            return print_job(load_job(args.job, overrides), args.job)
        job = load_for_engine(args, overrides)
        jobfile.check_relative_data(args.job, job)
        logging.getLogger("distnet.train").debug(
            f"job {args.job}: engine {job['dist']['engine']}, run directory {job['run']['out']}"
        )
        options = preflight(job, args.job, args.restart, log)  # before any engine starts
        rank = None if options is not None else process_rank()  # a Ray driver is no rank
        out = Path(job["run"]["out"])
        console.enter_context(keep_console(out, rank, user_console=rank in (None, 0)))
        if options is not None:  # this process drives Ray worker actors
            options.trace = args.trace
            report = run_ray_job(job, options, log=log)
        else:
            report = run_job(job, log=log, trace=args.trace, progress="off" if args.quiet else None)
    except (JobError, DatasetError, CheckpointError, RayEngineError) as e:
        # problems found while building (a layer list that does not fit the store's images)
        # are named by key only: say which file
        where = "" if str(args.job) in str(e) or not isinstance(e, JobError) else f"{args.job}: "
        print(f"distnet train: {where}{e}", file=sys.stderr)
        lifetime.abort_failed_rank(2, f"{type(e).__name__}: {e}")  # peers may wait for it
        return 2
    except KeyboardInterrupt:
        where = f"; checkpoints in {job['run']['out']}" if "job" in locals() else ""
        print(f"distnet train: interrupted{where}", file=sys.stderr)
        lifetime.abort_interrupted_rank(130)  # never MPI_Finalize: peers may not come
        return 130
    if report["rank"] == 0:
        acc = report.get("test_accuracy")
        summary = f"test accuracy {acc:.4f}" if acc is not None else "done"
        where = report.get("html") or f"{job['run']['out']}/report.json"
        print(f"{summary} in {report['seconds']:.1f}s; report: {where}")
    return 0
