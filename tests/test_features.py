"""secure_ai.features: ScatterNet features (shape, data-independence), DP-SGD on them (dp_sgd.make_private on
2-D features: Opacus's ghost clipping), and the epsilon values of benchmarks/dp_mnist.py pinned to the
independent accountants of tests/test_privacy.py."""
import importlib
import math
import os

import numpy as np
import pytest
import torch
from secure_ai import data, dp_sgd
from torch import nn

from tests.test_privacy import epsilon_pld, epsilon_rdp, rdp_sampled_gaussian


@pytest.fixture(scope="module")
def ft():
    """secure_ai.features, which needs kymatio: a failure in CI (the lock installs it), a skip elsewhere."""
    try:
        importlib.import_module("kymatio")
    except ImportError:  # pragma: no cover - CI installs the lock
        if os.environ.get("CI"):
            raise
        pytest.skip("kymatio is not installed (pip install -r requirements.txt)")
    from secure_ai import features

    return features


def digits(n=6, seed=0):
    """Random strokes on a black background, as raw uint8 digits (N, 28, 28)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    images[:, 6:22, 8:20] = torch.randint(0, 256, (n, 16, 12), generator=generator, dtype=torch.uint8)
    return images


# --- the feature pipeline ----------------------------------------------------------------------------------
def test_features_have_the_scatternet_shape(ft):
    images = digits(5)
    features = ft.scatter_features(images)
    assert ft.CHANNELS == 81 and ft.SIDE == 7 and ft.N_FEATURES == 81 * 7 * 7 == 3969
    assert features.shape == (5, 3969) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    compact = ft.scatter_features(images, compact=True)
    assert compact.shape == (5, 3969) and compact.dtype == torch.int8
    inside = features.abs() < 127 * ft.COMPACT_SCALE  # int8 keeps every value within half a step
    assert (compact.float() * ft.COMPACT_SCALE - features)[inside].abs().max() <= ft.COMPACT_SCALE / 2 + 1e-6
    assert inside.float().mean() > 0.99


def test_features_are_the_kymatio_scattering_normalized_per_image(ft):
    from kymatio.torch import Scattering2D

    images = digits(3)
    raw = Scattering2D(J=2, shape=(28, 28), L=8)(images.float() / 255).reshape(3, 27, -1)
    variance, mean = torch.var_mean(raw, -1, unbiased=False, keepdim=True)
    expected = (raw - mean) / torch.sqrt(variance + 1e-5)
    assert torch.allclose(ft.scatter_features(images), expected.reshape(3, -1), atol=1e-5)


def test_features_of_one_image_do_not_depend_on_the_others(ft):
    images = digits(7)
    together = ft.scatter_features(images, chunk=4)   # chunks of 4 and 3
    alone = torch.cat([ft.scatter_features(images[i:i + 1]) for i in range(7)])
    assert torch.allclose(together, alone, atol=1e-5)
    changed = images.clone()
    changed[3] = 255 - changed[3]                        # change one image only: only its row moves
    other = ft.scatter_features(changed, chunk=7)
    assert not torch.allclose(other[3], together[3], atol=1e-2)
    others = [i for i in range(7) if i != 3]
    assert torch.allclose(other[others], together[others], atol=1e-5)


def test_normalization_statistics_are_each_images_own(ft):
    """No statistic of a dataset enters the features: each row is torch's GroupNorm (27 groups, no learned
    scale) of that image's scattering alone, so every group of every row has mean 0 and variance at most 1."""
    from kymatio.torch import Scattering2D

    images = digits(4)
    raw = Scattering2D(J=2, shape=(28, 28), L=8)(images.float() / 255)          # (4, 81, 7, 7)
    norm = nn.GroupNorm(ft.GROUPS, ft.CHANNELS, affine=False)
    features = ft.scatter_features(images)
    for i in range(4):   # GroupNorm of one image at a time: nothing from the other images
        assert torch.allclose(features[i], norm(raw[i:i + 1]).ravel(), atol=1e-4)
    grouped = features.reshape(4, ft.GROUPS, -1)
    assert torch.allclose(grouped.mean(-1), torch.zeros(4, ft.GROUPS), atol=1e-4)
    assert (grouped.var(-1, unbiased=False) <= 1 + 1e-4).all()


