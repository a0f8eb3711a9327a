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
    result = mi.attack_membership(train, x[:60], y[:60], (tx[:100], ty[:100]), n_shadows=2, progress=False)
    assert result.member.sum() == 30 and set(result.scores) == {"loss threshold", "LiRA"}
    assert 0 <= result.auc("LiRA") <= 1 and 0 <= result.accuracy <= 1
    with pytest.raises(ValueError, match="unknown attack"):
        result.auc("oracle")
