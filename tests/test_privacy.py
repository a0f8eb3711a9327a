"""secure_ai.privacy: noisy counts, DP-SGD through Opacus, privacy ledgers, the owner-side DP update."""
import math

import numpy as np
import pytest
import torch
from scipy.signal import fftconvolve
from scipy.special import logsumexp, ndtr
from scipy.stats import norm
from secure_ai import privacy as dp
from secure_ai import training as tr
from torch import nn


def small_data(n=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def batchnorm_model():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 26 * 26, 10))


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


# --- models -----------------------------------------------------------------------------------------------
def test_tanh_cnn_shapes_and_compatibility():
    model = dp.TanhCNN()
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) == 26_010
    dp.check_compatible(model)  # no error


def test_batchnorm_is_refused_with_the_fix_in_the_message():
    from opacus.validators import ModuleValidator

    model = batchnorm_model()
    with pytest.raises(dp.IncompatibleModelError, match=r"BatchNorm[\s\S]*ModuleValidator\.fix"):
        dp.check_compatible(model)
    images, labels = small_data()
    with pytest.raises(ValueError, match="cannot be trained with DP-SGD"):
        dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), images, labels,
                        batch_size=32, max_grad_norm=1.0, noise_multiplier=1.0)
    fixed = ModuleValidator.fix(model)
    dp.check_compatible(fixed)
    private = dp.make_private(fixed, torch.optim.SGD(fixed.parameters(), lr=0.1), images, labels,
                              batch_size=32, max_grad_norm=1.0, noise_multiplier=1.0)
    private.train_epoch(progress=False)
    assert private.steps == len(private.loader)


# --- DP-SGD -----------------------------------------------------------------------------------------------
def test_a_trained_model_keeps_no_per_sample_gradients():
    """Opacus leaves the last slice's per-sample gradients on the parameters; a finished epoch drops them."""
    images, labels = small_data()
    model = dp.TanhCNN()
    private = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), images, labels,
                              batch_size=32, max_grad_norm=1.0, noise_multiplier=1.0)
    private.train_epoch(progress=False)
    for name, p in model.named_parameters():
        assert getattr(p, "grad_sample", None) is None, name
        assert getattr(p, "summed_grad", None) is None and p.grad is None, name
    private.train_epoch(progress=False)   # and the next epoch still trains
    assert private.steps == 2 * len(private.loader)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_reported_epsilon_is_the_accountants_for_the_steps_taken(accountant):
    tr.set_seed(0)
    images, labels = small_data(512)
    model = dp.TanhCNN()
    private = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), images, labels,
                              batch_size=64, max_grad_norm=1.0, noise_multiplier=1.1, accountant=accountant)
    assert private.epsilon() == 0.0 and private.sample_rate == pytest.approx(64 / 512)
    history = private.fit((images, labels), epochs=2, progress=False)
    assert private.steps == 2 * private.steps_per_epoch == 2 * 8
    assert [h["steps"] for h in history] == [8, 16]
    assert history[0]["epsilon"] < history[1]["epsilon"] == private.epsilon()
    expected = dp.epsilon_spent([(1.1, 64 / 512, private.steps)], accountant=accountant)
    assert private.epsilon() == pytest.approx(expected, rel=1e-6)


def test_fit_can_evaluate_several_times_per_epoch():
    tr.set_seed(0)
    images, labels = small_data(512)
    model = dp.TanhCNN()
    private = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), images, labels,
                              batch_size=64, max_grad_norm=1.0, noise_multiplier=1.0)
    history = private.fit((images[:100], labels[:100]), epochs=2, evals_per_epoch=2, progress=False)
    assert [h["epoch"] for h in history] == [0.5, 1.0, 1.5, 2.0]
    assert [h["steps"] for h in history] == [4, 8, 12, 16]
    assert all(0 <= h["accuracy"] <= 1 for h in history)
    for bad in (dict(epochs=0), dict(epochs=1, evals_per_epoch=0), dict(epochs=1, evals_per_epoch=9)):
        with pytest.raises(ValueError):
            private.fit((images, labels), **bad)


