"""The GPU path a user runs, end to end (issue 8): a ``device = "cuda"`` job on 1 and 2 ranks
(NCCL, real ``distnet launch``), with pictures after pretraining, evaluation and a report;
the loader on ``cuda:1``; float16 dropout and masking noise; checkpoint and resume.

Skipped with the reason when cupy or a CUDA GPU is missing; 2-GPU tests also need 2 GPUs
(NCCL refuses two ranks on one GPU). Runs as it stands the moment a GPU is present.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from helpers.jobs import sae_job
from helpers.mpi import MPIEXEC, SCRIPTS, launch

from distnet import backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        backend.gpu_skip_reason() is not None, reason=str(backend.gpu_skip_reason())
    ),
]


def gpu_count() -> int:
    import cupy  # noqa: PLC0415

    return int(cupy.cuda.runtime.getDeviceCount())


def needs_gpus(n: int):
    """Skips unless n GPUs are visible (evaluated at test time, after the module skip)."""
    if gpu_count() < n:
        pytest.skip(f"needs {n} GPUs, found {gpu_count()}")


def needs_mpiexec():
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec beside {sys.executable}")


@pytest.fixture
def job_file(digits, tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(sae_job(digits / "data", pictures=True, run={"device": "cuda"}))
    return path


# -- jobs --------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_cuda_job_in_one_process_draws_pictures_and_reports(job_file, tmp_path):
    from distnet import cli  # noqa: PLC0415

    out = tmp_path / "run"
    assert cli.main(["train", str(job_file), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["test_accuracy"] >= 0.7
    assert set(report["pictures"]) == {"filters", "reconstructions", "filters-final"}


@pytest.mark.mpi
@pytest.mark.timeout(300)
@pytest.mark.parametrize("np_", [1, 2])
def test_cuda_job_under_distnet_launch_with_nccl(np_, job_file, tmp_path):
    needs_mpiexec()
    needs_gpus(np_)
    out = tmp_path / "run"
    proc = launch(np_, "-m", "distnet.cli", "train", str(job_file), "--out", str(out), timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["workers"] == np_ and report["test_accuracy"] >= 0.7
    assert "reconstructions" in report["pictures"]


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("np_", [1, 2])
def test_cuda_job_resumes_to_the_parameters_of_a_run_that_never_stopped(np_, job_file, tmp_path):
    needs_mpiexec()
    needs_gpus(np_)
    script = str(SCRIPTS / "resume_local_dirs.py")
    local = tmp_path / "local"
    local.mkdir()

    def run(out: str, mode: str) -> str:
        proc = launch(
            np_, script, str(job_file), str(tmp_path / out), str(local), mode, "cuda", timeout=240
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    assert "full done" in run("full", "full")
    assert "crashed as planned" in run("stopped", "crash")
    assert "resumed from [0, 0, 2]" in run("stopped", "resume")
    full = np.load(local / "final-full-rank0.npz")
    for rank in range(np_):
        resumed = np.load(local / f"final-resume-rank{rank}.npz")
        for name in full.files:
            np.testing.assert_array_equal(resumed[name], full[name], err_msg=f"{rank} {name}")


# -- pieces ------------------------------------------------------------------------------------
def test_host_arrays_work_with_a_model_on_the_gpu():
    from distnet import nn  # noqa: PLC0415

    backend.seed(0)
    model = nn.Sequential(nn.Dense(8, 16, "relu"), nn.Dense(16, 3)).to("cuda")
    x = np.random.default_rng(0).random((40, 8), dtype=np.float32)
    y = np.arange(40) % 3
    assert model.device.startswith("cuda:")
    assert model.predict(x).shape == (40, 3)
    assert set(model.evaluate(x, y)) == {"loss", "accuracy"}
    history = model.fit(x, y, epochs=2, batch_size=8, seed=0)
    assert len(history.history["loss"]) == 2


def test_device_for_rank_uses_the_visible_gpus():
    n = gpu_count()
    assert backend.device_for_rank(n, "cuda") == "cuda:0"
    assert backend.device_for_rank(n - 1, "cuda") == f"cuda:{n - 1}"


def test_loader_on_cuda_1_puts_every_batch_there(digits):
    needs_gpus(2)
    import cupy  # noqa: PLC0415

    from distnet.data import StreamLoader  # noqa: PLC0415

    with StreamLoader(f"{digits}/data/train", 32, device="cuda:1") as loader:
        for x, y in loader:
            assert x.device.id == 1 and y.device.id == 1
    with cupy.cuda.Device(1):  # 'cuda' is the constructing thread's GPU, not the thread's 0
        loader = StreamLoader(f"{digits}/data/train", 32, device="cuda")
    assert loader.device == "cuda:1"
    x, _ = next(iter(loader))
    loader.close()
    assert x.device.id == 1


def test_float16_dropout_and_masking_noise_on_the_gpu():
    import cupy  # noqa: PLC0415

    from distnet import functional as F  # noqa: PLC0415
    from distnet import nn  # noqa: PLC0415
    from distnet.core import Tensor  # noqa: PLC0415

    x = Tensor(cupy.ones((64, 32), dtype=cupy.float16), requires_grad=True)
    backend.seed(3)
    y = F.dropout(x, 0.5)
    y.sum().backward()
    assert y.dtype == cupy.float16 and 0.3 < float((y.data == 0).mean()) < 0.7
    backend.seed(3)
    np.testing.assert_array_equal(F.dropout(x, 0.5).data.get(), y.data.get())  # seeded
    a = F.dropout(x, 0.5, rng=np.random.default_rng(9)).data.get()
    b = F.dropout(x, 0.5, rng=np.random.default_rng(9)).data.get()
    np.testing.assert_array_equal(a, b)  # rng= is honoured on the GPU
    ae = nn.AutoEncoder(32, 8, corruption=0.3, dtype=np.float16).to("cuda")
    loss = ae.loss(cupy.ones((16, 32), dtype=cupy.float16))
    loss.backward()
    assert loss.dtype == cupy.float16 and bool(cupy.isfinite(loss.data))


def test_checkpoint_and_resume_on_the_gpu(tmp_path):
    from distnet import nn  # noqa: PLC0415
    from distnet.optim import Adam  # noqa: PLC0415
    from distnet.train import ModelCheckpoint, fit, load_checkpoint  # noqa: PLC0415

    x = np.random.default_rng(0).random((64, 8), dtype=np.float32)
    y = np.arange(64) % 2

    def make():
        backend.seed(1)
        model = nn.Sequential(nn.Dense(8, 8, "tanh"), nn.Dense(8, 2)).to("cuda")
        return model, Adam(model, lr=0.01)

    model, opt = make()
    fit(model, x, y, epochs=4, batch_size=16, optimizer=opt, seed=5)
    uninterrupted = model.state_dict()
    model, opt = make()
    ckpt = ModelCheckpoint(str(tmp_path / "ep{epoch}"), monitor="loss")
    fit(model, x, y, epochs=2, batch_size=16, optimizer=opt, seed=5, callbacks=[ckpt])
    model, opt = make()
    info = load_checkpoint(tmp_path / "ep2", model, opt)
    assert info["epoch"] == 2 and model.device.startswith("cuda")
    fit(model, x, y, epochs=4, batch_size=16, optimizer=opt, seed=5, initial_epoch=2)
    for name, value in uninterrupted.items():
        np.testing.assert_allclose(model.state_dict()[name], value, rtol=1e-6, atol=1e-7)
