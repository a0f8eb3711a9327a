"""secure_ai.federated: FedAvg through real syft datasites, on a small slice of MNIST."""
import numpy as np
import pytest
import torch
from secure_ai import data
from secure_ai import federated as fl
from secure_ai import training as tr
from secure_ai.datasites import DataOwner
from secure_ai.quiet import quiet
from secure_ai.remote import RemoteError

EMAIL, PASSWORD = "ds@example.org", "pw"
ROUNDS = 2


def train_small(images, labels, weights):
    import torch
    from secure_ai.data import normalize
    from secure_ai.training import MLP, get_weights, set_weights, train_epoch

    torch.manual_seed(len(labels))
    model = set_weights(MLP(hidden=16), weights)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = train_epoch(model, normalize(images), torch.from_numpy(labels), optimizer, 32, progress=False)
    return {"weights": get_weights(model), "n_samples": len(labels), "loss": loss}


def train_checked(images, labels, weights):
    import torch
    from secure_ai.training import checked_model, model_to_vector, train_epoch

    model, recipe = checked_model(weights, min_batch_size=32, max_lr=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=recipe["momentum"])
    train_epoch(model, torch.tensor(images), torch.from_numpy(labels), optimizer, recipe["batch_size"],
                seed=recipe["seed"], progress=False, drop_last=True)
    return {"weights": {"vector": model_to_vector(model).numpy()}, "n_samples": len(labels)}


def _federation(names):
    """Owners with unequal MNIST slices, each approving ``train_small`` for ROUNDS runs."""
    images, labels = data.mnist_raw(True)
    parts = [np.arange(0, 300), np.arange(300, 500)]  # unequal sizes: FedAvg must weight them
    owners = {name: DataOwner(name) for name in names}
    for owner, idx in zip(owners.values(), parts):
        fl.upload_mnist(owner, images[idx], labels[idx], mock_size=8)
        owner.add_data_scientist(EMAIL, PASSWORD)
    clients = {name: owner.login(EMAIL, PASSWORD) for name, owner in owners.items()}
    for name, client in clients.items():
        fl.request_training(client, train_small, rounds=ROUNDS)
        owners[name].code_of("train_small")
        owners[name].approve("train_small")
    return owners, clients, parts


@pytest.fixture(scope="module")
def federation(mnist):
    owners, clients, parts = _federation(("fjoe", "fjane"))
    yield owners, clients, parts
    for owner in owners.values():
        owner.shutdown()


@pytest.fixture()
def fresh_federation(mnist):
    """Datasites of the test's own, so that run counts do not depend on which tests ran before."""
    owners, clients, parts = _federation(("rjoe", "rjane"))
    yield owners, clients, parts
    for owner in owners.values():
        owner.shutdown()


def test_upload_keeps_private_data_private(federation):
    owners, clients, parts = federation
    assets = clients["fjoe"].datasets[fl.DATASET].assets
    assert assets["images"].mock.shape == (8, 28, 28)
    with quiet():
        assert assets["images"].data is None
    private = owners["fjoe"].client.datasets[fl.DATASET].assets["images"].data
    assert private.shape == (300, 28, 28) and private.dtype == np.uint8


def test_fedavg_round_equals_local_fedavg_of_the_same_updates(federation):
    owners, clients, parts = federation
    tr.set_seed(0)
    start = tr.get_weights(tr.MLP(hidden=16))
    averaged, results = fl.fedavg_round(clients, "train_small", start)
    assert [r["n_samples"] for r in results.values()] == [300, 200]
    # The owners' own computation, done here with the private data, gives the same update:
    images, labels = data.mnist_raw(True)
    expected = [train_small(images[idx].copy(), labels[idx].copy(), start) for idx in parts]
    for got, want in zip(results.values(), expected):
        for name in want["weights"]:
            np.testing.assert_allclose(got["weights"][name], want["weights"][name], atol=1e-6)
    reference = tr.fedavg([e["weights"] for e in expected], [300, 200])
    for name in reference:
        np.testing.assert_allclose(averaged[name], reference[name], atol=1e-6)
    assert not np.allclose(averaged["net.1.weight"], start["net.1.weight"])


