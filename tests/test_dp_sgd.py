"""secure_ai.dp_sgd: DP-SGD through Opacus, its steps, clipping, slicing and epsilon."""
import pytest
import torch
from secure_ai import dp_sgd
from secure_ai import privacy as dp
from secure_ai import training as tr
from torch import nn


def small_data(n=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def batchnorm_model():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 26 * 26, 10))




# --- models -----------------------------------------------------------------------------------------------
def test_tanh_cnn_shapes_and_compatibility():
    model = dp_sgd.TanhCNN()
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) == 26_010
    dp_sgd.check_compatible(model)  # no error


def test_batchnorm_is_refused_with_the_fix_in_the_message():
    from opacus.validators import ModuleValidator

    model = batchnorm_model()
    with pytest.raises(dp_sgd.IncompatibleModelError, match=r"BatchNorm[\s\S]*ModuleValidator\.fix"):
        dp_sgd.check_compatible(model)
    images, labels = small_data()
    with pytest.raises(ValueError, match="cannot be trained with DP-SGD"):
        dp_sgd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), images, labels,
                            batch_size=32, max_grad_norm=1.0, noise_multiplier=1.0)
    fixed = ModuleValidator.fix(model)
    dp_sgd.check_compatible(fixed)
    private = dp_sgd.make_private(fixed, torch.optim.SGD(fixed.parameters(), lr=0.1), images, labels,
                                  batch_size=32, max_grad_norm=1.0, noise_multiplier=1.0)
    private.train_epoch(progress=False)
    assert private.steps == len(private.loader)


# --- DP-SGD -----------------------------------------------------------------------------------------------
def test_a_trained_model_keeps_no_per_sample_gradients():
    """Opacus leaves the last slice's per-sample gradients on the parameters; a finished epoch drops them."""
    images, labels = small_data()
    model = dp_sgd.TanhCNN()
    private = dp_sgd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), images, labels,
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
    model = dp_sgd.TanhCNN()
    private = dp_sgd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), images, labels,
                                  batch_size=64, max_grad_norm=1.0, noise_multiplier=1.1,
                                  accountant=accountant)
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
    model = dp_sgd.TanhCNN()
    private = dp_sgd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), images, labels,
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
    # an expanded view: n images that share the memory of one (60,000 copies would take 188 MB)
    images, labels = torch.zeros(1, 1, 28, 28).expand(n, 1, 28, 28), torch.zeros(n, dtype=torch.int64)
    assert images.untyped_storage().nbytes() == 28 * 28 * 4
    model = dp_sgd.TanhCNN()
    private = dp_sgd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), images, labels,
                                  batch_size=batch_size, max_grad_norm=1.0, noise_multiplier=1.0)
    assert dp.poisson_sampling(n, batch_size) == (private.sample_rate, private.steps_per_epoch)
    with pytest.raises(ValueError, match="batch_size"):
        dp.poisson_sampling(n, n + 1)
    with pytest.raises(ValueError, match="n_samples"):
        dp.poisson_sampling(0, 1)


def test_target_epsilon_is_met_after_the_planned_epochs():
    tr.set_seed(0)
    images, labels = small_data(512)
    model = dp_sgd.TanhCNN()
    private = dp_sgd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), images, labels,
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
    reference = dp_sgd.TanhCNN()
    nn.CrossEntropyLoss()(reference(images[:1]), labels[:1]).backward()
    assert torch.cat([p.grad.ravel() for p in reference.parameters()]).norm() > 20 * clip
    model, lr = dp_sgd.TanhCNN(), 0.5
    private = dp_sgd.make_private(model, torch.optim.SGD(model.parameters(), lr=lr), images, labels,
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
        monkeypatch.setattr(dp_sgd, "PHYSICAL_BATCH", physical)
        tr.set_seed(0)
        model = dp_sgd.TanhCNN()
        private = dp_sgd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), images, labels,
                                      batch_size=128, max_grad_norm=1.0, noise_multiplier=1e-6,
                                      accountant="rdp", generator=torch.Generator().manual_seed(0))
        seen = []
        private.train_epoch(progress=False, on_step=seen.append)
        results.append((tr.model_to_vector(model), private.steps, private.epsilon()))
        assert seen == list(range(1, private.steps_per_epoch + 1))
    (sliced, steps_a, eps_a), (whole, steps_b, eps_b) = results
    assert steps_a == steps_b == 4 and eps_a == eps_b
    tr.set_seed(0)
    start = tr.model_to_vector(dp_sgd.TanhCNN())
    assert torch.allclose(sliced, whole, atol=1e-5) and not torch.allclose(sliced, start, atol=1e-3)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_make_private_keeps_raw_uint8_digits_and_normalizes_each_slice():
    from secure_ai.data import normalize

    raw = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (64,))
    model = dp_sgd.TanhCNN()
    private = dp_sgd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), raw, labels,
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
    (dict(noise_multiplier=1.0, generator=0), "generator"),
])
def test_make_private_rejects_bad_arguments(kwargs, message):
    images, labels = small_data(64)
    model = dp_sgd.TanhCNN()
    arguments = dict(batch_size=16, max_grad_norm=1.0) | kwargs
    with pytest.raises(ValueError, match=message):
        dp_sgd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), images, labels, **arguments)
    with pytest.raises(ValueError, match="labels must have shape"):
        dp_sgd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), images, labels[:10],
                            batch_size=16, max_grad_norm=1.0, noise_multiplier=1.0)