def test_dp_normalization_clips_each_image_and_adds_the_stated_noise(ft):
    """DP normalization (Tramer & Boneh): each image's 81 channel moments clipped to the given L2 norm,
    summed, plus N(0, (noise * clip)^2) per channel, divided by the public N. One image, however extreme,
    moves the released mean by at most 2 clip / N beyond the noise; the noise has the stated std; it costs
    2 releases."""
    moments = ft.channel_moments(digits(5))
    assert moments.shape == (5, 2, ft.CHANNELS) and (moments[:, 1] >= moments[:, 0] ** 2 - 1e-6).all()
    clips = dict(clip_mean=0.5, clip_square=0.25)
    quiet = dict(noise_multiplier=1e-9, **clips)                  # (almost) no noise: the clipped means
    mean, variance = ft.dp_channel_statistics(moments, **quiet)
    factor = (0.5 / moments[:, 0].norm(dim=1)).clamp(max=1)
    assert torch.allclose(mean, (moments[:, 0] * factor[:, None]).mean(0), atol=1e-6)
    assert (variance >= 0).all()
    extreme = moments.clone()
    extreme[0] *= 1e6                                             # one image with enormous moments
    moved, _ = ft.dp_channel_statistics(extreme, **quiet)
    assert (moved - mean).norm() <= 2 * 0.5 / 5 + 1e-6            # at most one clip in and one out, over N
    draws = torch.stack([ft.dp_channel_statistics(moments, noise_multiplier=4.0, **clips)[0]
                         for _ in range(300)])                    # OS-seeded: a fresh draw each time
    assert 0.9 < draws.std(0).mean() / (4.0 * 0.5 / 5) < 1.1
    assert ft.normalization_runs(8.0) == [(8.0, 1.0, 2)]
    with pytest.raises(ValueError, match="moments"):
        ft.dp_channel_statistics(moments[:, 0], **quiet)
    with pytest.raises(ValueError, match="positive"):
        ft.dp_channel_statistics(moments, noise_multiplier=0.0, **clips)


def test_features_with_released_statistics_depend_on_each_image_and_the_statistics_alone(ft):
    images = digits(6)
    moments = ft.channel_moments(digits(20, seed=1))
    statistics = ft.dp_channel_statistics(moments, noise_multiplier=8.0, clip_mean=0.5, clip_square=0.25)
    together = ft.scatter_features(images, chunk=4, statistics=statistics)
    assert together.shape == (6, ft.N_FEATURES)
    alone = torch.cat([ft.scatter_features(images[i:i + 1], statistics=statistics) for i in range(6)])
    assert torch.allclose(together, alone, atol=1e-5)
    assert not torch.allclose(together, ft.scatter_features(images), atol=1e-2)   # not GroupNorm
    compact = ft.scatter_features(images, compact=True, statistics=statistics)
    assert compact.dtype == torch.int8 and compact.shape == (6, ft.N_FEATURES)
    with pytest.raises(ValueError, match="statistics"):
        ft.scatter_features(images, statistics=(torch.zeros(3), torch.ones(3)))


def test_raw_and_normalized_digits_give_the_same_features(ft):
    images = digits(3)
    from_raw = ft.scatter_features(images)
    assert torch.allclose(ft.scatter_features(data.normalize(images)), from_raw, atol=1e-4)
    assert torch.allclose(ft.ScatterNet()(data.normalize(images)), from_raw, atol=1e-4)
    compact = ft.ScatterNet(compact=True)(images)
    assert torch.equal(compact, ft.scatter_features(images, compact=True).float() * ft.COMPACT_SCALE)


def test_a_memo_computes_each_image_once_with_the_same_result(ft, monkeypatch):
    images = data.normalize(digits(6))
    plain, remembering = ft.ScatterNet(compact=True), ft.ScatterNet(compact=True, memo=True)
    computed = []
    transform = remembering._transform
    monkeypatch.setattr(remembering, "_transform",
                        lambda pixels: computed.append(len(pixels)) or transform(pixels))
    assert torch.equal(remembering(images[:4]), plain(images[:4]))
    assert torch.equal(remembering(images[[5, 2, 2, 0]]), plain(images[[5, 2, 2, 0]]))  # only digit 5 is new
    assert torch.equal(remembering(images), plain(images))
    assert computed == [4, 1, 1] and len(remembering.memo) == 6


