"""What each protection costs one owner per round, in seconds and bytes: the cost side of the privacy table.

* :func:`best_time`: the fastest of a few runs of a function (a busy machine only ever adds time)
* :func:`round_costs`: plain FedAvg, DP-SGD, pairwise masks and CKKS, timed without syft
* :func:`local_update`: the owner's work those costs time (Part 6 and ``benchmarks/privacy_table.py``)
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch


def best_time(function: Callable[[], object], repeat: int = 3) -> tuple[float, object]:
    """``(fastest of repeat runs of function(), in seconds, what its last run returned)``."""
    if not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be a positive integer, got {repeat!r}")
    best, result = math.inf, None
    for _ in range(repeat):
        tic = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - tic)
    return best, result


def local_update(images: torch.Tensor, labels: torch.Tensor, private: bool, seed: int = 0,
                 hidden: int = 128, noise_multiplier: float = 2.0, dp_batch: int = 100) -> torch.Tensor:
    """One owner's local epoch of an MLP on ``images``: plain SGD (batches of 32), or DP-SGD when
    ``private`` (Poisson batches of ``dp_batch``, clip 1, ``noise_multiplier``). Returns the flat weights it
    would send."""
    from .dp_sgd import make_private
    from .training import MLP, model_to_vector, set_seed, train_epoch

    set_seed(seed)
    net = MLP(hidden=hidden)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    if private:
        make_private(net, optimizer, images, labels, batch_size=dp_batch, max_grad_norm=1.0,
                     noise_multiplier=noise_multiplier).train_epoch(progress=False)
    else:
        train_epoch(net, images, labels, optimizer, batch_size=32, seed=seed, progress=False)
    return model_to_vector(net)


def round_costs(local_update: Callable[[bool], torch.Tensor], n_samples: int, n_owners: int = 3,
                repeat: int = 3) -> dict[str, dict[str, float]]:
    """Seconds and bytes one owner spends per round with each protection of the series, without syft.

    ``local_update(dp)`` runs one owner's local training (DP-SGD when ``dp``) and returns the flat weight
    vector it would send. Pairwise masks and CKKS are timed on that vector with ``n_owners`` owners: the
    owner's own work plus its share (1 / n_owners) of the aggregator's. Bytes are what one owner sends.
    Fastest of ``repeat`` runs (a busy machine only ever adds time).
    """
    from . import encryption as he
    from . import secret_sharing as ss

    plain_seconds, vector = best_time(lambda: local_update(False), repeat)
    dp_seconds, _ = best_time(lambda: local_update(True), repeat)
    vector = np.asarray(vector, dtype=np.float64)
    keys = {f"owner{i}": ss.generate_keypair() for i in range(n_owners)}
    public = {name: pk for name, (_, pk) in keys.items()}

    def masked_round():
        masked = {name: ss.mask(ss.encode_weighted(vector, n_samples), name, sk, public, 0)
                  for name, (sk, _) in keys.items()}
        ss.decode_weighted_average(ss.unmask_sum(masked, list(keys), 0))
        return masked["owner0"].nbytes

    context = he.make_context()
    public_context = he.public_context(context)

    def ckks_round():
        sent = [he.encrypt_weighted(public_context, vector, n_samples).to_bytes() for _ in range(n_owners)]
        total = he.aggregate([he.EncryptedVector.from_bytes(public_context, c) for c in sent])
        he.decrypt_weighted_average(total, context)
        return len(sent[0])

    mask_seconds, mask_bytes = best_time(masked_round, repeat)
    ckks_seconds, ckks_bytes = best_time(ckks_round, 1)
    plain_bytes = vector.size * 4  # float32 weights
    costs = {
        "plain FedAvg": (plain_seconds, plain_bytes),
        "FedAvg + DP": (dp_seconds, plain_bytes),
        "secure aggregation (masks)": (plain_seconds + mask_seconds / n_owners, mask_bytes),
        "CKKS": (plain_seconds + ckks_seconds / n_owners, ckks_bytes),
        "DP + secure aggregation": (dp_seconds + mask_seconds / n_owners, mask_bytes),
    }
    return {name: {"seconds": s, "bytes": b, "time vs plain": s / plain_seconds,
                   "bytes vs plain": b / plain_bytes} for name, (s, b) in costs.items()}
