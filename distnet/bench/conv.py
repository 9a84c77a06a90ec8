"""The ``conv`` workload of ``distnet bench core``: one LeNet-style training step.

Net (NCHW, float32, SGD, softmax cross-entropy on 28x28 single-channel images):
conv 1->16 5x5 pad 2 + relu, max pool 2, conv 16->32 5x5 + relu, max pool 2, flatten (800),
dense 800->128 + relu, dense 128->10. The same net in PyTorch CPU runs in its own process
(``distnet.bench.step`` alternates rounds); there is no hand-written numpy contender here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

LR = 0.01
CHANNELS = (16, 32)
HIDDEN = 128
CLASSES = 10


def lenet(in_channels: int = 1, side: int = 28, channels: tuple[int, int] = CHANNELS,
          hidden: int = HIDDEN, classes: int = CLASSES) -> Any:  # fmt: skip
    """The LeNet-style distnet model of this benchmark (and of the README's accuracy runs)."""
    from distnet import nn  # noqa: PLC0415

    c1, c2 = channels
    flat = c2 * (((side // 2) - 4) // 2) ** 2
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 5, padding=2, activation="relu"),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5, activation="relu"),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dense(flat, hidden, "relu"),
        nn.Dense(hidden, classes),
    )


def _data(batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((batch, 1, 28, 28), dtype=np.float32), rng.integers(0, CLASSES, batch)


def distnet_lenet_step(batch: int):
    """One step through distnet's layers, engine and SGD."""
    from distnet import backend, functional, optim  # noqa: PLC0415

    backend.seed(0)
    model = lenet()
    opt = optim.SGD(model, lr=LR)
    x, y = _data(batch)

    def step() -> None:
        opt.zero_grad()
        functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def torch_lenet_step(batch: int):
    """The same net and step in PyTorch CPU (only when torch is importable)."""
    import torch  # noqa: PLC0415

    torch.manual_seed(0)
    c1, c2 = CHANNELS
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, c1, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(c1, c2, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(c2 * 25, HIDDEN), torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, CLASSES),
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    xn, yn = _data(batch)
    x, y = torch.from_numpy(xn), torch.from_numpy(yn)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


CONTENDERS = {"distnet": distnet_lenet_step, "torch": torch_lenet_step}