@pytest.mark.parametrize("bad", [torch.zeros(2, 28), torch.zeros(2, 3, 28, 28),
                                 torch.zeros(2, 28, 28, dtype=torch.int32)])
def test_scatter_features_rejects_what_is_not_digits(ft, bad):
    with pytest.raises(ValueError, match="images"):
        ft.scatter_features(bad)


def test_scatter_features_restores_the_thread_count(ft):
    before = torch.get_num_threads()
    ft.scatter_features(digits(1), threads=1)
    assert torch.get_num_threads() == before


# --- DP-SGD on features ---------------------------------------------------------------------------------
def test_one_dp_step_on_features_is_the_clipped_mean_plus_noise(ft):
    """With q = 1 every sample is in the batch: one step moves the weights by lr times the mean of the
    per-sample gradients clipped to C (computed here sample by sample), plus noise of std sigma C / N."""
    torch.manual_seed(0)
    n, clip = 64, 0.05
    features, labels = torch.randn(n, 30) * 3, torch.randint(0, 10, (n,))
    for sigma in (0.0, 1.0):
        head = ft.linear_head(30)
        with torch.no_grad():
            head.fc.weight.normal_(0, 0.1)
        start = [p.detach().clone() for p in head.parameters()]
        clipped = [torch.zeros_like(p) for p in start]
        for i in range(n):
            head.zero_grad()
            nn.functional.cross_entropy(head(features[i:i + 1]), labels[i:i + 1]).backward()
            grads = [p.grad for p in head.parameters()]
            scale = min(1.0, clip / (torch.sqrt(sum((g * g).sum() for g in grads)).item() + 1e-6))
            assert scale < 1  # every gradient is clipped here: the test checks the clipping
            for total, g in zip(clipped, grads):
                total += g * scale / n
        head.zero_grad()
        private = dp_sgd.make_private(head, torch.optim.SGD(head.parameters(), lr=1.0), features, labels,
                                      batch_size=n, max_grad_norm=clip, noise_multiplier=max(sigma, 1e-12))
        assert private.ghost
        assert private.sample_rate == 1.0 and private.steps_per_epoch == 1
        private.train_epoch(progress=False)
        assert private.steps == 1
        moved = torch.cat([(s - p.detach()).ravel() for s, p in zip(start, head.parameters())])
        deviation = moved - torch.cat([c.ravel() for c in clipped])
        if sigma == 0:
            assert deviation.abs().max() < 1e-6
        else:
            assert deviation.std().item() == pytest.approx(sigma * clip / n, rel=0.15)


def test_dp_sgd_on_features_learns_and_reports_the_accountants_epsilon(ft):
    torch.manual_seed(0)
    centres = torch.randn(10, 40) * 2
    labels = torch.randint(0, 10, (2000,))
    features = centres[labels] + torch.randn(2000, 40)
    head = ft.linear_head(40)
    optimizer = torch.optim.SGD(head.parameters(), lr=2.0, momentum=0.9)
    private = dp_sgd.make_private(head, optimizer, features, labels, batch_size=200, max_grad_norm=0.5,
                                  target_epsilon=3.0, epochs=3)
    history = private.fit((features, labels), epochs=3, progress=False)
    assert private.steps == 30 and private.sample_rate == pytest.approx(0.1)
    assert [h["steps"] for h in history] == [10, 20, 30] and history[-1]["epsilon"] == private.epsilon()
    independent = epsilon_pld(private.noise_multiplier, 0.1, 30, 1e-5)
    assert independent <= private.epsilon() <= independent + 0.02 and private.epsilon() <= 3.0
    assert ft.accuracy(head, features, labels) > 0.9
    compact = (features / ft.COMPACT_SCALE).round().clamp(-128, 127).to(torch.int8)
    assert abs(ft.accuracy(head, compact, labels) - ft.accuracy(head, features, labels)) < 0.01


@pytest.mark.parametrize("kwargs, message", [
    (dict(noise_multiplier=1.0, target_epsilon=3.0, epochs=1), "exactly one"),
    (dict(target_epsilon=3.0), "epochs"), (dict(noise_multiplier=1.0, batch_size=0), "batch_size"),
    (dict(noise_multiplier=1.0, max_grad_norm=0), "max_grad_norm"),
])
def test_make_private_on_features_rejects_bad_settings(ft, kwargs, message):
    settings = dict(batch_size=10, max_grad_norm=1.0) | kwargs
    head = ft.linear_head(5)
    with pytest.raises(ValueError, match=message):
        dp_sgd.make_private(head, torch.optim.SGD(head.parameters(), lr=1.0), torch.zeros(20, 5),
                            torch.zeros(20, dtype=torch.int64), **settings)


