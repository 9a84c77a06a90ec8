"""The contenders of ``distnet bench core`` (``distnet.bench.step``): step builders, each
``batch -> step()``, that run inside their own worker process (one framework, one thread pool
per process), and the worker loop that times them.

Workloads and their contenders (``CONTENDERS``): the MLP step (distnet, a careful hand-written
numpy step, PyTorch, and the step's GEMMs alone), the same with Adam, the optimiser updates
alone, a denoising autoencoder layer, and the LeNet-style step (``distnet.bench.conv``).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from distnet.bench.conv import CONTENDERS as CONV_CONTENDERS
from distnet.bench.floor import gemm_floor_step, torch_gemm_floor_step

SIZES = {"mlp": [784, 1000, 1000, 1000, 10], "sae": [784, 1000]}
LR = 0.01
CORRUPTION = 0.3


def _data(batch: int, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.random((batch, n_in), dtype=np.float32)
    y = rng.integers(0, n_out, batch)
    return x, y


def _glorot(rng: np.random.Generator, n_in: int, n_out: int) -> np.ndarray:
    limit = np.sqrt(6.0 / (n_in + n_out))
    return rng.uniform(-limit, limit, (n_in, n_out)).astype(np.float32)


def numpy_mlp_step(batch: int):
    """A careful hand-written numpy step: the floor any numpy-based core pays."""
    sizes = SIZES["mlp"]
    rng = np.random.default_rng(0)
    ws = [_glorot(rng, a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    bs = [np.zeros(b, np.float32) for b in sizes[1:]]
    x, y = _data(batch, sizes[0], sizes[-1])
    rows = np.arange(batch)

    def step() -> None:
        acts = [x]
        for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
            z = acts[-1] @ w
            z += b
            if i < len(ws) - 1:
                np.tanh(z, out=z)
            acts.append(z)
        z = acts[-1]
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        z[rows, y] -= 1
        z /= batch
        g = z
        for i in range(len(ws) - 1, -1, -1):
            a = acts[i]
            gw = a.T @ g
            gb = g.sum(axis=0)
            if i > 0:
                g = g @ ws[i].T
                g *= 1 - a * a
            ws[i] -= LR * gw
            bs[i] -= LR * gb

    return step


def _distnet_mlp(activation: str = "tanh"):
    from distnet import backend, nn  # noqa: PLC0415

    backend.seed(0)
    sizes = SIZES["mlp"]
    layers = [nn.Dense(a, b, activation) for a, b in zip(sizes[:-2], sizes[1:-1], strict=True)]
    return nn.Sequential(*layers, nn.Dense(sizes[-2], sizes[-1]))


TORCH_ACTIVATIONS = {
    "tanh": "Tanh",
    "sigmoid": "Sigmoid",
    "relu": "ReLU",
    "leaky_relu": "LeakyReLU",
}


def _torch_mlp(activation: str = "tanh"):
    import torch  # noqa: PLC0415

    torch.manual_seed(0)
    sizes = SIZES["mlp"]
    mods: list[Any] = []
    for a, b in zip(sizes[:-2], sizes[1:-1], strict=True):  # LeakyReLU: slope 0.01 as distnet's
        mods += [torch.nn.Linear(a, b), getattr(torch.nn, TORCH_ACTIVATIONS[activation])()]
    return torch.nn.Sequential(*mods, torch.nn.Linear(sizes[-2], sizes[-1]))


def _distnet_optimizer(model, name: str, in_backward: bool = False):
    from distnet import optim  # noqa: PLC0415

    if name == "adam":
        return optim.Adam(model, lr=1e-3, update_in_backward=in_backward)
    if name == "rmsprop":
        return optim.RMSProp(model, lr=1e-3, update_in_backward=in_backward)
    momentum = 0.9 if name == "sgdm" else 0.0
    return optim.SGD(model, lr=LR, momentum=momentum, update_in_backward=in_backward)


def _torch_optimizer(model, name: str, fused: bool | None = None):
    """PyTorch's optimiser with its defaults (on CPU: a loop of per-tensor ops), or with
    ``fused=True``: its one-pass CPU kernel (SGD and Adam), the fair one-pass baseline."""
    import torch  # noqa: PLC0415  (defaults: what a PyTorch user gets)

    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    if name == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=1e-3)
    momentum = 0.9 if name == "sgdm" else 0.0
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum, fused=fused)


def distnet_mlp_step(
    batch: int, opt_name: str = "sgd", activation: str = "tanh", in_backward: bool = False
):
    """The same step through distnet's Module, fused ops, engine and SGD (or Adam); with
    ``in_backward`` the update runs inside backward (``distnet.optim.in_backward``)."""
    from distnet import functional  # noqa: PLC0415

    model = _distnet_mlp(activation)
    opt = _distnet_optimizer(model, opt_name, in_backward)
    x, y = _data(batch, SIZES["mlp"][0], SIZES["mlp"][-1])

    def step() -> None:
        opt.zero_grad()
        functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def torch_mlp_step(batch: int, opt_name: str = "sgd", activation: str = "tanh"):
    """PyTorch CPU, same net and threads (only when torch is importable)."""
    import torch  # noqa: PLC0415

    sizes = SIZES["mlp"]
    model = _torch_mlp(activation)
    opt = _torch_optimizer(model, opt_name)
    xn, yn = _data(batch, sizes[0], sizes[-1])
    x, y = torch.from_numpy(xn), torch.from_numpy(yn)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def numpy_sae_step(batch: int):
    """Hand-written denoising tied-weight autoencoder step (sigmoid, MSE, SGD)."""
    n_in, n_hidden = SIZES["sae"]
    rng = np.random.default_rng(0)
    w = _glorot(rng, n_in, n_hidden)
    bh, bv = np.zeros(n_hidden, np.float32), np.zeros(n_in, np.float32)
    x, _ = _data(batch, n_in, 2)
    noise = np.random.default_rng(1)

    def sigmoid_(z: np.ndarray) -> np.ndarray:
        z *= 0.5
        np.tanh(z, out=z)
        z += 1
        z *= 0.5
        return z

    def step() -> None:
        xc = x * (noise.random(x.shape, dtype=np.float32) >= CORRUPTION)
        h = xc @ w
        h += bh
        sigmoid_(h)
        r = h @ w.T
        r += bv
        sigmoid_(r)
        g = r - x
        g *= 2.0 / g.size
        g *= r * (1 - r)  # through the output sigmoid
        gw = g.T @ h  # decoder's contribution (W^T used there)
        gbv = g.sum(axis=0)
        gh = g @ w
        gh *= h * (1 - h)
        gw += xc.T @ gh  # encoder's contribution
        gbh = gh.sum(axis=0)
        w[...] -= LR * gw
        bh[...] -= LR * gbh
        bv[...] -= LR * gbv

    return step


def distnet_sae_step(batch: int):
    """The same step through distnet's AutoEncoder (tied weights, masking noise)."""
    from distnet import backend, nn, optim  # noqa: PLC0415

    backend.seed(0)
    n_in, n_hidden = SIZES["sae"]
    ae = nn.AutoEncoder(
        n_in, n_hidden, activation="sigmoid", tied_weights=True, corruption=CORRUPTION
    )
    opt = optim.SGD(ae, lr=LR)
    x, _ = _data(batch, n_in, 2)

    def step() -> None:
        opt.zero_grad()
        ae.loss(x).backward()
        opt.step()

    return step


