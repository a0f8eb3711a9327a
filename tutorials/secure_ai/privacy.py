"""Differential privacy: noisy counting queries, DP-SGD with Opacus, and DP-FedAvg with owner-side budgets.

* counting queries: :func:`laplace_mechanism`, :func:`gaussian_mechanism` (analytic calibration)
* DP-SGD: :func:`make_private` wraps a model, an optimizer and tensors with Opacus and returns a
  :class:`PrivateTraining` whose loop counts its (logical) steps and reports the accountant's epsilon
* accounting: :func:`epsilon_spent` (epsilon of a list of runs), :class:`PrivacyLedger` (one per owner)
* DP-FedAvg, owner side: :class:`DPPolicy` (the settings an owner fixes, from a noisy record count),
  :func:`publish_policy`, :func:`approve_dp_training` (checks the code, its inputs and the budget, and
  charges the ledger), :func:`dp_local_update` (the update that runs on the datasite)
* DP-FedAvg, data-scientist side: :func:`request_dp_training`, :func:`run_dp_fedavg`
* plots: :func:`plot_noisy_answers`, :func:`plot_privacy_utility`

Threat model of DP-FedAvg: the data scientist (aggregator) may be malicious; it chooses only the global
weights it sends, which the owner checks. Noise comes from numpy/torch generators: fine for a lesson, not
secure sampling (see Part 3, section 5). Opacus's warnings are silenced here.
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .runtime import release_memory
from .training import _check_data, evaluate

DELTA = 1e-5  # the convention of the published MNIST results (0.6 / 60,000 digits: not far below 1 / N)
ACCOUNTANTS = ("prv", "rdp")


@contextlib.contextmanager
def _quiet_opacus() -> Iterator[None]:
    """Hide Opacus's warnings (secure RNG off, backward hooks) inside the block; errors still propagate."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="opacus")
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        warnings.filterwarnings("ignore", message=".*backward hook.*")
        yield


# --- counting queries -----------------------------------------------------------------------------------
def _is_number(x) -> bool:
    numeric = isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
    return numeric and math.isfinite(x)


