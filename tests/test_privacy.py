"""secure_ai.privacy: noisy counts, privacy accounting checked against independent accountants, ledgers,
and the bound DP puts on membership attacks."""
import math

import numpy as np
import pytest
import torch
from scipy.signal import fftconvolve
from scipy.special import logsumexp, ndtr
from scipy.stats import norm
from secure_ai import dp_sgd
from secure_ai import privacy as dp
from secure_ai import training as tr


def small_data(n=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=generator), torch.randint(0, 10, (n,), generator=generator)


# --- counting queries -------------------------------------------------------------------------------------
def test_laplace_noise_has_scale_sensitivity_over_epsilon():
    answers = dp.laplace_mechanism(100.0, epsilon=0.5, sensitivity=2.0, size=200_000, seed=0)
    scale = 2.0 / 0.5
    assert abs(answers.mean() - 100.0) < 0.05
    assert abs(answers.std() - math.sqrt(2) * scale) < 0.05  # a Laplace(b) has standard deviation sqrt(2) b
    assert dp.laplace_mechanism(5, 1.0, seed=3) == dp.laplace_mechanism(5, 1.0, seed=3)


def test_laplace_answers_on_neighbouring_counts_are_epsilon_close():
    epsilon = 1.0
    with_person = dp.laplace_mechanism(11, epsilon, size=400_000, seed=1)
    without = dp.laplace_mechanism(10, epsilon, size=400_000, seed=2)
    for threshold in (8.0, 10.5, 13.0):  # P[M(D) > t] <= e^eps P[M(D') > t], and the other way round
        p, q = (with_person > threshold).mean(), (without > threshold).mean()
        assert p <= math.exp(epsilon) * q * 1.05 and q <= math.exp(epsilon) * p * 1.05
    assert (with_person > 10.5).mean() > (without > 10.5).mean() * 1.5  # ...but the noise is not too much


def test_gaussian_scale_is_the_analytic_calibration():
    for epsilon, delta in [(0.5, 1e-5), (1.0, 1e-5), (4.0, 1e-6)]:
        sigma = dp.gaussian_noise_scale(epsilon, delta)
        a, b = 1 / (2 * sigma), epsilon * sigma
        achieved = norm.cdf(a - b) - math.exp(epsilon) * norm.cdf(-a - b)  # Balle & Wang (2018), Thm. 8
        assert achieved == pytest.approx(delta, rel=1e-3)
        assert sigma < math.sqrt(2 * math.log(1.25 / delta)) / epsilon  # tighter than the textbook bound
    assert dp.gaussian_noise_scale(1.0, 1e-5, sensitivity=3.0) == pytest.approx(
        3 * dp.gaussian_noise_scale(1.0, 1e-5), rel=1e-6)
    answers = dp.gaussian_mechanism(0.0, 1.0, 1e-5, size=100_000, seed=0)
    assert answers.std() == pytest.approx(dp.gaussian_noise_scale(1.0, 1e-5), rel=0.02)


@pytest.mark.parametrize("kwargs, message", [
    (dict(epsilon=0), "epsilon"), (dict(epsilon=-1), "epsilon"), (dict(epsilon=float("inf")), "epsilon"),
    (dict(epsilon=1, sensitivity=0), "sensitivity"),
])
def test_laplace_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dp.laplace_mechanism(1.0, **kwargs)


@pytest.mark.parametrize("epsilon, delta", [(1.0, 0), (1.0, 1), (0, 1e-5), (1.0, None), (1.0, float("nan"))])
def test_gaussian_rejects_bad_parameters(epsilon, delta):
    with pytest.raises(ValueError, match="epsilon|delta"):
        dp.gaussian_mechanism(1.0, epsilon, delta)


