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
    with pytest.raises(ValueError, match="batch_size must be an integer >= 32, got 1"):
        tr.checked_model(_message(batch_size=1), min_batch_size=32, max_lr=0.1)


@pytest.mark.parametrize("changes, error", [
    ({"batch_size": 31}, "batch_size must be an integer >= 32"),
    ({"batch_size": 64.0}, "batch_size must be an integer"),
    ({"lr": 0.5}, r"lr must be a number in \(0, 0.1\]"),
    ({"lr": 0}, "lr must be a number"),
    ({"momentum": 1.0}, "momentum must be a number"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"vector": np.zeros(10, dtype=np.float32)}, r"vector must be float32 of shape \(397510,\)"),
    ({"vector": np.zeros(397510)}, "vector must be float32"),
    ({"vector": np.full(397510, np.nan, dtype=np.float32)}, "NaN or infinite"),
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