@pytest.mark.parametrize("n, batch_size", [(512, 64), (300, 50), (10_000, 256), (60_000, 1024), (49, 1)])
def test_poisson_sampling_is_what_opacus_uses(n, batch_size):
    images, labels = torch.zeros(n, 1, 28, 28), torch.zeros(n, dtype=torch.int64)
    model = dp.TanhCNN()
    private = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), images, labels,
                              batch_size=batch_size, max_grad_norm=1.0, noise_multiplier=1.0)
    assert dp.poisson_sampling(n, batch_size) == (private.sample_rate, private.steps_per_epoch)
    with pytest.raises(ValueError, match="batch_size"):
        dp.poisson_sampling(n, n + 1)
    with pytest.raises(ValueError, match="n_samples"):
        dp.poisson_sampling(0, 1)


def test_target_epsilon_is_met_after_the_planned_epochs():
    tr.set_seed(0)
    images, labels = small_data(512)
    model = dp.TanhCNN()
    private = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), images, labels,
                              batch_size=64, max_grad_norm=1.0, target_epsilon=3.0, epochs=2)
    for _ in range(2):
        private.train_epoch(progress=False)
    assert 2.5 < private.epsilon() <= 3.0  # the least noise that stays within the budget


@pytest.mark.filterwarnings("ignore:Full backward hook")
@pytest.mark.parametrize("clip", [0.01, 0.05])
def test_each_sample_gradient_is_clipped_and_the_sum_divided_by_the_expected_batch(clip):
    """Identical samples: every per-sample gradient points the same way and none cancels. Without noise,
    one DP-SGD step then moves the weights by exactly lr * C * |B| / E[B] (|B|: this Poisson batch,
    E[B] = q N: the expected batch size)."""
    tr.set_seed(0)
    images = torch.randn(1, 1, 28, 28).repeat(512, 1, 1, 1) * 20  # gradients far above the clipping norm
    labels = torch.full((512,), 3)
    reference = dp.TanhCNN()
    nn.CrossEntropyLoss()(reference(images[:1]), labels[:1]).backward()
    assert torch.cat([p.grad.ravel() for p in reference.parameters()]).norm() > 20 * clip
    model, lr = dp.TanhCNN(), 0.5
    private = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=lr), images, labels,
                              batch_size=64, max_grad_norm=clip, noise_multiplier=1e-9)
    expected_batch = private.optimizer.expected_batch_size
    assert expected_batch == 64
    sizes = []
    for x, y in private.loader:
        before = tr.model_to_vector(model)
        private.optimizer.zero_grad()
        private.criterion(private.model(x), y).backward()
        private.optimizer.step()
        moved = (tr.model_to_vector(model) - before).norm().item()
        assert moved == pytest.approx(lr * clip * len(y) / expected_batch, rel=0.01), len(y)
        sizes.append(len(y))
    assert len(set(sizes)) > 3 and any(abs(n - expected_batch) > 3 for n in sizes)  # batch sizes vary


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_large_batches_are_computed_in_slices_with_the_same_result(monkeypatch):
    """Slicing a batch (BatchMemoryManager) saves memory: same steps, same epsilon, same weights."""
    images, labels = small_data(512)
    results = []
    for physical in (16, 10_000):
        monkeypatch.setattr(dp, "PHYSICAL_BATCH", physical)
        tr.set_seed(0)
        model = dp.TanhCNN()
        private = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), images, labels,
                                  batch_size=128, max_grad_norm=1.0, noise_multiplier=1e-6, accountant="rdp")
        seen = []
        private.train_epoch(progress=False, on_step=seen.append)
        results.append((tr.model_to_vector(model), private.steps, private.epsilon()))
        assert seen == list(range(1, private.steps_per_epoch + 1))
    (sliced, steps_a, eps_a), (whole, steps_b, eps_b) = results
    assert steps_a == steps_b == 4 and eps_a == eps_b
    tr.set_seed(0)
    start = tr.model_to_vector(dp.TanhCNN())
    assert torch.allclose(sliced, whole, atol=1e-5) and not torch.allclose(sliced, start, atol=1e-3)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_make_private_keeps_raw_uint8_digits_and_normalizes_each_slice():
    from secure_ai.data import normalize

    raw = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (64,))
    model = dp.TanhCNN()
    private = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), raw, labels,
                              batch_size=16, max_grad_norm=1.0, noise_multiplier=1.0)
    x, _ = private.loader.dataset[:4]
    assert x.dtype == torch.uint8  # kept compact: a quarter of the memory of float32
    seen = []
    model.net[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    private.train_epoch(progress=False)
    extremes = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1).expand(2, 28, 28)
    lowest, highest = normalize(extremes)[:, 0, 0, 0]
    seen = [s for s in seen if len(s)]
    assert seen and all(s.dtype == torch.float32 and s.shape[1:] == (1, 28, 28) for s in seen)
    assert min(s.min() for s in seen) >= lowest - 1e-6 and max(s.max() for s in seen) <= highest + 1e-6
    assert max(s.max() for s in seen) > 2  # normalized (255 -> 2.8), not raw 0..255


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "exactly one"),
    (dict(noise_multiplier=1.0, target_epsilon=3.0, epochs=1), "exactly one"),
    (dict(target_epsilon=3.0), "epochs"),
    (dict(noise_multiplier=0.0), "noise_multiplier"),
    (dict(noise_multiplier=1.0, batch_size=0), "batch_size"),
    (dict(noise_multiplier=1.0, batch_size=10_000), "batch_size"),
    (dict(noise_multiplier=1.0, max_grad_norm=0), "max_grad_norm"),
    (dict(noise_multiplier=1.0, accountant="moments"), "accountant"),
    (dict(noise_multiplier=1.0, delta=1.5), "delta"),
])
def test_make_private_rejects_bad_arguments(kwargs, message):
    images, labels = small_data(64)
    model = dp.TanhCNN()
    arguments = dict(batch_size=16, max_grad_norm=1.0) | kwargs
    with pytest.raises(ValueError, match=message):
        dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), images, labels, **arguments)
    with pytest.raises(ValueError, match="labels must have shape"):
        dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), images, labels[:10],
                        batch_size=16, max_grad_norm=1.0, noise_multiplier=1.0)


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
    monkeypatch.setattr(dp, "PHYSICAL_BATCH", 16)
    tr.set_seed(0)
    images, labels = small_data(512)
    model = dp.TanhCNN()
    private = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), images, labels,
                              batch_size=64, max_grad_norm=1.0, noise_multiplier=1.1)
    slices = []
    for _ in range(2):
        private.train_epoch(progress=False, on_step=slices.append)
    assert private.steps == 16
    independent = epsilon_pld(1.1, 64 / 512, 16, 1e-5)
    assert independent <= private.epsilon() <= independent + 0.02
    assert private.epsilon() < epsilon_pld(1.1, 64 / 512, 20, 1e-5)


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


