"""What each protection costs one owner per round, in seconds and bytes: the cost side of the privacy table.

* :func:`best_time`: the fastest of a few runs of a function (a busy machine only ever adds time)
* :func:`round_costs`: plain FedAvg, DP-SGD, pairwise masks and CKKS, timed without syft
* :func:`local_update`: the owner's work those costs time (Part 6 and ``benchmarks/privacy_table.py``)
* :func:`compare_methods`: plain FedAvg, double masking and CKKS on one round of real updates: the work each
  adds, the bytes each owner sends, and the error of each on the average (Part 5's comparison)
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence

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


def compare_methods(vectors: Sequence, counts: Sequence[int], flooded_average, repeat: int = 3
                    ) -> dict[str, dict[str, float]]:
    """Plain FedAvg, double masking and CKKS on the same round of updates, without syft.

    ``vectors`` are the owners' trained weights of one round (flat float32 arrays), ``counts`` their sample
    counts, and ``flooded_average`` the CKKS key holder's average of that round as it handed it out (with its
    flooding noise). Per method:

    * ``seconds``: the aggregation alone, all parties' work in one process (fastest of ``repeat``; CKKS once):
      the float32 average (plain); each owner's fixed-point encoding, self mask and pairwise masks, then the
      aggregator's unmasking and decoding (double masking, with the self-mask seeds revealed); each owner's
      encryption and serialization, then the key holder's loading, adding and decrypting (CKKS);
    * ``bytes``: what one owner sends (float32 weights; ``[n*w, n]`` as 64-bit ring elements; ciphertexts);
    * ``error``: the largest difference on a weight from the exact (float64) FedAvg average, as handed out;
    * ``own error``: the same before any flooding noise (CKKS's own error, under a fresh key).
    """
    from . import encryption as he
    from . import secret_sharing as ss
    from .training import fedavg

    vectors = [np.asarray(v, dtype=np.float32).reshape(-1) for v in vectors]
    counts = [int(n) for n in counts]
    if len(vectors) < 2 or len(counts) != len(vectors) or len({v.size for v in vectors}) != 1:
        raise ValueError(f"need at least 2 vectors of one length and a count for each, got {len(vectors)} "
                         f"vectors and {len(counts)} counts")
    exact = np.average(np.stack(vectors).astype(np.float64), axis=0, weights=counts)
    names = [f"owner{i}" for i in range(len(vectors))]
    keys = {name: ss.generate_keypair() for name in names}
    public = {name: pk for name, (_, pk) in keys.items()}
    self_seeds = {name: os.urandom(32) for name in names}

    def plain():
        return fedavg([{"vector": v} for v in vectors], counts)["vector"], vectors[0].nbytes

    def double_masking():
        sent = {}
        for name, v, n in zip(names, vectors, counts):
            encoded = ss.encode_weighted(v, n)
            self_masked = encoded + ss.expand_seed(self_seeds[name], encoded.size)
            sent[name] = ss.mask(self_masked, name, keys[name][0], public, 0)
        total = ss.unmask_sum(sent, names)
        for seed in self_seeds.values():
            total -= ss.expand_seed(seed, total.size)
        return ss.decode_weighted_average(total)[0], sent[names[0]].nbytes

    context = he.make_context()
    public_context = he.public_context(context)

    def ckks():
        sent = [he.encrypt_weighted(public_context, v, n).to_bytes() for v, n in zip(vectors, counts)]
        total = he.aggregate([he.EncryptedVector.from_bytes(context, c) for c in sent])
        return he.decrypt_weighted_average(total, context)[0], len(sent[0])

    flooded_error = float(np.abs(np.asarray(flooded_average, dtype=np.float64) - exact).max())
    results = {}
    for method, run, times in (("plain FedAvg", plain, repeat), ("double masking", double_masking, repeat),
                               ("CKKS", ckks, 1)):
        seconds, (average, sent_bytes) = best_time(run, times)
        own = float(np.abs(np.asarray(average, dtype=np.float64) - exact).max())
        results[method] = {"seconds": seconds, "bytes": sent_bytes, "own error": own,
                           "error": flooded_error if method == "CKKS" else own}
    return results
