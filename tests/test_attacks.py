"""secure_ai.attacks: what one update leaks; the attacks work where the literature says they do, fail where
they should, identification tells a rebuilt digit from an uninformative image, and the image-quality numbers
(SSIM, PSNR) are the textbook ones."""

import numpy as np
import pytest
import torch
from secure_ai import attacks as at
from secure_ai import training as tr
from secure_ai.data import MNIST_MEAN, MNIST_STD


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
    (x, y), (tx, ty) = mnist
    digit, label = x[7:8], y[7:8]
    gradient = at.gradient_of(small_mlp, digit, label)
    rebuilt = at.invert_gradient(small_mlp, gradient, at.infer_labels(gradient, small_mlp), steps=200,
                                 progress=False)
    assert at.identify(rebuilt, digit, label, tx, ty)[0].all()
    assert at.psnr(rebuilt, digit).item() > 20


def test_inversion_fails_on_the_mean_of_many(mnist, small_mlp):
    (x, y), (tx, ty) = mnist
    images, labels = x[200:264], y[200:264]
    gradient = at.gradient_of(small_mlp, images, labels)
    guess = at.infer_labels(gradient, small_mlp, batch_size=8, reference=tx[:500])  # attacker tries 8 digits
    rebuilt = at.invert_gradient(small_mlp, gradient, guess, steps=200, progress=False)
    graded = at.grade_reconstructions(guess, rebuilt, images, labels, tx, ty)
    # 8 dummies for 64 digits: at most a digit or two stand out (chance alone gives 64 / 1,000 per pool)
    assert graded.summary["identified"] <= 2 and graded.summary["median rank"] > 100, graded.summary


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
    assert index.tolist() == [3, 2, 1, 0] and torch.isinf(quality).all()  # identical: no error at all


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




# --- identification (DP review 5.3) ----------------------------------------------------------------------
def pixels_to_normalized(pixels) -> torch.Tensor:
    return torch.as_tensor((np.asarray(pixels, dtype=np.float64) - MNIST_MEAN) / MNIST_STD).float()


def test_uninformative_images_are_not_identified(mnist):
    """An all-black image and the class's average image point to no particular digit."""
    (x, y), (tx, ty) = mnist
    digits, labels = x[:300], y[:300]
    black = torch.full_like(digits, (0 - MNIST_MEAN) / MNIST_STD)
    means = torch.stack([tx[ty == c].mean(0) for c in range(10)])[labels]   # the class mean of the pool
    for uninformative in (black, means):
        identified, rank = at.identify(uninformative, digits, labels, tx, ty)
        assert identified.sum() <= 3 and np.median(rank) > 100, (identified.sum(), np.median(rank))


def test_a_noisy_copy_is_identified(mnist):
    (x, y), (tx, ty) = mnist
    digits, labels = x[:300], y[:300]
    noise = np.random.default_rng(0).normal(0, 0.05, (300, 1, 28, 28))
    noisy = pixels_to_normalized(np.clip(at.to_pixels(digits).numpy() + noise, 0, 1))
    identified, rank = at.identify(noisy, digits, labels, tx, ty)
    assert identified.all() and (rank == 1).all()
    assert at.ssim(noisy, digits).median() < 0.8   # SSIM would have called most of them unrecognised


def test_rank_one_iff_identified_and_the_original_in_the_pool_does_not_count(mnist):
    (x, y), (tx, ty) = mnist
    digits, labels = x[:50], y[:50]
    halfway = (digits + torch.roll(digits, 1, 0)) / 2        # between a digit and another one
    identified, rank = at.identify(halfway, digits, labels, tx, ty)
    assert (identified == (rank == 1)).all() and (rank >= 1).all()
    pool, pool_labels = torch.cat([tx, digits]), torch.cat([ty, labels])   # the pool holds the originals
    assert at.identify(digits, digits, labels, pool, pool_labels)[0].all()
    raw = (at.to_pixels(digits)[:, 0] * 255).round().to(torch.uint8)       # raw uint8 digits work as well
    assert at.identify(digits, raw, labels, tx, ty)[0].all()


def test_identify_and_grading_reject_bad_input(mnist):
    (x, y), (tx, ty) = mnist
    with pytest.raises(ValueError, match="as many reconstructions"):
        at.identify(x[:3], x[:2], y[:2], tx, ty)
    with pytest.raises(ValueError, match="a label per pool digit"):
        at.identify(x[:2], x[:2], y[:2], tx, ty[:5])
    with pytest.raises(ValueError, match="no digit of class"):
        at.identify(x[:2], x[:2], torch.tensor([3, 3]), tx[ty != 3], ty[ty != 3])
    with pytest.raises(ValueError, match="784 pixels"):
        at.identify(x[:2, :, :5], x[:2], y[:2], tx, ty)


def test_grading_pairs_the_attackers_best_case_and_pads_with_black(mnist):
    (x, y), (tx, ty) = mnist
    digits, labels = x[:6], y[:6]
    graded = at.grade_reconstructions(labels.flip(0), digits[:4].flip(0), digits, labels, tx, ty)
    assert graded.summary["identified"] == 4 and graded.summary["digits"] == 6
    assert graded.summary["label accuracy"] == 1.0 and graded.summary["best PSNR"] == float("inf")
    assert torch.equal(graded.paired[:4], digits[:4])
    assert (at.to_pixels(graded.paired[4:]) < 1e-6).all() and not graded.identified[4:].any()