# --- plots ------------------------------------------------------------------------------------------------
def test_plots_draw_and_reject_empty_input():
    import matplotlib.pyplot as plt

    fig = dp.plot_noisy_answers({"with": [1, 2, 3], "without": [0, 1, 2]})
    assert len(fig.axes[0].patches) > 0
    fig2 = dp.plot_privacy_utility({"sigma=1": [(1.0, 0.9), (2.0, 0.95)]}, baseline=0.99,
                                   anchors={"paper": (2.0, 0.95)})
    assert len(fig2.axes[0].lines) == 3
    plt.close("all")
    with pytest.raises(ValueError, match="empty"):
        dp.plot_noisy_answers({})
    with pytest.raises(ValueError, match="empty"):
        dp.plot_privacy_utility({})


# --- DP-FedAvg: what the owner fixes, checks and charges -------------------------------------------------
POLICY = dict(noise_multiplier=1.0, max_grad_norm=0.1, batch_size=50, epochs=1, lr=0.5)


def owner_data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, size=n).astype(np.int64))


@pytest.fixture
def datasite():
    """A data owner with 300 records, a published DP policy, a ledger with budget 5 and a logged-in DS."""
    from secure_ai import federated as fl
    from secure_ai.workers import DataOwner

    images, labels = owner_data()
    owner = DataOwner("dpowner")
    try:
        fl.upload_mnist(owner, images, labels, mock_size=8)
        ledger = dp.PrivacyLedger("dpowner", budget=5.0)
        policy = dp.publish_policy(owner, ledger, len(labels), **POLICY, seed=1)
        owner.add_data_scientist("ds@example.org", "pw")
        yield owner, ledger, policy, owner.login("ds@example.org", "pw")
    finally:
        owner.shutdown()