@pytest.mark.parametrize("features, labels, message", [
    (torch.zeros(20, 5), torch.zeros(19, dtype=torch.int64), "labels"),
    (torch.zeros(20, 5, dtype=torch.int32), torch.zeros(20, dtype=torch.int64), "floats or compact int8"),
    (torch.full((20, 5), float("inf")), torch.zeros(20, dtype=torch.int64), "finite"),
    (torch.zeros(0, 5), torch.zeros(0, dtype=torch.int64), "empty"),
])
def test_make_private_rejects_features_that_are_not_features(ft, features, labels, message):
    head = ft.linear_head(5)
    with pytest.raises(ValueError, match=message):
        dp_sgd.make_private(head, torch.optim.SGD(head.parameters(), lr=1.0), features, labels,
                            batch_size=10, max_grad_norm=1.0, noise_multiplier=1.0)


def test_dp_sgd_on_features_draws_from_the_os_unless_given_a_generator(ft):
    """Like DP-SGD on digits: the OS seeds the sampling and the noise (two runs differ, whatever torch's
    global seed); a seeded generator, for experiments on public data, gives the same run twice."""
    features, labels = torch.randn(200, 8), torch.randint(0, 10, (200,))

    def run(generator=None):
        torch.manual_seed(0)
        head = ft.linear_head(8)
        private = dp_sgd.make_private(head, torch.optim.SGD(head.parameters(), lr=1.0), features, labels,
                                      batch_size=50, max_grad_norm=1.0, noise_multiplier=1.0,
                                      generator=generator)
        private.train_epoch(progress=False)
        return head.fc.weight.detach().clone()

    assert not torch.equal(run(), run())
    assert torch.equal(run(torch.Generator().manual_seed(5)), run(torch.Generator().manual_seed(5)))


def test_empty_poisson_batches_on_features_are_noisy_steps(ft):
    """Ghost clipping when a batch holds no sample: the step is taken, counted, and adds noise only. With 2
    records at q = 0.01, about 98 of the 100 steps are empty; the features are 0, so the weights (not the
    bias) move by the noise alone."""
    head = ft.linear_head(8)
    private = dp_sgd.make_private(head, torch.optim.SGD(head.parameters(), lr=1.0), torch.zeros(2, 8),
                                  torch.tensor([3, 4]), batch_size=1, max_grad_norm=1.0, noise_multiplier=1.0,
                                  sample_rate=0.01)
    assert private.train_epoch(progress=False) >= 0
    assert private.steps == 100 and torch.isfinite(head.fc.weight).all()
    moved = head.fc.weight.detach()
    assert moved.std().item() == pytest.approx(1.0 * 1.0 / 1 * 10, rel=0.25)  # sqrt(100 steps) x sigma C / B


# --- the epsilon values the benchmark prints, pinned to independent accountants ----------------------------
def epsilon_classical(runs, delta, orders=range(2, 64)):
    """Moments accountant (Abadi et al. 2016): RDP composed, eps = min_alpha RDP + log(1/delta)/(alpha-1),
    at integer orders; a run with q = 1 is the plain Gaussian mechanism, RDP alpha / (2 sigma^2)."""
    def rdp(sigma, q, alpha):
        return alpha / (2 * sigma**2) if q == 1 else rdp_sampled_gaussian(q, sigma, alpha)

    return min(sum(steps * rdp(sigma, q, a) for sigma, q, steps in runs) + math.log(1 / delta) / (a - 1)
               for a in orders)


