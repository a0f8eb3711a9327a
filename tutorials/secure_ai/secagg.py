"""Parts 4 and 5's workflow: secure aggregation with double masking, and every check an owner makes on it.

It is the owners' protocol for both secure methods: masked FedAvg (below, Part 4) and the owner's step of
CKKS aggregation (:func:`owner_encrypt`, Part 5); the maths are in :mod:`secure_ai.secret_sharing` and
:mod:`secure_ai.encryption`, the syft requests and calls in :mod:`secure_ai.remote`, the aggregator's side
in :mod:`secure_ai.aggregator`.

Threat model: the data scientist, who aggregates, may be **honest-but-curious** (follows the protocol,
studies what it receives) or **malicious** (sends forged keys, invented names, replayed rounds, false
dropout claims, a CKKS context of its own, different models to different owners). The owners' approved code
is the only thing it cannot change; everything in the ``weights``/``request`` argument is untrusted input
that this module checks. Not covered: an aggregator colluding with owners (with 3 owners, a colluder that
knows its own update learns the other survivor's from a 2-owner sum anyway); differences between rounds or
subsets (the sums of two rounds trained from the same model differ by exactly the updates of the owners in
one round and not the other; So et al. 2023); and a crafted model sent to every owner (imprint weights,
Fowl et al. 2022), which only owner-side DP bounds.

What the aggregator cannot change lives **owner-side** (:class:`OwnerConfig`, uploaded by each owner at
setup as a private asset): the run id, the owner's own name, the roster of names and public keys (compared
out of band between owners, as a PKI would), the threshold, the path of the owner's ledger, and the digest
of the CKKS key holder's public context plus this owner's MAC key shared with the key holder.

One round ``r`` of masked FedAvg, as three approved calls per owner (Bonawitz et al. 2017, simplified):

1. :func:`owner_mask`: the owner trains from the request itself and records its digest
   (:func:`secure_ai.training.message_digest`: the global model, its recipe and the round);
   ``y_i = x_i + PRG(b_i,r) + sum_j ±PRG(s_ij,r)``, with a self-mask seed ``b_i,r`` that only owner i can
   derive (from its secret key, the run id and r) and this round's pairwise seeds ``s_ij,r`` (from the
   pair's Diffie-Hellman secret).
2. :func:`owner_confirm`: the aggregator announces the survivors ``U`` (the owners whose ``y`` it uses);
   each owner in ``U`` authenticates ``U`` and the digest it trained for every other owner (HMAC under a
   pairwise key).
3. :func:`owner_unmask`: an owner in ``U`` that itself confirmed ``U`` and holds valid confirmations of the
   *same* ``U`` and the *same* model from every other member reveals its own ``b_i`` and this round's seeds
   with the owners outside ``U`` -- never a seed with a member of ``U``, never its ``b_i`` outside ``U``.

Each owner masks, confirms and unmasks at most once per round, in that order, with rounds strictly
increasing: its :class:`Ledger` enforces it -- a small JSON file in the owner's datasite folder, which the
approved code (running in the owner's process) finds through the owner's config, never through the request.
Because every member of ``U`` confirmed ``U``, each owner confirms once per round, and ``|U| >= threshold >
n/2``, no two different survivor sets can both be confirmed by all their members: a false "jill dropped"
claim gets this round's seeds with jill but never ``b_jill``, and jill's ``y`` stays masked. Because every
member confirmed the model it trained, a round in which the aggregator sent different models (say the real
one to joe, dead ones to the others, whose sum would give joe's update away) is never unmasked.

What we simplified from Bonawitz et al., and what it costs:

* **No Shamir sharing.** Bonawitz et al. split each owner's self-mask seed and key into t-of-n shares, so
  that any t survivors can finish a round. We do not: an owner that confirms the survivors and then drops
  out stalls the round, since nobody can remove its self mask. The aggregator starts a new round, with a new
  round number and new masks. Rounds survive owners that drop out *before* they confirm, not after.
* **Round seeds instead of key shares.** For an owner that dropped, survivors reveal this round's pairwise
  seeds with it; its other rounds stay masked. Bonawitz et al. reveal shares of the dropped owner's key.
* **MACs instead of signatures.** Owners confirm the survivor set to each other with HMACs under pairwise
  keys; Bonawitz et al.'s version against a malicious server signs it.
* **A ledger file.** Each owner remembers its rounds in a file in its datasite folder; deleting the file
  re-opens old round numbers of the run (start a new run id instead). syft also runs approved code on the
  mocks, whose config has no ledger and whose key unmasks nothing real.

Owner-side functions return ``{"refused": reason}`` instead of raising, because syft 0.9.5 replaces an
exception in approved code by "contact the Server Admin"; :func:`unwrap` turns it into :class:`Refused`.
"""
from __future__ import annotations