def test_policy_fixes_rate_steps_and_divisor_from_a_noisy_count():
    policy = dp.DPPolicy(1.0, 0.1, 128, 2, 1.0, 0.9, noisy_count=20_037, count_noise=50.0)
    assert policy.sample_rate == 128 / 20_037 and policy.steps == 2 * int(20_037 / 128)
    assert dp.DPPolicy.from_array(policy.to_array()) == policy
    assert policy.epsilon(0) == pytest.approx(dp.epsilon_spent([(50.0, 1.0, 1)]))  # the count alone
    assert policy.epsilon(3) == pytest.approx(dp.epsilon_spent([(50.0, 1.0, 1)] + [policy.run] * 3))
    for bad in (dict(noise_multiplier=0.0), dict(batch_size=12.5), dict(momentum=1.0), dict(epochs=1000),
                dict(noisy_count=100, batch_size=128), dict(lr=float("inf"))):
        with pytest.raises(ValueError, match="DP policy"):
            dp.DPPolicy(**(dict(noise_multiplier=1.0, max_grad_norm=0.1, batch_size=128, epochs=1, lr=1.0,
                                momentum=0.9, noisy_count=20_000, count_noise=50.0) | bad))
    with pytest.raises(ValueError, match="shape"):
        dp.DPPolicy.from_array(np.zeros(3))


def test_the_noisy_count_is_a_gaussian_mechanism_and_its_cost_is_charged():
    counts = np.array([dp.gaussian_noise(20_000, 50.0, seed=s) for s in range(4000)])
    assert abs(counts.mean() - 20_000) < 3 and counts.std() == pytest.approx(50.0, rel=0.05)
    # its epsilon at delta 1e-5: the analytic Gaussian mechanism (Balle & Wang 2018), computed here
    def delta_of(epsilon, sigma=50.0):
        a, b = 1 / (2 * sigma), epsilon * sigma
        return norm.cdf(a - b) - math.exp(epsilon) * norm.cdf(-a - b)

    low, high = 0.0, 1.0
    for _ in range(60):
        low, high = ((low + high) / 2, high) if delta_of((low + high) / 2) > 1e-5 else (low, (low + high) / 2)
    assert high == pytest.approx(0.0586, abs=1e-4)
    assert high <= dp.epsilon_spent([(50.0, 1.0, 1)]) <= high + 0.02  # PRV: an upper bound (eps_error 0.01)


def test_nothing_released_depends_on_the_exact_number_of_records():
    """Neighbouring datasets (one record removed): the sample rate, the steps, the divisor of the noisy sums
    and everything returned besides the DP weights are the same; no exact n is returned."""
    policy = dp.DPPolicy(1.0, 0.1, 50, 1, 0.5, 0.9, noisy_count=310, count_noise=50.0)
    images, labels = owner_data(300)
    start = tr.get_weights(dp.TanhCNN())
    seen = []
    for n in (300, 299):
        model = dp.TanhCNN()
        private = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), images[:n], labels[:n],
                                  batch_size=50, max_grad_norm=0.1, noise_multiplier=1.0,
                                  sample_rate=policy.sample_rate)
        tr.set_seed(0)
        result = dp.dp_local_update(images[:n], labels[:n], start, policy.to_array())
        seen.append((private.sample_rate, private.steps_per_epoch, private.optimizer.expected_batch_size,
                     set(result), result["noisy_count"]))
        assert n not in [v for v in result.values() if np.isscalar(v)]
    assert seen[0] == seen[1] == (50 / 310, 6, 50, {"weights", "noisy_count"}, 310)


@pytest.mark.parametrize("forged, message", [
    ({"w": np.zeros(1)}, "names"),
    ("weights", "dict"),
    ({**tr.get_weights(dp.TanhCNN()), "noise_multiplier": np.zeros(1)}, "names"),
    ({**tr.get_weights(dp.TanhCNN()), "net.0.weight": np.full((16, 1, 8, 8), np.nan, np.float32)}, "finite"),
    ({**tr.get_weights(dp.TanhCNN()), "net.0.bias": np.zeros(17, np.float32)}, "shape"),
    ({**tr.get_weights(dp.TanhCNN()), "net.0.bias": np.array(["x"] * 16)}, "finite"),
])
def test_the_owner_checks_the_weights_the_data_scientist_sends(forged, message):
    images, labels = owner_data(64)
    policy = dp.DPPolicy(1.0, 0.1, 16, 1, 0.5, 0.9, noisy_count=64, count_noise=50.0)
    with pytest.raises(ValueError, match=message):
        dp.dp_local_update(images, labels, forged, policy)


