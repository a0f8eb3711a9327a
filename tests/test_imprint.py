"""secure_ai.imprint: what one MLP update gives away inside Part 2's bounds, played by the data scientist.

Each attack runs against the owners' side as Part 2's bounds mean it (batch_size >= 32, lr <= 0.1, a full
batch, float32 weights) and must work; under owner-side DP it must fail. Numbers are sized for speed: the
full measurements are in benchmarks/malicious_model.py.
"""
import numpy as np
import pytest
import torch
from secure_ai import aggregator
from secure_ai import encryption as he
from secure_ai import imprint as im
from secure_ai import training as tr
from secure_ai.data import mnist_raw

LR = 0.1


@pytest.fixture(scope="module")
def owners(mnist):
    """Three owners' 300 raw training digits each, and the public test digits."""
    torch.set_num_threads(1)
    images, labels = mnist_raw(train=True)
    public = mnist_raw(train=False)
    order = np.random.default_rng(0).permutation(len(labels))
    shards = [order[i * 300:(i + 1) * 300] for i in range(3)]
    return [(images[s], labels[s]) for s in shards], public


@pytest.fixture(scope="module")
def honest():
    tr.set_seed(0)
    return tr.model_to_vector(tr.MLP()).numpy()


@pytest.fixture(scope="module")
def crafted(owners):
    return im.imprint_model(owners[1][0])


def graded(owners, found, digits, labels):
    return im.grade(found, digits, labels, *owners[1])


def batch(owner, batch_size, number=0):
    idx = tr.batch_indices(len(owner[1]), batch_size, number, seed=0)
    return owner[0][idx], owner[1][idx]


def stacked(owners, batch_size, number=0):
    """The digits and labels of batch ``number`` of every owner, one after the other."""
    digits = [batch(owner, batch_size, number) for owner in owners[0]]
    return np.concatenate([d for d, _ in digits]), np.concatenate([y for _, y in digits])


# --- the analytic attack on the honest model ---------------------------------------------------------------
def test_a_batch_one_update_gives_the_digit_exactly(owners, honest):
    joe = owners[0][0]
    for k in range(4):
        after = im.one_batch(honest, *joe, lr=LR, batch_size=1, batch=k)
        digit, _ = batch(joe, 1, k)
        error = np.abs(im.analytic_digit(im.update_gradient(honest, after, LR)) - im._flat(digit)[0]).max()
        assert error * 0.3081 < im.PIXEL_EXACT, error


def test_a_sum_of_three_batch_one_updates_gives_all_three_digits_without_knowing_them(owners, honest):
    afters = [im.one_batch(honest, *owner, lr=LR, batch_size=1, batch=5) for owner in owners[0]]
    average = np.mean(np.asarray(afters, dtype=np.float64), axis=0)
    found = im.analytic_digits(im.update_gradient(honest, average, LR), n_digits=3)
    result = graded(owners, found, *stacked(owners, 1, 5))
    assert len(found) == 3 and result["exact"] == 3, result


def test_the_analytic_attack_finds_nothing_in_an_honest_batch_of_32(owners, honest):
    joe = owners[0][0]
    gradient = im.update_gradient(honest, im.one_batch(honest, *joe, lr=LR, batch_size=32), LR)
    found = im.analytic_digits(gradient, n_digits=32)
    assert graded(owners, found, *batch(joe, 32))["exact"] == 0   # what imprint weights are for


# --- imprint weights ---------------------------------------------------------------------------------------
def test_the_imprint_model_is_a_small_finite_float32_mlp(crafted, owners):
    assert crafted.dtype == np.float32 and crafted.shape == (im.mlp_size(),) and np.isfinite(crafted).all()
    assert np.abs(crafted).max() <= 1e-2   # no magnitude bound at or above 0.01 stops it
    with pytest.raises(ValueError, match="logits near 0"):
        im.imprint_model(owners[1][0], scale=1.0, gain=1.0)


def test_one_batch_and_local_epoch_train_on_full_batches_only(owners, honest):
    """The owners' steps use training's index helpers: no tail, no wrap-around, no partial last batch."""
    joe = owners[0][0]
    with pytest.raises(ValueError, match="not a full batch"):
        im.one_batch(honest, *joe, lr=LR, batch_size=32, batch=9)   # 300 = 9 * 32 + 12: no 10th batch
    tail = np.setdiff1d(np.arange(300), tr.epoch_indices(300, 32, seed=0))
    assert len(tail) == 12
    changed = joe[0].copy()
    changed[tail] = 255                                             # the 12 digits an epoch leaves out
    assert np.array_equal(im.local_epoch(honest, changed, joe[1], lr=LR, batch_size=32),
                          im.local_epoch(honest, *joe, lr=LR, batch_size=32))


@pytest.mark.parametrize("batch_size, at_least", [(32, 27), (64, 52)])
def test_imprint_gives_back_most_of_a_batch_pixel_exact(owners, crafted, batch_size, at_least):
    joe = owners[0][0]
    gradient = im.update_gradient(crafted, im.one_batch(crafted, *joe, lr=LR, batch_size=batch_size), LR)
    flagged = im.imprint_digits(gradient, one_digit=1e-2 / batch_size)
    result = graded(owners, flagged, *batch(joe, batch_size))
    assert result["exact"] >= at_least, result
    assert result["exact"] >= 0.95 * len(flagged)   # what the attacker flags as one digit is one digit