def _check_privacy(epsilon: float, delta: float | None = None, sensitivity: float = 1.0) -> None:
    if not (_is_number(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive number, got {epsilon!r}")
    if delta is not None and not (_is_number(delta) and 0 < delta < 1):
        raise ValueError(f"delta must be between 0 and 1 (exclusive), got {delta!r}")
    if not (_is_number(sensitivity) and sensitivity > 0):
        raise ValueError(f"sensitivity must be a positive number, got {sensitivity!r}")


def _rng(seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def laplace_mechanism(true_answer: float, epsilon: float, sensitivity: float = 1.0, size=None, seed=None):
    """``true_answer`` plus Laplace noise of scale ``sensitivity / epsilon``: epsilon-DP.

    ``sensitivity`` is how much the answer can change when one person is added or removed (1 for a
    count). ``size`` draws that many independent answers (to look at their distribution).
    """
    _check_privacy(epsilon, None, sensitivity)
    return true_answer + _rng(seed).laplace(0.0, sensitivity / epsilon, size=size)


def gaussian_noise_scale(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """The smallest Gaussian standard deviation that makes a query (epsilon, delta)-DP.

    Analytic calibration of Balle & Wang (2018): exact for every epsilon, unlike the textbook
    ``sqrt(2 ln(1.25 / delta)) * sensitivity / epsilon``, which only holds for epsilon < 1.
    """
    if delta is None:
        raise ValueError("the Gaussian mechanism needs a delta in (0, 1), e.g. 1e-5; got None "
                         "(for delta = 0 use laplace_mechanism)")
    _check_privacy(epsilon, delta, sensitivity)
    from scipy.special import log_ndtr, ndtr

    def delta_of(sigma: float) -> float:  # the delta that noise of this scale achieves (decreasing)
        a, b = sensitivity / (2 * sigma), epsilon * sigma / sensitivity
        return float(ndtr(a - b) - math.exp(epsilon + log_ndtr(-a - b)))

    low, high = 1e-6 * sensitivity, sensitivity
    while delta_of(high) > delta:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if delta_of(middle) > delta else (low, middle)
    return high


def gaussian_mechanism(true_answer: float, epsilon: float, delta: float, sensitivity: float = 1.0,
                       size=None, seed=None):
    """``true_answer`` plus Gaussian noise calibrated by :func:`gaussian_noise_scale`: (epsilon, delta)-DP."""
    sigma = gaussian_noise_scale(epsilon, delta, sensitivity)
    return true_answer + _rng(seed).normal(0.0, sigma, size=size)


# --- models ----------------------------------------------------------------------------------------------
class TanhCNN(nn.Module):
    """The tempered-sigmoid CNN of Papernot et al. (2021), 26k weights, for DP-SGD on MNIST.

    conv 16@8x8 stride 2 -> tanh -> maxpool 2 (stride 1) -> conv 32@4x4 stride 2 -> tanh -> maxpool 2
    (stride 1) -> fc 32 -> tanh -> fc 10. tanh keeps activations bounded, which suits clipped, noisy
    gradients better than ReLU; there is no BatchNorm, so Opacus accepts it as it is.
    """

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 8, stride=2, padding=2), nn.Tanh(), nn.MaxPool2d(2, 1),  # 16 x 12 x 12
            nn.Conv2d(16, 32, 4, stride=2), nn.Tanh(), nn.MaxPool2d(2, 1),            # 32 x 4 x 4
            nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.Tanh(), nn.Linear(32, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


PHYSICAL_BATCH = 256  # DP-SGD computes a batch in slices of at most this many samples (memory, not math)


class IncompatibleModelError(ValueError):
    """The model has layers DP-SGD cannot train (e.g. BatchNorm mixes the samples of a batch)."""


def check_compatible(model: nn.Module) -> None:
    """Raise :class:`IncompatibleModelError` naming the remedy when Opacus cannot train ``model``."""
    from opacus.validators import ModuleValidator

    with _quiet_opacus():
        problems = ModuleValidator.validate(model, strict=False)
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems)
        raise IncompatibleModelError(
            f"{type(model).__name__} cannot be trained with DP-SGD:\n{listed}\n"
            "Fix: model = ModuleValidator.fix(model)  (from opacus.validators import ModuleValidator), "
            "which swaps BatchNorm for GroupNorm; then create the optimizer for the fixed model."
        )


# --- accounting ------------------------------------------------------------------------------------------
def _accountant(name: str):
    from opacus.accountants import create_accountant

    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {name!r}")
    return create_accountant(name)


def _check_run(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not (_is_number(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be a positive number, got {noise_multiplier!r}")
    if not (_is_number(sample_rate) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer (a count of steps), got {steps!r}")


def poisson_sampling(n_samples: int, batch_size: int) -> tuple[float, int]:
    """``(sample_rate, steps per epoch)`` that :func:`make_private` (Opacus) uses for this data size.

    Each step includes every sample independently with probability ``sample_rate`` = 1 / (number of
    batches of a plain loader), so a batch holds ``batch_size`` samples on average.
    """
    if not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    if not isinstance(batch_size, (int, np.integer)) or not 1 <= batch_size <= n_samples:
        raise ValueError(f"batch_size must be an integer in [1, {n_samples}], got {batch_size!r}")
    sample_rate = 1 / math.ceil(n_samples / batch_size)
    return sample_rate, int(1 / sample_rate)


def epsilon_spent(runs: Sequence[tuple[float, float, int]], delta: float = DELTA,
                  accountant: str = "prv") -> float:
    """Epsilon of a sequence of DP-SGD runs, each ``(noise_multiplier, sample_rate, steps)``.

    Computed from scratch by a fresh Opacus accountant, so it can check the epsilon a training loop
    reports. No steps at all cost nothing: epsilon 0.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be between 0 and 1 (exclusive), got {delta!r}")
    runs = list(runs)
    for run in runs:  # checked before any conversion: 2.5 or -1 steps must not become 2 or a valid run
        if not isinstance(run, Sequence) or len(run) != 3:
            raise ValueError(f"each run must be (noise_multiplier, sample_rate, steps), got {run!r}")
        _check_run(*run)
    runs = [(float(s), float(q), int(n)) for s, q, n in runs]
    merged: dict[tuple[float, float], int] = {}  # runs with the same noise and rate compose like one
    for noise_multiplier, sample_rate, steps in runs:
        merged[noise_multiplier, sample_rate] = merged.get((noise_multiplier, sample_rate), 0) + steps
    history = [(s, q, n) for (s, q), n in merged.items() if n > 0]
    if not history:
        return 0.0
    counter = _accountant(accountant)
    counter.history = history
    with _quiet_opacus():
        return float(counter.get_epsilon(delta=delta))


@dataclass
class PrivacyLedger:
    """One data owner's privacy accountant: every DP run on their data adds to their epsilon.

    Epsilon composes: the more rounds an owner takes part in, the more it has spent. ``budget`` (optional)
    is the most epsilon the owner accepts; ask :meth:`allows` before approving more runs. The ledger
    records every run it is told about, within budget or not: spent privacy cannot be given back.
    """

    owner: str
    delta: float = DELTA
    budget: float | None = None
    accountant: str = "prv"
    runs: list[tuple[float, float, int]] = field(default_factory=list)
    history: list[float] = field(default_factory=list)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int, times: int = 1) -> float:
        """The epsilon this owner would have spent after ``times`` more such runs (nothing is recorded)."""
        _check_run(noise_multiplier, sample_rate, steps)
        if not isinstance(times, int) or times < 0:
            raise ValueError(f"times must be a non-negative integer, got {times!r}")
        return epsilon_spent(self.runs + [(noise_multiplier, sample_rate, steps)] * times, self.delta,
                             self.accountant)

    def allows(self, noise_multiplier: float, sample_rate: float, steps: int, times: int = 1) -> bool:
        """Whether ``times`` more such runs keep this owner within budget (always true without one)."""
        epsilon = self.epsilon_after(noise_multiplier, sample_rate, steps, times)
        return self.budget is None or epsilon <= self.budget

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Add one DP-SGD run on this owner's data; returns the owner's epsilon so far."""
        epsilon = self.epsilon_after(noise_multiplier, sample_rate, steps)
        self.runs.append((float(noise_multiplier), float(sample_rate), int(steps)))
        self.history.append(epsilon)
        return epsilon

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.runs)

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far (at this ledger's delta)."""
        return self.history[-1] if self.history else 0.0

    @property
    def within_budget(self) -> bool:
        return self.budget is None or self.epsilon <= self.budget


# --- DP-SGD ----------------------------------------------------------------------------------------------
@dataclass
class PrivateTraining:
    """Everything a DP-SGD loop needs, made by :func:`make_private`.

    ``model`` is Opacus's wrapper (it computes one gradient per sample); ``module`` is your own model
    inside it. ``steps`` counts the optimizer steps actually taken, which is what epsilon depends on.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    engine: object
    delta: float
    accountant: str
    criterion: nn.Module
    steps: int = 0

    @property
    def module(self) -> nn.Module:
        return self.model._module

    @property
    def noise_multiplier(self) -> float:
        return float(self.optimizer.noise_multiplier)

    @property
    def max_grad_norm(self) -> float:
        return float(self.optimizer.max_grad_norm)

    @property
    def sample_rate(self) -> float:
        return float(self.loader.sample_rate)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def epsilon(self) -> float:
        """Epsilon spent so far, from the privacy engine's own accountant."""
        with _quiet_opacus():
            return float(self.engine.get_epsilon(self.delta)) if self.steps else 0.0

    def train_epoch(self, progress: bool = True, desc: str = "DP-SGD", on_step=None) -> float:
        """One pass of Poisson-sampled batches (clip each sample's gradient, add noise, step).

        Batches larger than :data:`PHYSICAL_BATCH` are computed in slices of that size (Opacus's
        ``BatchMemoryManager``): the same step and the same privacy, in a fraction of the memory.
        Returns the mean training loss; ``on_step(i)`` is called after the i-th step (1-based) of the epoch.
        """
        from opacus.utils.batch_memory_manager import BatchMemoryManager

        from .data import normalize

        self.model.train()
        total, count, step = 0.0, 0, 0
        manager = BatchMemoryManager(data_loader=self.loader, max_physical_batch_size=PHYSICAL_BATCH,
                                     optimizer=self.optimizer)
        with _quiet_opacus(), manager as slices:
            # mininterval: a few updates a second at most, so that a long run does not flood Jupyter
            bar = tqdm(slices, desc=desc, disable=not progress, leave=False, mininterval=1.0)
            for i, (x, y) in enumerate(bar, 1):
                if x.dtype == torch.uint8:  # raw digits stay compact in memory: normalized slice by slice
                    x = normalize(x)
                self.optimizer.zero_grad(set_to_none=True)
                if len(y) == 0:  # an empty Poisson batch is still a step: noise only, and it is accounted
                    for p in self.module.parameters():
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
                    self.optimizer.step()
                else:
                    loss = self.criterion(self.model(x), y)
                    loss.backward()
                    self.optimizer.step()  # a real step only after the last slice of a batch
                    total += loss.item() * len(y)
                count += len(y)
                if i % 10 == 0:
                    release_memory()  # batch sizes vary every step: without this, memory keeps growing
                if not self.optimizer._is_last_step_skipped:
                    self.steps += 1
                    step += 1
                    if on_step is not None:
                        on_step(step)
        # Opacus keeps the last slice's per-sample gradients on the parameters until the next zero_grad
        # (batch x weights floats: 41 MB for Part 5's MLP): drop them, or every trained model carries them
        self.optimizer.zero_grad(set_to_none=True)
        release_memory()
        return total / max(count, 1)

    def fit(self, test: tuple[torch.Tensor, torch.Tensor], epochs: int, evals_per_epoch: int = 1,
            progress: bool = True) -> list[dict]:
        """Train ``epochs`` DP epochs, evaluating on ``test`` ``evals_per_epoch`` times per epoch.

        Returns one ``{"epoch", "steps", "epsilon", "accuracy"}`` per evaluation (``epoch`` may be 0.5).
        """
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        if not isinstance(evals_per_epoch, int) or not 1 <= evals_per_epoch <= self.steps_per_epoch:
            raise ValueError(
                f"evals_per_epoch must be in [1, {self.steps_per_epoch}], got {evals_per_epoch!r}")
        per_epoch = self.steps_per_epoch
        checkpoints = {round(per_epoch * k / evals_per_epoch): k for k in range(1, evals_per_epoch + 1)}
        history = []
        bar = tqdm(range(epochs), desc=f"DP-SGD (sigma={self.noise_multiplier:.2f})", disable=not progress)

        def record(epoch: int, step: int) -> None:
            if step in checkpoints:
                accuracy = evaluate(self.module, *test)[0]
                self.model.train()
                history.append({"epoch": epoch + checkpoints[step] / evals_per_epoch, "steps": self.steps,
                                "epsilon": self.epsilon(), "accuracy": accuracy})
                bar.set_postfix(test_acc=f"{accuracy:.4f}", epsilon=f"{history[-1]['epsilon']:.2f}")

        for epoch in bar:
            self.train_epoch(progress=progress, on_step=functools.partial(record, epoch))
        return history


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int,
    max_grad_norm: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    epochs: int | None = None,
    delta: float = DELTA,
    accountant: str = "prv",
    sample_rate: float | None = None,
) -> PrivateTraining:
    """Make ``model`` + ``optimizer`` train with DP-SGD on ``(images, labels)``, via Opacus.

    Give either ``noise_multiplier`` (then epsilon grows as you train), or ``target_epsilon`` and
    ``epochs`` (Opacus picks the smallest noise that stays within epsilon after that many epochs).
    Batches are Poisson-sampled with rate ``batch_size / len(images)``, as the accountant assumes.
    With ``sample_rate`` (and ``noise_multiplier``), the rate, the steps per epoch (``int(1 / rate)``)
    and the divisor of each noisy gradient sum (``batch_size``) are fixed by the caller and do not
    depend on ``len(images)``: what DP-FedAvg needs so that nothing released depends on the exact n.
    Raw uint8 digits (N, 28, 28) stay raw (a quarter of the memory); each slice is normalized as it is used.
    """
    images, labels = torch.as_tensor(images), torch.as_tensor(labels)
    _check_data(images, labels)
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("give exactly one of noise_multiplier or target_epsilon (with epochs)")
    if target_epsilon is not None:
        _check_privacy(target_epsilon, delta)
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"target_epsilon needs epochs, a positive integer; got {epochs!r}")
    elif not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be positive, got {noise_multiplier!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be between 0 and 1 (exclusive), got {delta!r}")
    if sample_rate is not None:
        if target_epsilon is not None or not (_is_number(sample_rate) and 0 < sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], with noise_multiplier; got {sample_rate!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size (the expected batch) must be a positive int, got {batch_size!r}")
    elif not isinstance(batch_size, int) or not 1 <= batch_size <= len(images):
        raise ValueError(f"batch_size must be an integer in [1, {len(images)}], got {batch_size!r}")
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm!r}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    check_compatible(model)

    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    dataset = TensorDataset(images, labels)
    loader = DataLoader(dataset, batch_size=batch_size) if sample_rate is None else \
        DPDataLoader(dataset, sample_rate=sample_rate)  # Poisson batches at the caller's rate
    criterion = nn.CrossEntropyLoss()
    with _quiet_opacus():
        engine = PrivacyEngine(accountant=accountant)
        # "ew" (expanded weights): per-sample gradients from one batched backward pass, about 25% faster
        # on a CPU than Opacus's default hooks for the same clipping and noise (measured on TanhCNN)
        common = dict(module=model, optimizer=optimizer, data_loader=loader, max_grad_norm=max_grad_norm,
                      grad_sample_mode="ew")
        if target_epsilon is not None:
            wrapped, dp_optimizer, dp_loader = engine.make_private_with_epsilon(
                **common, target_epsilon=target_epsilon, target_delta=delta, epochs=epochs)
        else:
            wrapped, dp_optimizer, dp_loader = engine.make_private(
                **common, noise_multiplier=noise_multiplier, poisson_sampling=sample_rate is None)
    if sample_rate is not None:  # Opacus derives both from len(images): fix them to the caller's values
        dp_optimizer.expected_batch_size = batch_size
        dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return PrivateTraining(wrapped, dp_optimizer, dp_loader, engine, delta, accountant, criterion)


# --- federated: what each owner fixes, checks and charges --------------------------------------------------
POLICY_DATASET = "dp-policy"  # the owner's DP settings live on its datasite, as an asset of this dataset
_POLICY_FIELDS = ("noise_multiplier", "max_grad_norm", "batch_size", "epochs", "lr", "momentum",
                  "noisy_count", "count_noise")


class DPRequestRefused(ValueError):
    """An owner refused a DP training request (wrong code, inputs not pinned, or over budget)."""


@dataclass(frozen=True)
class DPPolicy:
    """One owner's DP-SGD settings for DP-FedAvg, fixed by the owner: the data scientist sets none of them.

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
            if not _is_number(value) or value < 0 or (value == 0 and name != "momentum"):
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


def publish_policy(owner, ledger: PrivacyLedger, n_records: int, *, noise_multiplier: float,
                   max_grad_norm: float, batch_size: int, epochs: int, lr: float, momentum: float = 0.9,
                   count_noise: float = 50.0, seed=None) -> DPPolicy:
    """Owner side: release a noisy count of the records, fix the DP settings, put them on the datasite.

    The count gets Gaussian noise of std ``count_noise`` (a count has sensitivity 1) and is charged on
    ``ledger``; everything else derives from it. The asset's mock is the policy itself: it is public, and
    the data scientist needs it to plan.
    """
    if not isinstance(n_records, (int, np.integer)) or n_records < 1:
        raise ValueError(f"n_records must be a positive integer, got {n_records!r}")
    noisy_count = max(int(batch_size), int(round(gaussian_noise(n_records, count_noise, seed))))
    policy = DPPolicy(noise_multiplier, max_grad_norm, batch_size, epochs, lr, momentum, noisy_count,
                      count_noise)
    ledger.record(*policy.count_release)
    owner.upload_dataset(POLICY_DATASET, private={"policy": policy.to_array()},
                         mock={"policy": policy.to_array()},
                         description=f"{owner.name}'s DP-SGD settings for DP-FedAvg (public)")
    return policy


def gaussian_noise(value: float, std: float, seed=None) -> float:
    """``value`` plus one draw of N(0, std^2), from numpy: fine for a lesson, not secure sampling (Part 3)."""
    if not (_is_number(std) and std > 0):
        raise ValueError(f"std must be a positive number, got {std!r}")
    return float(value + _rng(seed).normal(0.0, std))


def dp_train(images, labels, weights, policy):
    """The DP-FedAvg local update the owners approve (:func:`approve_dp_training` accepts only this code)."""
    from secure_ai.privacy import dp_local_update

    return dp_local_update(images, labels, weights, policy)


def _check_weights(weights) -> dict[str, np.ndarray]:
    """Untrusted weights from the data scientist: TanhCNN's names and shapes, finite floats, nothing else."""
    if not isinstance(weights, Mapping):
        raise ValueError(f"weights must be a dict of arrays, got {type(weights).__name__}")
    expected = {name: tuple(t.shape) for name, t in TanhCNN().state_dict().items()}
    if set(weights) != set(expected):
        raise ValueError(f"weights must have exactly TanhCNN's names {sorted(expected)}, "
                         f"got {sorted(weights)}")
    checked = {}
    for name, value in weights.items():
        array = np.asarray(value)
        if array.dtype.kind != "f" or array.shape != expected[name] or not np.isfinite(array).all():
            raise ValueError(f"weight {name!r} must be finite floats of shape {expected[name]}, "
                             f"got {array.dtype} {array.shape}")
        checked[name] = array.astype(np.float32)
    return checked


def dp_local_update(images, labels, weights: Mapping[str, np.ndarray], policy) -> dict:
    """One data owner's DP-SGD update in a DP-FedAvg round, run on the owner's datasite.

    ``images`` are the owner's raw uint8 digits (N, 28, 28); ``policy`` the owner's :class:`DPPolicy`
    (or its asset array); ``weights``, the global :class:`TanhCNN` weights, is the one input the data
    scientist chooses and is checked. Returns only ``weights`` (DP-trained) and the public ``noisy_count``:
    nothing that depends on the exact number of records.
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
    """Owner side: approve the data scientist's pending DP-FedAvg request, or deny it and raise.

    Approves only a request that carries one code, exactly :func:`dp_train` (the owner's own copy), whose
    inputs pin ``images``, ``labels`` and ``policy`` to this owner's assets (``weights`` is the only free
    input), with a run limit N such that N rounds of ``policy`` keep ``ledger`` within its budget.
    All N rounds are charged on ``ledger`` now: the data scientist may use every one. Returns N.
    """
    import inspect

    from syft.service.policy.policy import OutputPolicyExecuteCount

    from .federated import DATASET

    matches = [r for r in owner.pending_requests()
               if getattr(r.code, "service_func_name", None) == function_name]
    if len(matches) != 1:
        raise DPRequestRefused(f"{owner.name}: expected one pending request for {function_name!r}, "
                               f"found {len(matches)}")
    request, code = matches[0], matches[0].code
    rules = list((code.input_policy_init_kwargs or {}).values())
    assets = owner.client.datasets[DATASET].assets
    policy_asset = owner.client.datasets[POLICY_DATASET].assets["policy"]
    limit = (code.output_policy_init_kwargs or {}).get("limit")
    if len(request.changes) != 1:
        reason = "the request carries more than one code change"
    elif code.raw_code.strip() != inspect.getsource(dp_train).strip():
        reason = "its code is not secure_ai.privacy.dp_train"
    elif (len(rules) != 1 or set(rules[0]) != {"images", "labels", "weights", "policy"}
          or not all(_pinned(rules[0][name], asset) for name, asset in
                     [("images", assets["images"]), ("labels", assets["labels"]), ("policy", policy_asset)])):
        reason = "its inputs do not pin images, labels and policy to this datasite's assets"
    elif not np.array_equal(DPPolicy.from_array(policy_asset.data).to_array(), policy.to_array()):
        reason = "the policy on the datasite is not the owner's"
    elif code.output_policy_type is not OutputPolicyExecuteCount or not isinstance(limit, int) or limit < 1:
        reason = "it does not limit the number of runs"
    elif not ledger.allows(*policy.run, times=limit):
        reason = (f"{limit} rounds would spend epsilon {ledger.epsilon_after(*policy.run, times=limit):.2f}, "
                  f"over the budget of {ledger.budget}")
    else:
        reason = None
    if reason is not None:
        owner.deny(function_name, f"DP request refused: {reason}")
        raise DPRequestRefused(f"{owner.name} refused {function_name!r}: {reason}")
    from .quiet import quiet

    with quiet():
        result = request.approve()
    if type(result).__name__ == "SyftError":
        raise RuntimeError(f"{owner.name} could not approve {function_name!r}: {result.message}")
    for _ in range(limit):
        ledger.record(*policy.run)
    return limit


# --- federated: the data scientist's side --------------------------------------------------------------
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
    """DP-FedAvg rounds (each owner runs :func:`dp_train`), averaged with the owners' noisy counts as weights.

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

    history, _ = run_rounds(model, rounds, step, test, desc="DP FedAvg rounds", progress=progress)
    return history, last


# --- plots -----------------------------------------------------------------------------------------------
def plot_noisy_answers(answers: Mapping[str, Sequence[float]], bins: int = 60, ax=None):
    """Overlaid histograms of a mechanism's answers, e.g. on two datasets that differ in one person."""
    import matplotlib.pyplot as plt

    if not answers:
        raise ValueError("answers is empty: pass {dataset name: noisy answers}")
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.2))
    values = np.concatenate([np.asarray(a, dtype=float).ravel() for a in answers.values()])
    edges = np.linspace(values.min(), values.max(), bins + 1)
    for name, a in answers.items():
        ax.hist(np.asarray(a, dtype=float).ravel(), bins=edges, alpha=0.5, label=name)
    ax.set(xlabel="noisy answer", ylabel="how often")
    ax.legend()
    ax.figure.tight_layout()
    return ax.figure


_EPSILON_TICKS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 3, 5, 8, 10, 20, 50)


def plot_privacy_utility(curves: Mapping[str, Sequence[tuple[float, float]]], baseline: float | None = None,
                         anchors: Mapping[str, tuple[float, float]] | None = None, log_epsilon: bool = True,
                         xlabel: str = "epsilon (delta = 1e-5)", ax=None):
    """Test accuracy against epsilon: one line of ``(epsilon, accuracy)`` points per run.

    ``baseline`` draws the non-private model's accuracy as a horizontal line; ``anchors`` marks
    published results ``{label: (epsilon, accuracy)}``. Epsilon is on a log scale unless ``log_epsilon``
    is false. Compare like with like: give every curve and anchor by the same accountant, named in ``xlabel``.
    """
    import matplotlib.pyplot as plt

    if not curves:
        raise ValueError("curves is empty: pass {run name: [(epsilon, accuracy), ...]}")
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 4))
    epsilons = []
    for name, points in curves.items():
        points = np.asarray(points, dtype=float).reshape(-1, 2)
        ax.plot(points[:, 0], points[:, 1], marker="o", label=name)
        epsilons.extend(points[:, 0])
    if baseline is not None:
        ax.axhline(baseline, color="black", linestyle="--", label=f"non-private ({baseline:.1%})")
    for label, (epsilon, accuracy) in (anchors or {}).items():
        ax.plot([epsilon], [accuracy], marker="*", markersize=12, linestyle="none", label=label)
        epsilons.append(epsilon)
    ax.set(xlabel=xlabel, ylabel="test accuracy")
    if log_epsilon:
        ax.set_xscale("log")
        low, high = min(epsilons), max(epsilons)
        ticks = [t for t in _EPSILON_TICKS if low / 1.5 <= t <= high * 1.5]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.figure.tight_layout()
    return ax.figure
