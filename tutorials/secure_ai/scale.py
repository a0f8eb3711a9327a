"""Part 7's workflow: owners trained at once, a deadline per round, a minimum of answers, dropouts recorded.

A :class:`Federation` holds one *trainer* per data owner: a callable ``message -> reply``. For a real owner
it is :func:`remote_trainer` (an approved syft function on the owner's datasite, in-process or over HTTP);
for a cheap simulation it is :func:`local_trainer` (the same training function run here on a shard). Both go
through the same round: dispatch to a sample of owners at once (one daemon thread per call: syft's client
calls are blocking HTTP), wait until every sampled owner answered or the deadline passed, check every reply,
and average the valid ones weighted by their sample counts (FedAvg), optionally with server momentum
(FedAvgM, Hsu et al. 2019). A round with fewer valid answers than ``min_answers`` keeps the previous model
(Flower's ``FaultTolerantFedAvg`` sets it as a share, ``min_completion_rate_fit``). Each round leaves a
:class:`RoundRecord`: who was asked, who answered with how many samples, who was dropped and why, whose
answer came too late, and which late answers arrived afterwards (received by the data scientist, never
averaged).

Averaging only the owners who answer weights the model toward them (participation bias); ``min_answers``
bounds how few may make a round.

Threat model of the aggregation: owners are honest-but-unreliable (they crash, stall, come back), and a
reply is untrusted input: a reply that is not a finite float32 vector of the model's size, or that claims
more samples than the owner declared at setup (``max_samples``), is dropped and recorded; it never enters
the average. A malicious owner can still send a wrong update of the right form; robust aggregation is out
of scope here.

The processes behind HTTP owners, and the real failures the chapter causes (kill, pause, resume), are the
owners' side: :mod:`secure_ai.datasites`.
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field

import numpy as np

from . import remote
from .federated import training_assets
from .quiet import quiet
from .runtime import release_memory
from .training import fedavg, model_to_vector, vector_to_model

Trainer = Callable[[Mapping], Mapping]


# --- training code that runs on an owner's datasite (syft sends its source: it imports what it uses) -----
def train_local_epoch(images, labels, weights):
    """One local epoch of SGD on the owner's digits, within the owner's bounds on the message: batches of
    16 to 256 digits, full batches only (every step averages at least 16 digits; FL review 2)."""
    import time

    import numpy as np
    import torch

    from secure_ai.training import checked_model, model_to_vector, train_epoch

    start = time.perf_counter()
    torch.set_num_threads(1)  # a small model: one thread, so that owners sharing a machine do not thrash
    model, m = checked_model(weights, min_batch_size=16, max_lr=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=m["lr"], momentum=m["momentum"])
    loss = train_epoch(model, torch.from_numpy(np.array(images)), torch.from_numpy(np.array(labels)),
                       optimizer, batch_size=m["batch_size"], seed=m["seed"], progress=False, drop_last=True)
    return {"weights": {"vector": model_to_vector(model).numpy()}, "n_samples": len(labels), "loss": loss,
            "train_s": time.perf_counter() - start}


# --- trainers ----------------------------------------------------------------------------------------------
def remote_trainer(client, function_name: str, max_samples: int | None = None) -> Trainer:
    """A trainer that runs the approved ``function_name`` on ``client``'s datasite (``mnist`` assets).

    ``max_samples``: the count the owner declared (syft shows the data scientist only the mock's shape);
    a reply that claims more is dropped.

    Safe to call from a worker thread: unlike :func:`secure_ai.remote.call` it does not redirect the
    process's output (the round does that once, in the main thread).
    """
    if getattr(client.code, function_name, None) is None:
        raise ValueError(f"{client.name} has no function {function_name!r}; request it with request_training")
    inputs = training_assets(client)  # the images and labels, as federated.train_remotely passes them

    def train(message: Mapping) -> Mapping:
        return remote.run(client, function_name, message, inputs, threaded=True,
                          requested_with="request_training")

    train.max_samples = max_samples
    return train


def local_trainer(function: Callable, images, labels) -> Trainer:
    """A trainer that runs ``function(images, labels, message)`` here: a simulation of one owner."""
    images, labels = np.asarray(images), np.asarray(labels)
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"a local owner needs as many labels as images (> 0), got {len(images)} and "
                         f"{len(labels)}")

    def train(message: Mapping) -> Mapping:
        return function(images, labels, dict(message))

    train.max_samples = len(labels)
    return train


# --- one round, and its record -----------------------------------------------------------------------------
@dataclass
class RoundRecord:
    """What happened in one round, for the data scientist's log."""

    round: int
    sampled: list[str]
    answered: dict[str, int] = field(default_factory=dict)   # owner -> samples its update is weighted by
    dropped: dict[str, str] = field(default_factory=dict)    # owner -> why it is not in the average
    late: list[str] = field(default_factory=list)            # no answer by the deadline (a subset of dropped)
    seconds: float = 0.0
    owner_seconds: dict[str, float] = field(default_factory=dict)   # each answered call, as the caller saw it
    failed_after: dict[str, float] = field(default_factory=dict)    # each call that raised: seconds to fail
    metrics: dict[str, dict] = field(default_factory=dict)   # the numbers in each valid reply (loss, ...)
    applied: bool = True      # False: too few answers, the global model was kept as it was
    skipped: str = ""         # why it was kept ("1 answer, 2 needed")
    # late answers that arrived after the round (owner -> the sample count the reply claimed, or None): the
    # data scientist received them, so they are released, but they never enter an average
    late_received: dict[str, int | None] = field(default_factory=dict)

    @property
    def weights(self) -> dict[str, float]:
        """Each survivor's share of the average: its sample count over the survivors' total."""
        total = sum(self.answered.values())
        return {name: n / total for name, n in self.answered.items()}

    def row(self) -> dict:
        """One table row: round, who answered, who dropped and why, the global model, seconds."""
        dropped = {k: v + ("; its answer came later, received but not averaged" if k in self.late_received
                           else "") for k, v in self.dropped.items()}
        return {"round": self.round, "sampled": len(self.sampled),
                "answered (samples)": ", ".join(f"{k} ({v})" for k, v in self.answered.items()) or "-",
                "dropped": "; ".join(f"{k}: {v}" for k, v in dropped.items()) or "-",
                "global model": "averaged" if self.applied else f"kept ({self.skipped})",
                "seconds": round(self.seconds, 2)}


def _check_reply(reply, size: int, cap: int | None) -> tuple[np.ndarray, int]:
    """``(vector, n_samples)`` of an owner's reply, or ``ValueError`` saying what is wrong with it."""
    if not isinstance(reply, Mapping) or not isinstance(reply.get("weights"), Mapping):
        raise ValueError(f"reply must be a dict with 'weights': {{'vector': ...}}, got "
                         f"{type(reply).__name__}")
    vector, n = reply["weights"].get("vector"), reply.get("n_samples")
    if not (isinstance(vector, np.ndarray) and vector.dtype == np.float32 and vector.shape == (size,)):
        raise ValueError(f"weights must be a float32 vector of shape ({size},), got "
                         f"{getattr(vector, 'dtype', type(vector).__name__)} {getattr(vector, 'shape', '')}")
    if not np.isfinite(vector).all():
        raise ValueError("weights hold NaN or infinite values")
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n!r}")
    if cap is not None and n > cap:
        raise ValueError(f"claims {n} samples but declared {cap} at setup")
    return vector, int(n)


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text if len(text) <= 100 else text[:97] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _claimed_samples(reply) -> int | None:
    """The sample count a (late) reply claims, unchecked: what the data scientist received."""
    n = reply.get("n_samples") if isinstance(reply, Mapping) else None
    return int(n) if isinstance(n, int | np.integer) and not isinstance(n, bool) else None


