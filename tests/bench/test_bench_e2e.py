"""``distnet bench e2e``'s PyTorch recipe follows the job's fine-tuning schedule epoch by epoch
as distnet's callbacks do (runs only where torch is installed; it is never a dependency)."""

from __future__ import annotations

import pytest

from distnet.bench.e2e import _torch_schedule
from distnet.train.loop.lrcallbacks import cosine, step

torch = pytest.importorskip("torch", reason="PyTorch is not installed (benchmarks only)")


@pytest.mark.parametrize(
    ("ft", "distnet_lr"),
    [
        ({"schedule": "cosine", "lr": 1e-3, "epochs": 12, "lr_min": 1e-5}, cosine(1e-3, 12, 1e-5)),
        (
            {"schedule": "step", "lr": 0.1, "epochs": 12, "step_epochs": 4, "step_factor": 0.5},
            step(0.1, 4, 0.5),
        ),
    ],
)
def test_the_pytorch_schedule_gives_distnets_rate_every_epoch(ft, distnet_lr):
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=ft["lr"])
    sched = _torch_schedule(torch, opt, ft)
    for epoch in range(ft["epochs"]):
        assert opt.param_groups[0]["lr"] == pytest.approx(distnet_lr(epoch), rel=1e-9), epoch
        opt.step()
        sched.step()


def test_an_unknown_schedule_is_named():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ValueError, match="'warmup'"):
        _torch_schedule(torch, opt, {"schedule": "warmup"})
