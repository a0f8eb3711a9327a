"""Differential privacy's maths: noise mechanisms, privacy accounting, and the most DP lets any attack learn.

* counting queries: :func:`laplace_mechanism`, :func:`gaussian_mechanism` (analytic calibration), and
  :func:`gaussian_noise` (one draw from the operating system's secure source, as an owner releases a noisy
  record count)
* accounting: :func:`poisson_sampling`, :func:`epsilon_spent` (epsilon of a list of DP-SGD runs),
  :func:`noise_for_epsilon` (the noise that keeps a training, after earlier releases, within a target),
  :func:`classical_epsilon` and :func:`epsilons` (the same runs by the three conventions in use),
  :data:`MNIST_ANCHORS` (published DP-SGD results on MNIST, with their runs where known), and
  :class:`PrivacyLedger` (one per owner, kept in a file that survives a restart)
* the bound: :func:`dp_tpr_bound`, the highest true-positive rate any membership attack can reach against an
  (epsilon, delta)-DP training (Kairouz et al. 2015)

Training with DP lives in :mod:`secure_ai.dp_sgd` (DP-SGD with Opacus) and :mod:`secure_ai.dp_fedavg`
(federated DP-SGD, record-level DP per owner, on the owners' datasites); the chapter's figures are in
:mod:`secure_ai.plots`.
:func:`laplace_mechanism` and :func:`gaussian_mechanism` take a ``seed`` so that a lesson's figures can be
reproduced; without one they draw from fresh OS entropy. What an owner releases draws from the OS only:
:func:`gaussian_noise` takes no seed (DP review 3.10), and DP-SGD's generator is seeded by the OS
(:func:`secure_ai.dp_sgd.os_generator`).
"""
from __future__ import annotations

import json
import math
import os
import random
import threading
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .quiet import quiet_opacus

DELTA = 1e-5  # the convention of the published MNIST results (0.6 / 60,000 digits: not far below 1 / N)
ACCOUNTANTS = ("prv", "rdp")


# --- counting queries ---------------------------------------------------------------------------------------
def is_number(x) -> bool:
    """True for a finite int or float (NumPy's too), False for a bool, NaN, infinity or anything else."""
    numeric = isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
    return numeric and math.isfinite(x)


