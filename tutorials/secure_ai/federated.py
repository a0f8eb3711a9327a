"""Federated averaging (FedAvg) where every local update runs on a data owner's datasite, through syft.

The round trip, in syft 0.9.5 terms:

* each owner holds MNIST as two assets, ``images`` (uint8, N x 28 x 28) and ``labels``, with a small mock;
* the data scientist wraps a plain training function ``f(images, labels, weights) -> dict`` in a
  ``syft_function`` whose input policy pins the two assets and accepts any ``weights`` dict the data
  scientist owns, and whose output policy allows at most ``rounds`` runs; each owner approves it once;
* every round sends the global weights (a ``{name: array}`` dict, about 0.1 MB for our CNN) to each owner
  and gets a dict back; the data scientist averages the weights (:func:`secure_ai.training.fedavg`).

An approval pins the code, not its inputs: the data scientist picks the ``weights`` message anew on every
call. Approved training code therefore starts with :func:`checked_model`, the owner's bounds on that message
(minimum batch size, learning rate, model shape, finite weights).

Why it is fast: the assets stay on the datasite in their compact uint8 form, one call per owner per
round does a whole local epoch, the mock is small (syft also runs approved code on the mock), and
:mod:`secure_ai.syft_patches` removes syft's per-byte walk over data blobs.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np
from tqdm.auto import tqdm

from .data import mock_like
from .quiet import quiet
from .runtime import release_memory
from .training import CNN, MLP, evaluate, fedavg, get_weights, set_weights, vector_to_model
from .workers import DataOwner, RemoteError, _clean, call, sy

DATASET = "mnist"


def upload_mnist(owner: DataOwner, images: np.ndarray, labels: np.ndarray, mock_size: int = 64,
                 seed: int = 0):
    """Owner side: keep ``images`` (uint8, N x 28 x 28) and ``labels`` private, with a noise mock."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"images must be uint8 of shape (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
    if len(images) == 0:
        raise ValueError(f"{owner.name} would hold no samples: empty partition")
    mock_images, mock_labels = mock_like(images, labels, n=mock_size, seed=seed)
    return owner.upload_dataset(
        DATASET,
        private={"images": np.ascontiguousarray(images), "labels": labels.astype(np.int64)},
        mock={"images": mock_images, "labels": mock_labels.astype(np.int64)},
        description=f"handwritten digits held by {owner.name}",  # no count: the exact n is private (Part 3)
    )


def request_training(client, train_function: Callable, rounds: int,
                     extra_assets: Mapping[str, object] | None = None):
    """Data-scientist side: ask one datasite to run ``train_function`` for at most ``rounds`` rounds.

    ``train_function(images, labels, weights)`` runs on the owner's side and must return a dict (the
    new weights and metrics). ``extra_assets`` maps further argument names to other assets of the same
    datasite (say ``{"secret_key": asset}``); the function then takes those arguments too.
    Returns the submitted syft function.
    """
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    if DATASET not in [d.name for d in client.datasets]:
        raise ValueError(f"{client.name} has no dataset {DATASET!r}: upload it with upload_mnist first")
    inputs = _asset_kwargs(client, extra_assets)
    from syft.service.policy.policy import OutputPolicyExecuteCount

    with quiet():
        function = sy.syft_function(
            input_policy=sy.MixedInputPolicy(client=client, **inputs, weights=dict),
            output_policy=OutputPolicyExecuteCount(limit=rounds),
        )(train_function)
        result = client.code.request_code_execution(function)
    if isinstance(result, sy.SyftError):
        raise RemoteError(_clean(result.message))
    return function


def _asset_kwargs(client, extra_assets: Mapping[str, object] | None) -> dict:
    """The asset arguments of a training function: ``images``, ``labels`` and any ``extra_assets``."""
    assets = client.datasets[DATASET].assets
    inputs = {"images": assets["images"], "labels": assets["labels"]}
    clash = set(extra_assets or ()) & {"images", "labels", "weights"}
    if clash:
        raise ValueError(f"extra_assets cannot be named {sorted(clash)}: those arguments are taken")
    from syft.service.dataset.dataset import Asset  # what a client lists (sy.Asset is the upload form)

    for name, asset in (extra_assets or {}).items():
        if not isinstance(asset, Asset) or asset.server_uid != client.id:
            where = getattr(asset, "server_uid", None)
            raise ValueError(
                f"extra_assets[{name!r}] must be an asset of {client.name}'s datasite, got "
                f"{type(asset).__name__}" + (f" of datasite {where.short()}" if where is not None else "")
            )
    return inputs | dict(extra_assets or {})


def checked_model(message: Mapping, *, min_batch_size: int, max_lr: float, max_momentum: float = 0.99,
                  max_channels: int = 32, extra_ints: tuple[str, ...] = ()):
    """Owner side, first thing in approved training code: the data scientist's message, within bounds.

    The message is ``{"model": "cnn" | "mlp", "channels": [c1, c2] (cnn only), "vector": weights, "lr",
    "momentum", "batch_size", "seed"}`` plus the integer keys named in ``extra_ints``. Refused with a
    ``ValueError``: unknown or missing keys, ``batch_size < min_batch_size``, ``lr`` outside
    ``(0, max_lr]``, ``momentum`` outside ``[0, max_momentum]``, channels outside ``1..max_channels``, and a
    ``vector`` that is not a finite float32 vector of exactly the model's size.
    Returns ``(model with the vector loaded, the checked message)``.
    """
    if not isinstance(message, Mapping):
        raise ValueError(f"the message must be a dict, got {type(message).__name__}")
    required = {"model", "vector", "lr", "momentum", "batch_size", "seed", *extra_ints}
    allowed = required | {"channels"}
    if set(message) - allowed or required - set(message):
        raise ValueError(f"message keys must be {sorted(required)} (and 'channels' for a cnn), got "
                         f"{sorted(message)}")

    def integer(key, low):
        value = message[key]
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
        return int(value)

    def number(key, low, high, low_open):
        value = message[key]
        if isinstance(value, bool) or not isinstance(value, int | float | np.floating) or not (
            (low < value if low_open else low <= value) and value <= high
        ):
            interval = f"{'(' if low_open else '['}{low}, {high}]"
            raise ValueError(f"{key} must be a number in {interval}, got {value!r}")
        return float(value)

    checked = {"model": message["model"], "batch_size": integer("batch_size", min_batch_size),
               "seed": integer("seed", 0), "lr": number("lr", 0, max_lr, True),
               "momentum": number("momentum", 0, max_momentum, False)}
    checked |= {key: integer(key, 0) for key in extra_ints}
    if checked["model"] == "cnn":
        channels = message.get("channels")
        if (not isinstance(channels, list | tuple) or len(channels) != 2
                or not all(isinstance(c, int) and 1 <= c <= max_channels for c in channels)):
            raise ValueError(f"channels must be two integers in 1..{max_channels}, got {channels!r}")
        checked["channels"] = list(channels)
        model = CNN(channels=tuple(channels))
    elif checked["model"] == "mlp" and "channels" not in message:
        model = MLP()
    else:
        raise ValueError(f"model must be 'cnn' (with channels) or 'mlp', got {checked['model']!r}")
    vector = message["vector"]
    size = sum(p.numel() for p in model.parameters())
    if not (isinstance(vector, np.ndarray) and vector.dtype == np.float32 and vector.shape == (size,)):
        raise ValueError(f"vector must be float32 of shape ({size},) for this {checked['model']}, got "
                         f"{getattr(vector, 'dtype', type(vector).__name__)} {getattr(vector, 'shape', '')}")
    if not np.isfinite(vector).all():
        raise ValueError("vector holds NaN or infinite weights")
    return vector_to_model(vector, model), checked


def train_remotely(client, function_name: str, weights: Mapping[str, np.ndarray],
                   extra_assets: Mapping[str, object] | None = None) -> dict:
    """One local update on one datasite: send ``weights``, run the approved function, get its dict back.

    Pass the same ``extra_assets`` as to :func:`request_training`.
    """
    remote = getattr(client.code, function_name, None)
    if remote is None:
        raise ValueError(f"{client.name} has no function {function_name!r}; request it with request_training")
    return call(remote, **_asset_kwargs(client, extra_assets), weights=dict(weights))


def fedavg_round(clients: Mapping[str, object], function_name: str, weights: Mapping[str, np.ndarray]):
    """One FedAvg round: every owner trains from ``weights``.

    Returns ``(averaged weights, {owner: the dict its function returned})``.
    """
    if not clients:
        raise ValueError("fedavg_round needs at least one data owner")
    results = {name: train_remotely(client, function_name, weights) for name, client in clients.items()}
    for name, result in results.items():
        if not isinstance(result, Mapping) or "weights" not in result or "n_samples" not in result:
            raise ValueError(f"{name}'s function must return a dict with 'weights' and 'n_samples'")
    averaged = fedavg([r["weights"] for r in results.values()], [r["n_samples"] for r in results.values()])
    return averaged, results


def run_rounds(model, rounds: int, step: Callable, test, desc: str = "FedAvg rounds",
               progress: bool = True) -> tuple[list[float], list[float]]:
    """The round loop every chapter shares: ``step(model, r)`` runs round ``r``, then ``model`` is tested.

    ``step`` sends the global weights out, aggregates what comes back by any method (plain, DP, masked,
    encrypted) and loads the result into ``model``; a dict it returns is shown on the progress bar.
    Returns ``(test accuracy after each round, seconds each step took)``.
    """
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    history, seconds = [], []
    bar = tqdm(range(rounds), desc=desc, disable=not progress)
    for r in bar:
        tic = time.perf_counter()
        shown = step(model, r)
        seconds.append(time.perf_counter() - tic)
        release_memory()  # what syft's serialization freed this round
        history.append(evaluate(model, *test)[0])
        bar.set_postfix(test_acc=f"{history[-1]:.4f}", **(shown if isinstance(shown, Mapping) else {}))
    return history, seconds


def run_fedavg(model, clients: Mapping[str, object], function_name: str, rounds: int, test,
               progress: bool = True) -> list[float]:
    """``rounds`` rounds of FedAvg starting from ``model``'s weights; returns test accuracy per round.

    ``model`` ends up holding the final global weights.
    """

    def step(model, r):
        averaged, _ = fedavg_round(clients, function_name, get_weights(model))
        set_weights(model, averaged)

    return run_rounds(model, rounds, step, test, progress=progress)[0]
