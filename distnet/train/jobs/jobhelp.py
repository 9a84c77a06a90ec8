"""What each key of a job file does, one sentence or two per key: the help column of the jobs
reference (docs/jobs.md, written by ``python -m distnet.train.jobs.jobsdoc``).

The schema itself (types, defaults, ranges, the ``expected ...`` phrase of each error) is in
``distnet.train.jobs.jobspec``; a key added there needs its line here
(``tests/unit/test_jobs_doc.py`` says which one is missing).
"""

from __future__ import annotations

HELP: dict[str, str] = {
    # [data]
    "data.train": (
        "The training store (a distnet Zarr store, `distnet data convert`); a relative path is "
        "relative to the job file, a URL is read remotely. Required."
    ),
    "data.test": (
        "The test store, evaluated after fine-tuning (accuracy, confusion matrix); absent: no test."
    ),
    "data.batch_size": (
        "The global batch: each of N ranks or workers takes batch_size / N samples a step."
    ),
    "data.shuffle_chunks": (
        "Chunks the loader shuffles together (more: better mixing, more memory)."
    ),
    "data.validation_fraction": (
        "The share of the training store held out for validation (its last samples; the "
        "converters shuffle each split): validation loss and accuracy after every epoch of a "
        "supervised stage. 0: none."
    ),
    # [model]
    "model.type": (
        "stacked_autoencoder: greedy layer-wise pretraining, then supervised fine-tuning; mlp: "
        "supervised only; cnn: the layers of `layers`."
    ),
    "model.hidden": (
        "Hidden layer widths (stacked_autoencoder and mlp); the input and output widths come "
        "from the data."
    ),
    "model.activation": "Activation of every hidden layer (stacked_autoencoder and mlp).",
    "model.tied_weights": (
        "Each decoder uses its encoder's transposed weights (stacked_autoencoder)."
    ),
    "model.dropout": (
        "Dropout after each hidden layer (type = 'mlp' only; a cnn takes a 'dropout P' entry)."
    ),
    "model.layers": (
        "The CNN's layers (type = 'cnn'); images are read as (N, 1, H, W), an activation right "
        "after a conv or dense layer is fused into it, and the output layer is appended."
    ),
    # [pretrain]
    "pretrain.epochs": (
        "Pretraining epochs of each autoencoder (one value for all layers or one per hidden "
        "layer); 0 skips pretraining."
    ),
    "pretrain.lr": "Adam's learning rate in pretraining (one value or one per hidden layer).",
    "pretrain.corruption": (
        "Fraction of inputs masked to zero (denoising), one value or one per hidden layer."
    ),
    "pretrain.cache_codes": (
        "Layer k reads the frozen encoders' codes from a store written once instead of "
        "recomputing them; 'auto': on CPU when a layer trains more than one epoch and the store"
        " fits twice on disk."
    ),
    "pretrain.loss": "Reconstruction loss of each autoencoder.",
    "pretrain.sparsity_target": (
        "Target mean activation of the KL sparsity penalty (with sparsity_weight > 0)."
    ),
    "pretrain.sparsity_weight": "Weight of the KL sparsity penalty (0: none).",
    # [finetune]
    "finetune.epochs": (
        "Epochs of supervised training (the whole stack with a softmax layer, or the mlp or cnn)."
    ),
    "finetune.optimizer": "The optimiser of the supervised stage.",
    "finetune.lr": "Its initial learning rate (the schedule changes it).",
    "finetune.weight_decay": "L2 weight decay.",
    "finetune.momentum": "Momentum of optimizer = 'sgd' (the other optimisers do not read it).",
    "finetune.plateau_patience": "schedule = 'plateau': epochs of flat training loss before a cut.",
    "finetune.plateau_factor": (
        "schedule = 'plateau': the learning rate is multiplied by this at a cut."
    ),
    "finetune.schedule": (
        "The learning rate over the epochs: cut on a plateau of the training loss, cosine decay"
        " to lr_min, or times step_factor every step_epochs."
    ),
    "finetune.lr_min": (
        "The floor of every schedule; absent: lr / 1000 for plateau, 0 for cosine and step."
    ),
    "finetune.step_epochs": "schedule = 'step': epochs between cuts.",
    "finetune.step_factor": "schedule = 'step': the learning rate is multiplied by this at a cut.",
    # [dist]
    "dist.engine": (
        "Who starts the workers: 'mpi' (the ranks of distnet launch, mpiexec or srun), 'ray' "
        "(worker actors), 'local' (one process); 'auto': mpi under an MPI launcher, else local."
    ),
    "dist.bucket_mb": "Size of the allreduce buckets (slices of the flat gradient buffer).",
    "dist.compression": "Gradients sent as float16 in the allreduce ('fp16'), or as they are.",
    "dist.overlap": (
        "Start each bucket's allreduce during backward; 'auto': as DISTNET_OVERLAP says (off by"
        " default: it gained nothing on 2-core CPU nodes)."
    ),
    "dist.hierarchical": (
        "Allreduce inside each node, then among node leaders; 'auto': on with several nodes of "
        "several ranks, or as DISTNET_HIERARCHICAL says."
    ),
    "dist.strategy": (
        "How gradients meet: allreduce, a sharded parameter server ('ps'), or allreduce inside "
        "a node and a parameter server across nodes ('hybrid'; ps and hybrid need engine = "
        "'ray'), or local SGD ('local_sgd': sync_every local steps, then the parameters are "
        "averaged)."
    ),
    "dist.sync_every": (
        "strategy = 'local_sgd': local steps between two averages of the parameters (1: the "
        "same as allreduce SGD)."
    ),
    "dist.average_state": (
        "strategy = 'local_sgd': also average the optimiser's state (momentum, Adam's moments)."
    ),
    "dist.mode": (
        "Parameter server: 'sync' (one global-batch step), 'async' (Downpour: each push is a "
        "step), 'ssp' (bounded staleness)."
    ),
    "dist.staleness": (
        "mode = 'ssp': how many steps a worker may run ahead of the slowest; 'auto': a bound "
        "that follows the workers' measured speeds, 0 to 16 (docs/rebalancing.md)."
    ),
    "dist.shards": (
        "Parameter-server shards (contiguous ranges of the flat buffer, one Ray actor each)."
    ),
    "dist.workers": "Ray workers (GPU ones when gpus_per_worker > 0).",
    "dist.cpu_workers": "Ray CPU workers beside the GPU ones (a mixed group).",
    "dist.gpus_per_worker": "GPUs each Ray worker reserves.",
    "dist.min_workers": (
        "The fewest Ray workers a job carries on with after losing some (0: all of them; a lost"
        " one is replaced)."
    ),
    "dist.placement": "Ray placement-group strategy of the workers' bundles.",
    "dist.address": (
        "The Ray cluster to join ('auto', or HOST:PORT); absent: a local Ray started on demand."
    ),
    "dist.rebalance_every": (
        "Least steps between two measurements of each worker's speed; the global batch is split "
        "again at the next epoch end (Ray workers and MPI ranks; 0: never)."
    ),
    "dist.rebalance": (
        "Batch shares that follow measured speed. Ray: 'auto' re-splits where a step gets more "
        "than 10% shorter, true at every measurement, false never. MPI: only with true (a "
        "timing-dependent split would make a rerun or resume differ; docs/rebalancing.md)."
    ),
    "dist.workers_per_node": (
        "strategy = 'hybrid': consecutive ranks taken as one node (tests, benchmarks); 0: the "
        "Ray nodes the workers landed on."
    ),
    "dist.devices": (
        "One device per Ray worker, e.g. ['cuda', 'cpu'] (instead of workers and cpu_workers)."
    ),
    "dist.worker_resources": (
        "Custom Ray resources per worker, pinning worker i to the nodes that have them."
    ),
    "dist.shard_optimizer": (
        "ZeRO stage 1 over MPI ranks; 'auto': on where its collectives go through shared memory"
        " (every rank on one node, CPU buffers, no compression)."
    ),
    "dist.survivors_go_on": (
        "strategy = 'ps' in async/ssp mode: a lost worker is replaced while the others go on "
        "(false: the group restarts from the epoch checkpoint)."
    ),
    "dist.replicas": (
        "strategy = 'ps' or 'hybrid': copies of each shard; 2: a primary and a backup that "
        "holds every acknowledged push and takes over when the primary dies; a lost replica "
        "is rebuilt in the background, on another node than the live one where there is one. "
        "'auto' (the default): 2 where the Ray cluster has more than one live node (each "
        "backup on another node than its primary), 1 on a single node unless asked; the "
        "number chosen is logged and in the run's ps_stats (replicas_per_shard)."
    ),
    # [run]
    "run.out": (
        "The run directory (checkpoints, report.html, metrics); a relative path is relative to "
        "the job file."
    ),
    "run.seed": "Seed of initialisation, shuffling and noise.",
    "run.log_every": "Epochs between progress lines in a log.",
    "run.pictures": "Draw filters and reconstructions into the run directory and the report.",
    "run.report": (
        "Draw report.html when the run ends or fails (false: report.json and the metrics "
        "only, as for sweeps of many small jobs; `distnet report RUN` draws the page later)."
    ),
    "run.device": "Where each rank computes; 'cuda' takes GPU local_rank % visible GPUs.",
    "run.on_nonfinite": (
        "A NaN or inf loss or gradient: stop, naming step, rank(s) and parameter, or skip the "
        "step on every rank."
    ),
}
