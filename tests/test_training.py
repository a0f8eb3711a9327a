"""secure_ai.training: models, loops, weights <-> arrays, FedAvg, and the owner's bounds on a message."""
import numpy as np
import pytest
import torch
from secure_ai import data
from secure_ai import training as tr


def _toy(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(n, 1, 28, 28, generator=g) * 0.1
    x[torch.arange(n), 0, y, y] += 3.0  # the label is written into the image: easy to learn
    return x, y


@pytest.mark.parametrize("model_cls", [tr.MLP, tr.CNN])
def test_models_map_digits_to_ten_logits(model_cls):
    out = model_cls()(torch.zeros(3, 1, 28, 28))
    assert out.shape == (3, 10)


def test_mlp_is_the_original_784_500_10():
    sizes = [tuple(p.shape) for p in tr.MLP().parameters()]
    assert sizes == [(500, 784), (500,), (10, 500), (10,)]


def test_set_seed_makes_models_reproducible():
    tr.set_seed(3)
    a = tr.model_to_vector(tr.CNN())
    tr.set_seed(3)
    assert torch.equal(a, tr.model_to_vector(tr.CNN()))


def test_batches_cover_data_once_and_are_seeded():
    x, y = _toy(50)
    seen = torch.cat([yb for _, yb in tr.batches(x, y, batch_size=16, seed=1)])
    assert sorted(seen.tolist()) == sorted(y.tolist())
    first = [xb for xb, _ in tr.batches(x, y, 16, seed=1)][0]
    assert torch.equal(first, [xb for xb, _ in tr.batches(x, y, 16, seed=1)][0])
    ordered = torch.cat([yb for _, yb in tr.batches(x, y, 16, shuffle=False)])
    assert torch.equal(ordered, y)
    with pytest.raises(ValueError, match="batch_size"):
        next(tr.batches(x, y, 0))


def test_training_learns_and_evaluate_reports_accuracy():
    tr.set_seed(0)
    x, y = _toy(512)
    model = tr.MLP(hidden=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before, _ = tr.evaluate(model, x, y)
    losses = [tr.train_epoch(model, x, y, opt, batch_size=32, seed=e, progress=False) for e in range(3)]
    after, loss = tr.evaluate(model, x, y)
    assert losses[-1] < losses[0]
    assert after > 0.9 > before
    assert 0 <= loss < 1


def test_fit_returns_accuracy_per_epoch():
    tr.set_seed(0)
    train, test = _toy(256, 0), _toy(128, 1)
    model = tr.MLP(hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    history = tr.fit(model, train, test, 3, opt, batch_size=32, progress=False)
    assert len(history) == 3 and all(0 <= a <= 1 for a in history)
    assert history[-1] > 0.8


@pytest.mark.parametrize(
    "x, y, message",
    [
        (torch.zeros(4, 28, 28), torch.zeros(4, dtype=torch.long), r"\(N, 1, 28, 28\)"),
        (torch.zeros(4, 1, 28, 28), torch.zeros(3, dtype=torch.long), "labels must have shape"),
        (torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long), "empty"),
    ],
)
def test_loops_reject_bad_shapes(x, y, message):
    model = tr.MLP(hidden=8)
    with pytest.raises(ValueError, match=message):
        tr.evaluate(model, x, y)
    with pytest.raises(ValueError, match=message):
        tr.train_epoch(model, x, y, torch.optim.SGD(model.parameters(), lr=0.1), progress=False)


def test_vector_round_trip_and_shape_error():
    a, b = tr.CNN(), tr.CNN()
    tr.vector_to_model(tr.model_to_vector(a), b)
    assert torch.equal(tr.model_to_vector(a), tr.model_to_vector(b))
    tr.vector_to_model(tr.model_to_vector(a).numpy(), b)  # NumPy works too
    vector = tr.model_to_vector(a)
    tr.vector_to_model(vector, b)
    vector.zero_()  # the model holds a copy, not a view of the vector
    assert torch.equal(tr.model_to_vector(a), tr.model_to_vector(b))
    with pytest.raises(ValueError, match="parameters but the vector has shape"):
        tr.vector_to_model(torch.zeros(5), b)


def test_weights_dict_round_trip_and_errors():
    a, b = tr.CNN(), tr.CNN()
    weights = tr.get_weights(a)
    assert all(isinstance(v, np.ndarray) for v in weights.values())
    tr.set_weights(b, weights)
    assert torch.equal(tr.model_to_vector(a), tr.model_to_vector(b))
    weights["net.0.weight"][...] = 0  # a copy: changing it leaves the model alone
    assert tr.model_to_vector(a).abs().sum() > 0
    with pytest.raises(ValueError, match="missing"):
        tr.set_weights(b, {"net.0.weight": weights["net.0.weight"]})
    with pytest.raises(ValueError, match="has shape"):
        tr.set_weights(b, {**weights, "net.0.bias": np.zeros(3, dtype=np.float32)})
    with pytest.raises(ValueError, match="do not fit"):
        tr.set_weights(tr.MLP(), weights)


def test_fedavg_weights_by_sample_count():
    avg = tr.fedavg([torch.tensor([0.0, 0.0]), torch.tensor([4.0, 8.0])], weights=[3, 1])
    assert torch.allclose(avg, torch.tensor([1.0, 2.0]))
    assert torch.allclose(tr.fedavg([np.array([1.0]), np.array([3.0])]), torch.tensor([2.0]))


def test_fedavg_of_weight_dicts_equals_fedavg_of_vectors():
    tr.set_seed(0)
    models = [tr.CNN(), tr.CNN(), tr.CNN()]
    counts = [100, 250, 50]
    by_dict = tr.fedavg([tr.get_weights(m) for m in models], counts)
    by_vector = tr.fedavg([tr.model_to_vector(m) for m in models], counts)
    merged = tr.set_weights(tr.CNN(), by_dict)
    assert torch.allclose(tr.model_to_vector(merged), by_vector, atol=1e-7)


@pytest.mark.parametrize(
    "updates, weights, message",
    [
        ([], None, "at least one"),
        ([np.zeros(2), np.zeros(3)], None, "same shape"),
        ([np.zeros(2), np.zeros(2)], [1], "2 updates but 1 weights"),
        ([np.zeros(2), np.zeros(2)], [0, 0], "not all zero"),
        ([np.zeros(2), np.zeros(2)], [-1, 2], "non-negative"),
        ([{"a": np.zeros(1)}, {"b": np.zeros(1)}], None, "same weight names"),
    ],
)
def test_fedavg_rejects_bad_input(updates, weights, message):
    with pytest.raises(ValueError, match=message):
        tr.fedavg(updates, weights)


def test_raw_uint8_digits_train_and_evaluate_like_normalized_ones():
    raw = torch.randint(0, 256, (96, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (96,))
    normalized = data.normalize(raw)
    for (xr, yr), (xn, yn) in zip(tr.batches(raw, y, 32, seed=3), tr.batches(normalized, y, 32, seed=3)):
        assert xr.dtype == torch.float32 and torch.equal(xr, xn) and torch.equal(yr, yn)
    model = tr.MLP(hidden=8)
    assert tr.evaluate(model, raw, y) == tr.evaluate(model, normalized, y)
    a, b = tr.MLP(hidden=8), tr.MLP(hidden=8)
    b.load_state_dict(a.state_dict())
    for m, x in ((a, raw), (b, normalized)):
        tr.train_epoch(m, x, y, torch.optim.SGD(m.parameters(), lr=0.1), 32, seed=0, progress=False)
    assert torch.equal(tr.model_to_vector(a), tr.model_to_vector(b))
    with pytest.raises(ValueError, match="raw uint8 digits"):
        tr.evaluate(model, raw.float(), y)  # float images must be normalized and (N, 1, 28, 28)


# --- checked_model: the owner's bounds on the data scientist's message ---------------------------------
def _message(model="mlp", **changes):
    net = tr.MLP() if model == "mlp" else tr.CNN(channels=(4, 8))
    message = {"model": model, "vector": tr.model_to_vector(net).numpy(), "lr": 0.01, "momentum": 0.0,
               "batch_size": 64, "seed": 0}
    return message | ({"channels": [4, 8]} if model == "cnn" else {}) | changes


def test_a_batch_of_one_reveals_the_digit_so_approved_code_must_bound_it():
    """Malicious data scientist: one SGD step on one digit; first-layer weight change / bias change is it."""
    images, labels = data.mnist_raw(True)
    x = data.normalize(images[:1])
    model = tr.MLP()
    w, b = model.net[1].weight.detach().clone(), model.net[1].bias.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    tr.train_epoch(model, x, torch.from_numpy(labels[:1].astype(np.int64)), optimizer, 1, progress=False)
    dw, db = model.net[1].weight.detach() - w, model.net[1].bias.detach() - b
    unit = db.abs().argmax()
    np.testing.assert_allclose(dw[unit] / db[unit], x.flatten(), atol=1e-3)  # the digit, recovered
    with pytest.raises(ValueError, match=r"batch_size must be an integer in \[32, 256\], got 1"):
        tr.checked_model(_message(batch_size=1), min_batch_size=32, max_lr=0.1)


@pytest.mark.parametrize("changes, error", [
    ({"batch_size": 31}, r"batch_size must be an integer in \[32, 256\]"),
    ({"batch_size": 257}, r"batch_size must be an integer in \[32, 256\]"),
    ({"batch_size": 10**9}, "batch_size must be an integer in"),   # one step on all of the owner's data
    ({"batch_size": 64.0}, "batch_size must be an integer"),
    ({"lr": 0.5}, r"lr must be a number in \(0, 0.1\]"),
    ({"lr": 0}, "lr must be a number"),
    ({"momentum": 1.0}, "momentum must be a number"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"vector": np.zeros(10, dtype=np.float32)}, r"vector must be float32 of shape \(397510,\)"),
    ({"vector": np.zeros(397510)}, "vector must be float32"),
    ({"vector": np.full(397510, np.nan, dtype=np.float32)}, "NaN or infinite"),
    ({"vector": np.where(np.arange(397510) == 7, np.nan, 0).astype(np.float32)}, "NaN or infinite"),
    ({"vector": np.where(np.arange(397510) == 7, np.inf, 0).astype(np.float32)}, "NaN or infinite"),
    ({"vector": np.where(np.arange(397510) == 7, -np.inf, 0).astype(np.float32)}, "NaN or infinite"),
    ({"extra": 1}, "message keys must be"),
    ({"model": "resnet"}, "model must be 'cnn'"),
    ({"channels": [4, 8]}, "model must be 'cnn'"),
])
def test_checked_model_refuses_what_the_owner_did_not_allow(changes, error):
    with pytest.raises(ValueError, match=error):
        tr.checked_model(_message(**changes), min_batch_size=32, max_lr=0.1)


def test_checked_model_builds_the_model_from_an_allowed_message():
    message = _message("cnn", batch=3)
    model, recipe = tr.checked_model(message, min_batch_size=32, max_lr=0.1, extra_ints=("batch",))
    assert isinstance(model, tr.CNN) and recipe["batch"] == 3 and recipe["channels"] == [4, 8]
    assert torch.equal(tr.model_to_vector(model), torch.from_numpy(message["vector"]))
    with pytest.raises(ValueError, match="channels must be two integers in 1..32"):
        tr.checked_model(_message("cnn", channels=[4, 1000]), min_batch_size=32, max_lr=0.1)
    with pytest.raises(ValueError, match="message keys"):
        tr.checked_model(_message("cnn"), min_batch_size=32, max_lr=0.1, extra_ints=("batch",))


def test_checked_model_takes_a_smaller_mlp_within_the_owners_bound_on_hidden_units():
    """Parts 4 and 5 train an MLP with 100 hidden units (79,510 weights: 20 CKKS ciphertexts, not 98)."""
    small = tr.model_to_vector(tr.MLP(hidden=100)).numpy()
    model, recipe = tr.checked_model(_message(hidden=100, vector=small), min_batch_size=32, max_lr=0.1)
    assert model.net[1].out_features == 100 and recipe["hidden"] == 100
    assert torch.equal(tr.model_to_vector(model), torch.from_numpy(small))
    _, recipe = tr.checked_model(_message(), min_batch_size=32, max_lr=0.1)
    assert "hidden" not in recipe                                       # absent: the 500 units of MLP()
    with pytest.raises(ValueError, match=r"vector must be float32 of shape \(79510,\)"):
        tr.checked_model(_message(hidden=100), min_batch_size=32, max_lr=0.1)   # a 500-unit vector
    for hidden in (0, 501, 100.0, True):
        with pytest.raises(ValueError, match="hidden must be an integer in"):
            tr.checked_model(_message(hidden=hidden, vector=small), min_batch_size=32, max_lr=0.1)
    with pytest.raises(ValueError, match=r"hidden must be an integer in \[1, 50\]"):
        tr.checked_model(_message(hidden=100, vector=small), min_batch_size=32, max_lr=0.1, max_hidden=50)
    with pytest.raises(ValueError, match="model must be 'cnn'"):
        tr.checked_model(_message("cnn", hidden=100), min_batch_size=32, max_lr=0.1)


def test_the_batch_size_cap_is_the_owners_to_set():
    assert tr.MAX_BATCH_SIZE == 256
    _, recipe = tr.checked_model(_message(batch_size=256), min_batch_size=32, max_lr=0.1)
    assert recipe["batch_size"] == 256
    _, recipe = tr.checked_model(_message(batch_size=512), min_batch_size=32, max_lr=0.1, max_batch_size=512)
    assert recipe["batch_size"] == 512
    with pytest.raises(ValueError, match=r"in \[32, 128\]"):
        tr.checked_model(_message(batch_size=256), min_batch_size=32, max_lr=0.1, max_batch_size=128)
    with pytest.raises(ValueError, match="min_batch_size <= max_batch_size"):
        tr.checked_model(_message(), min_batch_size=64, max_lr=0.1, max_batch_size=32)


# --- full batches: every step of approved code trains on at least the batch the owner checked -------------
def test_drop_last_keeps_full_batches_only_in_the_order_epoch_indices_gives():
    x, y = _toy(50)
    sizes = [len(yb) for _, yb in tr.batches(x, y, 16, seed=3, drop_last=True)]
    assert sizes == [16, 16, 16]                       # 50 = 3 * 16 + 2: the tail of 2 is left out
    assert [len(yb) for _, yb in tr.batches(x, y, 16, seed=3)] == [16, 16, 16, 2]
    numbered = torch.arange(50).float().view(50, 1, 1, 1).expand(50, 1, 28, 28)
    seen = torch.cat([yb for _, yb in tr.batches(numbered, torch.arange(50), 16, seed=3, drop_last=True)])
    assert seen.tolist() == tr.epoch_indices(50, 16, seed=3).tolist()
    # fewer samples than one batch: no batch, no step (syft also runs approved code on a small mock)
    assert list(tr.batches(x, y, 51, drop_last=True)) == [] and len(tr.epoch_indices(50, 51, seed=0)) == 0
    model = tr.MLP(hidden=8)
    before = tr.model_to_vector(model)
    loss = tr.train_epoch(model, x, y, torch.optim.SGD(model.parameters(), lr=0.1), 51, progress=False,
                          drop_last=True)
    assert np.isnan(loss) and torch.equal(tr.model_to_vector(model), before)


def test_a_tail_digit_never_moves_a_full_batch_epoch():
    """Malicious data scientist: batch_size = n - 1 makes the epoch's second step train on one digit. With
    full batches only, that digit has no influence at all on the weights that come back."""
    x, y = _toy(40)
    tail = int(np.setdiff1d(np.arange(40), tr.epoch_indices(40, 39, seed=5))[0])
    results = {}
    for drop_last in (True, False):
        for value in (0.0, 50.0):
            images = x.clone()
            images[tail] = value                        # the digit left in the tail, changed
            tr.set_seed(0)
            model = tr.MLP(hidden=8)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            steps = [0]
            optimizer.register_step_post_hook(lambda *_, counter=steps: counter.append(1))
            tr.train_epoch(model, images, y, optimizer, 39, seed=5, progress=False, drop_last=drop_last)
            results[drop_last, value] = (tr.model_to_vector(model), len(steps) - 1)
    assert results[True, 0.0][1] == 1 and results[False, 0.0][1] == 2
    assert torch.equal(results[True, 0.0][0], results[True, 50.0][0])
    assert not torch.equal(results[False, 0.0][0], results[False, 50.0][0])   # without it, the tail leaks


def test_batch_indices_are_a_full_batch_never_a_tail_or_a_wrap_around():
    """FL review 1: batch_size 37 (>= 32, accepted) and batch 17027 on 30,000 digits started at 29,999 and
    wrapped around: one digit. Every batch that fits is the slice the old arithmetic took."""
    n, size = 30_000, 37
    order = torch.randperm(n, generator=torch.Generator().manual_seed(4)).numpy()
    for batch in (0, 1, n // size - 1):
        idx = tr.batch_indices(n, size, batch, seed=4)
        assert len(idx) == size and np.array_equal(idx, order[batch * size:(batch + 1) * size])
    for batch in (n // size, 17_027, -1, True, 2.0):
        with pytest.raises(ValueError, match="not a full batch"):
            tr.batch_indices(n, size, batch, seed=4)
    assert len(tr.batch_indices(300, 32, 8, seed=0)) == 32
    with pytest.raises(ValueError, match="not a full batch"):
        tr.batch_indices(300, 32, 9, seed=0)           # 300 = 9 * 32 + 12: no 10th batch
    with pytest.raises(ValueError, match="batch_size"):
        tr.batch_indices(300, 0, 0, seed=0)