import copy
import fcntl
import hashlib
import hmac
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import secret_sharing as ss
from .training import message_digest

CONFIG_BYTES = 16384  # a config asset is a fixed-size uint8 row (its mock must have the same shape)


class Refused(ValueError):
    """An owner (or the key holder) refused a request: the reason says which check failed."""


def default_threshold(n_owners: int) -> int:
    """The fewest survivors a round needs: a strict majority, and at least 2."""
    return max(2, n_owners // 2 + 1)


@dataclass(frozen=True)
class OwnerConfig:
    """What one owner fixes at setup for a whole run; the aggregator never supplies any of it."""

    run_id: str
    me: str
    roster: Mapping[str, bytes]
    threshold: int
    ledger: str | None = None
    ckks_context_sha256: str | None = None
    ckks_mac_key: bytes | None = None

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", str(self.run_id)):
            raise ValueError(f"run_id must be 1-64 letters, digits, '.', '_' or '-', got {self.run_id!r}")
        ss.check_roster(self.roster)
        if self.me not in self.roster:
            raise ValueError(f"{self.me!r} is not in the roster {sorted(self.roster)}")
        if not default_threshold(len(self.roster)) <= self.threshold <= len(self.roster):
            raise ValueError(f"threshold must be a strict majority of the {len(self.roster)} owners "
                             f"(at least {default_threshold(len(self.roster))}), got {self.threshold}")

    def to_asset(self) -> np.ndarray:
        """The config as a ``(1, CONFIG_BYTES)`` uint8 array, to upload as a private asset."""
        text = json.dumps({
            "run_id": self.run_id, "me": self.me, "threshold": self.threshold, "ledger": self.ledger,
            "roster": {name: bytes(key).hex() for name, key in self.roster.items()},
            "ckks_context_sha256": self.ckks_context_sha256,
            "ckks_mac_key": None if self.ckks_mac_key is None else bytes(self.ckks_mac_key).hex(),
        }).encode()
        if len(text) > CONFIG_BYTES:
            raise ValueError(f"the config needs {len(text)} bytes, more than CONFIG_BYTES = {CONFIG_BYTES}")
        return np.frombuffer(text.ljust(CONFIG_BYTES), dtype=np.uint8)[None].copy()


def make_config(run_id: str, me: str, roster: Mapping[str, bytes], ledger: str | Path | None,
                threshold: int | None = None, ckks_public_context: bytes | None = None,
                ckks_mac_key: bytes | None = None) -> OwnerConfig:
    """Owner side, at setup: a checked :class:`OwnerConfig` (duplicate keys and a missing self refused)."""
    roster = {str(name): bytes(ss.raw_bytes(key)) for name, key in roster.items()}
    digest = None if ckks_public_context is None else hashlib.sha256(bytes(ckks_public_context)).hexdigest()
    return OwnerConfig(str(run_id), me, roster, threshold or default_threshold(len(roster)),
                       None if ledger is None else str(ledger), digest,
                       None if ckks_mac_key is None else bytes(ckks_mac_key))


def load_config(asset) -> OwnerConfig:
    """The :class:`OwnerConfig` stored in an asset made by :meth:`OwnerConfig.to_asset`."""
    raw = json.loads(np.asarray(asset, dtype=np.uint8).tobytes().decode().strip())
    raw["roster"] = {name: bytes.fromhex(key) for name, key in raw["roster"].items()}
    if raw["ckks_mac_key"] is not None:
        raw["ckks_mac_key"] = bytes.fromhex(raw["ckks_mac_key"])
    return OwnerConfig(**raw)


def mock_config(config: OwnerConfig, mock_secret_key) -> OwnerConfig:
    """The config's mock: the mock key's public key as this owner's, no ledger, a random MAC key."""
    roster = dict(config.roster) | {config.me: ss.public_key_of(mock_secret_key)}
    return OwnerConfig(config.run_id, config.me, roster, config.threshold, None, config.ckks_context_sha256,
                       None if config.ckks_mac_key is None else os.urandom(32))


def setup_owner(owner, config: OwnerConfig, secret_key, dataset: str = "secagg"):
    """Owner side: upload the secret key and the config as private assets, each with a harmless mock."""
    if ss.public_key_of(secret_key) != config.roster[config.me]:
        raise ValueError(f"the secret key does not belong to {config.me}'s public key in the roster")
    mock_key, _ = ss.generate_keypair()
    as_row = lambda key: np.frombuffer(ss.raw_bytes(key), dtype=np.uint8)[None]
    return owner.upload_dataset(
        dataset, private={"secret_key": as_row(secret_key), "config": config.to_asset()},
        mock={"secret_key": as_row(mock_key), "config": mock_config(config, mock_key).to_asset()},
        description=f"{config.me}'s secure-aggregation key and run config ({config.run_id})")


def ledger_path(owner, run_id: str) -> Path:
    """Owner side: where its ledger lives, inside its datasite's folder (removed when it shuts down)."""
    from .datasites import TEMP_ROOT  # first: it imports syft quietly, and patches it

    from syft.server.utils import get_named_server_uid  # isort: skip

    return TEMP_ROOT / str(get_named_server_uid(owner.name)) / f"secagg-ledger-{run_id}.json"


def assets(client, dataset: str = "secagg") -> dict:
    """Data-scientist side: the ``extra_assets`` for the approved functions (``secret_key``, ``config``)."""
    found = client.datasets[dataset].assets
    return {"secret_key": found["secret_key"], "config": found["config"]}


def request_step(client, function: Callable, rounds: int, dataset: str = "secagg"):
    """Data-scientist side: request ``function(secret_key, config, weights)``, a step that reads no data.

    Unlike a training function it is not bound to the images, so a call does not load them (faster).
    """
    from . import remote

    remote.check_rounds(rounds)
    return remote.request(client, function, rounds, assets(client, dataset))


def call_step(client, function_name: str, request: Mapping, dataset: str = "secagg") -> dict:
    """Data-scientist side: run an approved protocol step (:func:`request_step`) and bring its answer back."""
    from . import remote

    return remote.run(client, function_name, request, assets(client, dataset), requested_with="request_step")


def approve_step(owner, review, dataset: str = "secagg") -> None:
    """Owner side: approve a Part 4 step the owner reviewed (``review = owner.code_of(name)``) only if its
    request binds ``config`` (and ``secret_key``, when the step takes one) to this owner's own ``dataset``
    assets; otherwise deny it and raise :class:`Refused`. A request with a config of the data scientist's
    (its roster, no ledger) would let it unmask anything. The approval is the owner's own, of exactly the
    reviewed request."""
    pinned = ["config", *(["secret_key"] if "secret_key" in review.inputs else [])]
    wrong = {name: review.inputs.get(name, "nothing") for name in pinned
             if review.inputs.get(name) != f"asset {dataset}/{name}"}
    if wrong:
        reason = ", ".join(f"{name} is bound to {bound}" for name, bound in wrong.items())
        owner.deny(review.function_name, f"refused: {reason}, not to this owner's {dataset} assets")
        raise Refused(f"{owner.name} refused {review.function_name!r}: {reason}")
    owner.approve(review.function_name, review.digest)


# --- the owner's state --------------------------------------------------------------------------------
class Ledger:
    """One owner's record of its last masked (with the model's digest), confirmed, unmasked and encrypted
    round: a JSON file, or none on mocks."""

    def __init__(self, path: str | None, run_id: str):
        self.path, self.run_id = (None if path is None else Path(path)), run_id

    def read(self) -> dict:
        state = {"run_id": self.run_id, "masked": -1, "model": None, "confirmed": None, "unmasked": -1,
                 "encrypted": -1}
        if self.path is None or not self.path.exists():
            return state
        state |= json.loads(self.path.read_text())
        if state.get("run_id") != self.run_id:
            raise Refused(f"the ledger {self.path} belongs to run {state.get('run_id')!r}, "
                          f"not {self.run_id!r}")
        return state

    def update(self, change: Callable[[dict], None]) -> None:
        """Lock the file, read the state, let ``change`` check it (raising :class:`Refused`) and edit it."""
        if self.path is None:
            change(self.read())
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.read()
            change(state)
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(state))
            os.replace(temporary, self.path)