# --- the owner's DP-SGD against the data scientist: its seeds and its weights ------------------------------
def _one_private_epoch(images, labels, generator=None, model=None):
    model = model or dp_sgd.TanhCNN()
    private = dp_sgd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), images, labels,
                                  batch_size=32, max_grad_norm=1.0, noise_multiplier=1.0, generator=generator)
    private.train_epoch(progress=False)
    return tr.model_to_vector(model)


def test_sampling_and_noise_never_come_from_torchs_global_generator():
    """DP review 3.11: the data scientist seeds torch in the owner's process (tr.set_seed(0)) and replays the
    run locally, to subtract the noise. Two runs after the same seed must differ by about the noise."""
    images, labels = small_data(128)
    runs = []
    for _ in range(2):
        tr.set_seed(0)   # seeds torch, numpy and random; the model's initial weights are the same
        runs.append(_one_private_epoch(images, labels))
    gap = (runs[0] - runs[1]).std().item()
    assert gap > 0.5 * (0.5 * 1.0 * 1.0 / 32)   # half of one step's noise std, lr * sigma * C / batch
    seeded = [_one_private_epoch(images, labels, torch.Generator().manual_seed(7),
                                 tr.vector_to_model(runs[0] * 0, dp_sgd.TanhCNN())) for _ in range(2)]
    assert torch.equal(*seeded)   # a seeded generator, passed on purpose, reproduces an experiment
    assert dp_sgd.os_generator().initial_seed() != dp_sgd.os_generator().initial_seed()


def crafted_tanh_cnn():
    """DP review 3.9's weights, all finite: the hidden fc is 0, the last layer's rows 3 and 7 are -3e38 and
    +3e38 (and class 3's bias 2, so that a 7's gradient overflows for every image)."""
    model = dp_sgd.TanhCNN()
    with torch.no_grad():
        model.net[7].weight.zero_()
        model.net[7].bias.zero_()
        model.net[9].weight[3], model.net[9].weight[7] = -3e38, 3e38
        model.net[9].bias.zero_()
        model.net[9].bias[3] = 2.0
    assert all(p.isfinite().all() for p in model.parameters())
    return model


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_crafted_finite_weights_never_make_finiteness_depend_on_a_record():
    """DP review 3.9: one label-7 record made Opacus's step return NaN, so a NaN reply told the data
    scientist that a 7 was sampled (delta >= 0.6). Here the reply is finite with or without it, always."""
    images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    without_seven = torch.tensor([0, 1, 2, 4, 5, 6, 8, 9] * 8)
    one_seven = without_seven.clone()
    one_seven[5] = 7
    model = crafted_tanh_cnn()
    loss = nn.CrossEntropyLoss()(model(images[:1].float().unsqueeze(1)), torch.tensor([7]))
    loss.backward()   # a single 7's gradient, computed plainly, overflows
    assert not all(p.grad.isfinite().all() for p in model.parameters())
    for labels in (without_seven, one_seven, torch.full((64,), 7), torch.full((64,), 3)):
        for _ in range(2):
            start = crafted_tanh_cnn()
            after = _one_private_epoch(images, labels, model=start)
            assert after.isfinite().all(), labels[:8]