def test_dp_fedavg_through_syft_is_charged_owner_side(datasite, mnist):
    from secure_ai import federated as fl

    owner, ledger, policy, client = datasite
    assert ledger.runs == [policy.count_release] and policy.noisy_count != 300
    assert dp.public_policy(client) == policy  # public: the data scientist plans with it
    visible = client.datasets["mnist"]  # what the data scientist sees of the data: no exact count
    assert "300" not in visible.description.text
    assert all(asset.shape[0] != 300 for asset in visible.assets)
    dp.request_dp_training(client, rounds=2)
    assert dp.approve_dp_training(owner, ledger, policy) == 2
    charged = ledger.epsilon
    assert charged == pytest.approx(policy.epsilon(2))
    assert ledger.runs == [policy.count_release] + [policy.run] * 2
    tr.set_seed(0)
    _, (test_x, test_y) = mnist
    history, results = dp.run_dp_fedavg(dp.TanhCNN(), {"dpowner": client}, 2, (test_x[:200], test_y[:200]),
                                        progress=False)
    assert len(history) == 2 and owner.runs("dp_train") == 2
    assert set(results["dpowner"]) == {"weights", "noisy_count"} and results["dpowner"]["noisy_count"] != 300
    with pytest.raises(fl.RemoteError, match="used up"):  # a third round was neither approved nor charged
        fl.train_remotely(client, "dp_train", results["dpowner"]["weights"],
                          extra_assets={"policy": client.datasets[dp.POLICY_DATASET].assets["policy"]})
    assert ledger.epsilon == charged


def test_owner_refuses_code_that_asks_for_less_noise(datasite):
    """The data scientist submits a 'dp_train' of its own that weakens the owner's policy."""
    from secure_ai import federated as fl

    owner, ledger, policy, client = datasite

    def dp_train(images, labels, weights, policy):
        from secure_ai.privacy import DPPolicy, dp_local_update

        weak = DPPolicy.from_array(policy)
        weak = DPPolicy(0.05, weak.max_grad_norm, weak.batch_size, 20, weak.lr, weak.momentum,
                        weak.noisy_count, weak.count_noise)
        return dp_local_update(images, labels, weights, weak)

    fl.request_training(client, dp_train, rounds=1,
                        extra_assets={"policy": client.datasets[dp.POLICY_DATASET].assets["policy"]})
    before = list(ledger.runs)
    with pytest.raises(dp.DPRequestRefused, match="not secure_ai.privacy.dp_train"):
        dp.approve_dp_training(owner, ledger, policy)
    assert ledger.runs == before and owner.pending_requests() == []
    with pytest.raises(fl.RemoteError):
        fl.train_remotely(client, "dp_train", tr.get_weights(dp.TanhCNN()),
                          extra_assets={"policy": client.datasets[dp.POLICY_DATASET].assets["policy"]})


def test_owner_refuses_more_rounds_than_its_budget(datasite):
    owner, ledger, policy, client = datasite
    assert ledger.allows(*policy.run, times=2) and not ledger.allows(*policy.run, times=30)
    dp.request_dp_training(client, rounds=30)
    with pytest.raises(dp.DPRequestRefused, match="over the budget of 5.0"):
        dp.approve_dp_training(owner, ledger, policy)
    assert ledger.runs == [policy.count_release]


def test_owner_refuses_a_policy_of_the_data_scientists_making(datasite):
    """The reviewed code, but its 'policy' input is any object the data scientist owns (say sigma = 0.01)."""
    import syft as sy
    from syft.service.policy.policy import OutputPolicyExecuteCount

    owner, ledger, policy, client = datasite
    assets = client.datasets["mnist"].assets
    function = sy.syft_function(
        input_policy=sy.MixedInputPolicy(client=client, images=assets["images"], labels=assets["labels"],
                                         weights=dict, policy=list),
        output_policy=OutputPolicyExecuteCount(limit=1))(dp.dp_train)
    client.code.request_code_execution(function)
    with pytest.raises(dp.DPRequestRefused, match="do not pin"):
        dp.approve_dp_training(owner, ledger, policy)
    assert ledger.runs == [policy.count_release]
