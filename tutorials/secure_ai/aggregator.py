"""Part 4's aggregator, the data scientist's side: one secure round through the owners' approved steps.

:func:`secure_round` runs one round of double masking (mask, confirm, unmask) by calling each owner's
approved functions of :mod:`secure_ai.secagg`, and :func:`unmask` removes the masks from what came back.
:func:`masked_average` and :func:`ckks_average` run one round of each protocol in one process, the owners'
functions called directly, to measure what the aggregator receives (Part 6, Appendix A, ``benchmarks/``).
There each owner is handed an update already made, the same message for all: the model binding of
:mod:`secure_ai.secagg` cannot see which model an update came from, so these rounds show what the
aggregator would receive *without* it, when it sends different models.

:class:`InProcessOwners` holds such owners for playing attacks against them (Appendix A): their keys, the
config each one fixes at setup, and the same config with one check left out (a roster the aggregator chose,
no ledger), to measure what that check prevents. :func:`flooded_decryptions` is what a CKKS key holder
without its once-per-round check would hand out.
"""
from __future__ import annotations

import secrets
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


# --- owners in this process, for measuring what the aggregator receives ----------------------------
class InProcessOwners:
    """Part 4's owners in this process, to play the aggregator against: their keys, configs and steps.

    Each owner makes a key pair (``roster`` holds the public keys). :meth:`config` is the config an owner
    fixes at setup: the shared roster, a ledger file of its own (in a temporary folder, which :meth:`close`
    deletes) and, with a CKKS ``key_holder``, the digest of its public context and the owner's MAC key. To
    measure what a check prevents, a config can leave it out: ``roster=`` keys the aggregator chose in place
    of the owners' own, ``ledger=False`` no ledger, ``ledger="name"`` a fresh ledger apart. :meth:`call`
    runs the owners' three masking steps as :func:`secure_round` calls them; :meth:`encrypt` the CKKS step.
    """

    def __init__(self, names: Sequence[str], run_id: str = "in-process", key_holder=None):
        if len(set(names)) != len(names) or len(names) < 2:
            raise ValueError(f"need at least 2 distinct owner names, got {list(names)}")
        self.names, self.run_id, self.key_holder = list(names), run_id, key_holder
        self.keys = {name: ss.generate_keypair() for name in self.names}
        self.roster = {name: public for name, (_, public) in self.keys.items()}
        self._folder = tempfile.TemporaryDirectory(prefix="secagg-owners-")

    def secret_key(self, name: str):
        """Owner side: ``name``'s secret key."""
        return self.keys[name][0]

    def config(self, name: str, roster: Mapping[str, bytes] | None = None, ledger: bool | str = True
               ) -> np.ndarray:
        """``name``'s config asset: as the owner fixes it at setup, or with ``roster`` in place of the owners'
        (keys the aggregator chose). ``ledger``: ``True`` the owner's own ledger, ``False`` none (every round
        is new to it, and it cannot confirm or unmask), or a name: a ledger apart, made fresh on first use
        (for a what-if owner, or an aggregator's sybil)."""
        if ledger is True:
            path = Path(self._folder.name) / f"{name}.json"
        elif isinstance(ledger, str) and ledger.isidentifier():
            path = Path(self._folder.name) / f"{name}-{ledger}.json"
        elif ledger is False:
            path = None
        else:
            raise ValueError(f"ledger must be True, False or a name (letters, digits, _), got {ledger!r}")
        holder = self.key_holder
        return make_config(self.run_id, name, self.roster if roster is None else roster, path,
                           ckks_public_context=None if holder is None else holder.public_context_bytes,
                           ckks_mac_key=None if holder is None else holder.mac_key(name)).to_asset()

    def call(self, updates: Mapping, configs: Mapping | None = None,
             keys: Mapping | None = None) -> Callable[[str, str, dict], dict]:
        """``call(owner, function, request)`` for :func:`secure_round`: each owner's approved steps.

        ``updates[owner]`` is its ``train(message)`` (an encoded update from the request) or an update made
        beforehand; ``configs`` and ``keys`` replace the config (default :meth:`config`) and the secret key
        of the owners they name, for instance by those of the aggregator's sybils.
        """
        configs = {name: self.config(name) for name in updates if name in self.keys} | dict(configs or {})
        keys = {name: self.secret_key(name) for name in updates if name in self.keys} | dict(keys or {})

        def call(name: str, function: str, request: Mapping) -> dict:
            if function == "train_and_mask":
                return owner_mask(_as_train(updates[name]), keys[name], configs[name], request)
            if function == "confirm_survivors":
                return owner_confirm(keys[name], configs[name], request)
            if function == "reveal_masks":
                return owner_unmask(keys[name], configs[name], request)
            raise ValueError(f"no owner step {function!r}: train_and_mask, confirm_survivors, reveal_masks")

        return call

    def encrypt(self, name: str, update, request: Mapping, config: np.ndarray | None = None) -> dict:
        """``name``'s CKKS step (:func:`secure_ai.secagg.owner_encrypt`) for ``update``: its
        ``train(message) -> (weights, n)``, or ``(weights, n)`` made beforehand."""
        return owner_encrypt(_as_train(update), self.config(name) if config is None else config, request)

    def close(self) -> None:
        """Delete the owners' ledgers."""
        self._folder.cleanup()

    def __enter__(self) -> InProcessOwners:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _as_train(update) -> Callable:
    return update if callable(update) else (lambda message: update)