def distnet_update(opt_name: str):
    """The optimiser update alone over the MLP's 2.8M-parameter flat buffer."""
    model = _distnet_mlp()
    opt = _distnet_optimizer(model, opt_name)
    rng = np.random.default_rng(0)
    opt.flat_grads[...] = rng.standard_normal(opt.flat_grads.size, dtype=np.float32) * 1e-3
    for p in opt.params:
        p._grad_zeroed = False  # the gradient above is the one to apply
    return opt.step


def torch_update(opt_name: str, fused: bool | None = None):
    import torch  # noqa: PLC0415

    model = _torch_mlp()
    opt = _torch_optimizer(model, opt_name, fused)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return opt.step


def _update_contenders(opt_name: str) -> dict[str, Any]:
    contenders = {
        "distnet": lambda batch: distnet_update(opt_name),
        "torch": lambda batch: torch_update(opt_name),
    }
    if opt_name in ("sgdm", "adam"):  # torch has a fused CPU kernel for these
        contenders["torch-fused"] = lambda batch: torch_update(opt_name, fused=True)
    return contenders


CONTENDERS = {
    "mlp": {
        "distnet": distnet_mlp_step,
        "numpy": numpy_mlp_step,
        "torch": torch_mlp_step,
        "floor": gemm_floor_step,  # the step's 11 GEMMs alone (distnet.bench.floor)
        "torch-floor": torch_gemm_floor_step,  # the same GEMMs through torch.mm
    },
    "mlp-adam": {
        "distnet": lambda batch: distnet_mlp_step(batch, "adam"),
        "torch": lambda batch: torch_mlp_step(batch, "adam"),
        "floor": gemm_floor_step,
    },
    "sae": {"distnet": distnet_sae_step, "numpy": numpy_sae_step},
    "update-sgdm": _update_contenders("sgdm"),
    "update-adam": _update_contenders("adam"),
    "update-rmsprop": _update_contenders("rmsprop"),
    "conv": CONV_CONTENDERS,  # LeNet-style step: distnet.bench.conv
}
WORKLOADS = list(CONTENDERS)


def contender(workload: str, name: str) -> Any:
    """The step builder (batch -> step) for ``workload``; the grid's cells are named
    ``grid-<activation>-<optimiser>`` (see ``distnet.bench.grid``)."""
    if workload.startswith("grid-"):
        _, activation, opt_name = workload.split("-", 2)
        if name == "floor":
            return gemm_floor_step
        if name == "distnet-ib":  # the update inside backward
            return lambda batch: distnet_mlp_step(batch, opt_name, activation, True)
        build = {"distnet": distnet_mlp_step, "torch": torch_mlp_step}[name]
        return lambda batch: build(batch, opt_name, activation)
    return CONTENDERS[workload][name]


def _build(spec: str) -> Any:
    workload, name, batch = spec.split(":")
    step = contender(workload, name)(int(batch))
    step()  # warm-up: first-touch allocations, BLAS thread start
    return step


def serve(spec: str) -> int:
    """Worker loop: build the step, then answer 'N' with the seconds N steps took; a line
    'build SPEC' builds another step (the grid reuses one process per contender)."""
    from distnet import backend  # noqa: PLC0415

    backend.tune_malloc()  # every contender gets the same allocator settings
    step = _build(spec)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.startswith("build "):
            step = None  # free the previous model first
            step = _build(line.split()[1])
            print("ready", flush=True)
            continue
        n = int(line)
        start = time.perf_counter()
        for _ in range(n):
            step()
        print(time.perf_counter() - start, flush=True)
    return 0