def test_run_fedavg_trains_and_stops_at_the_approved_rounds(fresh_federation, mnist):
    owners, clients, _ = fresh_federation
    _, (test_x, test_y) = mnist
    tr.set_seed(1)
    model = tr.MLP(hidden=16)
    before = tr.evaluate(model, test_x[:1000], test_y[:1000])[0]
    history = fl.run_fedavg(model, clients, "train_small", ROUNDS, (test_x[:1000], test_y[:1000]),
                            progress=False)
    assert len(history) == ROUNDS and history[-1] > before + 0.2
    assert all(owner.runs("train_small") == ROUNDS for owner in owners.values())
    with pytest.raises(RemoteError, match="used up"):
        fl.train_remotely(clients["rjoe"], "train_small", tr.get_weights(model))


def test_clear_errors_for_bad_input(federation):
    owners, clients, _ = federation
    owner = owners["fjoe"]
    with pytest.raises(ValueError, match="uint8"):
        fl.upload_mnist(owner, np.zeros((2, 28, 28), dtype=np.float32), np.zeros(2))
    with pytest.raises(ValueError, match="labels must have shape"):
        fl.upload_mnist(owner, np.zeros((2, 28, 28), dtype=np.uint8), np.zeros(3))
    with pytest.raises(ValueError, match="empty partition"):
        fl.upload_mnist(owner, np.zeros((0, 28, 28), dtype=np.uint8), np.zeros(0))
    with pytest.raises(ValueError, match="rounds"):
        fl.request_training(clients["fjoe"], train_small, rounds=0)
    with pytest.raises(ValueError, match="no function 'nope'"):
        fl.train_remotely(clients["fjoe"], "nope", {})
    with pytest.raises(ValueError, match="at least one data owner"):
        fl.fedavg_round({}, "train_small", {})


def test_request_training_needs_the_dataset():
    with DataOwner("empty") as owner:
        owner.add_data_scientist(EMAIL, PASSWORD)
        with pytest.raises(ValueError, match="no dataset 'mnist'"):
            fl.request_training(owner.login(EMAIL, PASSWORD), train_small, rounds=1)


def test_function_without_weights_and_counts_is_rejected(federation):
    owners, clients, _ = federation

    def returns_nothing_useful(images, labels, weights):
        return {"loss": 0.0}

    for name, client in clients.items():
        fl.request_training(client, returns_nothing_useful, rounds=1)
        owners[name].code_of("returns_nothing_useful")
        owners[name].approve("returns_nothing_useful")
    with pytest.raises(ValueError, match="'weights' and 'n_samples'"):
        fl.fedavg_round(clients, "returns_nothing_useful", {"w": torch.zeros(1).numpy()})


def test_extra_assets_reach_the_function_and_names_cannot_clash(federation):
    owners, clients, _ = federation
    owners["fjoe"].upload_dataset("extra", private={"secret": np.array([7])}, mock={"secret": np.array([0])})

    def uses_secret(images, labels, secret, weights):
        return {"n": len(labels), "product": int(secret[0]) * weights["k"]}

    extra = {"secret": clients["fjoe"].datasets["extra"].assets["secret"]}
    fl.request_training(clients["fjoe"], uses_secret, rounds=1, extra_assets=extra)
    owners["fjoe"].code_of("uses_secret")
    owners["fjoe"].approve("uses_secret")
    result = fl.train_remotely(clients["fjoe"], "uses_secret", {"k": 3}, extra_assets=extra)
    assert result == {"n": 300, "product": 21}
    with pytest.raises(ValueError, match=r"cannot be named \['labels'\]"):
        fl.request_training(clients["fjoe"], uses_secret, rounds=1, extra_assets={"labels": extra["secret"]})
    # An asset of another datasite (jane's labels) cannot be bound to a function on joe's.
    foreign = {"secret": clients["fjane"].datasets[fl.DATASET].assets["labels"]}
    with pytest.raises(ValueError, match="must be an asset of fjoe's datasite"):
        fl.request_training(clients["fjoe"], uses_secret, rounds=1, extra_assets=foreign)
    with pytest.raises(ValueError, match="must be an asset of fjoe's datasite"):
        fl.train_remotely(clients["fjoe"], "uses_secret", {"k": 3}, extra_assets={"secret": np.array([7])})