def flooded_decryptions(key_holder, submissions: Mapping[str, Mapping], times: int) -> np.ndarray:
    """What a CKKS key holder *without* its once-per-round check would hand out if asked ``times`` times for
    the sum of ``submissions`` (``{owner: {"encrypted", ...}}``): each decryption of ``sum n_i w_i`` (and
    the count) flooded afresh with N(0, ``key_holder.flood_sigma``), one row per decryption. For measuring
    only: the real key holder decrypts each round once."""
    from . import encryption as he

    if isinstance(times, bool) or not isinstance(times, (int, np.integer)) or times < 1:
        raise ValueError(f"times must be a positive integer, got {times!r}")
    total = he.aggregate([he.EncryptedVector.from_bytes(key_holder.context, bytes(item["encrypted"]))
                          for item in submissions.values()]).decrypt(key_holder.context)
    rng = np.random.default_rng(secrets.randbits(128))   # as the key holder's: seeded by the OS
    return total + rng.normal(0, key_holder.flood_sigma, (times, total.size))


# --- one round in process, for measurements: what the aggregator receives -------------------------------
def masked_average(vectors: Sequence, counts: Sequence[int],
                   run_id: str = "imprint") -> tuple[np.ndarray, int]:
    """``(sum n_i w_i / sum n_i, sum n_i)`` from one round of Part 4's double masking, run in process.

    Each owner encodes ``[n_i w_i, n_i]`` in the ring, masks it (:func:`secure_ai.secagg.owner_mask`),
    confirms the survivors and reveals its masks; the aggregator decodes the sum. Fresh keys every call.
    """
    names = [f"owner{i}" for i in range(len(vectors))]
    encoded = {name: ss.encode_weighted(np.asarray(v, dtype=np.float64), int(n))
               for name, v, n in zip(names, vectors, counts)}
    with InProcessOwners(names, run_id) as owners:  # each owner's ledger: mask, confirm, unmask once each
        return ss.decode_weighted_average(secure_round(owners.call(encoded), names, 0, {}))


def ckks_average(vectors: Sequence, counts: Sequence[int],
                 run_id: str = "imprint") -> tuple[np.ndarray, int]:
    """``(sum n_i w_i / sum n_i, sum n_i)`` as Part 5's CKKS key holder returns it: decrypted, then flooded
    with Gaussian noise of std ``KeyHolder.flood_sigma`` in the sum's units (a key holder sized for one
    round of these vectors)."""
    from . import encryption as he

    names = [f"owner{i}" for i in range(len(vectors))]
    holder = he.KeyHolder(run_id, names, length=len(vectors[0]), max_rounds=1)
    request = {"round": 0, "context": holder.public_context_bytes}
    with InProcessOwners(names, run_id, key_holder=holder) as owners:
        submissions = {name: unwrap(name, owners.encrypt(name, (np.asarray(v, dtype=np.float64), int(n)),
                                                         request))
                       for name, v, n in zip(names, vectors, counts)}
    try:
        return holder.decrypt_average(0, submissions)
    finally:
        del submissions
        release_memory()  # the ciphertexts: hundreds of MB for the series' MLP