# --- owner side ---------------------------------------------------------------------------------------
def _owner_side(function):
    def wrapped(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (Refused, ValueError, KeyError, TypeError) as error:
            return {"refused": f"{type(error).__name__}: {error}"}

    wrapped.__name__, wrapped.__doc__ = function.__name__, function.__doc__
    return wrapped


def _round(request: Mapping) -> int:
    r = request.get("round")
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0:
        raise Refused(f"the round number must be a non-negative integer, got {r!r}")
    return int(r)


def _check_train(train, what: str) -> None:
    """``train(message)`` gets a copy of the very request whose digest the owner records; an update made
    beforehand could come from any message."""
    if not callable(train):
        raise TypeError(f"{what} trains from the request itself: pass train(message), not an update made "
                        "from another message")


def _survivors(config: OwnerConfig, request: Mapping) -> list[str]:
    survivors = request.get("survivors")
    if not isinstance(survivors, (list, tuple)) or not all(isinstance(n, str) for n in survivors):
        raise Refused(f"survivors must be a list of owner names, got {survivors!r}")
    if len(set(survivors)) != len(survivors):
        raise Refused(f"an owner is listed twice among the survivors {list(survivors)}")
    unknown = set(survivors) - set(config.roster)
    if unknown:
        raise Refused(f"unknown owners {sorted(unknown)}: the roster fixed at setup is "
                      f"{sorted(config.roster)}")
    if config.me not in survivors:
        raise Refused(f"{config.me} is not among the survivors: an owner counted as dropped reveals nothing")
    if len(survivors) < config.threshold:
        raise Refused(f"{len(survivors)} survivors, fewer than the threshold {config.threshold}: unmasking "
                      "would expose too few owners' sum")
    return sorted(survivors)


def _pair_key(secret_key, config: OwnerConfig, peer: str, purpose: str, r: int, sender: str) -> bytes:
    pair = ss.shared_seed(secret_key, config.roster[peer])
    return ss.round_seed(pair, config.run_id, r, f"{purpose} from {sender}")


def _confirmation(key: bytes, config: OwnerConfig, r: int, survivors: Sequence[str], model: str) -> bytes:
    message = json.dumps([config.run_id, r, sorted(survivors), model]).encode()
    return hmac.new(key, message, hashlib.sha256).digest()


def _self_seed(secret_key, config: OwnerConfig, r: int) -> bytes:
    """``b_i`` of round r: only this owner can compute it; revealing it tells nothing about other rounds'."""
    own = hashlib.sha256(b"secure-ai self mask" + ss.raw_bytes(secret_key)).digest()
    return ss.round_seed(own, config.run_id, r, "self mask")


def _check_key(secret_key, config: OwnerConfig) -> None:
    if ss.public_key_of(secret_key) != config.roster[config.me]:
        raise Refused(f"the secret key does not match {config.me}'s public key in the roster")


def _model_of(state: dict, config: OwnerConfig, r: int) -> str:
    if state["masked"] != r or state["model"] is None or state["model"][0] != r:
        raise Refused(f"{config.me} did not mask round {r} (its last masked round is {state['masked']})")
    return state["model"][1]


@_owner_side
def owner_mask(train: Callable[[dict], np.ndarray], secret_key, config, request: Mapping) -> dict:
    """Owner side, step 1: ``{"masked": y}`` for ``train(request)``, the encoded update the owner trains
    from the request itself; the round must be new. The request's digest goes to the ledger."""
    _check_train(train, "owner_mask")
    config = load_config(config)
    _check_key(secret_key, config)
    r, model = _round(request), message_digest(request)

    def claim(state):
        if r <= state["masked"]:
            raise Refused(f"round {r} is not after round {state['masked']}, which {config.me} already "
                          "masked: a repeated round would reuse masks")
        state["masked"], state["model"] = r, [r, model]

    Ledger(config.ledger, config.run_id).update(claim)
    update = ss.as_ring(train(copy.deepcopy(dict(request))), "owner_mask").reshape(-1)
    self_mask = ss.expand_seed(_self_seed(secret_key, config, r), update.size)
    return {"masked": ss.mask(update + self_mask, config.me, secret_key, config.roster, r, config.run_id)}


@_owner_side
def owner_confirm(secret_key, config, request: Mapping) -> dict:
    """Owner side, step 2: ``{"tags": {peer: HMAC}}`` over the survivors and the model this owner trained;
    once per round."""
    config = load_config(config)
    _check_key(secret_key, config)
    r, survivors = _round(request), _survivors(config, request)
    trained = []

    def claim(state):
        trained.append(_model_of(state, config, r))
        if state["confirmed"] is not None and state["confirmed"][0] == r:
            raise Refused(f"{config.me} already confirmed survivors {state['confirmed'][1]} for round {r}")
        state["confirmed"] = [r, survivors]

    Ledger(config.ledger, config.run_id).update(claim)
    return {"tags": {peer: _confirmation(_pair_key(secret_key, config, peer, "confirm", r, config.me),
                                         config, r, survivors, trained[0])
                     for peer in survivors if peer != config.me}}


@_owner_side
def owner_unmask(secret_key, config, request: Mapping) -> dict:
    """Owner side, step 3: ``{"self_seed", "pair_seeds"}`` once every other survivor confirmed the same set
    and the same model as this owner.

    ``request["tags"]`` maps each other survivor to the tag it made for this owner (:func:`owner_confirm`).
    """
    config = load_config(config)
    _check_key(secret_key, config)
    r, survivors = _round(request), _survivors(config, request)
    tags = request.get("tags")
    if not isinstance(tags, Mapping):
        raise Refused("the request carries no confirmation tags")

    def claim(state):
        model = _model_of(state, config, r)
        for peer in survivors:
            tag = tags.get(peer)
            key = _pair_key(secret_key, config, peer, "confirm", r, peer)
            if peer != config.me and (not isinstance(tag, (bytes, bytearray)) or not hmac.compare_digest(
                    _confirmation(key, config, r, survivors, model), bytes(tag))):
                raise Refused(f"no valid confirmation from {peer} that the survivors of round {r} are "
                              f"{survivors} and that they trained the model {config.me} trained")
        if state["confirmed"] != [r, survivors]:   # its own confirmation of this very set
            raise Refused(f"{config.me} confirmed {state['confirmed']}, not round {r} with survivors "
                          f"{survivors}")
        if state["unmasked"] >= r:
            raise Refused(f"{config.me} already answered the unmasking request of round {r}")
        state["unmasked"] = r

    Ledger(config.ledger, config.run_id).update(claim)
    dropped = sorted(set(config.roster) - set(survivors))
    return {
        "self_seed": _self_seed(secret_key, config, r),
        "pair_seeds": ss.recovery_seeds(config.me, secret_key, config.roster, dropped, survivors, r,
                                        config.run_id, min_survivors=config.threshold) if dropped else {},
    }


@_owner_side
def owner_encrypt(train: Callable[[dict], tuple], config, request: Mapping) -> dict:
    """Owner side, CKKS: ``{"encrypted", "model", "tag"}`` for ``train(request) -> (weights, n_samples)``,
    trained from the request itself and encrypted under the key holder's context only; once per round,
    rounds increasing. The tag binds the run, the round, this owner and the request's digest ``model``."""
    from . import encryption as he

    _check_train(train, "owner_encrypt")
    config = load_config(config)
    r = _round(request)
    if config.ckks_mac_key is None:
        raise Refused(f"{config.me}'s config has no MAC key shared with a CKKS key holder")
    context = he.check_public_context(request.get("context"), config.ckks_context_sha256)
    model = message_digest(request)

    def claim(state):
        if r <= state["encrypted"]:
            raise Refused(f"round {r} is not after round {state['encrypted']}, which {config.me} already "
                          "encrypted: the key holder must see each owner once per round")
        state["encrypted"] = r

    Ledger(config.ledger, config.run_id).update(claim)
    vector, n_samples = train(copy.deepcopy(dict(request)))
    encrypted = he.encrypt_weighted(context, vector, n_samples).to_bytes()
    return {"encrypted": encrypted, "model": model,
            "tag": he.authenticate(config.ckks_mac_key, config.run_id, r, config.me, model, encrypted)}


# --- aggregator side ----------------------------------------------------------------------------------
def unwrap(owner: str, answer) -> dict:
    """Data-scientist side: an owner's answer, or :class:`Refused` with the owner's reason."""
    if isinstance(answer, Mapping) and "refused" in answer:
        raise Refused(f"{owner} refused: {answer['refused']}")
    return dict(answer)
