"""Autoencoders (plain, denoising, sparse) and stacked autoencoders.

An ``AutoEncoder`` maps x (N, n_in) to a code h = f(x W + b) (N, n_hidden) and back to a
reconstruction x' = g(h W^T + c) (tied weights: one ``Parameter`` W, so the flat buffer holds
it once) or g(h V + c) (untied). Its objective follows the UFLDL notes the seed lectures cite:

    J = (1/N) sum_i L(x_i, x'_i) + beta * sum_j KL(rho || rho_hat_j)

with L = 1/2 ||x - x'||^2 (``loss="mse"``) or the summed binary cross-entropy
(``loss="cross_entropy"``, inputs in [0, 1]), and rho_hat the batch-mean activation of hidden
unit j. Denoising corrupts the input with masking noise in training mode only, and the
target stays the clean input.

``StackedAutoEncoder`` trains its autoencoders greedily, layer k on the codes of layers
1..k-1, then stacks the encoders under a softmax layer and fine-tunes the whole net. The
training loop lives in ``distnet.train`` and is reached through ``Module.fit`` (see
``distnet.nn.training``: nn never imports train); each layer's pretraining and the
fine-tuning are separate, resumable units.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from distnet import backend
from distnet.core import ops
from distnet.core.functional import binary_cross_entropy, linear, mse_loss
from distnet.core.tensor import Tensor, make_result, no_grad
from distnet.nn.layers import Dense, Sequential, as_input, get_activation
from distnet.nn.module import Module
from distnet.nn.parameter import Parameter, pin_layout

_LOSSES = ("mse", "cross_entropy")


def kl_sparsity(h: Tensor, target: float) -> Tensor:
    """sum_j KL(target || rho_hat_j), rho_hat = h.mean(axis=0), as one fused op.

    Shapes: h (N, H) with values in (0, 1) (sigmoid codes) -> scalar. rho_hat is clipped
    away from 0 and 1 so that a dead or saturated unit gives a large, finite penalty.
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"kl_sparsity: target must be in (0, 1), got {target}")
    xp = backend.array_module(h.data)
    n = h.shape[0]
    eps = float(np.finfo(h.dtype).eps)
    rho_hat = xp.clip(h.data.mean(axis=0), eps, 1.0 - eps)
    rho = target
    value = (rho * xp.log(rho / rho_hat) + (1 - rho) * xp.log((1 - rho) / (1 - rho_hat))).sum()

    def backward(g: Any) -> tuple[Any]:
        d = (-rho / rho_hat + (1 - rho) / (1 - rho_hat)) * (g / n)
        return (xp.broadcast_to(d, h.shape).copy(),)

    return make_result(xp.asarray(value, dtype=h.dtype), (h,), backward, "kl_sparsity")


