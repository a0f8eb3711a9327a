"""secure_ai.attacks: the attacks work where the literature says they do, fail where they should, and the
numbers they report (SSIM, AUC, TPR at low FPR, the DP bound) are the textbook ones."""
import math

import numpy as np
import pytest
import torch
from secure_ai import attacks as at
from secure_ai import training as tr

RECOGNISED = 0.8  # SSIM above which a reconstruction is *that* digit (the notebook derives it from MNIST)


@pytest.fixture(scope="module")
def small_mlp():
    torch.set_num_threads(1)
    tr.set_seed(0)
    return tr.MLP(hidden=100)


# --- updates, labels ---------------------------------------------------------------------------------------
def test_update_of_one_sgd_step_is_its_gradient(mnist, small_mlp):
    (x, y), _ = mnist
    images, labels = x[:8], y[:8]
    expected = at.gradient_of(small_mlp, images, labels)
    model = tr.vector_to_model(tr.model_to_vector(small_mlp), tr.MLP(hidden=100))
    before = tr.model_to_vector(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()
    recovered = at.gradient_from_update(before, tr.model_to_vector(model), 0.01, small_mlp)
    for g, e in zip(recovered, expected):
        assert torch.allclose(g, e, atol=2e-4, rtol=1e-3)


def test_label_inference_is_exact_on_batch_one(mnist, small_mlp):
    (x, y), _ = mnist
    trained = tr.MLP(hidden=100)
    tr.train_epoch(trained, x[:2000], y[:2000], torch.optim.SGD(trained.parameters(), lr=0.1), progress=False)
    for model in (small_mlp, trained):  # untrained and trained: the sign argument holds for both
        for i in range(40):
            gradient = at.gradient_of(model, x[i:i + 1], y[i:i + 1])
            assert at.infer_labels(gradient, model).tolist() == [int(y[i])]


def test_label_counts_of_a_batch(mnist, small_mlp):
    (x, y), (tx, _) = mnist
    images, labels = x[100:116], y[100:116]
    gradient = at.gradient_of(small_mlp, images, labels)
    inferred = at.infer_labels(gradient, small_mlp, batch_size=16, reference=tx[:500])
    assert len(inferred) == 16
    assert at.label_accuracy(inferred, labels) >= 0.9
    assert at.label_accuracy(torch.tensor([1, 1, 2]), torch.tensor([1, 2, 3])) == pytest.approx(2 / 3)


# --- inversion ---------------------------------------------------------------------------------------------
def test_inversion_rebuilds_a_batch_one_digit(mnist, small_mlp):
    (x, y), _ = mnist
    digit, label = x[7:8], y[7:8]
    gradient = at.gradient_of(small_mlp, digit, label)
    rebuilt = at.invert_gradient(small_mlp, gradient, at.infer_labels(gradient, small_mlp), steps=200,
                                 progress=False)
    quality = at.ssim(rebuilt, digit).item()
    assert quality >= RECOGNISED, quality
    assert at.psnr(rebuilt, digit).item() > 20


def test_inversion_fails_on_the_mean_of_many(mnist, small_mlp):
    (x, y), (tx, _) = mnist
    images, labels = x[200:264], y[200:264]
    gradient = at.gradient_of(small_mlp, images, labels)
    guess = at.infer_labels(gradient, small_mlp, batch_size=8, reference=tx[:500])  # attacker tries 8 digits
    rebuilt = at.invert_gradient(small_mlp, gradient, guess, steps=200, progress=False)
    _, quality = at.match_reconstructions(rebuilt, images)
    assert quality.max().item() < RECOGNISED, quality.max()


def test_inversion_rejects_bad_input(small_mlp):
    gradient = [torch.zeros_like(p) for p in small_mlp.parameters()]
    with pytest.raises(ValueError, match="all zeros"):
        at.invert_gradient(small_mlp, gradient, torch.tensor([1]), steps=1, progress=False)
    with pytest.raises(ValueError, match="does not fit"):
        at.invert_gradient(small_mlp, gradient[:-1], torch.tensor([1]), steps=1, progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        at.invert_gradient(small_mlp, [g + 1 for g in gradient], torch.tensor([], dtype=torch.long), steps=1)
    with pytest.raises(ValueError, match="empty"):
        at.gradient_of(small_mlp, torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size"):
        at.infer_labels(gradient, small_mlp, batch_size=0)
    with pytest.raises(ValueError, match="parameters"):
        at.gradient_from_update(torch.zeros(5), torch.zeros(5), 0.1, small_mlp)
    with pytest.raises(ValueError, match="lr"):
        at.gradient_from_update(torch.zeros(5), torch.zeros(5), 0.0, small_mlp)


# --- image quality -----------------------------------------------------------------------------------------
def test_ssim_and_psnr_known_values(mnist):
    (x, _), _ = mnist
    digits = x[:4]
    assert torch.allclose(at.ssim(digits, digits), torch.ones(4), atol=1e-5)
    pixels = at.to_pixels(digits)
    shifted = ((pixels * 0.5 + 0.25) - 0.1307) / 0.3081  # an affine change of contrast
    mse = ((at.to_pixels(shifted) - pixels) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(at.psnr(shifted, digits), 10 * torch.log10(1 / mse), atol=1e-3)
    noise = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)) / 0.3081 - 0.42
    assert at.ssim(noise, digits).abs().max() < 0.2  # noise is unrelated to a digit
    index, quality = at.match_reconstructions(digits.flip(0), digits)  # order does not matter
    assert index.tolist() == [3, 2, 1, 0] and torch.allclose(quality, torch.ones(4), atol=1e-5)


def test_ssim_and_psnr_match_torchmetrics(mnist):
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    (x, _), _ = mnist
    noisy = x[:16] + torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for a, b in [(noisy, x[:16]), (x[16:32], x[:16])]:
        pa, pb = at.to_pixels(a), at.to_pixels(b)
        reference = structural_similarity_index_measure(pa, pb, data_range=1.0, reduction="none")
        assert torch.allclose(at.ssim(a, b), reference, atol=1e-5)
        reference = peak_signal_noise_ratio(pa, pb, data_range=1.0, reduction="none", dim=(1, 2, 3))
        assert torch.allclose(at.psnr(a, b), reference, atol=1e-4)


def test_quality_rejects_bad_input(mnist):
    (x, _), _ = mnist
    with pytest.raises(ValueError, match="shape mismatch"):
        at.ssim(x[:2], x[:3])
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        at.psnr(x[:2, 0], x[:2, 0])
    with pytest.raises(ValueError, match="empty"):
        at.ssim(x[:0], x[:0])


# --- membership inference -----------------------------------------------------------------------------------
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
    auc = at.roc_auc(at.loss_scores(model, x[a], y[a]), at.loss_scores(model, x[b], y[b]))
    assert abs(auc - 0.5) <= at.auc_margin(500, 500), auc  # 3 standard deviations: +-0.055


def test_mia_beats_guessing_on_an_overfit_model(mnist):
    (x, y), _ = mnist
    members, non_members = slice(0, 300), slice(300, 600)
    model = _train(x[members], y[members], epochs=30)
    auc = at.roc_auc(at.loss_scores(model, x[members], y[members]),
                     at.loss_scores(model, x[non_members], y[non_members]))
    assert auc >= 0.5 + 2 * at.auc_margin(300, 300), auc


def test_lira_separates_members_and_guesses_on_the_null():
    rng = np.random.default_rng(0)
    n, k = 2000, 8
    inside = np.stack([rng.permutation(np.arange(k) < k // 2) for _ in range(n)], axis=1)
    difficulty = rng.normal(0, 3, n)  # per-sample offsets: a global threshold cannot see through them
    shadows = difficulty + np.where(inside, 1.0, 0.0) + rng.normal(0, 0.3, (k, n))
    member = rng.random(n) < 0.5
    target = difficulty + np.where(member, 1.0, 0.0) + rng.normal(0, 0.3, n)
    scores = at.lira_scores(target, shadows, inside)
    assert at.roc_auc(scores[member], scores[~member]) > 0.95
    assert at.roc_auc(target[member], target[~member]) < 0.7  # the raw confidence is much weaker
    null = at.lira_scores(difficulty + rng.normal(0, 0.3, n), difficulty + rng.normal(0, 0.3, (k, n)), inside)
    assert abs(at.roc_auc(null[member], null[~member]) - 0.5) <= at.auc_margin(member.sum(), (~member).sum())
    with pytest.raises(ValueError, match="shape mismatch"):
        at.lira_scores(target[:5], shadows, inside)
    with pytest.raises(ValueError, match="at least one shadow"):
        at.lira_scores(target, shadows, np.ones_like(inside))


def test_shadow_models_split_every_sample_in_half(mnist):
    (x, y), _ = mnist
    calls = []

    def train(images, labels, seed):
        calls.append((len(images), seed))
        return _train(images, labels, epochs=1, seed=seed, hidden=16)

    scores, inside = at.shadow_confidences(train, x[:40], y[:40], n_shadows=4, progress=False)
    assert scores.shape == inside.shape == (4, 40) and np.isfinite(scores).all()
    assert (inside.sum(0) == 2).all() and [s for _, s in calls] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="even"):
        at.shadow_confidences(train, x[:40], y[:40], n_shadows=3)


# --- ROC, AUC, TPR at FPR, DP bound ----------------------------------------------------------------------
def test_roc_auc_and_tpr_known_values():
    assert at.roc_auc([3, 4], [1, 2]) == 1.0
    assert at.roc_auc([1, 2], [3, 4]) == 0.0
    assert at.roc_auc([1, 1], [1, 1]) == 0.5  # ties count half
    rng = np.random.default_rng(1)
    m, n = rng.normal(1, 1, 300), rng.normal(0, 1, 400)
    brute = ((m[:, None] > n[None, :]).sum() + 0.5 * (m[:, None] == n[None, :]).sum()) / (300 * 400)
    assert at.roc_auc(m, n) == pytest.approx(brute)
    fpr, tpr = at.roc_curve(m, n)
    assert np.trapz(tpr, fpr) == pytest.approx(brute)
    members, non_members = np.arange(100, 200), np.arange(0, 110)
    # FPR <= 1%: at most 1 of the 110 non-members may score >= t, so t = 109, which 91 members reach
    assert at.tpr_at_fpr(members, non_members, 0.01) == pytest.approx(0.91)
    assert at.tpr_at_fpr(members, non_members, 0.005) == pytest.approx(0.90)  # none: t = 110
    assert at.tpr_at_fpr(members, non_members, 0.5) == 1.0


def test_dp_bound_matches_the_definition():
    fpr = np.array([0.001, 0.01, 0.1, 0.5])
    for epsilon, delta in [(0.0, 0.0), (1.0, 1e-5), (3.0, 1e-5), (8.0, 1e-5)]:
        bound = at.dp_tpr_bound(fpr, epsilon, delta)
        expected = np.minimum(np.exp(epsilon) * fpr + delta, 1 - np.exp(-epsilon) * (1 - delta - fpr))
        assert np.allclose(bound, np.minimum(expected, 1))
        assert (bound <= math.exp(epsilon) * fpr + delta + 1e-12).all()
    assert at.dp_tpr_bound(0.01, 1.0, 1e-5) == pytest.approx(math.e * 0.01 + 1e-5)
    assert np.allclose(at.dp_tpr_bound(fpr, 0.0, 0.0), fpr)  # epsilon 0: no attack beats guessing
    assert at.dp_tpr_bound(0.5, 8.0, 1e-5) == pytest.approx(1 - math.exp(-8) * (0.5 - 1e-5))


def test_membership_metrics_reject_bad_input():
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            at.tpr_at_fpr([1.0], [0.0], bad)
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            at.dp_tpr_bound(bad, 1.0, 1e-5)
    with pytest.raises(ValueError, match="members and non-members"):
        at.roc_auc([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        at.roc_curve([np.nan], [1.0])
    with pytest.raises(ValueError, match="epsilon"):
        at.dp_tpr_bound(0.1, -1.0, 1e-5)


def test_margins():
    assert at.binomial_margin(0.5, 100) == pytest.approx(3 * 0.05)
    assert at.binomial_margin(0.0, 100) == pytest.approx(0.03)  # one more hit out of 100, times 3
    assert at.auc_margin(500, 500) == pytest.approx(3 * math.sqrt(1001 / (12 * 500 * 500)))
    with pytest.raises(ValueError):
        at.binomial_margin(0.1, 0)


def test_attack_membership_and_round_costs(mnist):
    (x, y), (tx, ty) = mnist
    train = lambda images, labels, seed: _train(images, labels, epochs=1, seed=seed, hidden=16)
    result = at.attack_membership(train, x[:60], y[:60], (tx[:100], ty[:100]), n_shadows=2, progress=False)
    assert result.member.sum() == 30 and set(result.scores) == {"loss threshold", "LiRA"}
    assert 0 <= result.auc("LiRA") <= 1 and 0 <= result.accuracy <= 1
    with pytest.raises(ValueError, match="unknown attack"):
        result.auc("oracle")
    update = lambda private: torch.ones(1000) * (2.0 if private else 1.0)
    costs = at.round_costs(update, n_samples=10, repeat=1)
    assert costs["plain FedAvg"]["bytes vs plain"] == 1 and costs["plain FedAvg"]["time vs plain"] == 1
    assert costs["secure aggregation (masks)"]["bytes"] == 1001 * 8  # [n * w, n] as 64-bit ring elements
    assert costs["CKKS"]["bytes vs plain"] > costs["secure aggregation (masks)"]["bytes vs plain"]
    assert all(c["seconds"] > 0 for c in costs.values())


def test_plots_of_the_chapter():
    from secure_ai import plots

    x = torch.zeros(5, 1, 28, 28)
    fig = plots.plot_reconstructions({"a": (x, x, torch.tensor([0.1, 0.9, 0.2, 0.3, 0.4])),
                                      "b": (x[:1], x[:1], torch.tensor([0.5]))}, n=4, threshold=0.8)
    assert len([ax for ax in fig.axes if ax.images]) == 2 * (4 + 1)
    labels = [ax.title for ax in fig.axes if ax.get_title()]
    assert [t.get_text() for t in labels] == ["0.10", "0.90", "0.20", "0.30", "0.50"]
    assert [t.get_fontweight() for t in labels][:2] == ["normal", "bold"]
    with pytest.raises(ValueError, match="same length"):
        plots.plot_reconstructions({"a": (x, x[:2], [0.1])})
    with pytest.raises(ValueError, match="empty"):
        plots.plot_reconstructions({})
    fig = plots.plot_roc({"attack": (np.array([0, 0.5, 1]), np.array([0, 0.7, 1]))}, {"bound": (1.0, 1e-5)})
    lines = fig.axes[0].get_lines()
    assert len(lines) == 3  # guessing, the attack, the bound
    assert np.allclose(lines[2].get_ydata(), at.dp_tpr_bound(lines[2].get_xdata(), 1.0, 1e-5))
    with pytest.raises(ValueError, match="empty"):
        plots.plot_roc({})