def mlp_message(**changes):
    """A message ``train_checked`` accepts (an MLP, a modest recipe), with ``changes``."""
    return {"model": "mlp", "vector": tr.model_to_vector(tr.MLP()).numpy(), "lr": 0.01, "momentum": 0.0,
            "batch_size": 64, "seed": 0} | changes


def test_approved_code_refuses_a_data_scientist_who_asks_for_batch_1_or_odd_shapes(federation):
    owners, clients, _ = federation
    fl.request_training(clients["fjoe"], train_checked, rounds=3)
    owners["fjoe"].code_of("train_checked")
    owners["fjoe"].approve("train_checked")
    # syft shows the data scientist only that the approved code raised (checked_model's ValueError)
    with pytest.raises(RemoteError, match="Exception encountered while running train_checked"):
        fl.train_remotely(clients["fjoe"], "train_checked", mlp_message(batch_size=1))
    with pytest.raises(RemoteError, match="Exception encountered while running train_checked"):
        fl.train_remotely(clients["fjoe"], "train_checked", mlp_message(vector=np.zeros((5, 3), np.float32)))
    assert owners["fjoe"].runs("train_checked") == 0  # nothing trained, nothing returned
    result = fl.train_remotely(clients["fjoe"], "train_checked", mlp_message())  # within bounds: it trains
    assert result["n_samples"] == 300 and result["weights"]["vector"].shape == (397510,)
    assert owners["fjoe"].runs("train_checked") == 1


def test_run_rounds_steps_tests_and_times_every_round(mnist):
    _, (test_x, test_y) = mnist
    model = tr.MLP(hidden=8)
    calls = []

    def step(model, r):
        calls.append(r)
        torch.nn.init.zeros_(model.net[3].weight)
        torch.nn.init.zeros_(model.net[3].bias)
        model.net[3].bias.data[1] = 1.0  # always predicts "1"
        return {"r": r} if r else model  # a dict goes on the progress bar, anything else is ignored

    history, seconds = fl.run_rounds(model, 3, step, (test_x, test_y))
    assert calls == [0, 1, 2] and len(seconds) == 3 and all(s >= 0 for s in seconds)
    assert history == [pytest.approx((test_y == 1).float().mean().item())] * 3
    with pytest.raises(ValueError, match="rounds must be a positive integer"):
        fl.run_rounds(model, 0, step, (test_x, test_y))


# --- Part 2's approved functions, as the notebook defines them, against a data scientist who probes them ---
def notebook_function(name: str, notebook: str = "Part-02-federated-learning-mnist.ipynb"):
    """The function ``name`` as a notebook defines it (the code its owners approve), defined here, with
    its source where ``inspect`` finds it (syft sends a function's source)."""
    import ast
    import linecache
    from pathlib import Path

    import nbformat

    cells = nbformat.read(Path(__file__).resolve().parents[1] / "tutorials" / notebook, as_version=4).cells
    for index, cell in enumerate(cells):
        if cell.cell_type != "code":
            continue
        for node in ast.parse(cell.source).body:
            if isinstance(node, ast.FunctionDef) and node.name == name:
                filename = f"<{notebook}, cell {index}>"
                lines = cell.source.splitlines(keepends=True)
                linecache.cache[filename] = (len(cell.source), None, lines, filename)
                namespace = {}
                exec(compile(ast.Module([node], []), filename, "exec"), namespace)
                return namespace[name]
    raise LookupError(f"{notebook} defines no function {name!r}")


