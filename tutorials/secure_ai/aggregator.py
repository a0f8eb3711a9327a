"""Part 4's aggregator, the data scientist's side: one secure round through the owners' approved steps.

:func:`secure_round` runs one round of double masking (mask, confirm, unmask) by calling each owner's
approved functions of :mod:`secure_ai.secagg`, and :func:`unmask` removes the masks from what came back.
:func:`masked_average` and :func:`ckks_average` run one round of each protocol in one process, the owners'
functions called directly, to measure what the aggregator receives (Part 5, ``benchmarks/``). There each
owner is handed an update already made, the same message for all: the model binding of
:mod:`secure_ai.secagg` cannot see which model an update came from, so these rounds show what the
aggregator would receive *without* it, when it sends different models.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from . import secret_sharing as ss
from .secagg import make_config, owner_confirm, owner_encrypt, owner_mask, owner_unmask, unwrap


def unmask(masked: Mapping[str, np.ndarray], answers: Mapping[str, Mapping],
           roster: Sequence[str]) -> np.ndarray:
    """Aggregator side: the survivors' sum from their masked vectors and their unmasking answers."""
    if set(answers) != set(masked):
        raise ValueError(f"every survivor must answer the unmasking request: masked vectors from "
                         f"{sorted(masked)}, answers from {sorted(answers)}")
    total = ss.unmask_sum(masked, roster, {name: a["pair_seeds"] for name, a in answers.items()})
    flat = total.reshape(-1)
    for answer in answers.values():
        flat -= ss.expand_seed(answer["self_seed"], flat.size)
    return total


def secure_round(call: Callable[[str, str, dict], dict], roster: Sequence[str], round_number: int,
                 payload: Mapping, survivors: Sequence[str] | None = None,
                 functions: tuple[str, str, str] = ("train_and_mask", "confirm_survivors", "reveal_masks"),
                 log: list | None = None, masked: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """Aggregator side, one honest round: mask, confirm, unmask; returns the survivors' encoded sum.

    ``call(owner, function_name, request)`` runs an owner's approved function (through syft);
    ``survivors`` (default: all) are the owners whose masked vectors the round uses; ``masked`` gives
    vectors already received this round (then step 1 is skipped). Everything received is appended to ``log``.
    """
    survivors = sorted(survivors or roster)
    mask_fn, confirm_fn, unmask_fn = functions
    received = lambda name, fn, request: _logged(log, name, fn, unwrap(name, call(name, fn, request)))
    if masked is None:
        request = dict(payload) | {"round": round_number}
        masked = {n: received(n, mask_fn, request)["masked"] for n in survivors}
    masked = {n: masked[n] for n in survivors}
    announce = {"round": round_number, "survivors": survivors}
    tags = {n: received(n, confirm_fn, announce)["tags"] for n in survivors}
    answers = {n: received(n, unmask_fn, announce | {"tags": {p: tags[p][n] for p in survivors if p != n}})
               for n in survivors}
    return unmask(masked, answers, roster)


def _logged(log, name, function, answer):
    if log is not None:
        log.append((name, function, answer))
    return answer


# --- one round in process, for measurements: what the aggregator receives -------------------------------
def masked_average(vectors: Sequence, counts: Sequence[int],
                   run_id: str = "imprint") -> tuple[np.ndarray, int]:
    """``(sum n_i w_i / sum n_i, sum n_i)`` from one round of Part 4's double masking, run in process.

    Each owner encodes ``[n_i w_i, n_i]`` in the ring, masks it (:func:`secure_ai.secagg.owner_mask`),
    confirms the survivors and reveals its masks; the aggregator decodes the sum. Fresh keys every call.
    """
    names = [f"owner{i}" for i in range(len(vectors))]
    keys = {name: ss.generate_keypair() for name in names}
    roster = {name: public for name, (_, public) in keys.items()}
    encoded = {name: ss.encode_weighted(np.asarray(v, dtype=np.float64), int(n))
               for name, v, n in zip(names, vectors, counts)}
    with tempfile.TemporaryDirectory() as folder:  # each owner's ledger: mask, confirm, unmask once each
        configs = {name: make_config(run_id, name, roster, Path(folder) / name).to_asset() for name in names}

        def call(name, function, request):
            secret = keys[name][0]
            if function == "train_and_mask":
                return owner_mask(lambda message: encoded[name], secret, configs[name], request)
            if function == "confirm_survivors":
                return owner_confirm(secret, configs[name], request)
            return owner_unmask(secret, configs[name], request)

        return ss.decode_weighted_average(secure_round(call, names, 0, {}))


def ckks_average(vectors: Sequence, counts: Sequence[int],
                 run_id: str = "imprint") -> tuple[np.ndarray, int]:
    """``(sum n_i w_i / sum n_i, sum n_i)`` as Part 5's CKKS key holder returns it: decrypted, then flooded
    with Gaussian noise of std ``KeyHolder.flood_sigma`` in the sum's units (a key holder sized for one
    round of these vectors)."""
    from . import encryption as he

    names = [f"owner{i}" for i in range(len(vectors))]
    holder = he.KeyHolder(run_id, names, length=len(vectors[0]), max_rounds=1)
    roster = {name: ss.generate_keypair()[1] for name in names}  # a config needs one; CKKS uses no mask
    request = {"round": 0, "context": holder.public_context_bytes}
    submissions = {}
    for name, vector, n in zip(names, vectors, counts):
        config = make_config(run_id, name, roster, None, ckks_public_context=holder.public_context_bytes,
                             ckks_mac_key=holder.mac_key(name)).to_asset()
        update = (np.asarray(vector, dtype=np.float64), int(n))
        answer = owner_encrypt(lambda message, update=update: update, config, request)
        submissions[name] = unwrap(name, answer)
    return holder.decrypt_average(0, submissions)
