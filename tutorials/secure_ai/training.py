"""Models, local training and evaluation loops, FedAvg, model <-> flat-vector helpers (pure torch).

Also the owner's bounds on a training message (:func:`checked_model`) and its digest (:func:`message_digest`):
approved training code runs on a datasite and imports them from here, a module that imports no syft.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import normalize
from .runtime import release_memory


def set_seed(seed: int = 0) -> None:
    """Seed Python, NumPy and PyTorch so that a notebook re-run gives the same numbers."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class MLP(nn.Module):
    """The original series' model: 784 -> 500 -> ReLU -> 10."""

    def __init__(self, hidden: int = 500):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """A small convolutional net that reaches ~99% on MNIST in a few epochs on a CPU.

    28,938 weights with the default channels (16, 32); 11,274 with Part 2's (8, 16).

    ``activation`` may be swapped (e.g. ``nn.Tanh`` for differential privacy); there is no BatchNorm, so
    the model works with Opacus as it is.
    """

    def __init__(self, channels: tuple[int, int] = (16, 32), activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        c1, c2 = channels
        self.net = nn.Sequential(
            nn.Conv2d(1, c1, 5, padding=2), activation(), nn.MaxPool2d(2),   # 16 x 14 x 14
            nn.Conv2d(c1, c2, 5, padding=2), activation(), nn.MaxPool2d(2),  # 32 x 7 x 7
            nn.Flatten(), nn.Linear(c2 * 7 * 7, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _is_raw(images: torch.Tensor) -> bool:
    return images.dtype == torch.uint8 and images.ndim == 3 and tuple(images.shape[1:]) == (28, 28)


def check_data(images: torch.Tensor, labels: torch.Tensor) -> None:
    """``ValueError`` unless images (normalized (N, 1, 28, 28) or raw uint8 (N, 28, 28)) fit their labels."""
    if not _is_raw(images) and (images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28)):
        raise ValueError(
            f"images must be normalized, of shape (N, 1, 28, 28), or raw uint8 digits of shape (N, 28, 28); "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"labels must have shape ({len(images)},) to match the images, got {tuple(labels.shape)}"
        )
    if len(images) == 0:
        raise ValueError("no samples: the dataset is empty")


def _order(n: int, shuffle: bool, seed: int | None) -> torch.Tensor:
    """The order an epoch visits ``n`` samples: a permutation (seeded when ``seed`` is given), or 0..n-1."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed) if seed is not None else None)


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def batches(images, labels, batch_size: int = 64, shuffle: bool = True, seed: int | None = None,
            drop_last: bool = False):
    """Yield ``(x, y)`` mini-batches from tensors already in memory (much faster than a DataLoader).

    ``drop_last`` keeps full batches only: the last ``len(images) % batch_size`` samples of the order are
    left out (what approved training code uses, so that no step trains on fewer than ``batch_size``), and
    fewer samples than one batch give no batch at all.
    Raw uint8 digits (N, 28, 28) are normalized batch by batch: a quarter of the memory of float images.
    """
    check_data(images, labels)
    _check_batch_size(batch_size)
    n, raw = len(images), _is_raw(images)
    order = _order(n, shuffle, seed)
    end = n // batch_size * batch_size if drop_last else n
    for start in range(0, end, batch_size):
        idx = order[start : start + batch_size]
        yield (normalize(images[idx]) if raw else images[idx]), labels[idx]


def epoch_indices(n: int, batch_size: int, seed: int) -> np.ndarray:
    """The samples a full-batch epoch (``train_epoch(..., seed=seed, drop_last=True)``) trains on, in the
    order it visits them: a seeded permutation of ``n`` without its last ``n % batch_size`` (none at all
    when ``n < batch_size``)."""
    _check_batch_size(batch_size)
    return _order(n, True, seed)[: n // batch_size * batch_size].numpy()


def batch_indices(n: int, batch_size: int, batch: int, seed: int) -> np.ndarray:
    """The samples of batch number ``batch`` of a seeded permutation of ``n``: always ``batch_size`` of them.

    A batch that would run past the end (a short tail, or a wrap-around to the start) is refused with a
    ``ValueError``: approved code that takes one step on the data scientist's ``batch`` never trains on fewer
    samples than the bound it checked. syft runs approved code on the owner's mock too, after the private
    data, and fails the call when that run raises: through syft, a batch must also fit in the mock.
    """
    _check_batch_size(batch_size)
    if isinstance(batch, bool) or not isinstance(batch, int | np.integer) or not 0 <= batch < n // batch_size:
        raise ValueError(f"batch {batch!r} of {batch_size} samples is not a full batch of the data "
                         f"({n // batch_size} full batches): no tail, no wrap-around")
    return _order(n, True, seed)[batch * batch_size:(batch + 1) * batch_size].numpy()


def train_epoch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    batch_size: int = 64,
    seed: int | None = None,
    progress: bool = True,
    desc: str = "train",
    drop_last: bool = False,
) -> float:
    """One pass over ``(images, labels)`` in shuffled mini-batches; returns the mean training loss.

    ``drop_last=True`` trains on full batches only (:func:`epoch_indices` are the samples it uses): approved
    code passes it, so that every step averages at least the ``batch_size`` the owner's bounds checked.
    With fewer samples than one batch there is no step at all, and the loss is NaN. (syft runs approved
    code on the small mock too, after the private data: that run must not fail.)
    """
    check_data(images, labels)
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    total, count = 0.0, 0
    n_batches = len(images) // batch_size if drop_last else -(-len(images) // batch_size)
    for x, y in tqdm(batches(images, labels, batch_size, True, seed, drop_last), total=n_batches, desc=desc,
                     disable=not progress, leave=False, mininterval=0.5):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(y)
        count += len(y)
    release_memory()
    return total / count if count else float("nan")


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500):
    """Return ``(accuracy, mean loss)`` of ``model`` on ``(images, labels)``; accuracy is in [0, 1]."""
    check_data(images, labels)
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    correct, loss = 0, 0.0
    for x, y in batches(images, labels, batch_size, shuffle=False):
        out = model(x)
        loss += loss_fn(out, y).item()
        correct += (out.argmax(1) == y).sum().item()
    return correct / len(labels), loss / len(labels)


def fit(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    epochs: int,
    optimizer: torch.optim.Optimizer,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Centralized training: ``epochs`` passes over ``train``; returns test accuracy after each epoch."""
    history = []
    bar = tqdm(range(epochs), desc="epochs", disable=not progress)
    for epoch in bar:
        train_epoch(model, *train, optimizer, batch_size, seed=seed + epoch, progress=progress)
        history.append(evaluate(model, *test)[0])
        bar.set_postfix(test_acc=f"{history[-1]:.4f}")
    return history


def model_to_vector(model: nn.Module) -> torch.Tensor:
    """All of ``model``'s parameters as one flat float32 vector (a copy)."""
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def vector_to_model(vector, model: nn.Module) -> nn.Module:
    """Load a flat vector (from :func:`model_to_vector`) into ``model``'s parameters, in place."""
    vector = torch.as_tensor(np.asarray(vector) if not isinstance(vector, torch.Tensor) else vector)
    expected = sum(p.numel() for p in model.parameters())
    if vector.ndim != 1 or vector.numel() != expected:
        raise ValueError(
            f"{type(model).__name__} has {expected} parameters but the vector has shape {tuple(vector.shape)}"
        )
    offset = 0
    with torch.no_grad():  # copy_, not torch's vector_to_parameters, which makes parameters views of `vector`
        for p in model.parameters():
            p.copy_(vector[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    return model


def get_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state as ``{name: NumPy array}``: the form weights take to and from a datasite."""
    return {name: tensor.detach().cpu().numpy().copy() for name, tensor in model.state_dict().items()}


def set_weights(model: nn.Module, weights: Mapping[str, np.ndarray]) -> nn.Module:
    """Load ``{name: array}`` (from :func:`get_weights`) into ``model``, in place; checks names and shapes."""
    state = model.state_dict()
    if set(weights) != set(state):
        raise ValueError(
            f"weights do not fit {type(model).__name__}: missing {sorted(set(state) - set(weights))}, "
            f"unexpected {sorted(set(weights) - set(state))}"
        )
    for name, value in weights.items():
        if tuple(np.shape(value)) != tuple(state[name].shape):
            raise ValueError(
                f"weight {name!r} has shape {tuple(np.shape(value))}, "
                f"{type(model).__name__} needs {tuple(state[name].shape)}"
            )
    model.load_state_dict({name: torch.as_tensor(np.asarray(v)) for name, v in weights.items()})
    return model


def fedavg(updates: Sequence, weights: Sequence[float] | None = None):
    """Federated averaging: the average of the owners' updates, weighted by their sample counts.

    Each update is a flat vector (tensor or array) or a ``{name: array}`` dict from :func:`get_weights`;
    the result has the same form.
    """
    if len(updates) == 0:
        raise ValueError("fedavg needs at least one update")
    if all(isinstance(u, Mapping) for u in updates):
        names = set(updates[0])
        if any(set(u) != names for u in updates):
            raise ValueError("all updates must have the same weight names")
        return {
            name: fedavg([u[name] for u in updates], weights).reshape(np.shape(updates[0][name])).numpy()
            for name in updates[0]
        }
    vectors = [torch.as_tensor(np.asarray(u) if not isinstance(u, torch.Tensor) else u) for u in updates]
    shapes = {tuple(v.shape) for v in vectors}
    if len(shapes) != 1:
        raise ValueError(f"all updates must have the same shape, got {sorted(shapes)}")
    if weights is None:
        weights = [1.0] * len(vectors)
    if len(weights) != len(vectors):
        raise ValueError(f"{len(vectors)} updates but {len(weights)} weights")
    w = torch.as_tensor(weights, dtype=torch.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative and not all zero, got {list(weights)}")
    stacked = torch.stack([v.to(torch.float64) for v in vectors])
    return ((w / w.sum()) @ stacked.reshape(len(vectors), -1)).reshape(stacked.shape[1:]).to(torch.float32)


# --- the owner's bounds on a training message (runs on the datasite, first thing in approved code) ----------
# The largest batch approved code trains on in one step, unless the owner sets another. It bounds the work
# and memory of one step on the owner's machine (the MLP at 256 digits: 1.3 MB of inputs and activations)
# and keeps an epoch several steps long: a batch of 1e9 made one step on all of an owner's data. It is no
# defence against a crafted model: imprint weights still rebuild digits of a batch of 256 exactly
# (benchmarks/malicious_model.py, section B). Part 2's recipes use 64; DP-SGD computes in slices of 256 too.
MAX_BATCH_SIZE = 256


def checked_model(message: Mapping, *, min_batch_size: int, max_lr: float, max_momentum: float = 0.99,
                  max_channels: int = 32, extra_ints: tuple[str, ...] = (),
                  max_batch_size: int = MAX_BATCH_SIZE, max_hidden: int = 500):
    """Owner side, first thing in approved training code: the data scientist's message, within bounds.

    The message is ``{"model": "cnn" | "mlp", "channels": [c1, c2] (cnn only), "hidden": units (mlp only,
    optional: 500 when absent), "vector": weights, "lr", "momentum", "batch_size", "seed"}`` plus the integer
    keys named in ``extra_ints``. Refused with a ``ValueError``: unknown or missing keys, ``batch_size``
    outside ``[min_batch_size, max_batch_size]``, ``lr`` outside ``(0, max_lr]``, ``momentum`` outside
    ``[0, max_momentum]``, channels outside ``1..max_channels``, hidden units outside ``1..max_hidden``, and
    a ``vector`` that is not a finite float32 vector of exactly the model's size.
    Returns ``(model with the vector loaded, the checked message)``.

    The batch bounds hold only if the training code then takes full batches: :func:`train_epoch` with
    ``drop_last=True``, or one step on :func:`batch_indices`.
    """
    if not 1 <= min_batch_size <= max_batch_size:
        raise ValueError(f"need 1 <= min_batch_size <= max_batch_size, got {min_batch_size} and "
                         f"{max_batch_size}")
    if not isinstance(message, Mapping):
        raise ValueError(f"the message must be a dict, got {type(message).__name__}")
    required = {"model", "vector", "lr", "momentum", "batch_size", "seed", *extra_ints}
    allowed = required | {"channels", "hidden"}
    if set(message) - allowed or required - set(message):
        raise ValueError(f"message keys must be {sorted(required)} (and 'channels' for a cnn, 'hidden' for "
                         f"an mlp), got {sorted(message)}")

    def integer(key, low, high=None):
        value = message[key]
        if (isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low
                or (high is not None and value > high)):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ValueError(f"{key} must be an integer {bounds}, got {value!r}")
        return int(value)

    def number(key, low, high, low_open):
        value = message[key]
        if isinstance(value, bool) or not isinstance(value, int | float | np.floating) or not (
            (low < value if low_open else low <= value) and value <= high
        ):
            interval = f"{'(' if low_open else '['}{low}, {high}]"
            raise ValueError(f"{key} must be a number in {interval}, got {value!r}")
        return float(value)

    checked = {"model": message["model"], "batch_size": integer("batch_size", min_batch_size, max_batch_size),
               "seed": integer("seed", 0), "lr": number("lr", 0, max_lr, True),
               "momentum": number("momentum", 0, max_momentum, False)}
    checked |= {key: integer(key, 0) for key in extra_ints}
    if checked["model"] == "cnn" and "hidden" not in message:
        channels = message.get("channels")
        if (not isinstance(channels, list | tuple) or len(channels) != 2
                or not all(isinstance(c, int) and 1 <= c <= max_channels for c in channels)):
            raise ValueError(f"channels must be two integers in 1..{max_channels}, got {channels!r}")
        checked["channels"] = list(channels)
        model = CNN(channels=tuple(channels))
    elif checked["model"] == "mlp" and "channels" not in message:
        if "hidden" in message:
            checked["hidden"] = integer("hidden", 1, max_hidden)
        model = MLP(hidden=checked.get("hidden", 500))
    else:
        raise ValueError(f"model must be 'cnn' (with channels) or 'mlp' (with or without hidden), got "
                         f"{checked['model']!r} with {sorted(set(message) & {'channels', 'hidden'})}")
    vector = message["vector"]
    size = sum(p.numel() for p in model.parameters())
    if not (isinstance(vector, np.ndarray) and vector.dtype == np.float32 and vector.shape == (size,)):
        raise ValueError(f"vector must be float32 of shape ({size},) for this {checked['model']}, got "
                         f"{getattr(vector, 'dtype', type(vector).__name__)} {getattr(vector, 'shape', '')}")
    if not np.isfinite(vector).all():
        raise ValueError("vector holds NaN or infinite weights")
    return vector_to_model(vector, model), checked


def message_digest(message: Mapping) -> str:
    """SHA-256 of a training message, all of it: the global model, its recipe (seed, ...) and the round.

    Arrays count with their dtype and shape, numbers with their type: two messages have the same digest only
    if an owner trains the same way from both.
    """
    digest = hashlib.sha256()

    def feed(value) -> None:
        value = value.detach().cpu().numpy() if hasattr(value, "detach") else value
        if isinstance(value, Mapping):
            if not all(isinstance(key, str) for key in value):
                raise TypeError("the keys of a training message must be strings")
            digest.update(b"{%d" % len(value))
            for key in sorted(value):
                feed(key)
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(b"[%d" % len(value))
            for item in value:
                feed(item)
        elif isinstance(value, (np.ndarray, np.generic)) and not np.asarray(value).dtype.hasobject:
            array = np.ascontiguousarray(value)
            header = f"{array.dtype.str}{array.shape}".encode()
            digest.update(b"a%d:" % len(header) + header + array.tobytes())
        elif isinstance(value, (bytes, bytearray)):
            digest.update(b"b%d:" % len(value) + bytes(value))
        elif value is None or isinstance(value, (bool, int, float, str)):
            text = f"{type(value).__name__}:{value!r}".encode()
            digest.update(b"s%d:" % len(text) + text)
        else:
            raise TypeError(f"a training message cannot hold a {type(value).__name__}")

    feed(message)
    return digest.hexdigest()