class AutoEncoder(Module):
    """One-hidden-layer autoencoder; see the module docstring for the objective.

    Args:
        n_in, n_hidden: input and code widths.
        activation: hidden activation ('sigmoid', 'tanh', 'relu', ...).
        tied_weights: decoder uses the encoder's W^T (one shared parameter).
        corruption: fraction of inputs zeroed by masking noise while training (denoising).
        sparsity_target: rho, the desired mean activation of each hidden unit (sigmoid only).
        sparsity_weight: beta, the weight of the KL penalty.
        loss: 'mse' (1/2 squared error summed over features) or 'cross_entropy' (binary,
            summed over features; the decoder output is then a sigmoid, computed from logits).
        output_activation: decoder activation for 'mse' (default: ``activation``).
        init: weight initialiser name (see ``distnet.nn.init``).
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int,
        activation: str = "sigmoid",
        tied_weights: bool = True,
        corruption: float = 0.0,
        sparsity_target: float | None = None,
        sparsity_weight: float = 0.0,
        loss: str = "mse",
        output_activation: str | None = None,
        init: str = "glorot_uniform",
        dtype: Any = np.float32,
    ):
        super().__init__()
        if loss not in _LOSSES:
            raise ValueError(f"AutoEncoder: loss must be one of {_LOSSES}, got {loss!r}")
        if not 0.0 <= corruption < 1.0:
            raise ValueError(f"AutoEncoder: corruption must be in [0, 1), got {corruption}")
        if sparsity_target is not None and activation != "sigmoid":
            raise ValueError(
                "AutoEncoder: the KL sparsity penalty needs codes in (0, 1), i.e. "
                f"activation='sigmoid' (got {activation!r})"
            )
        self.n_in, self.n_hidden = n_in, n_hidden
        self.tied_weights = tied_weights
        self.corruption = float(corruption)
        self.sparsity_target = sparsity_target
        self.sparsity_weight = float(sparsity_weight)
        self.loss_name = loss
        self.activation_name = activation
        self.encoder = Dense(n_in, n_hidden, activation, init=init, dtype=dtype)
        if tied_weights:
            self.decoder_bias = Parameter(np.zeros(n_in, dtype=dtype))
        else:
            self.decoder = Dense(n_hidden, n_in, None, init=init, dtype=dtype)
        out = output_activation or activation
        self._output = get_activation(None if loss == "cross_entropy" else out)

    # -- the two halves ----------------------------------------------------------------
    def encode(self, x: Any) -> Tensor:
        """Codes (N, n_hidden) of inputs (N, n_in)."""
        return self.encoder(x)

    def decode_logits(self, h: Tensor) -> Tensor:
        """Pre-activation of the reconstruction, (N, n_hidden) -> (N, n_in)."""
        if self.tied_weights:
            return linear(h, self.encoder.weight, self.decoder_bias, transpose_weight=True)
        return self.decoder(h)

    def decode(self, h: Any) -> Tensor:
        """Reconstruction (N, n_in) of codes (N, n_hidden)."""
        h = as_input(h, self.encoder.weight.dtype)
        z = self.decode_logits(h)
        return ops.sigmoid(z) if self.loss_name == "cross_entropy" else self._output(z)

    def corrupt(self, x: Tensor) -> Tensor:
        """Masking noise: each element zeroed with probability ``corruption`` (training only)."""
        if not self.training or self.corruption == 0.0:
            return x
        keep = backend.random_like(x.shape, x.data) >= self.corruption
        return Tensor(x.data * keep)

    def forward(self, x: Any) -> Tensor:
        """Reconstruction (N, n_in) of x (N, n_in); corrupted first in training mode."""
        x = self._check(x)
        return self.decode(self.encode(self.corrupt(x)))

    def loss(self, x: Any) -> Tensor:
        """The training objective J (scalar) on a batch x (N, n_in): see the module doc."""
        x = self._check(x)
        h = self.encode(self.corrupt(x))
        z = self.decode_logits(h)
        n = x.shape[0]
        if self.loss_name == "cross_entropy":
            rec = binary_cross_entropy(z, x.data, from_logits=True, reduction="sum") * (1.0 / n)
        else:
            rec = mse_loss(self._output(z), x.data, reduction="sum") * (0.5 / n)
        if self.sparsity_target is not None and self.sparsity_weight:
            rec = rec + kl_sparsity(h, self.sparsity_target) * self.sparsity_weight
        return rec

    def _check(self, x: Any) -> Tensor:
        x = as_input(x, self.encoder.weight.dtype)
        if x.ndim != 2 or x.shape[1] != self.n_in:
            raise ValueError(f"AutoEncoder({self.n_in}, {self.n_hidden}): input {x.shape}")
        return x

    def extra_repr(self) -> str:
        extra = f", corruption={self.corruption}" if self.corruption else ""
        if self.sparsity_target is not None:
            extra += f", sparsity={self.sparsity_target}x{self.sparsity_weight}"
        return (
            f"{self.n_in}, {self.n_hidden}, activation={self.activation_name!r}, "
            f"tied={self.tied_weights}, loss={self.loss_name!r}{extra}"
        )


class EncodedLoader:
    """Wraps a batch loader so that it yields (codes, y): the input of a deeper layer.

    Delegates ``__len__``, ``set_epoch`` and ``state_dict`` to the wrapped loader.
    """

    def __init__(
        self,
        loader: Iterable[tuple[Any, Any]],
        encode: Callable[[Any], Any],
        keep_labels: bool = True,
    ):
        self.loader, self.encode, self.keep_labels = loader, encode, keep_labels

    def __iter__(self):
        for xb, yb in self.loader:
            yield self.encode(xb), (yb if self.keep_labels else None)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    @property
    def batch_share(self) -> float | None:
        """The wrapped loader's share of the global batch (None when it has none)."""
        return getattr(self.loader, "batch_share", None)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict() if hasattr(self.loader, "state_dict") else {}