def test_part2_one_batch_refuses_a_tail_or_a_wrap_around():
    """FL review 1: batch_size 37 (>= 32, accepted) and batch 17027 on 30,000 digits: start = 29,999, and
    the step trained on one digit. The approved one_batch must refuse it, and still train a full batch."""
    one_batch = notebook_function("one_batch")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(30_000, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=30_000).astype(np.int64)
    for batch in (17_027, 30_000 // 37, 10**6):
        with pytest.raises(ValueError, match="not a full batch"):
            one_batch(images, labels, mlp_message(batch_size=37, batch=batch))
    reply = one_batch(images, labels, mlp_message(batch_size=37, batch=30_000 // 37 - 1))
    assert reply["n_samples"] == 37
    with pytest.raises(ValueError, match="batch_size"):
        one_batch(images, labels, mlp_message(batch_size=10**9, batch=0))   # one step on all the data


def test_part2_train_on_mnist_trains_full_batches_of_32_to_256_only():
    """FL review 2: the last partial batch was a step on n mod batch_size digits (1 with batch_size n - 1).
    The approved train_on_mnist leaves the tail out: the digit there does not move the reply."""
    train_on_mnist = notebook_function("train_on_mnist")
    images, labels = data.mnist_raw(True)
    images, labels = images[:100].copy(), labels[:100].astype(np.int64)
    message = mlp_message(batch_size=99, seed=2)
    tail = int(np.setdiff1d(np.arange(100), tr.epoch_indices(100, 99, seed=2))[0])
    first = train_on_mnist(images, labels, message)["weights"]["vector"]
    images[tail] = 255 - images[tail]
    assert np.array_equal(first, train_on_mnist(images, labels, message)["weights"]["vector"])
    with pytest.raises(ValueError, match="batch_size"):
        train_on_mnist(images, labels, mlp_message(batch_size=257))


def test_part2_one_batch_through_syft_trains_a_full_batch_and_refuses_a_wrap_around(mnist):
    """The same function, approved on a datasite (whose mock syft also runs it on: 64 digits here)."""
    images, labels = data.mnist_raw(True)
    owner = DataOwner("fbatch")
    try:
        fl.upload_mnist(owner, images[:300], labels[:300], mock_size=64)
        owner.add_data_scientist(EMAIL, PASSWORD)
        client = owner.login(EMAIL, PASSWORD)
        with quiet():
            fl.request_training(client, notebook_function("one_batch"), rounds=3)
        owner.code_of("one_batch")
        owner.approve("one_batch")
        reply = fl.train_remotely(client, "one_batch", mlp_message(batch_size=32, batch=1))
        assert reply["n_samples"] == 32
        with pytest.raises(RemoteError, match="Exception encountered while running one_batch"):
            fl.train_remotely(client, "one_batch", mlp_message(batch_size=37, batch=8))   # 300 = 8 * 37 + 4
        assert owner.runs("one_batch") == 1
    finally:
        owner.shutdown()


def test_request_and_approve_shows_one_review_and_approves_that_code_everywhere(mnist, capsys):
    images, labels = data.mnist_raw(True)
    owners = {name: DataOwner(name) for name in ("qjoe", "qjane")}
    try:
        for owner in owners.values():
            fl.upload_mnist(owner, images[:64], labels[:64], mock_size=8)
            owner.add_data_scientist(EMAIL, PASSWORD)
        clients = {name: owner.login(EMAIL, PASSWORD) for name, owner in owners.items()}
        with pytest.raises(ValueError, match="same owners"):
            fl.request_and_approve(train_small, clients, {"qjoe": owners["qjoe"]}, rounds=1)
        review = fl.request_and_approve(train_small, clients, owners, rounds=1)
        assert "def train_small" in capsys.readouterr().out and "at most 1 run" in review
        weights = tr.get_weights(tr.MLP(hidden=16))
        for client in clients.values():  # approved on both datasites, for exactly one run
            assert fl.train_remotely(client, "train_small", weights)["n_samples"] == 64
            with pytest.raises(RemoteError, match="used up"):
                fl.train_remotely(client, "train_small", weights)
    finally:
        for owner in owners.values():
            owner.shutdown()
