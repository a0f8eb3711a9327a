"""secure_ai.privacy: noisy counts, DP-SGD through Opacus, privacy ledgers, the owner-side DP update."""
import math

import numpy as np
import pytest
import torch
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


@pytest.mark.parametrize("epsilon, delta", [(1.0, 0), (1.0, 1), (0, 1e-5)])
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
def test_each_sample_gradient_is_clipped():
    """With (almost) no noise and plain SGD, one step moves the weights by at most lr * max_grad_norm."""
    tr.set_seed(0)
    images, labels = small_data(256)
    images = images * 20  # large inputs: per-sample gradients far above the clipping norm
    reference = dp.TanhCNN()
    loss = nn.CrossEntropyLoss()(reference(images[:32]), labels[:32])
    loss.backward()
    assert torch.cat([p.grad.ravel() for p in reference.parameters()]).norm() > 1.0
    model = dp.TanhCNN()
    before = tr.model_to_vector(model)
    private = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), images, labels,
                              batch_size=32, max_grad_norm=0.01, noise_multiplier=1e-6)
    x, y = next(iter(private.loader))
    private.optimizer.zero_grad()
    private.criterion(private.model(x), y).backward()
    private.optimizer.step()
    moved = (tr.model_to_vector(model) - before).norm().item()
    assert 0 < moved <= 0.01 * 1.0001


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
def test_make_private_normalizes_raw_uint8_digits():
    raw = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (64,))
    model = dp.TanhCNN()
    private = dp.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), raw, labels,
                              batch_size=16, max_grad_norm=1.0, noise_multiplier=1.0)
    x, _ = private.loader.dataset[:4]
    assert x.dtype == torch.float32 and x.shape == (4, 1, 28, 28)
    private.train_epoch(progress=False)


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
    for bad in ([(0.0, q, 1)], [(1.0, 0.0, 1)], [(1.0, 1.5, 1)], [(1.0, q, -1)]):
        with pytest.raises(ValueError):
            dp.epsilon_spent(bad)
    with pytest.raises(ValueError, match="delta"):
        dp.epsilon_spent([(1.0, q, 1)], delta=0)


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


# --- federated: the owner's side --------------------------------------------------------------------------
def test_dp_local_update_returns_only_dp_weights_and_the_cost():
    tr.set_seed(0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(300, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=300).astype(np.int64)
    start = tr.get_weights(dp.TanhCNN())
    result = dp.dp_local_update(images, labels, start, noise_multiplier=1.0, max_grad_norm=1.0,
                                batch_size=50, lr=0.5, epochs=2)
    assert set(result) == {"weights", "n_samples", "privacy", "epsilon"}
    assert set(result["weights"]) == set(start) and result["n_samples"] == 300
    assert not np.allclose(result["weights"]["net.0.weight"], start["net.0.weight"])
    assert result["privacy"] == {"noise_multiplier": 1.0, "sample_rate": pytest.approx(50 / 300), "steps": 12}
    ledger = dp.PrivacyLedger("owner")
    assert ledger.record(**result["privacy"]) == pytest.approx(result["epsilon"], rel=1e-6)
    with pytest.raises(ValueError, match="weights"):
        dp.dp_local_update(images, labels, {"w": np.zeros(1)}, noise_multiplier=1.0, max_grad_norm=1.0,
                           batch_size=50, lr=0.5)


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


def test_dp_fedavg_through_syft_keeps_one_ledger_per_owner(mnist):
    from secure_ai import data
    from secure_ai import federated as fl
    from secure_ai.workers import DataOwner

    def dp_train_small(images, labels, weights):
        from secure_ai.privacy import dp_local_update

        return dp_local_update(images, labels, weights, noise_multiplier=1.0, max_grad_norm=0.1,
                               batch_size=100, lr=0.5)

    images, labels = data.mnist_raw(True)
    shards = {"dpjoe": np.arange(0, 400), "dpjane": np.arange(400, 600)}
    owners = {name: DataOwner(name) for name in shards}
    try:
        for name, owner in owners.items():
            fl.upload_mnist(owner, images[shards[name]], labels[shards[name]], mock_size=8)
            owner.add_data_scientist("ds@example.org", "pw")
        clients = {name: owner.login("ds@example.org", "pw") for name, owner in owners.items()}
        for name, client in clients.items():
            fl.request_training(client, dp_train_small, rounds=2)
            owners[name].approve("dp_train_small")
        ledgers = {name: dp.PrivacyLedger(name) for name in owners}
        tr.set_seed(0)
        model = dp.TanhCNN()
        _, (test_x, test_y) = mnist
        history, results = dp.run_dp_fedavg(model, clients, "dp_train_small", 2, (test_x[:500], test_y[:500]),
                                            ledgers, progress=False)
        assert len(history) == 2
        assert set(results["dpjoe"]) == {"weights", "n_samples", "privacy", "epsilon"}
        for name, ledger in ledgers.items():
            q, steps = dp.poisson_sampling(len(shards[name]), 100)
            runs = owners[name].runs("dp_train_small")
            assert runs == 2 and ledger.steps == runs * steps
            assert ledger.epsilon == pytest.approx(dp.epsilon_spent([(1.0, q, steps)] * runs), rel=1e-6)
            assert ledger.history[0] < ledger.history[1]
        assert ledgers["dpjane"].epsilon > ledgers["dpjoe"].epsilon  # fewer samples: each is used more often
        with pytest.raises(ValueError, match="one ledger per owner"):
            dp.run_dp_fedavg(model, clients, "dp_train_small", 1, (test_x, test_y),
                             {"dpjoe": ledgers["dpjoe"]})
    finally:
        for owner in owners.values():
            owner.shutdown()