def _per_layer(value: Any, n: int, name: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"StackedAutoEncoder: {name} has {len(value)} values for {n} layers")
        return list(value)
    return [value] * n


class StackedAutoEncoder(Module):
    """Autoencoders stacked into a deep classifier: greedy pretraining, then fine-tuning.

    Args:
        layer_sizes: [n_in, h1, h2, ...]; one autoencoder per consecutive pair.
        n_classes: width of the softmax layer put on top for fine-tuning.
        corruption, sparsity_target, sparsity_weight, loss: one value, or one per layer.
        Other keyword arguments go to every ``AutoEncoder``.

    ``forward(x)`` returns the classifier's raw scores (N, n_classes); train them with
    ``cross_entropy`` (the softmax is fused into the loss).
    """

    def __init__(
        self,
        layer_sizes: Sequence[int],
        n_classes: int,
        activation: str = "sigmoid",
        corruption: float | Sequence[float] = 0.0,
        sparsity_target: float | None | Sequence[float | None] = None,
        sparsity_weight: float | Sequence[float] = 0.0,
        loss: str | Sequence[str] = "mse",
        tied_weights: bool = True,
        dtype: Any = np.float32,
        **kwargs: Any,
    ):
        super().__init__()
        if len(layer_sizes) < 2:
            raise ValueError(f"StackedAutoEncoder: need [n_in, h1, ...], got {layer_sizes}")
        self.layer_sizes = [int(s) for s in layer_sizes]
        self.n_classes = n_classes
        n = len(self.layer_sizes) - 1
        corr = _per_layer(corruption, n, "corruption")
        rho = _per_layer(sparsity_target, n, "sparsity_target")
        beta = _per_layer(sparsity_weight, n, "sparsity_weight")
        losses = _per_layer(loss, n, "loss")
        for k in range(n):
            ae = AutoEncoder(
                self.layer_sizes[k], self.layer_sizes[k + 1], activation, tied_weights,
                corr[k], rho[k], beta[k], losses[k], dtype=dtype, **kwargs,
            )  # fmt: skip
            setattr(self, f"ae{k}", ae)
        self.output = Dense(self.layer_sizes[-1], n_classes, None, dtype=dtype)
        # not registered as a child: it holds the same parameters, which must appear once
        object.__setattr__(self, "_classifier", None)
        self._lay_out()

    def _lay_out(self) -> None:
        # One layout for every view: [ae0 | ae1 | ... | output], so each autoencoder
        # (pretraining) is a slice and the whole stack (fine-tuning) is the whole buffer.
        pin_layout(self.parameters(), f"StackedAutoEncoder{self.layer_sizes}")

    def to(self, device: str) -> StackedAutoEncoder:
        """Moves every parameter to ``device`` and lays the stack out there again."""
        super().to(device)
        self._lay_out()
        return self

    @property
    def autoencoders(self) -> list[AutoEncoder]:
        """The autoencoders, input side first."""
        return [getattr(self, f"ae{k}") for k in range(len(self.layer_sizes) - 1)]

    def classifier(self) -> Sequential:
        """The encoders stacked under the softmax layer (shares their parameters), for
        inference. To train it, train the stack itself (``finetune``, or an optimiser over
        this model): its forward is the classifier's, and its parameters are one buffer;
        an optimiser over the classifier's parameters alone is refused (they are not
        consecutive in the stack's layout)."""
        if self._classifier is None:
            layers = [ae.encoder for ae in self.autoencoders] + [self.output]
            object.__setattr__(self, "_classifier", Sequential(*layers))
        return self._classifier

    def forward(self, x: Any) -> Tensor:
        """Raw class scores (N, n_classes) of x (N, n_in)."""
        return self.classifier()(x)

    def encode(self, x: Any, depth: int | None = None) -> Any:
        """Codes of the first ``depth`` encoders (all by default), as an array, no graph."""
        depth = len(self.autoencoders) if depth is None else depth
        was_array = not isinstance(x, Tensor)
        with no_grad():
            h = as_input(x, self.output.weight.dtype)
            for ae in self.autoencoders[:depth]:
                h = ae.encoder(h)
        return h.data if was_array else h

    # -- training (the loop is distnet.train's, reached through nn/training.py) ----------
    def layer_input(self, k: int, data: Any) -> Any:
        """What layer k is pretrained on: codes of layers 0..k-1 of ``data`` (array or loader)."""
        if k == 0:
            return data
        if hasattr(data, "shape"):
            return self.encode(data, k)
        return EncodedLoader(data, lambda xb: self.encode(xb, k))

    def pretrain_layer(
        self, k: int, x: Any, epochs: int = 10, encoded: bool = False, **fit_kwargs: Any
    ) -> Any:
        """Trains autoencoder k on the codes of layers 0..k-1 (one resumable unit of work).

        Args:
            x: inputs (N, n_in) or a loader yielding (x, y) batches (y is ignored).
            encoded: ``x`` already holds the codes of layers 0..k-1 (N, h_k), e.g. from
                ``distnet.train.jobs.codes.CodesCache``: they are not computed again.
            epochs, **fit_kwargs: as for ``distnet.train.loop.fit`` (batch_size, optimizer,
                callbacks, initial_epoch, seed, ...).
        Returns:
            the ``History``; ``history["loss"]`` is the per-epoch mean objective.
        """
        ae = self.autoencoders[k]
        data = x if encoded else self.layer_input(k, x)
        if not hasattr(data, "shape"):  # a loader: pretraining is unsupervised, drop labels
            data = EncodedLoader(data, lambda xb: xb, keep_labels=False)
        return ae.fit(data, None, epochs=epochs, **fit_kwargs)

    def pretrain(self, x: Any, epochs_per_layer: int = 10, **fit_kwargs: Any) -> list[Any]:
        """Greedy layer-wise pretraining of every layer in turn; returns their histories.

        ``optimizer`` in ``fit_kwargs`` should be a factory or a name (each layer gets its own
        optimiser); an optimiser instance cannot serve several layers.
        """
        if hasattr(fit_kwargs.get("optimizer"), "step"):
            raise TypeError("pretrain: pass an optimizer factory (module -> Optimizer) or name")
        return [
            self.pretrain_layer(k, x, epochs_per_layer, **fit_kwargs)
            for k in range(len(self.autoencoders))
        ]

    def finetune(self, x: Any, y: Any = None, epochs: int = 10, **fit_kwargs: Any) -> Any:
        """Supervised training of the whole stack (encoders + softmax) with cross-entropy.

        The optimiser runs over the stack's one flat buffer (the decoders' parameters get
        zero gradients and stay put, unless weight decay is on), so the pretraining views
        and this one share memory and ``zero_grad`` on any of them moves nothing.

        Args:
            x, y: inputs (N, n_in) and int labels (N,), or a loader of (x, y) batches.
        """
        fit_kwargs.setdefault("loss", "cross_entropy")
        return self.fit(x, y, epochs=epochs, **fit_kwargs)
