"""Part 4's aggregator, the data scientist's side: one secure round through the owners' approved steps.

:func:`secure_round` runs one round of double masking (mask, confirm, unmask) by calling each owner's
approved functions of :mod:`secure_ai.secagg`, and :func:`unmask` removes the masks from what came back.
:func:`masked_round` and :func:`ckks_round` run one round of each protocol (Part 4's masks, Part 5's CKKS key
holder) in one process, the owners' functions called directly, each owner sent its own message: the model
binding of :mod:`secure_ai.secagg` refuses a round in which the owners were sent different models (Part 6).
:func:`masked_average` and :func:`ckks_average` hand every owner an update already made, under one message:
what the aggregator receives from updates of its choice, as it would *without* that binding (Part 6,
``benchmarks/``).
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from . import secret_sharing as ss
from .runtime import release_memory
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
Train = Callable[[str, dict], tuple[np.ndarray, int]]


def masked_round(messages: Mapping[str, Mapping], train: Train,
                 run_id: str = "in-process") -> tuple[np.ndarray, int]:
    """``(sum n_i w_i / sum n_i, sum n_i)`` from one round of Part 4's double masking, run in process.

    Owner ``name`` is sent ``messages[name]`` and trains from it, ``train(name, message) -> (weights, n)``;
    it masks ``[n w, n]`` (:func:`secure_ai.secagg.owner_mask`, which records the message's digest), confirms
    the survivors and the digest, and reveals its masks only if every other owner confirmed the same digest.
    Raises :class:`secure_ai.secagg.Refused` when an owner refuses. Fresh keys and ledgers every call.
    """
    names = list(messages)
    keys = {name: ss.generate_keypair() for name in names}
    roster = {name: public for name, (_, public) in keys.items()}
    with tempfile.TemporaryDirectory() as folder:  # each owner's ledger: mask, confirm, unmask once each
        configs = {name: make_config(run_id, name, roster, Path(folder) / name).to_asset() for name in names}
        masked = {}
        for name in names:
            trains = lambda message, name=name: ss.encode_weighted(*_trained(train, name, message))
            request = dict(messages[name]) | {"round": 0}
            masked[name] = unwrap(name, owner_mask(trains, keys[name][0], configs[name], request))["masked"]

        def call(name, function, request):
            if function == "confirm_survivors":
                return owner_confirm(keys[name][0], configs[name], request)
            return owner_unmask(keys[name][0], configs[name], request)

        total = secure_round(call, names, 0, {}, masked=masked)
    release_memory()
    return ss.decode_weighted_average(total)


def ckks_round(messages: Mapping[str, Mapping], train: Train,
               run_id: str = "in-process") -> tuple[np.ndarray, int]:
    """``(sum n_i w_i / sum n_i, sum n_i)`` as Part 5's CKKS key holder returns it, from one round run in
    process: owner ``name`` trains from ``messages[name]`` and encrypts
    (:func:`secure_ai.secagg.owner_encrypt`, whose MAC binds the message's digest); the key holder (sized for
    this one round) decrypts the sum only if every owner trained the same message, and floods it with
    Gaussian noise of std ``KeyHolder.flood_sigma`` in the sum's units. Raises ``ValueError`` when it
    refuses."""
    from . import encryption as he

    names = list(messages)
    updates = {name: _trained(train, name, dict(messages[name])) for name in names}  # to size the key holder
    holder = he.KeyHolder(run_id, names, length=len(next(iter(updates.values()))[0]), max_rounds=1)
    roster = {name: ss.generate_keypair()[1] for name in names}  # a config needs one; CKKS uses no mask
    submissions = {}
    for name in names:
        config = make_config(run_id, name, roster, None, ckks_public_context=holder.public_context_bytes,
                             ckks_mac_key=holder.mac_key(name)).to_asset()
        request = dict(messages[name]) | {"round": 0, "context": holder.public_context_bytes}
        answer = owner_encrypt(lambda message, name=name: updates[name], config, request)
        submissions[name] = unwrap(name, answer)
    try:
        return holder.decrypt_average(0, submissions)
    finally:
        del submissions
        release_memory()  # the ciphertexts: hundreds of MB for the series' MLP


def _trained(train: Train, name: str, message: dict) -> tuple[np.ndarray, int]:
    vector, n = train(name, message)
    return np.asarray(vector, dtype=np.float64), int(n)


def _given(vectors: Sequence, counts: Sequence[int]) -> tuple[dict, Train]:
    """Every owner the same (empty) message, and the update already made for it."""
    names = [f"owner{i}" for i in range(len(vectors))]
    made = dict(zip(names, zip(vectors, counts)))
    return {name: {} for name in names}, lambda name, message: made[name]


def masked_average(vectors: Sequence, counts: Sequence[int],
                   run_id: str = "imprint") -> tuple[np.ndarray, int]:
    """``(sum n_i w_i / sum n_i, sum n_i)`` from one round of Part 4's double masking, run in process, in
    which owner ``i`` hands in ``vectors[i]`` for ``counts[i]`` digits (:func:`masked_round`, one message)."""
    return masked_round(*_given(vectors, counts), run_id=run_id)


def ckks_average(vectors: Sequence, counts: Sequence[int],
                 run_id: str = "imprint") -> tuple[np.ndarray, int]:
    """``(sum n_i w_i / sum n_i, sum n_i)`` as Part 5's key holder returns it, decrypted and flooded, in which
    owner ``i`` hands in ``vectors[i]`` for ``counts[i]`` digits (:func:`ckks_round` under one message)."""
    return ckks_round(*_given(vectors, counts), run_id=run_id)