def test_the_noisy_count_is_a_gaussian_mechanism_and_its_cost_is_charged():
    counts = np.array([dp.gaussian_noise(20_000, 50.0) for _ in range(4000)])
    assert abs(counts.mean() - 20_000) < 4 and counts.std() == pytest.approx(50.0, rel=0.06)  # 5 sigma
    # its epsilon at delta 1e-5: the analytic Gaussian mechanism (Balle & Wang 2018), computed here
    def delta_of(epsilon, sigma=50.0):
        a, b = 1 / (2 * sigma), epsilon * sigma
        return norm.cdf(a - b) - math.exp(epsilon) * norm.cdf(-a - b)

    low, high = 0.0, 1.0
    for _ in range(60):
        low, high = ((low + high) / 2, high) if delta_of((low + high) / 2) > 1e-5 else (low, (low + high) / 2)
    assert high == pytest.approx(0.0586, abs=1e-4)
    assert high <= dp.epsilon_spent([(50.0, 1.0, 1)]) <= high + 0.02  # PRV: an upper bound (eps_error 0.01)


# --- accounting -------------------------------------------------------------------------------------------
def test_epsilon_spent_composes_runs():
    q = 256 / 60_000
    assert dp.epsilon_spent([]) == 0.0 == dp.epsilon_spent([(1.0, q, 0)])
    one, two = dp.epsilon_spent([(1.0, q, 200)]), dp.epsilon_spent([(1.0, q, 400)])
    assert 0 < one < two
    assert dp.epsilon_spent([(1.0, q, 200), (1.0, q, 200)]) == pytest.approx(two, rel=1e-6)
    assert dp.epsilon_spent([(2.0, q, 400)]) < two  # more noise, less epsilon
    assert dp.epsilon_spent([(1.0, q, 400)], delta=1e-3) < two  # a looser delta, a smaller epsilon
    assert dp.epsilon_spent([(1.0, q, 400)], accountant="rdp") > two  # RDP is a looser bound than PRV
    for bad in ([(0.0, q, 1)], [(1.0, 0.0, 1)], [(1.0, 1.5, 1)], [(1.0, q, -1)], [(1.0, q, 2.5)],
                [(1.0, q, -0.5)], [(1.0, q, 0.9)], [(1.0, q, True)], [(1.0, q)], [(float("nan"), q, 1)]):
        with pytest.raises(ValueError):  # never truncated to a valid-looking number of steps
            dp.epsilon_spent(bad)
    with pytest.raises(ValueError, match="delta"):
        dp.epsilon_spent([(1.0, q, 1)], delta=0)


# Independent accountants, written from the papers and sharing no code with Opacus: they pin the epsilon our
# helper reports, so that a change of accountant or of step counting fails here.
def rdp_sampled_gaussian(q, sigma, alpha):
    """RDP of integer order alpha of the Poisson-sampled Gaussian (Mironov, Talwar & Zhang 2019, Sec. 3.3):
    log(sum_k C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2))) / (alpha - 1)."""
    log_terms = [math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
                 + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
                 for k in range(alpha + 1)]
    return float(logsumexp(log_terms)) / (alpha - 1)


def epsilon_rdp(sigma, q, steps, delta, orders=range(2, 64)):
    """RDP composed over steps, converted with Balle et al. 2020 (Thm. 21), at the best integer order."""
    return min(steps * rdp_sampled_gaussian(q, sigma, a) - (math.log(delta) + math.log(a)) / (a - 1)
               + math.log((a - 1) / a) for a in orders)


