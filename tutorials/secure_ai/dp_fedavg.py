"""Part 3's federated DP-SGD: each owner trains with DP-SGD on its datasite, within a budget it sets.

Record-level DP per owner (McMahan et al.'s DP-FedAvg is something else: user-level DP, clipped and noised
by the server).

* owner side: :class:`DPPolicy` (the settings an owner fixes, from a noisy record count),
  :func:`ledger_path` (where an owner's :class:`~secure_ai.privacy.PrivacyLedger` file lives),
  :func:`publish_policy`, :func:`approve_dp_training` (checks the code, its inputs and the budget, charges
  the ledger, then approves through :meth:`secure_ai.datasites.DataOwner.approve`), :func:`dp_local_update`
  (the update that runs on the datasite) and :func:`dp_train` (the function the owners approve)
* data-scientist side: :func:`public_policy`, :func:`request_dp_training`, :func:`run_dp_fedavg`

Threat model: the data scientist (aggregator) may be malicious. It chooses the global weights it sends, which
the owner checks (names, shapes, finite and within :data:`MAX_WEIGHT` after the cast to float32); it may
seed torch, numpy and ``random`` in the process the owner's code runs in, which is why the noisy count and
DP-SGD's sampling and noise come from the operating system's secure source (:func:`secure_ai.privacy.
gaussian_noise`, :func:`secure_ai.dp_sgd.os_generator`); and it chooses when to call. :func:`dp_train` runs
on the datasite and imports this module there, so this module imports nothing that imports syft; the syft
plumbing (:mod:`secure_ai.federated`) is imported where used.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .dp_sgd import TanhCNN, make_private
from .privacy import DELTA, BudgetExceeded, PrivacyLedger, epsilon_spent, gaussian_noise, is_number

# --- what each owner fixes, checks and charges --------------------------------------------------------------
POLICY_DATASET = "dp-policy"  # the owner's DP settings live on its datasite, as an asset of this dataset
_POLICY_FIELDS = ("noise_multiplier", "max_grad_norm", "batch_size", "epochs", "lr", "momentum",
                  "noisy_count", "count_noise")
# The largest |weight| an owner accepts. A TanhCNN trained with DP-SGD stays far below it (largest |w| 1.2
# after Part 3's three rounds); it keeps each per-sample gradient far from float32's range (DP-SGD also
# zeroes any non-finite one).
MAX_WEIGHT = 1e3


class DPRequestRefused(ValueError):
    """An owner refused a DP training request (wrong code, inputs not pinned, or over budget)."""


@dataclass(frozen=True)
class DPPolicy:
    """One owner's DP-SGD settings for federated DP-SGD, fixed by the owner: the data scientist sets none.

    Unit of privacy: one record of this owner. Neighbouring datasets: this owner's records with one record
    added or removed (the relation Opacus's accountants assume); the other owners' data is fixed. So nothing
    that leaves the datasite may depend on the exact record count n: the sample rate, the steps per round
    and the divisor of each noisy gradient sum all come from ``noisy_count``, a count the owner releases
    once with Gaussian noise of std ``count_noise`` (its cost is on the owner's ledger), and FedAvg weighs
    the owners by that noisy count too.
    """

    noise_multiplier: float
    max_grad_norm: float
    batch_size: int  # expected batch size: sample rate = batch_size / noisy_count; divides each noisy sum
    epochs: int  # passes over (about) noisy_count records per round
    lr: float
    momentum: float
    noisy_count: int
    count_noise: float

    def __post_init__(self):
        for name in _POLICY_FIELDS:
            value = getattr(self, name)
            if not is_number(value) or value < 0 or (value == 0 and name != "momentum"):
                raise ValueError(f"DP policy: {name} must be a positive number, got {value!r}")
        for name in ("batch_size", "epochs", "noisy_count"):
            if int(getattr(self, name)) != getattr(self, name):
                raise ValueError(f"DP policy: {name} must be an integer, got {getattr(self, name)!r}")
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.momentum >= 1 or self.batch_size > self.noisy_count or self.epochs > 100:
            raise ValueError("DP policy: need momentum < 1, batch_size <= noisy_count and at most 100 epochs")

    @property
    def sample_rate(self) -> float:
        return self.batch_size / self.noisy_count

    @property
    def steps(self) -> int:
        """DP-SGD steps in one round (one approved run)."""
        return self.epochs * int(1 / self.sample_rate)

    @property
    def run(self) -> tuple[float, float, int]:
        """One round's ``(noise_multiplier, sample_rate, steps)``, as :func:`epsilon_spent` takes it."""
        return float(self.noise_multiplier), self.sample_rate, self.steps

    @property
    def count_release(self) -> tuple[float, float, int]:
        """The noisy count as a run: the Gaussian mechanism (sensitivity 1) is one step with q = 1."""
        return float(self.count_noise), 1.0, 1

    def epsilon(self, rounds: int, delta: float = DELTA, accountant: str = "prv") -> float:
        """The owner's epsilon after releasing the noisy count and ``rounds`` rounds."""
        if not isinstance(rounds, (int, np.integer)) or rounds < 0:
            raise ValueError(f"rounds must be a non-negative integer, got {rounds!r}")
        return epsilon_spent([self.count_release] + [self.run] * int(rounds), delta, accountant)

    def to_array(self) -> np.ndarray:
        """The policy as the asset the approved code reads: one float64 row, fields in a fixed order."""
        return np.array([[float(getattr(self, name)) for name in _POLICY_FIELDS]])

    @classmethod
    def from_array(cls, array) -> DPPolicy:
        array = np.asarray(array, dtype=np.float64)
        if array.shape != (1, len(_POLICY_FIELDS)):
            raise ValueError(f"a DP policy asset has shape (1, {len(_POLICY_FIELDS)}), got {array.shape}")
        return cls(**dict(zip(_POLICY_FIELDS, array[0].tolist())))


def ledger_path(owner) -> Path:
    """Owner side: the file of its :class:`~secure_ai.privacy.PrivacyLedger`, next to its datasite's folder.

    Not inside it: syft empties that folder when the datasite restarts, and the ledger must outlive a
    restart. It lives in this process's syft folder (removed at exit, as the in-memory datasites are); a
    real owner keeps it on storage of its own: ``PrivacyLedger(name, budget=..., path=...)``.
    """
    from .datasites import TEMP_ROOT  # imports syft quietly, patched

    return TEMP_ROOT / "privacy-ledgers" / f"{owner.name}.json"


def publish_policy(owner, ledger: PrivacyLedger, n_records: int, *, noise_multiplier: float,
                   max_grad_norm: float, batch_size: int, epochs: int, lr: float, momentum: float = 0.9,
                   count_noise: float = 50.0) -> DPPolicy:
    """Owner side: release a noisy count of the records, fix the DP settings, put them on the datasite.

    The count gets Gaussian noise of std ``count_noise`` (a count has sensitivity 1), drawn from the
    operating system (no seed: one the caller could pass would give the count away), and is charged on
    ``ledger``; everything else derives from it. The asset's mock is the policy itself: it is public, and
    the data scientist needs it to plan.
    """
    if not isinstance(n_records, (int, np.integer)) or n_records < 1:
        raise ValueError(f"n_records must be a positive integer, got {n_records!r}")
    noisy_count = max(int(batch_size), int(round(gaussian_noise(n_records, count_noise))))
    policy = DPPolicy(noise_multiplier, max_grad_norm, batch_size, epochs, lr, momentum, noisy_count,
                      count_noise)
    ledger.record(*policy.count_release)
    owner.upload_dataset(POLICY_DATASET, private={"policy": policy.to_array()},
                         mock={"policy": policy.to_array()},
                         description=f"{owner.name}'s DP-SGD settings for federated DP-SGD (public)")
    return policy


def dp_train(images, labels, weights, policy):
    """The federated DP-SGD local update the owners approve (:func:`approve_dp_training` accepts only it)."""
    from secure_ai.dp_fedavg import dp_local_update

    return dp_local_update(images, labels, weights, policy)


def _check_weights(weights) -> dict[str, np.ndarray]:
    """Untrusted weights from the data scientist: TanhCNN's names and shapes, floats that are finite and
    within :data:`MAX_WEIGHT` as float32 (checked after the cast: float64 1e300 becomes inf)."""
    if not isinstance(weights, Mapping):
        raise ValueError(f"weights must be a dict of arrays, got {type(weights).__name__}")
    expected = {name: tuple(t.shape) for name, t in TanhCNN().state_dict().items()}
    if set(weights) != set(expected):
        raise ValueError(f"weights must have exactly TanhCNN's names {sorted(expected)}, "
                         f"got {sorted(weights)}")
    checked = {}
    for name, value in weights.items():
        array = np.asarray(value)
        if array.dtype.kind != "f" or array.shape != expected[name]:
            raise ValueError(f"weight {name!r} must be finite floats of shape {expected[name]}, "
                             f"got {array.dtype} {array.shape}")
        with np.errstate(over="ignore"):
            array = array.astype(np.float32)
        if not (np.isfinite(array).all() and np.abs(array).max(initial=0) <= MAX_WEIGHT):
            raise ValueError(f"weight {name!r} must be finite, within +-{MAX_WEIGHT:g} as float32 (the "
                             f"owner's bound); its largest |value| is {np.abs(array).max():.3g}")
        checked[name] = array
    return checked


def dp_local_update(images, labels, weights: Mapping[str, np.ndarray], policy) -> dict:
    """One data owner's DP-SGD update in a federated DP-SGD round, run on the owner's datasite.

    ``images`` are the owner's raw uint8 digits (N, 28, 28); ``policy`` the owner's :class:`DPPolicy`
    (or its asset array); ``weights``, the global :class:`TanhCNN` weights, is the one input the data
    scientist chooses and is checked. Returns only ``weights`` (DP-trained) and the public ``noisy_count``:
    nothing that depends on the exact number of records. The Poisson sampling and the noise come from a
    generator the operating system seeds (:func:`secure_ai.dp_sgd.make_private`'s default), whatever the
    caller did to torch's or numpy's global generators.
    """
    from .training import get_weights, set_weights

    policy = policy if isinstance(policy, DPPolicy) else DPPolicy.from_array(policy)
    weights = _check_weights(weights)
    images = torch.from_numpy(np.array(images, dtype=np.uint8))  # a copy: syft may hand over read-only arrays
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    model = set_weights(TanhCNN(), weights)
    optimizer = torch.optim.SGD(model.parameters(), lr=policy.lr, momentum=policy.momentum)
    private = make_private(model, optimizer, images, labels, batch_size=policy.batch_size,
                           max_grad_norm=policy.max_grad_norm, noise_multiplier=policy.noise_multiplier,
                           sample_rate=policy.sample_rate)
    for _ in range(policy.epochs):
        private.train_epoch(progress=False)
    if private.steps != policy.steps:  # the ledger charged policy.steps per round
        raise RuntimeError(f"took {private.steps} DP steps, the policy allows {policy.steps}")
    return {"weights": get_weights(model), "noisy_count": policy.noisy_count}


def _pinned(rule, asset) -> bool:
    return type(rule).__name__ == "Matches" and getattr(rule, "val", None) == asset.action_id


def approve_dp_training(owner, ledger: PrivacyLedger, policy: DPPolicy,
                        function_name: str = "dp_train") -> int:
    """Owner side: approve the data scientist's pending federated DP-SGD request, or deny it and raise.

    Approves only a request that carries one code, exactly :func:`dp_train` (the owner's own copy), and
    nothing else (a second code change, or nested code, is refused), whose inputs pin ``images``, ``labels``
    and ``policy`` to this owner's assets (``weights`` is the only free input), with a run limit N such that
    N rounds of ``policy`` keep ``ledger`` within its budget. All N rounds are charged on ``ledger`` first,
    in one locked step (:meth:`~secure_ai.privacy.PrivacyLedger.charge`), and only then approved: the data
    scientist may use every one, and the ledger is never behind the runs (if the approval itself fails,
    the charge stays: ahead, never behind). The approval is the owner's own
    (:meth:`~secure_ai.datasites.DataOwner.approve`), bound to the request and code reviewed here.
    Returns N.
    """
    try:  # the owner's own review: one request, one code, nothing nested (else ValueError)
        owner.code_of(function_name)
        request = owner.pending_request(function_name)
    except ValueError as error:
        reason = str(error)
    else:
        reason = _refusal(owner, ledger, policy, request)
    if reason is None:
        limit = request.code.output_policy_init_kwargs["limit"]
        try:
            ledger.charge(*policy.run, times=limit)
        except BudgetExceeded as error:
            reason = str(error)
    if reason is not None:
        try:
            owner.deny(function_name, f"DP request refused: {reason}")
        except ValueError:  # no pending request of that name: nothing to deny
            pass
        raise DPRequestRefused(f"{owner.name} refused {function_name!r}: {reason}")
    owner.approve(function_name)  # exactly the request and code reviewed above
    return limit


def _refusal(owner, ledger: PrivacyLedger, policy: DPPolicy, request) -> str | None:
    """Why ``owner`` refuses this federated DP-SGD request, or ``None`` when every check passes (the budget is
    checked again when the ledger is charged).

    The request carries exactly one code and nothing nested: :meth:`DataOwner.code_of` checked that first.
    """
    import inspect

    from .federated import DATASET  # first: it imports syft (quietly, patched) through secure_ai.datasites

    from syft.service.policy.policy import OutputPolicyExecuteCount  # isort: skip

    code = request.code
    rules = list((code.input_policy_init_kwargs or {}).values())
    assets = owner.client.datasets[DATASET].assets
    policy_asset = owner.client.datasets[POLICY_DATASET].assets["policy"]
    limit = (code.output_policy_init_kwargs or {}).get("limit")
    if code.raw_code.strip() != inspect.getsource(dp_train).strip():
        return "its code is not secure_ai.dp_fedavg.dp_train"
    if (len(rules) != 1 or set(rules[0]) != {"images", "labels", "weights", "policy"}
            or not all(_pinned(rules[0][name], asset) for name, asset in [
                ("images", assets["images"]), ("labels", assets["labels"]), ("policy", policy_asset)])):
        return "its inputs do not pin images, labels and policy to this datasite's assets"
    if not np.array_equal(DPPolicy.from_array(policy_asset.data).to_array(), policy.to_array()):
        return "the policy on the datasite is not the owner's"
    if code.output_policy_type is not OutputPolicyExecuteCount or not isinstance(limit, int) or limit < 1:
        return "it does not limit the number of runs"
    if not ledger.allows(*policy.run, times=limit):
        return (f"{limit} rounds would spend epsilon {ledger.epsilon_after(*policy.run, times=limit):.2f}, "
                f"over the budget of {ledger.budget}")
    return None


# --- the data scientist's side ------------------------------------------------------------------------------
def _policy_input(client) -> dict:
    if POLICY_DATASET not in [d.name for d in client.datasets]:
        raise ValueError(f"{client.name} has published no DP policy (the owner runs publish_policy first)")
    return {"policy": client.datasets[POLICY_DATASET].assets["policy"]}


def public_policy(client) -> DPPolicy:
    """Data-scientist side: an owner's published :class:`DPPolicy` (the asset's mock, which is the policy)."""
    return DPPolicy.from_array(_policy_input(client)["policy"].mock)


def request_dp_training(client, rounds: int):
    """Data-scientist side: ask an owner to run :func:`dp_train` with its own policy for ``rounds`` rounds."""
    from .federated import request_training

    return request_training(client, dp_train, rounds=rounds, extra_assets=_policy_input(client))


def run_dp_fedavg(model: nn.Module, clients: Mapping[str, object], rounds: int, test, progress: bool = True):
    """Federated DP-SGD rounds (each owner runs :func:`dp_train`), averaged with the noisy counts as weights.

    Returns ``(test accuracy per round, {owner: what its datasite returned in the last round})``; ``model``
    ends up with the final global weights. The owners' ledgers are theirs: nothing here records privacy.
    """
    from .federated import run_rounds, train_remotely
    from .training import fedavg, get_weights, set_weights

    inputs = {name: _policy_input(client) for name, client in clients.items()}
    last = {}

    def step(model, r):
        weights = get_weights(model)
        results = {name: train_remotely(client, "dp_train", weights, extra_assets=inputs[name])
                   for name, client in clients.items()}
        set_weights(model, fedavg([v["weights"] for v in results.values()],
                                  [v["noisy_count"] for v in results.values()]))
        last.update(results)

    history, _ = run_rounds(model, rounds, step, test, desc="federated DP-SGD rounds", progress=progress)
    return history, last

