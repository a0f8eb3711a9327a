"""Part 2's workflow: federated averaging (FedAvg) whose local updates run on the owners' datasites.

The round trip, in syft 0.9.5 terms:

* each owner holds MNIST as two assets, ``images`` (uint8, N x 28 x 28) and ``labels``, with a small mock;
* the data scientist wraps a plain training function ``f(images, labels, weights) -> dict`` in a
  ``syft_function`` whose input policy pins the two assets and accepts any ``weights`` dict the data
  scientist owns, and whose output policy allows at most ``rounds`` runs; each owner approves it once;
* every round sends the global weights as one flat float32 ``vector`` plus the recipe (about 45 KB for
  Part 2's CNN) to each owner and gets a dict back: the new weights, the sample count and the training loss;
  the data scientist averages the weights (:func:`secure_ai.training.fedavg`).

An approval pins the code, not its inputs: the data scientist picks the ``weights`` message anew on every
call. Approved training code therefore starts with :func:`secure_ai.training.checked_model`, the owner's
bounds on that message (batch size between a minimum and a maximum, learning rate, model shape, finite
weights), and trains on full batches only (``train_epoch(..., drop_last=True)``, or one step on
:func:`secure_ai.training.batch_indices`), so that no step averages fewer digits than the bound. The request
and the call go through :mod:`secure_ai.remote`; this module chooses the assets they bind.

Why it is fast: the assets stay on the datasite in their compact uint8 form, one call per owner per
round does a whole local epoch, the mock is small (syft also runs approved code on the mock), and
:mod:`secure_ai.syft_patches` removes syft's per-byte walk over data blobs.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np
from tqdm.auto import tqdm

from . import remote
from .data import mock_like
from .datasites import DataOwner
from .runtime import release_memory
from .training import evaluate, fedavg, get_weights, set_weights

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
        description=f"handwritten digits held by {owner.name}",  # no count (Part 3 publishes a noisy one)
    )


def request_training(client, train_function: Callable, rounds: int,
                     extra_assets: Mapping[str, object] | None = None):
    """Data-scientist side: ask one datasite to run ``train_function`` for at most ``rounds`` rounds.

    ``train_function(images, labels, weights)`` runs on the owner's side and must return a dict (the
    new weights and metrics). ``extra_assets`` maps further argument names to other assets of the same
    datasite (say ``{"secret_key": asset}``); the function then takes those arguments too.
    Returns the submitted syft function.
    """
    remote.check_rounds(rounds)
    if DATASET not in [d.name for d in client.datasets]:
        raise ValueError(f"{client.name} has no dataset {DATASET!r}: upload it with upload_mnist first")
    return remote.request(client, train_function, rounds, training_assets(client, extra_assets))


def request_and_approve(train_function: Callable, clients: Mapping[str, object],
                        owners: Mapping[str, DataOwner], rounds: int, show: bool = True):
    """Both sides in one call, for the chapters after Part 2 (which writes each step out once).

    The data scientist requests ``train_function`` for at most ``rounds`` runs on every owner's datasite
    (:func:`request_training`); each owner reviews its pending request (:meth:`DataOwner.code_of`) and
    approves exactly the reviewed code, whose digest must be the same on every datasite. The first review is
    printed (``show``) so that the reader sees what the owners approve. Returns that review.
    """
    if set(clients) != set(owners) or not clients:
        raise ValueError(f"need the same owners on both sides, got clients {sorted(clients)} and owners "
                         f"{sorted(owners)}")
    for client in clients.values():
        request_training(client, train_function, rounds)
    name = train_function.__name__
    first = None
    for owner_name in clients:  # each owner reviews its own pending request, then approves that code
        review = owners[owner_name].code_of(name)
        first = first or review
        owners[owner_name].approve(name, digest=first.digest)
    if show:
        print(first)
    return first


def training_assets(client, extra_assets: Mapping[str, object] | None = None) -> dict:
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


def train_remotely(client, function_name: str, weights: Mapping[str, np.ndarray],
                   extra_assets: Mapping[str, object] | None = None) -> dict:
    """One local update on one datasite: send ``weights``, run the approved function, get its dict back.

    Pass the same ``extra_assets`` as to :func:`request_training`.
    """
    return remote.run(client, function_name, weights, training_assets(client, extra_assets),
                      requested_with="request_training")


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