def epsilon_pld(sigma, q, steps, delta, h=1e-4, low=-5.0, high=20.0):
    """A numerical privacy-loss distribution (Koskela et al. 2020). The loss of the remove-one pair,
    L = log(1 - q + q e^((2x-1)/2s^2)) with x ~ (1-q) N(0, s^2) + q N(1, s^2) against N(0, s^2), on a grid of
    step h, composed by FFT; then the smallest eps with E[(1 - e^(eps - L))+] <= delta (mass beyond the
    grid counts as delta)."""
    grid = np.arange(low, high + h / 2, h)

    def mass_below(loss):
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.where(loss > math.log1p(-q), sigma**2 * np.log((np.exp(loss) - 1 + q) / q) + 0.5, -np.inf)
        return (1 - q) * ndtr(x / sigma) + q * ndtr((x - 1) / sigma)

    edges = np.append(grid - h / 2, grid[-1] + h / 2)
    pmf, beyond = np.diff(mass_below(edges)), 1 - mass_below(edges[-1])

    def compose(a, lost_a, b, lost_b):
        full = np.clip(fftconvolve(a, b), 0, None)
        start = int(round(-low / h))
        return full[start:start + len(grid)], 1 - (1 - lost_a) * (1 - lost_b) + full[start + len(grid):].sum()

    result, power = None, (pmf, beyond)
    while steps:
        if steps & 1:
            result = power if result is None else compose(*result, *power)
        steps >>= 1
        if steps:
            power = compose(*power, *power)
    losses, lost = result
    low_eps, high_eps = 0.0, 50.0
    for _ in range(50):
        middle = (low_eps + high_eps) / 2
        failing = lost + np.sum(losses * np.clip(1 - np.exp(middle - grid), 0, None)) > delta
        low_eps, high_eps = (middle, high_eps) if failing else (low_eps, middle)
    return high_eps


# (sigma, q, steps) at delta = 1e-5: Part 3's BatchNorm-fixed run, its main run, its federated joe (3 rounds)
# and the benchmark recipe (30 epochs at sigma 1.24)
SETTINGS = [(1.0, 1 / 8, 8), (0.8, 1 / 59, 236), (1.0, 1 / 156, 3 * 156), (1.24, 1 / 59, 1770)]


@pytest.mark.parametrize("sigma, q, steps", SETTINGS)
def test_prv_epsilon_matches_an_independent_privacy_loss_distribution(sigma, q, steps):
    reported = dp.epsilon_spent([(sigma, q, steps)])
    independent = epsilon_pld(sigma, q, steps, 1e-5)
    assert independent <= reported <= independent + 0.02  # Opacus's PRV: an upper bound (eps_error 0.01)
    assert epsilon_pld(sigma, q, steps + steps // 4, 1e-5) > reported + 0.02  # 25% more steps: visibly more


@pytest.mark.parametrize("sigma, q, steps", SETTINGS)
def test_rdp_epsilon_matches_an_independent_implementation(sigma, q, steps):
    from opacus.accountants import RDPAccountant

    counter = RDPAccountant()
    counter.history = [(sigma, q, steps)]
    integer_orders = counter.get_epsilon(delta=1e-5, alphas=list(range(2, 64)))
    assert integer_orders == pytest.approx(epsilon_rdp(sigma, q, steps, 1e-5), rel=1e-9)
    reported = dp.epsilon_spent([(sigma, q, steps)], accountant="rdp")  # Opacus adds fractional orders
    assert 0.93 * integer_orders <= reported <= integer_orders


def test_published_and_benchmark_values():
    """Numbers the chapter prints next to published ones, computed here independently."""
    assert epsilon_pld(0.8, 1 / 59, 236, 1e-5) == pytest.approx(2.98, abs=0.01)  # Part 3: "eps = 3.00"
    assert epsilon_rdp(1.24, 1 / 59, 1770, 1e-5) == pytest.approx(3.26, abs=0.01)  # benchmark: RDP 3.26
    assert epsilon_pld(1.24, 1 / 59, 1770, 1e-5) == pytest.approx(2.97, abs=0.01)  # PRV 2.99 (upper bound)
    assert epsilon_pld(1.0, 1 / 8, 8, 1e-5) == pytest.approx(3.17, abs=0.01)  # 8 steps at q = 1/8: eps 3.18


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_training_counts_logical_steps_not_physical_slices(monkeypatch):
    """A batch computed in 4 slices is one step: epsilon after 2 epochs is that of 2 * 8 steps, computed
    independently, not that of the 2 * 32 slices."""
    monkeypatch.setattr(dp_sgd, "PHYSICAL_BATCH", 16)
    tr.set_seed(0)
    images, labels = small_data(512)
    model = dp_sgd.TanhCNN()
    private = dp_sgd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), images, labels,
                                  batch_size=64, max_grad_norm=1.0, noise_multiplier=1.1)
    slices = []
    for _ in range(2):
        private.train_epoch(progress=False, on_step=slices.append)
    assert private.steps == 16
    independent = epsilon_pld(1.1, 64 / 512, 16, 1e-5)
    assert independent <= private.epsilon() <= independent + 0.02
    assert private.epsilon() < epsilon_pld(1.1, 64 / 512, 20, 1e-5)