def check_privacy(epsilon: float, delta: float | None = None, sensitivity: float = 1.0) -> None:
    """``ValueError`` unless epsilon > 0, delta (when given) in (0, 1) and sensitivity > 0."""
    if not (is_number(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive number, got {epsilon!r}")
    if delta is not None and not (is_number(delta) and 0 < delta < 1):
        raise ValueError(f"delta must be between 0 and 1 (exclusive), got {delta!r}")
    if not (is_number(sensitivity) and sensitivity > 0):
        raise ValueError(f"sensitivity must be a positive number, got {sensitivity!r}")


def _rng(seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def laplace_mechanism(true_answer: float, epsilon: float, sensitivity: float = 1.0, size=None, seed=None):
    """``true_answer`` plus Laplace noise of scale ``sensitivity / epsilon``: epsilon-DP.

    ``sensitivity`` is how much the answer can change when one person is added or removed (1 for a
    count). ``size`` draws that many independent answers (to look at their distribution).
    """
    check_privacy(epsilon, None, sensitivity)
    return true_answer + _rng(seed).laplace(0.0, sensitivity / epsilon, size=size)


def gaussian_noise_scale(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """The smallest Gaussian standard deviation that makes a query (epsilon, delta)-DP.

    Analytic calibration of Balle & Wang (2018): exact for every epsilon, unlike the textbook
    ``sqrt(2 ln(1.25 / delta)) * sensitivity / epsilon``, which only holds for epsilon < 1.
    """
    if delta is None:
        raise ValueError("the Gaussian mechanism needs a delta in (0, 1), e.g. 1e-5; got None "
                         "(for delta = 0 use laplace_mechanism)")
    check_privacy(epsilon, delta, sensitivity)
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


def gaussian_noise(value: float, std: float) -> float:
    """``value`` plus one draw of N(0, std^2) from the operating system's secure source (``os.urandom``).

    No seed: a count released with noise that a caller could seed is a count it could read exactly.
    """
    if not (is_number(std) and std > 0):
        raise ValueError(f"std must be a positive number, got {std!r}")
    return float(value + random.SystemRandom().normalvariate(0.0, std))


# --- accounting ---------------------------------------------------------------------------------------------
def _accountant(name: str):
    from opacus.accountants import create_accountant

    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {name!r}")
    return create_accountant(name)


def _check_run(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not (is_number(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be a positive number, got {noise_multiplier!r}")
    if not (is_number(sample_rate) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer (a count of steps), got {steps!r}")


def poisson_sampling(n_samples: int, batch_size: int) -> tuple[float, int]:
    """``(sample_rate, steps per epoch)`` that ``dp_sgd.make_private`` (Opacus) uses for this data size.

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
    with quiet_opacus():
        return float(counter.get_epsilon(delta=delta))


def noise_for_epsilon(target_epsilon: float, sample_rate: float, steps: int, *,
                      after: Sequence[tuple[float, float, int]] = (), delta: float = DELTA,
                      accountant: str = "prv", tolerance: float = 1e-3) -> float:
    """The smallest noise multiplier (within ``tolerance``) for which ``steps`` DP-SGD steps at
    ``sample_rate``, composed with the runs ``after`` already spent, stay within ``target_epsilon``.

    Opacus's ``make_private_with_epsilon`` does this for one training alone; here the training pays for
    what was released before it (a DP normalization, a noisy count), so that the total is the target.
    """
    check_privacy(target_epsilon, delta)
    after = list(after)
    if epsilon_spent(after, delta, accountant) >= target_epsilon:
        raise ValueError(f"the earlier runs already spend epsilon >= {target_epsilon}: nothing is left")

    def fits(sigma: float) -> bool:
        return epsilon_spent(after + [(sigma, sample_rate, steps)], delta, accountant) <= target_epsilon

    low, high = 0.05, 1.0
    while not fits(high):
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier up to 1e4 reaches epsilon {target_epsilon}")
    while high - low > tolerance:
        middle = (low + high) / 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def classical_epsilon(runs: Sequence[tuple[float, float, int]], delta: float = DELTA) -> float:
    """Epsilon of ``runs`` by the moments accountant as the papers of 2016-2021 computed it.

    Renyi DP of each Poisson-subsampled Gaussian run (Opacus's ``compute_rdp``; Mironov et al. 2019)
    composed, then converted with eps = min_alpha RDP(alpha) + log(1 / delta) / (alpha - 1) (Abadi et al.
    2016; Mironov 2017, Prop. 3), as TF Privacy and Opacus <= 0.x did. Opacus 1.x's RDP accountant converts
    with Balle et al. (2020, Thm. 21) instead, and PRV (Gopi et al. 2021) is tighter still: the same run
    has three epsilons, and only like may be compared with like.
    """
    from opacus.accountants.analysis.rdp import compute_rdp
    from opacus.accountants.rdp import RDPAccountant

    for run in runs:
        _check_run(*run)
    orders = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    rdp = sum(np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders))
              for sigma, q, steps in runs)
    return float(np.min(rdp + math.log(1 / delta) / (orders - 1)))


def epsilons(runs: Sequence[tuple[float, float, int]], delta: float = DELTA) -> dict[str, float]:
    """``{"PRV": ..., "RDP": ..., "classical": ...}``: the epsilon of the same ``runs`` three ways (PRV and
    Opacus's RDP from :func:`epsilon_spent`, the moments accountant from :func:`classical_epsilon`)."""
    return {"PRV": epsilon_spent(runs, delta, "prv"), "RDP": epsilon_spent(runs, delta, "rdp"),
            "classical": classical_epsilon(runs, delta)}


# Published DP-SGD results on MNIST (60,000 training digits, delta = 1e-5): test accuracy, epsilon as
# published, the runs as (noise multiplier, sample rate, steps) where the paper or its code gives them
# (None where they do not), and where the numbers come from. :func:`epsilons` puts them on today's scales.
MNIST_ANCHORS = {
    "Opacus README (10-run mean)": (
        0.9678, "3.01, now 2.91", [(1.1, 240 / 60_000, 60 * 250)],
        "Opacus examples/mnist_README.md: sigma 1.1, batch 240, 60 epochs; printed (3.01, 1e-5) until "
        "March 2021, (2.91, 1e-5) since"),
    "Papernot et al. 2021, tanh CNN": (
        0.981, "2.93", None, "sigma, q and steps: not in the paper's text"),
    "Tramer & Boneh 2021, tanh CNN": (
        0.981, "~3", [(1.23, 512 / 60_000, (60_000 // 512) * 40)],
        "their code's README: sigma 1.23, batch 512, 40 epochs (their rerun of Papernot et al.'s CNN)"),
    "Tramer & Boneh 2021, ScatterNet + linear": (
        0.987, "~3", [(8.0, 1.0, 2), (3.04, 4096 / 60_000, (60_000 // 4096) * 40)],
        "their code's README: sigma 3.04, batch 4,096; DP normalization at sigma 8 (two releases, charged); "
        "40 epochs is what makes their accountant give 3.00 for sigma 3.04"),
}


class BudgetExceeded(ValueError):
    """More runs than an owner's privacy budget allows: nothing was recorded."""


class PrivacyLedger:
    """One data owner's privacy accountant: every DP run on their data adds to their epsilon.

    Epsilon composes: the more rounds an owner takes part in, the more it has spent. ``budget`` (optional)
    is the most epsilon the owner accepts: :meth:`charge` records runs only within it, in one step.
    :meth:`record` records every run it is told about, within budget or not: spent privacy cannot be given
    back. Charge before the runs can happen: a ledger may be ahead of the runs, never behind.

    ``path`` (optional) keeps the runs in a JSON file. Every change locks it (``fcntl``), reads it, and
    replaces it atomically, so concurrent threads or processes never lose a run; a ledger created on an
    existing file starts from it, so a restarted owner keeps what it spent (DP review 3.12). The file must
    belong to the same owner, delta and accountant.
    """

    def __init__(self, owner: str, delta: float = DELTA, budget: float | None = None,
                 accountant: str = "prv", path: str | os.PathLike | None = None):
        if not 0 < delta < 1:
            raise ValueError(f"delta must be between 0 and 1 (exclusive), got {delta!r}")
        if budget is not None and not (is_number(budget) and budget > 0):
            raise ValueError(f"budget must be a positive number or None, got {budget!r}")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        self.owner, self.delta, self.budget, self.accountant = owner, delta, budget, accountant
        self.path = None if path is None else Path(path)
        self._memory: dict = {"owner": owner, "delta": delta, "accountant": accountant, "runs": [],
                              "history": []}
        self._lock = threading.Lock()
        with self._state():  # creates the file, or checks that an existing one is this owner's
            pass

    def __repr__(self) -> str:
        return (f"PrivacyLedger({self.owner!r}, epsilon={self.epsilon:.3f}, budget={self.budget}, "
                f"runs={len(self.runs)}{f', path={str(self.path)!r}' if self.path else ''})")

    @contextmanager
    def _state(self):
        """The ledger's state, locked while the block runs; written back (atomically) when it changes."""
        with self._lock:
            if self.path is None:
                yield self._memory
                return
            import fcntl  # POSIX; only a ledger kept in a file needs it

            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_suffix(".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                state = self._read()
                before = json.dumps(state)
                yield state
                if json.dumps(state) != before or not self.path.exists():
                    temporary = self.path.with_suffix(".tmp")
                    temporary.write_text(json.dumps(state))
                    os.replace(temporary, self.path)

    def _read(self) -> dict:
        if not self.path.exists():
            return {**self._memory, "runs": [], "history": []}
        state = json.loads(self.path.read_text())
        mine = {"owner": self.owner, "delta": self.delta, "accountant": self.accountant}
        theirs = {key: state.get(key) for key in mine}
        if theirs != mine:
            raise ValueError(f"the ledger file {self.path} belongs to {theirs}, not {mine}")
        return state

    def _runs(self) -> list[tuple[float, float, int]]:
        with self._state() as state:
            return [tuple(run) for run in state["runs"]]

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int, times: int = 1) -> float:
        """The epsilon this owner would have spent after ``times`` more such runs (nothing is recorded)."""
        return self._epsilon_after(self._runs(), (noise_multiplier, sample_rate, steps), times)

    def _epsilon_after(self, runs: list, run: tuple, times: int) -> float:
        _check_run(*run)
        if not isinstance(times, int) or isinstance(times, bool) or times < 0:
            raise ValueError(f"times must be a non-negative integer, got {times!r}")
        return epsilon_spent(runs + [run] * times, self.delta, self.accountant)

    def allows(self, noise_multiplier: float, sample_rate: float, steps: int, times: int = 1) -> bool:
        """Whether ``times`` more such runs keep this owner within budget (always true without one)."""
        epsilon = self.epsilon_after(noise_multiplier, sample_rate, steps, times)
        return self.budget is None or epsilon <= self.budget

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Add one DP-SGD run on this owner's data, within budget or not; returns the owner's epsilon."""
        return self._add((noise_multiplier, sample_rate, steps), 1, within_budget=False)

    def charge(self, noise_multiplier: float, sample_rate: float, steps: int, times: int = 1) -> float:
        """Record ``times`` such runs if they keep the owner within budget; otherwise record nothing and
        raise :class:`BudgetExceeded`. The check and the record are one locked step. Returns the epsilon."""
        return self._add((noise_multiplier, sample_rate, steps), times, within_budget=True)

    def _add(self, run: tuple, times: int, within_budget: bool) -> float:
        with self._state() as state:
            runs = [tuple(r) for r in state["runs"]]
            total = self._epsilon_after(runs, run, times)
            if within_budget and self.budget is not None and total > self.budget:
                raise BudgetExceeded(f"{self.owner}: {times} more runs would spend epsilon {total:.2f}, "
                                     f"over the budget of {self.budget}")
            run = (float(run[0]), float(run[1]), int(run[2]))
            for k in range(1, times + 1):
                state["history"].append(total if k == times else self._epsilon_after(runs, run, k))
                state["runs"].append(list(run))
            return total

    @property
    def runs(self) -> list[tuple[float, float, int]]:
        """Every recorded run, ``(noise_multiplier, sample_rate, steps)``, oldest first."""
        return self._runs()

    @property
    def history(self) -> list[float]:
        """The owner's epsilon after each recorded run."""
        with self._state() as state:
            return list(state["history"])

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.runs)

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far (at this ledger's delta)."""
        history = self.history
        return history[-1] if history else 0.0

    @property
    def within_budget(self) -> bool:
        return self.budget is None or self.epsilon <= self.budget


# --- what DP promises against membership inference ----------------------------------------------------------
def check_fpr(fpr) -> np.ndarray:
    """False-positive rates as a float array; ``ValueError`` unless each lies strictly between 0 and 1."""
    fpr = np.asarray(fpr, float)
    if not ((fpr > 0) & (fpr < 1)).all():
        raise ValueError(f"false-positive rates must lie strictly between 0 and 1, got {fpr}")
    return fpr


def dp_tpr_bound(fpr, epsilon: float, delta: float):
    """The highest TPR any membership attack can reach at false-positive rate ``fpr`` against an
    (epsilon, delta)-DP training: ``TPR <= e^epsilon * FPR + delta``, and, from the other side of the
    definition, ``1 - FPR <= e^epsilon * (1 - TPR) + delta``; capped at 1 (Kairouz et al. 2015)."""
    fpr = check_fpr(fpr)
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be a non-negative number, got {epsilon!r}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    bound = np.minimum(np.exp(epsilon) * fpr + delta, 1 - np.exp(-epsilon) * (1 - delta - fpr))
    bound = np.minimum(bound, 1.0)
    return float(bound) if bound.ndim == 0 else bound