def test_imprint_survives_a_masked_sum_of_three_owners(owners, crafted):
    afters = [im.one_batch(crafted, *owner, lr=LR, batch_size=32) for owner in owners[0]]
    average, n_total = aggregator.masked_average(afters, [32] * 3)
    assert n_total == 96
    flagged = im.imprint_digits(im.update_gradient(crafted, average, LR), one_digit=1e-2 / n_total)
    result = graded(owners, flagged, *stacked(owners, 32))
    assert result["exact"] >= 60, result


def test_imprint_through_ckks_is_as_precise_as_the_flooding_noise(owners):
    hidden, gain = 100, 1e3
    model = im.imprint_model(owners[1][0], hidden=hidden, scale=1e-9, gain=gain)
    afters = [im.one_batch(model, *owner, lr=LR, batch_size=32, hidden=hidden) for owner in owners[0]]
    average, n_total = aggregator.ckks_average(afters, [32] * 3)
    candidates, _ = im.imprint_bins(im.update_gradient(model, average, LR), hidden=hidden)
    result = graded(owners, candidates, *stacked(owners, 32))
    assert result["identified"] >= 25, result      # 100 bins for 96 digits: about 37 alone in a bin
    best = np.sort(result["errors"])[:25]
    assert 1e-3 < best[0] and best[-1] < 0.05, best   # the flooding noise (sigma 0.97, N_d = 21) is there


def test_a_whole_local_epoch_at_a_tiny_learning_rate_still_gives_digits(owners):
    jane, lr = owners[0][1], 1e-11
    model = im.imprint_model(owners[1][0], scale=3.2e-7, gain=3.2)   # lr * gain / scale = 1e-4
    digits = 96
    images, labels = jane[0][:digits], jane[1][:digits]
    after = im.local_epoch(model, images, labels, lr=lr, batch_size=32)   # 3 steps
    candidates, _ = im.imprint_bins(im.update_gradient(model, after, lr))
    idx = tr.epoch_indices(digits, 32, seed=0)
    result = graded(owners, candidates, images[idx], labels[idx])
    assert result["identified"] >= 70 and result["exact"] >= 40, result


# --- owner-side DP: the noise is there whatever the weights ------------------------------------------------
def test_dp_noise_is_there_whatever_the_weights_and_no_digit_comes_back(owners, crafted, honest):
    joe, sigma, clip = owners[0][0], 1.0, 0.1
    for model in (crafted, np.zeros_like(honest), im.imprint_model(owners[1][0], scale=1e-9, gain=1e3)):
        after = im.dp_one_batch(model, *joe, lr=LR, batch_size=32, noise_multiplier=sigma, max_grad_norm=clip)
        gradient = im.update_gradient(model, after, LR)
        assert 0.98 < gradient.std() * 32 / (sigma * clip) < 1.02
        result = graded(owners, im.imprint_bins(gradient)[0], *batch(joe, 32))
        assert result["identified"] == 0 and result["exact"] == 0, result


def test_dp_noise_does_not_come_from_a_generator_the_data_scientist_seeds(owners, crafted):
    joe = owners[0][0]
    afters = []
    for _ in range(2):
        torch.manual_seed(0)   # what a data scientist's tr.set_seed(0) does in the owner's process
        afters.append(im.dp_one_batch(crafted, *joe, lr=LR, batch_size=32, noise_multiplier=1.0,
                                      max_grad_norm=0.1))
    assert not np.array_equal(*afters)


# --- different models to different owners ---------------------------------------------------------------
def test_different_models_give_the_targets_count_and_update_through_the_masked_sum(owners, honest):
    sent = im.inconsistent_models(honest, 3, target=0)
    afters = [im.local_epoch(v, *owner, lr=LR, batch_size=32) for v, owner in zip(sent, owners[0])]
    assert all(np.array_equal(a[:-10], v[:-10]) for a, v in zip(afters[1:], sent[1:]))  # only b2 moved
    count, weights = im.recover_target(*aggregator.masked_average(afters, [300] * 3))
    assert count == 300
    assert np.isnan(weights[-10:]).all() and np.abs(weights[:-10] - afters[0][:-10]).max() < 1e-8


def test_different_models_through_ckks_within_the_flooding_noise(owners, honest):
    hidden = 100
    tr.set_seed(1)
    real = tr.model_to_vector(tr.MLP(hidden=hidden)).numpy()
    sent = im.inconsistent_models(real, 3, target=2, hidden=hidden)
    afters = [im.local_epoch(v, *owner, lr=LR, batch_size=32, hidden=hidden)
              for v, owner in zip(sent, owners[0])]
    count, weights = im.recover_target(*aggregator.ckks_average(afters, [300] * 3), hidden=hidden)
    sigma = he.flooding_sigma(he.ciphertexts_for(im.mlp_size(hidden)), error_bound=3 * he.FRESH_ERROR_BOUND)
    error = np.abs(weights[:-10] * count / 300 - afters[2][:-10]).max()   # the count itself is flooded
    assert abs(count - 300) <= 5 * sigma and 1e-5 < error < 8 * sigma / 300, (count, error)


def test_recover_target_refuses_a_round_without_a_counting_unit(honest):
    with pytest.raises(ValueError, match="not a round of inconsistent models"):
        im.recover_target(honest.astype(np.float64), 900)
