"""secure_ai.membership: membership inference guesses on a model that saw neither set, beats guessing on an
overfit one, and its statistics (AUC, TPR at low FPR, margins) are the textbook ones."""
import math

import numpy as np
import pytest
import torch
from secure_ai import membership as mi
from secure_ai import training as tr


def _train(images, labels, epochs, seed=0, hidden=128):
    tr.set_seed(seed)
    model = tr.MLP(hidden=hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(epochs):
        tr.train_epoch(model, images, labels, optimizer, batch_size=32, seed=seed + epoch, progress=False)
    return model


def test_mia_is_a_guess_on_a_model_that_saw_neither_set(mnist):
    (x, y), _ = mnist
    model = _train(x[:2000], y[:2000], epochs=3)
    a, b = slice(10_000, 10_500), slice(20_000, 20_500)  # two disjoint sets from the same distribution
    auc = mi.roc_auc(mi.loss_scores(model, x[a], y[a]), mi.loss_scores(model, x[b], y[b]))
    assert abs(auc - 0.5) <= mi.auc_margin(500, 500), auc  # 3 standard deviations: +-0.055


def test_mia_beats_guessing_on_an_overfit_model(mnist):
    (x, y), _ = mnist
    members, non_members = slice(0, 300), slice(300, 600)
    model = _train(x[members], y[members], epochs=30)
    auc = mi.roc_auc(mi.loss_scores(model, x[members], y[members]),
                     mi.loss_scores(model, x[non_members], y[non_members]))
    assert auc >= 0.5 + 2 * mi.auc_margin(300, 300), auc


def test_lira_separates_members_and_guesses_on_the_null():
    rng = np.random.default_rng(0)
    n, k = 2000, 8
    inside = np.stack([rng.permutation(np.arange(k) < k // 2) for _ in range(n)], axis=1)
    difficulty = rng.normal(0, 3, n)  # per-sample offsets: a global threshold cannot see through them
    shadows = difficulty + np.where(inside, 1.0, 0.0) + rng.normal(0, 0.3, (k, n))
    member = rng.random(n) < 0.5
    target = difficulty + np.where(member, 1.0, 0.0) + rng.normal(0, 0.3, n)
    scores = mi.lira_scores(target, shadows, inside)
    assert mi.roc_auc(scores[member], scores[~member]) > 0.95
    assert mi.roc_auc(target[member], target[~member]) < 0.7  # the raw confidence is much weaker
    null = mi.lira_scores(difficulty + rng.normal(0, 0.3, n), difficulty + rng.normal(0, 0.3, (k, n)), inside)
    assert abs(mi.roc_auc(null[member], null[~member]) - 0.5) <= mi.auc_margin(member.sum(), (~member).sum())
    with pytest.raises(ValueError, match="shape mismatch"):
        mi.lira_scores(target[:5], shadows, inside)
    with pytest.raises(ValueError, match="at least one shadow"):
        mi.lira_scores(target, shadows, np.ones_like(inside))


def test_shadow_models_split_every_sample_in_half(mnist):
    (x, y), _ = mnist
    calls = []

    def train(images, labels, seed):
        calls.append((len(images), seed))
        return _train(images, labels, epochs=1, seed=seed, hidden=16)

    scores, inside = mi.shadow_confidences(train, x[:40], y[:40], n_shadows=4, progress=False)
    assert scores.shape == inside.shape == (4, 40) and np.isfinite(scores).all()
    assert (inside.sum(0) == 2).all() and [s for _, s in calls] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="even"):
        mi.shadow_confidences(train, x[:40], y[:40], n_shadows=3)
    with pytest.raises(ValueError, match=">= 4"):
        mi.shadow_confidences(train, x[:40], y[:40], n_shadows=2)


def test_lira_refuses_one_shadow_per_side():
    """With one 'in' and one 'out' shadow per sample every residual is 0: the pooled variance would be 0."""
    rng = np.random.default_rng(0)
    inside = np.stack([rng.permutation([True, False]) for _ in range(100)], axis=1)
    shadows, target = rng.normal(size=(2, 100)), rng.normal(size=100)
    with pytest.raises(ValueError, match="at least 2 'in' and 2 'out'"):
        mi.lira_scores(target, shadows, inside)


def test_lira_global_variance_is_the_pooled_residual_std():
    rng = np.random.default_rng(1)
    n, k, std = 2000, 16, 1.5
    inside = np.stack([rng.permutation(np.arange(k) < k // 2) for _ in range(n)], axis=1)
    means = rng.normal(0, 3, n) + np.where(inside, 1.0, 0.0)
    shadows = means + rng.normal(0, std, (k, n))
    target = rng.normal(0, 3, n)
    in_mean = np.nanmean(np.where(inside, shadows, np.nan), 0)
    out_mean = np.nanmean(np.where(~inside, shadows, np.nan), 0)
    pooled_in = np.sqrt(np.nanmean(np.where(inside, shadows - in_mean, np.nan) ** 2))   # as documented
    pooled_out = np.sqrt(np.nanmean(np.where(~inside, shadows - out_mean, np.nan) ** 2))
    assert abs(pooled_in / std - 1) < 0.1 and abs(pooled_out / std - 1) < 0.1   # 8 per side: sqrt(7/8) low
    expected = (-0.5 * ((target - in_mean) / pooled_in) ** 2 - np.log(pooled_in)
                + 0.5 * ((target - out_mean) / pooled_out) ** 2 + np.log(pooled_out))
    assert np.allclose(mi.lira_scores(target, shadows, inside), expected)


# --- the empirical lower bound on epsilon (DP review 5.6) -----------------------------------------------
def test_empirical_epsilon_of_a_guess_is_zero():
    scores = np.random.default_rng(2).normal(size=500)
    assert mi.empirical_epsilon(scores, scores.copy(), 1e-5) == 0.0
    rng = np.random.default_rng(3)
    assert mi.empirical_epsilon(rng.normal(size=500), rng.normal(size=500), 1e-5) == 0.0


def test_empirical_epsilon_of_a_perfect_attack_is_the_clopper_pearson_ceiling():
    """500 / 500 separated scores, halves of 250: TPR >= (alpha/2)^(1/250), FPR <= 1 - (alpha/2)^(1/250)."""
    rng = np.random.default_rng(4)
    ceiling = 0.025 ** (1 / 250)
    expected = np.log((ceiling - 1e-5) / (1 - ceiling))
    assert mi.empirical_epsilon(rng.normal(10, 1, 500), rng.normal(0, 1, 500), 1e-5) == pytest.approx(
        expected, abs=1e-3)
    assert 4.1 < expected < 4.3   # a perfect attack on 500 records proves little more than 4


def test_empirical_epsilon_grows_with_the_attack():
    rng = np.random.default_rng(5)
    non_members = rng.normal(size=500)
    proven = [mi.empirical_epsilon(rng.normal(shift, 1, 500), non_members, 1e-5) for shift in (1, 1.5, 3)]
    assert 0 < proven[0] < proven[1] < proven[2], proven
    with pytest.raises(ValueError, match="at least 4"):
        mi.empirical_epsilon([1, 2, 3], [0, 1, 2, 3], 1e-5)
    with pytest.raises(ValueError, match="alpha"):
        mi.empirical_epsilon(non_members, non_members, 1e-5, alpha=0)


# --- ROC, AUC, TPR at FPR ----------------------------------------------------------------------
def test_roc_auc_and_tpr_known_values():
    assert mi.roc_auc([3, 4], [1, 2]) == 1.0
    assert mi.roc_auc([1, 2], [3, 4]) == 0.0
    assert mi.roc_auc([1, 1], [1, 1]) == 0.5  # ties count half
    rng = np.random.default_rng(1)
    m, n = rng.normal(1, 1, 300), rng.normal(0, 1, 400)
    brute = ((m[:, None] > n[None, :]).sum() + 0.5 * (m[:, None] == n[None, :]).sum()) / (300 * 400)
    assert mi.roc_auc(m, n) == pytest.approx(brute)
    fpr, tpr = mi.roc_curve(m, n)
    assert np.trapz(tpr, fpr) == pytest.approx(brute)
    members, non_members = np.arange(100, 200), np.arange(0, 110)
    # FPR <= 1%: at most 1 of the 110 non-members may score >= t, so t = 109, which 91 members reach
    assert mi.tpr_at_fpr(members, non_members, 0.01) == pytest.approx(0.91)
    assert mi.tpr_at_fpr(members, non_members, 0.005) == pytest.approx(0.90)  # none: t = 110
    assert mi.tpr_at_fpr(members, non_members, 0.5) == 1.0



def test_membership_metrics_reject_bad_input():
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            mi.tpr_at_fpr([1.0], [0.0], bad)
    with pytest.raises(ValueError, match="members and non-members"):
        mi.roc_auc([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        mi.roc_curve([np.nan], [1.0])


def test_margins():
    assert mi.binomial_margin(0.5, 100) == pytest.approx(3 * 0.05)
    assert mi.binomial_margin(0.0, 100) == pytest.approx(0.03)  # one more hit out of 100, times 3
    assert mi.auc_margin(500, 500) == pytest.approx(3 * math.sqrt(1001 / (12 * 500 * 500)))
    with pytest.raises(ValueError):
        mi.binomial_margin(0.1, 0)


def test_attack_membership(mnist):
    (x, y), (tx, ty) = mnist
    train = lambda images, labels, seed: _train(images, labels, epochs=1, seed=seed, hidden=16)
    result = mi.attack_membership(train, x[:60], y[:60], (tx[:100], ty[:100]), n_shadows=4, progress=False)
    assert result.member.sum() == 30 and set(result.scores) == {"loss threshold", "LiRA"}
    assert 0 <= result.auc("LiRA") <= 1 and 0 <= result.accuracy <= 1
    assert result.shadows.shape == result.inside.shape == (4, 60) and result.confidence.shape == (60,)
    lira = mi.lira_scores(result.confidence, result.shadows, result.inside)
    assert np.allclose(result.scores["LiRA"], lira)
    members, non_members = result.scores["LiRA"][result.member], result.scores["LiRA"][~result.member]
    assert result.empirical_epsilon("LiRA", 1e-5) == mi.empirical_epsilon(members, non_members, 1e-5)
    with pytest.raises(ValueError, match="unknown attack"):
        result.auc("oracle")


# --- the targets -----------------------------------------------------------------------------------------
def test_the_targets_part_6_and_the_benchmark_share(mnist):
    (x, y), (tx, ty) = mnist
    images, labels, test = x[:200], y[:200], (tx[:300], ty[:300])
    plain = mi.overfit_trainer(hidden=32, epochs=15)(images, labels, 0)
    assert tr.evaluate(plain, images, labels)[0] == 1.0                       # it memorised its digits
    train, state = mi.dp_trainer(3.0, steps=10)
    private = train(images, labels, 0)
    assert abs(state["epsilon"] - 3.0) < 0.05 and state["sigma"] > 1           # the target's noise, for eps 3
    shadow = train(images[:100], labels[:100], 1)
    assert state["epsilon"] == pytest.approx(3.0, abs=0.05) and shadow is not private   # shadows reuse sigma
    dp_accuracy = tr.evaluate(private, *test)[0]
    assert dp_accuracy > 0.5
    matched = mi.matched_trainer(dp_accuracy, test, max_steps=200)(images, labels, 0)
    assert tr.evaluate(matched, *test)[0] >= dp_accuracy                       # the DP model's utility
    untrained = mi.matched_trainer(0.0, test)(images, labels, 0)               # reached before any step
    assert tr.evaluate(untrained, *test)[0] == pytest.approx((test[1] == 0).float().mean().item())