def _run_in_thread(function: Callable, *args) -> Future:
    """``function(*args)`` in a daemon thread: a call stuck on a frozen server never blocks Python's exit."""
    future: Future = Future()

    def target():
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(function(*args))
            except BaseException as error:  # noqa: BLE001 - handed to the round, which records it
                future.set_exception(error)

    threading.Thread(target=target, daemon=True, name="secure-ai-round").start()
    return future


def _run_inline(function: Callable, *args) -> Future:
    """``function(*args)`` in this thread, as a finished future (a new thread per call costs memory)."""
    future: Future = Future()
    try:
        future.set_result(function(*args))
    except Exception as error:  # noqa: BLE001 - handed to the round, which records it
        future.set_exception(error)
    return future


class Federation:
    """The data scientist's view of N owners: concurrent rounds, a deadline, client sampling, a log.

    ``deadline`` (seconds, or ``None`` for none) bounds how long a round waits; ``fraction`` is McMahan's C,
    the share of owners asked each round (at least one); ``min_answers``: a round with fewer valid answers
    keeps the global model (and FedAvgM's velocity) as it was; ``server_momentum`` > 0 turns FedAvg into
    FedAvgM; ``concurrent=False`` calls the owners one after another (for comparison). ``max_samples`` caps
    the count each owner may claim (default: what its trainer declares, e.g. its dataset size).
    """

    def __init__(self, trainers: Mapping[str, Trainer], *, deadline: float | None = None,
                 fraction: float = 1.0, min_answers: int = 1, server_momentum: float = 0.0,
                 server_lr: float = 1.0, concurrent: bool = True,
                 max_samples: Mapping[str, int] | None = None, seed: int = 0):
        if not isinstance(trainers, Mapping) or not trainers:
            raise ValueError("a federation needs at least one data owner: pass {name: trainer}")
        for name, trainer in trainers.items():
            if not callable(trainer):
                raise ValueError(f"trainer of {name!r} must be callable (remote_trainer or local_trainer)")
        if deadline is not None and not (isinstance(deadline, int | float) and deadline > 0
                                         and math.isfinite(deadline)):
            raise ValueError(f"deadline must be a positive number of seconds or None, got {deadline!r}")
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
            raise ValueError(f"fraction (owners asked per round) must be in (0, 1], got {fraction!r}")
        if isinstance(min_answers, bool) or not isinstance(min_answers, int) or min_answers < 1:
            raise ValueError(f"min_answers must be a positive integer, got {min_answers!r}")
        if not 0 <= server_momentum < 1:
            raise ValueError(f"server_momentum must be in [0, 1), got {server_momentum!r}")
        if not server_lr > 0:
            raise ValueError(f"server_lr must be positive, got {server_lr!r}")
        self.trainers = dict(trainers)
        self.deadline, self.fraction, self.concurrent = deadline, float(fraction), concurrent
        if min_answers > self.per_round:
            raise ValueError(f"min_answers={min_answers} but each round asks only {self.per_round} owner(s): "
                             "every round would keep the model")
        self.min_answers = min_answers
        self.server_momentum, self.server_lr = float(server_momentum), float(server_lr)
        self.max_samples = {name: getattr(t, "max_samples", None) for name, t in self.trainers.items()}
        self.max_samples |= dict(max_samples or {})
        self.records: list[RoundRecord] = []
        self._rng = np.random.default_rng(seed)
        self._velocity: np.ndarray | None = None
        self._in_flight: dict[str, tuple[int, Future]] = {}

    @property
    def per_round(self) -> int:
        """How many owners each round asks: all of them, or ``max(1, round(fraction * N))``."""
        n = len(self.trainers)
        return n if self.fraction == 1.0 else max(1, round(self.fraction * n))

    def sample(self) -> list[str]:
        """This round's owners: :attr:`per_round` of them, drawn without replacement."""
        names = list(self.trainers)
        if self.per_round == len(names):
            return names
        return sorted(self._rng.choice(names, size=self.per_round, replace=False).tolist(), key=names.index)

    def round(self, vector: np.ndarray, message: Mapping) -> tuple[np.ndarray, RoundRecord]:
        """Send ``{"vector": vector, **message}`` to this round's owners; aggregate who answered in time.

        Returns ``(new global vector, record)``. With no valid answer the global vector is kept as it was
        (the record says why), so a run survives a round where everybody failed.
        """
        vector = np.asarray(vector, dtype=np.float32)
        if vector.ndim != 1:
            raise ValueError(f"the global model must be a flat vector, got shape {vector.shape}")
        self._collect_late()
        record = RoundRecord(round=len(self.records) + 1, sampled=self.sample())
        full = {**message, "vector": vector}
        tic = time.perf_counter()
        futures = {}
        with quiet():  # once, in this thread: syft's prints from the worker threads are swallowed too
            for name in record.sampled:
                busy = self._in_flight.get(name)
                if busy is not None and not busy[1].done():
                    record.dropped[name] = f"still busy with round {busy[0]}"
                    continue
                if not self.concurrent and self.deadline is None:  # nothing to time out: run it right here
                    futures[name] = _run_inline(self._timed, name, full)
                    continue
                futures[name] = _run_in_thread(self._timed, name, full)
                if not self.concurrent:  # one after another: wait for this owner before asking the next
                    wait([futures[name]], timeout=self._left(tic))
            wait(futures.values(), timeout=self._left(tic))
        record.seconds = time.perf_counter() - tic
        updates, counts = [], []
        for name, future in futures.items():
            if not future.done():
                record.dropped[name] = f"no answer within the {self.deadline:.3g} s deadline"
                record.late.append(name)
                self._in_flight[name] = (record.round, future)
                continue
            self._in_flight.pop(name, None)
            try:
                reply, seconds = future.result()
                update, n = _check_reply(reply, len(vector), self.max_samples.get(name))
            except Exception as error:  # noqa: BLE001 - an owner's failure is recorded, not raised
                record.dropped[name] = _reason(error)
                if hasattr(error, "secure_ai_seconds"):
                    record.failed_after[name] = error.secure_ai_seconds
                continue
            record.owner_seconds[name] = seconds
            record.metrics[name] = {k: float(v) for k, v in reply.items()
                                    if isinstance(v, int | float | np.number) and not isinstance(v, bool)}
            record.answered[name] = n
            updates.append(update)
            counts.append(n)
        self.records.append(record)
        release_memory()  # the worker threads' malloc arenas keep what their calls freed
        if len(updates) < self.min_answers:
            record.applied = False
            record.skipped = (f"{len(updates)} answer{'s' if len(updates) != 1 else ''}, "
                              f"{self.min_answers} needed")
            return vector, record
        return self._apply(vector, fedavg(updates, counts).numpy()), record

    def _left(self, tic: float) -> float | None:
        return None if self.deadline is None else max(self.deadline - (time.perf_counter() - tic), 0.0)

    def _timed(self, name: str, message: Mapping):
        tic = time.perf_counter()
        try:
            reply = self.trainers[name](message)
        except Exception as error:
            error.secure_ai_seconds = time.perf_counter() - tic  # how long the failing call took
            raise
        return reply, time.perf_counter() - tic

    def _apply(self, vector: np.ndarray, average: np.ndarray) -> np.ndarray:
        """FedAvg (momentum 0, lr 1: the average itself) or FedAvgM's server step."""
        if self.server_momentum == 0 and self.server_lr == 1:
            return average.astype(np.float32)
        delta = vector.astype(np.float64) - average
        self._velocity = delta if self._velocity is None else self.server_momentum * self._velocity + delta
        return (vector - self.server_lr * self._velocity).astype(np.float32)

    def step(self, recipe: Mapping, seed: int = 0) -> Callable:
        """A ``step(model, r)`` for :func:`secure_ai.federated.run_rounds`: one round from the model."""

        def step(model, r):
            new, record = self.round(model_to_vector(model).numpy(), {**recipe, "seed": seed + r})
            vector_to_model(new, model)
            return {"answered": len(record.answered), "dropped": len(record.dropped)}

        return step

    def settle(self, timeout: float = 30.0) -> list[str]:
        """Wait up to ``timeout`` s for late answers still in flight; returns the owners still busy after.

        A late answer that arrives is recorded in its round's ``late_received`` (then dropped)."""
        pending = [f for _, f in self._in_flight.values()]
        with quiet():
            wait(pending, timeout=timeout)
        self._collect_late()
        return sorted(self._in_flight)

    def _collect_late(self) -> None:
        """Record the late calls that have finished since: an answer in its round's ``late_received``."""
        for name, (round_number, future) in list(self._in_flight.items()):
            if not future.done():
                continue
            del self._in_flight[name]
            if future.exception() is None:
                reply, _ = future.result()
                self.records[round_number - 1].late_received[name] = _claimed_samples(reply)

    def table(self) -> list[dict]:
        """The log, one row per round (``pandas.DataFrame(federation.table())``)."""
        return [record.row() for record in self.records]


def dropouts(records: Sequence[RoundRecord]) -> dict[str, list[int]]:
    """Rounds each owner was left out of: ``{owner: [round, ...]}`` (only owners that were)."""
    out: dict[str, list[int]] = {}
    for record in records:
        for name in record.dropped:
            out.setdefault(name, []).append(record.round)
    return out