def test_a_noisy_count_cannot_be_reproduced_from_any_seed_the_caller_controls():
    """DP review 3.10: the notebook seeded the noisy counts with 0 and 1; numpy's default_rng(0) gave the
    noise, and 20,006 - 6 = 20,000 exactly. The owner's draw takes no seed and ignores every global one."""
    import inspect
    import random

    import torch

    assert list(inspect.signature(dp.gaussian_noise).parameters) == ["value", "std"]
    draws = []
    for _ in range(2):
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        draws.append(dp.gaussian_noise(20_000, 50.0))
    assert draws[0] != draws[1]
    replays = {20_000 + np.random.default_rng(s).normal(0.0, 50.0) for s in range(1000)}
    replays |= {20_000 + random.Random(s).normalvariate(0.0, 50.0) for s in range(1000)}
    assert not replays & set(draws)


def test_ledgers_track_each_owner_separately_and_check_a_budget():
    joe, jane = dp.PrivacyLedger("joe"), dp.PrivacyLedger("jane", budget=2.0)
    assert joe.epsilon == 0.0 and joe.steps == 0 and joe.allows(1.0, 0.5, 100, times=3)  # no budget
    preview = joe.epsilon_after(1.0, 0.01, 100, times=2)
    assert joe.epsilon == 0.0 and joe.runs == []  # a preview records nothing
    first = joe.record(1.0, 0.01, 100)
    second = joe.record(1.0, 0.01, 100)
    assert 0 < first < second == joe.epsilon == pytest.approx(preview)
    assert joe.history == [first, second] and joe.steps == 200
    assert jane.epsilon == 0.0  # joe's runs cost jane nothing
    rounds_allowed = max(t for t in range(1, 30) if jane.allows(1.0, 0.02, 100, times=t))
    assert jane.epsilon_after(1.0, 0.02, 100, times=rounds_allowed) <= 2.0
    assert jane.epsilon_after(1.0, 0.02, 100, times=rounds_allowed + 1) > 2.0
    for _ in range(rounds_allowed):
        jane.record(1.0, 0.02, 100)
    assert jane.within_budget and not jane.allows(1.0, 0.02, 100)
    jane.record(1.0, 0.02, 100)  # spent privacy is recorded even beyond the budget
    assert not jane.within_budget and len(jane.runs) == rounds_allowed + 1
    with pytest.raises(ValueError, match="times"):
        jane.epsilon_after(1.0, 0.02, 100, times=-1)


def test_charge_records_all_the_runs_within_budget_or_none():
    ledger = dp.PrivacyLedger("jane", budget=2.0, accountant="rdp")
    allowed = max(t for t in range(1, 30) if ledger.allows(1.0, 0.02, 100, times=t))
    with pytest.raises(dp.BudgetExceeded, match="over the budget of 2.0"):
        ledger.charge(1.0, 0.02, 100, times=allowed + 1)
    assert ledger.runs == [] and ledger.epsilon == 0.0
    assert ledger.charge(1.0, 0.02, 100, times=allowed) == pytest.approx(ledger.epsilon)
    assert ledger.runs == [(1.0, 0.02, 100)] * allowed and len(ledger.history) == allowed
    assert ledger.history == sorted(ledger.history) and ledger.history[-1] <= 2.0
    with pytest.raises(dp.BudgetExceeded):
        ledger.charge(1.0, 0.02, 100)
    for bad in (dict(budget=0.0), dict(budget=float("nan")), dict(accountant="moments"), dict(delta=0)):
        with pytest.raises(ValueError):
            dp.PrivacyLedger("jane", **({"accountant": "rdp"} | bad))