@pytest.fixture(scope="module")
def bench():
    """benchmarks/dp_mnist.py as a module (loaded from its path: ``benchmarks`` is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "dp_mnist.py"
    spec = importlib.util.spec_from_file_location("dp_mnist_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_epsilon_three_ways(bench):
    """The benchmark's whole run: the DP normalization (2 Gaussian releases at noise 20, q = 1) and 40
    epochs of Poisson batches of 4,096 out of 60,000 (q = 1/15, 600 steps) at the noise that brings the
    total to 3."""
    import argparse

    runs = bench.benchmark_runs(argparse.Namespace(**bench.RECIPE, normalization="dp"))
    normalization, (sigma, q, steps) = runs[:-1], runs[-1]
    assert normalization == [(20.0, 1.0, 2)] and (q, steps) == (1 / 15, 600)
    prv, rdp, classical = bench.three_epsilons(runs)
    training_alone = epsilon_pld(sigma, q, steps, 1e-5)        # independent; the normalization adds to it
    assert training_alone < prv <= 3.0 and prv - training_alone < 0.05
    assert 0.93 * epsilon_rdp(sigma, q, steps, 1e-5) <= bench.three_epsilons([runs[-1]])[1] <= rdp
    classical_independent = epsilon_classical(runs, 1e-5)      # composes the q = 1 releases too
    assert 0.97 * classical_independent <= classical <= classical_independent
    assert prv < rdp < classical  # the same run, three conventions: PRV is the tightest
    # printed by the benchmark: 3.00 (PRV), 3.26 (Opacus RDP), 3.73 (classical); training noise 2.4502
    assert (round(prv, 2), round(rdp, 2), round(classical, 2), round(sigma, 4)) == (3.0, 3.26, 3.73, 2.4502)
    per_image = bench.benchmark_runs(argparse.Namespace(**bench.RECIPE, normalization="per-image"))
    assert len(per_image) == 1 and per_image[0][0] < sigma     # nothing to charge: a little less noise


def test_anchor_epsilons_recomputed_independently(bench):
    anchors = {name: runs for name, _, _, runs, _ in bench.ANCHORS}
    opacus = anchors["Opacus README (10-run mean)"][0]
    assert epsilon_pld(*opacus, 1e-5) == pytest.approx(2.30, abs=0.01)         # PRV 2.31 (upper bound)
    assert epsilon_rdp(*opacus, 1e-5) == pytest.approx(2.50, abs=0.01)
    assert epsilon_classical([opacus], 1e-5) == pytest.approx(2.91, abs=0.01)  # the README's "(2.91, 1e-5)"
    scatter = anchors["Tramer & Boneh 2021, ScatterNet + linear"]
    assert epsilon_classical(scatter, 1e-5) == pytest.approx(3.00, abs=0.01)   # their eps ~ 3 after 40 epochs
    assert bench.classical_epsilon(scatter) == pytest.approx(epsilon_classical(scatter, 1e-5), abs=0.02)
    cnn = anchors["Tramer & Boneh 2021, tanh CNN"][0]
    assert epsilon_classical([cnn], 1e-5) == pytest.approx(2.99, abs=0.01)
    assert np.isclose(bench.three_epsilons([cnn])[0], epsilon_pld(*cnn, 1e-5), atol=0.02)


def epsilon_gaussian_composed(sigma, steps, delta):
    """Exact epsilon of ``steps`` full-batch Gaussian steps (q = 1): one Gaussian mechanism of mu =
    sqrt(steps) / sigma, delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu) (Balle & Wang 2018)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    mu = math.sqrt(steps) / sigma
    def excess(e):
        return norm.cdf(mu / 2 - e / mu) - math.exp(e) * norm.cdf(-mu / 2 - e / mu) - delta

    return brentq(excess, 0, 100)


def test_epsilon_of_the_feature_runs_proposed_for_parts_3_and_5(bench):
    """Part 3: 10 epochs of Poisson batches of 2,048 (q = 1/30) at the noise for eps = 3; Part 5's DP
    membership targets: 30 full-batch steps (q = 1) at the noise for eps = 1, 3 and 8 (PRV, as Opacus picks
    it)."""
    part3 = (1.12548828125, 1 / 30, 300)
    independent = epsilon_pld(*part3, 1e-5)
    assert independent <= bench.three_epsilons([part3])[0] <= independent + 0.02 and independent <= 3.0
    for sigma, epsilon in [(20.625, 1.0), (7.65625, 3.0), (3.29345703125, 8.0)]:
        exact = epsilon_gaussian_composed(sigma, 30, 1e-5)
        prv, rdp, classical = bench.three_epsilons([(sigma, 1.0, 30)])
        assert exact <= prv <= exact + 0.02 and prv <= epsilon
        assert prv < rdp < classical == pytest.approx(epsilon_classical([(sigma, 1.0, 30)], 1e-5), rel=0.03)
