"""A convolutional network from a short layer list (``[model] type = "cnn"`` in a job file).

Each entry is one layer, a name and then numbers and ``key=value`` options::

    layers = ["conv 16 5 pad=2", "relu", "maxpool 2",
              "conv 32 5", "relu", "maxpool 2",
              "dense 128", "relu"]

| entry | layer |
|---|---|
| ``conv OUT K [stride=S] [pad=P] [dilation=D]`` | ``Conv2d(in, OUT, K, ...)`` |
| ``maxpool K [stride=S] [pad=P]``, ``avgpool K ...`` | ``MaxPool2d`` / ``AvgPool2d`` |
| ``dense OUT`` | ``Dense(in, OUT)`` (a ``Flatten`` goes in first when the input is a map) |
| ``relu``, ``tanh``, ``sigmoid``, ``leaky_relu`` | activation (fused into a conv/dense before it) |
| ``dropout P`` | ``Dropout(P)`` |
| ``flatten`` | ``Flatten()`` (optional: implied before the first dense layer) |

The output layer (``dense n_classes``, raw scores for softmax cross-entropy) is appended.
"""

from __future__ import annotations

from typing import Any

from distnet.suggest import did_you_mean

ACTIVATIONS = ("relu", "tanh", "sigmoid", "leaky_relu")
_ARITY = {"conv": 2, "maxpool": 1, "avgpool": 1, "dense": 1, "dropout": 1, "flatten": 0}
_OPTIONS = {"conv": {"stride", "pad", "dilation"}, "maxpool": {"stride", "pad"},
            "avgpool": {"stride", "pad"}}  # fmt: skip


class LayerSpecError(ValueError):
    """A layer entry that cannot be read (names the entry and what is wrong)."""


def parse_layer(text: str) -> dict[str, Any]:
    """One entry -> {"kind", "args": [numbers], "options": {key: int}}."""
    words = str(text).split()
    if not words:
        raise LayerSpecError(f"layer {text!r}: empty")
    kind, rest = words[0].lower(), words[1:]
    if kind in ACTIVATIONS:
        if rest:
            raise LayerSpecError(f"layer {text!r}: an activation takes no arguments")
        return {"kind": kind, "args": [], "options": {}}
    if kind not in _ARITY:
        known = sorted([*_ARITY, *ACTIVATIONS])
        raise LayerSpecError(
            f"layer {text!r}: unknown layer {kind!r}{did_you_mean(kind, known)}; known: {known}"
        )
    args = [w for w in rest if "=" not in w]
    options: dict[str, int] = {}
    for word in (w for w in rest if "=" in w):
        key, _, value = word.partition("=")
        if key not in _OPTIONS.get(kind, set()):
            allowed = sorted(_OPTIONS.get(kind, set())) or "none"
            raise LayerSpecError(f"layer {text!r}: unknown option {key!r} (options: {allowed})")
        options[key] = _number(text, value, int, minimum=0 if key == "pad" else 1)
    if len(args) != _ARITY[kind]:
        raise LayerSpecError(f"layer {text!r}: {kind} takes {_ARITY[kind]} number(s), "
                             f"got {len(args)}")  # fmt: skip
    if kind == "dropout":
        p = _number(text, args[0], float, minimum=0.0)
        if p >= 1.0:
            raise LayerSpecError(f"layer {text!r}: dropout probability must be in [0, 1)")
        return {"kind": kind, "args": [p], "options": {}}
    return {"kind": kind, "args": [_number(text, a, int, 1) for a in args], "options": options}


def _number(text: str, value: str, kind: type, minimum: float) -> Any:
    try:
        number = kind(value)
    except ValueError:
        raise LayerSpecError(f"layer {text!r}: {value!r} is not a number") from None
    if number < minimum:
        raise LayerSpecError(f"layer {text!r}: {value!r} must be >= {minimum}")
    return number


def build_cnn(
    layers: list[str], input_shape: tuple[int, int, int], n_classes: int, dtype: Any = "float32"
) -> Any:
    """A ``Sequential`` from the layer list, for inputs (N, C, H, W) with
    ``input_shape = (C, H, W)``; LayerSpecError names an entry that does not fit."""
    from distnet import nn  # noqa: PLC0415
    from distnet.nn.conv import output_shape  # noqa: PLC0415

    specs = [parse_layer(text) for text in layers]
    modules: list[Any] = []
    i = 0
    while i < len(specs):
        text, spec = layers[i], specs[i]
        kind, args, opts = spec["kind"], spec["args"], spec["options"]
        # an activation right after a conv or dense layer is fused into it (in place)
        following = specs[i + 1]["kind"] if i + 1 < len(specs) else None
        fused = following if kind in ("conv", "dense") and following in ACTIVATIONS else None
        shape = output_shape(modules, input_shape)
        if kind in ("conv", "maxpool", "avgpool") and len(shape) != 3:
            raise LayerSpecError(f"layer {text!r}: needs feature maps, its input is flat {shape}")
        if kind in ACTIVATIONS:
            modules.append(_activation(kind))
        elif kind == "conv":
            modules.append(nn.Conv2d(shape[0], args[0], args[1], stride=opts.get("stride", 1),
                                     padding=opts.get("pad", 0),
                                     dilation=opts.get("dilation", 1), activation=fused,
                                     dtype=dtype))  # fmt: skip
        elif kind in ("maxpool", "avgpool"):
            pool = nn.MaxPool2d if kind == "maxpool" else nn.AvgPool2d
            modules.append(pool(args[0], opts.get("stride"), opts.get("pad", 0)))
        elif kind == "flatten":
            modules.append(nn.Flatten())
        elif kind == "dropout":
            modules.append(nn.Dropout(args[0]))
        else:  # dense
            if len(shape) != 1:
                modules.append(nn.Flatten())
            width = output_shape(modules, input_shape)[0]
            modules.append(nn.Dense(width, args[0], activation=fused, dtype=dtype))
        try:
            sizes = output_shape(modules, input_shape)
        except ValueError as e:
            raise LayerSpecError(f"layer {text!r}: {e}") from None
        if min(sizes) < 1:
            raise LayerSpecError(
                f"layer {text!r}: its input {shape} is too small for it (output {sizes})"
            )
        i += 2 if fused else 1
    if len(output_shape(modules, input_shape)) != 1:
        modules.append(nn.Flatten())
    modules.append(nn.Dense(output_shape(modules, input_shape)[0], n_classes, dtype=dtype))
    return nn.Sequential(*modules)


def _activation(name: str) -> Any:
    from distnet import nn  # noqa: PLC0415

    return {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
            "leaky_relu": nn.LeakyReLU}[name]()  # fmt: skip


def flat_samples_error(n_in: int) -> str:
    """Why a cnn cannot train on a store of flat samples of ``n_in`` features, and the way out
    (for a square ``n_in``, the image shape to write the store with)."""
    side = round(n_in**0.5)
    hint = (f"; write the store with samples of shape ({side}, {side}), e.g. "
            f"x.reshape(N, {side}, {side}) before `distnet data convert npy`"
            if side * side == n_in else "")  # fmt: skip
    return (f"[model] type = 'cnn' needs image samples, (H, W) or (C, H, W) each; the store's "
            f"samples are flat vectors of {n_in} features{hint}")  # fmt: skip