def test_a_restarted_owner_keeps_its_privacy_ledger(tmp_path):
    """DP review 3.12: the ledger was an object in memory, gone with the owner's process. In a file, a new
    ledger on it (the owner, restarted) starts from what was spent and refuses what is over budget."""
    path = tmp_path / "joe-privacy.json"
    before = dp.PrivacyLedger("joe", budget=3.0, path=path, accountant="rdp")
    before.record(50.0, 1.0, 1)                       # the noisy count
    before.charge(1.0, 0.02, 100, times=3)
    spent, runs = before.epsilon, before.runs
    del before
    after = dp.PrivacyLedger("joe", budget=3.0, path=path, accountant="rdp")
    assert after.runs == runs and after.epsilon == pytest.approx(spent) and len(after.history) == 4
    allowed = max(t for t in range(0, 30) if after.allows(1.0, 0.02, 100, times=t))
    with pytest.raises(dp.BudgetExceeded):
        after.charge(1.0, 0.02, 100, times=allowed + 1)
    assert after.runs == runs
    with pytest.raises(ValueError, match="belongs to"):
        dp.PrivacyLedger("jane", budget=2.0, path=path, accountant="rdp")   # another owner's file,
    with pytest.raises(ValueError, match="belongs to"):
        dp.PrivacyLedger("joe", delta=1e-6, path=path, accountant="rdp")     # another delta,
    with pytest.raises(ValueError, match="belongs to"):
        dp.PrivacyLedger("joe", path=path)                                    # another accountant


def test_concurrent_charges_on_one_ledger_file_lose_no_run(tmp_path):
    """Two ledger objects on one file (two threads of the owner's server, or two processes) charge at once:
    every run is on the file, and the budget holds across them."""
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "ledger.json"
    ledgers = [dp.PrivacyLedger("joe", budget=3.0, path=path, accountant="rdp") for _ in range(4)]
    allowed = max(t for t in range(1, 40) if ledgers[0].allows(1.0, 0.05, 20, times=t))

    def charge(ledger):
        done = 0
        for _ in range(allowed):
            try:
                ledger.charge(1.0, 0.05, 20)
                done += 1
            except dp.BudgetExceeded:
                pass
        return done

    with ThreadPoolExecutor(4) as pool:
        done = sum(pool.map(charge, ledgers))
    assert done == allowed and len(ledgers[0].runs) == allowed and ledgers[3].within_budget



# --- the bound DP puts on membership attacks ---------------------------------------------------------------
def test_dp_bound_matches_the_definition():
    fpr = np.array([0.001, 0.01, 0.1, 0.5])
    for epsilon, delta in [(0.0, 0.0), (1.0, 1e-5), (3.0, 1e-5), (8.0, 1e-5)]:
        bound = dp.dp_tpr_bound(fpr, epsilon, delta)
        expected = np.minimum(np.exp(epsilon) * fpr + delta, 1 - np.exp(-epsilon) * (1 - delta - fpr))
        assert np.allclose(bound, np.minimum(expected, 1))
        assert (bound <= math.exp(epsilon) * fpr + delta + 1e-12).all()
    assert dp.dp_tpr_bound(0.01, 1.0, 1e-5) == pytest.approx(math.e * 0.01 + 1e-5)
    assert np.allclose(dp.dp_tpr_bound(fpr, 0.0, 0.0), fpr)  # epsilon 0: no attack beats guessing
    assert dp.dp_tpr_bound(0.5, 8.0, 1e-5) == pytest.approx(1 - math.exp(-8) * (0.5 - 1e-5))



def test_dp_bound_rejects_bad_input():
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            dp.dp_tpr_bound(bad, 1.0, 1e-5)
    with pytest.raises(ValueError, match="epsilon"):
        dp.dp_tpr_bound(0.1, -1.0, 1e-5)
