"""secure_ai.dp_fedavg: what each owner fixes, checks and charges, and DP-FedAvg through real datasites."""
import numpy as np
import pytest
import torch
from secure_ai import dp_fedavg
from secure_ai import privacy as dp
from secure_ai import training as tr
from secure_ai.dp_sgd import TanhCNN, make_private
from secure_ai.remote import RemoteError

# --- DP-FedAvg: what the owner fixes, checks and charges -------------------------------------------------
POLICY = dict(noise_multiplier=1.0, max_grad_norm=0.1, batch_size=50, epochs=1, lr=0.5)


def owner_data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, size=n).astype(np.int64))


@pytest.fixture
def datasite():
    """A data owner with 300 records, a published DP policy, a ledger with budget 5 and a logged-in DS."""
    from secure_ai import federated as fl
    from secure_ai.datasites import DataOwner

    images, labels = owner_data()
    owner = DataOwner("dpowner")
    try:
        fl.upload_mnist(owner, images, labels, mock_size=8)
        ledger = dp.PrivacyLedger("dpowner", budget=5.0)
        policy = dp_fedavg.publish_policy(owner, ledger, len(labels), **POLICY, seed=1)
        owner.add_data_scientist("ds@example.org", "pw")
        yield owner, ledger, policy, owner.login("ds@example.org", "pw")
    finally:
        owner.shutdown()


def test_policy_fixes_rate_steps_and_divisor_from_a_noisy_count():
    policy = dp_fedavg.DPPolicy(1.0, 0.1, 128, 2, 1.0, 0.9, noisy_count=20_037, count_noise=50.0)
    assert policy.sample_rate == 128 / 20_037 and policy.steps == 2 * int(20_037 / 128)
    assert dp_fedavg.DPPolicy.from_array(policy.to_array()) == policy
    assert policy.epsilon(0) == pytest.approx(dp.epsilon_spent([(50.0, 1.0, 1)]))  # the count alone
    assert policy.epsilon(3) == pytest.approx(dp.epsilon_spent([(50.0, 1.0, 1)] + [policy.run] * 3))
    for bad in (dict(noise_multiplier=0.0), dict(batch_size=12.5), dict(momentum=1.0), dict(epochs=1000),
                dict(noisy_count=100, batch_size=128), dict(lr=float("inf"))):
        with pytest.raises(ValueError, match="DP policy"):
            dp_fedavg.DPPolicy(**(dict(noise_multiplier=1.0, max_grad_norm=0.1, batch_size=128, epochs=1,
                                       lr=1.0, momentum=0.9, noisy_count=20_000, count_noise=50.0) | bad))
    with pytest.raises(ValueError, match="shape"):
        dp_fedavg.DPPolicy.from_array(np.zeros(3))


def test_nothing_released_depends_on_the_exact_number_of_records():
    """Neighbouring datasets (one record removed): the sample rate, the steps, the divisor of the noisy sums
    and everything returned besides the DP weights are the same; no exact n is returned."""
    policy = dp_fedavg.DPPolicy(1.0, 0.1, 50, 1, 0.5, 0.9, noisy_count=310, count_noise=50.0)
    images, labels = owner_data(300)
    start = tr.get_weights(TanhCNN())
    seen = []
    for n in (300, 299):
        model = TanhCNN()
        private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), images[:n], labels[:n],
                               batch_size=50, max_grad_norm=0.1, noise_multiplier=1.0,
                               sample_rate=policy.sample_rate)
        tr.set_seed(0)
        result = dp_fedavg.dp_local_update(images[:n], labels[:n], start, policy.to_array())
        seen.append((private.sample_rate, private.steps_per_epoch, private.optimizer.expected_batch_size,
                     set(result), result["noisy_count"]))
        assert n not in [v for v in result.values() if np.isscalar(v)]
    assert seen[0] == seen[1] == (50 / 310, 6, 50, {"weights", "noisy_count"}, 310)


@pytest.mark.parametrize("forged, message", [
    ({"w": np.zeros(1)}, "names"),
    ("weights", "dict"),
    ({**tr.get_weights(TanhCNN()), "noise_multiplier": np.zeros(1)}, "names"),
    ({**tr.get_weights(TanhCNN()), "net.0.weight": np.full((16, 1, 8, 8), np.nan, np.float32)}, "finite"),
    ({**tr.get_weights(TanhCNN()), "net.0.bias": np.zeros(17, np.float32)}, "shape"),
    ({**tr.get_weights(TanhCNN()), "net.0.bias": np.array(["x"] * 16)}, "finite"),
])
def test_the_owner_checks_the_weights_the_data_scientist_sends(forged, message):
    images, labels = owner_data(64)
    policy = dp_fedavg.DPPolicy(1.0, 0.1, 16, 1, 0.5, 0.9, noisy_count=64, count_noise=50.0)
    with pytest.raises(ValueError, match=message):
        dp_fedavg.dp_local_update(images, labels, forged, policy)


def test_dp_fedavg_through_syft_is_charged_owner_side(datasite, mnist):
    from secure_ai import federated as fl

    owner, ledger, policy, client = datasite
    assert ledger.runs == [policy.count_release] and policy.noisy_count != 300
    assert dp_fedavg.public_policy(client) == policy  # public: the data scientist plans with it
    visible = client.datasets["mnist"]  # what the data scientist sees of the data: no exact count
    assert "300" not in visible.description.text
    assert all(asset.shape[0] != 300 for asset in visible.assets)
    dp_fedavg.request_dp_training(client, rounds=2)
    assert dp_fedavg.approve_dp_training(owner, ledger, policy) == 2
    charged = ledger.epsilon
    assert charged == pytest.approx(policy.epsilon(2))
    assert ledger.runs == [policy.count_release] + [policy.run] * 2
    tr.set_seed(0)
    _, (test_x, test_y) = mnist
    history, results = dp_fedavg.run_dp_fedavg(TanhCNN(), {"dpowner": client}, 2,
                                               (test_x[:200], test_y[:200]), progress=False)
    assert len(history) == 2 and owner.runs("dp_train") == 2
    assert set(results["dpowner"]) == {"weights", "noisy_count"} and results["dpowner"]["noisy_count"] != 300
    with pytest.raises(RemoteError, match="used up"):  # a third round was neither approved nor charged
        fl.train_remotely(client, "dp_train", results["dpowner"]["weights"],
                          extra_assets={"policy": client.datasets[dp_fedavg.POLICY_DATASET].assets["policy"]})
    assert ledger.epsilon == charged


def test_owner_refuses_code_that_asks_for_less_noise(datasite):
    """The data scientist submits a 'dp_train' of its own that weakens the owner's policy."""
    from secure_ai import federated as fl

    owner, ledger, policy, client = datasite

    def dp_train(images, labels, weights, policy):
        from secure_ai.dp_fedavg import DPPolicy, dp_local_update

        weak = DPPolicy.from_array(policy)
        weak = DPPolicy(0.05, weak.max_grad_norm, weak.batch_size, 20, weak.lr, weak.momentum,
                        weak.noisy_count, weak.count_noise)
        return dp_local_update(images, labels, weights, weak)

    fl.request_training(client, dp_train, rounds=1,
                        extra_assets={"policy": client.datasets[dp_fedavg.POLICY_DATASET].assets["policy"]})
    before = list(ledger.runs)
    with pytest.raises(dp_fedavg.DPRequestRefused, match="not secure_ai.dp_fedavg.dp_train"):
        dp_fedavg.approve_dp_training(owner, ledger, policy)
    assert ledger.runs == before and owner.pending_requests() == []
    with pytest.raises(RemoteError):
        fl.train_remotely(client, "dp_train", tr.get_weights(TanhCNN()),
                          extra_assets={"policy": client.datasets[dp_fedavg.POLICY_DATASET].assets["policy"]})


def test_owner_refuses_more_rounds_than_its_budget(datasite):
    owner, ledger, policy, client = datasite
    assert ledger.allows(*policy.run, times=2) and not ledger.allows(*policy.run, times=30)
    dp_fedavg.request_dp_training(client, rounds=30)
    with pytest.raises(dp_fedavg.DPRequestRefused, match="over the budget of 5.0"):
        dp_fedavg.approve_dp_training(owner, ledger, policy)
    assert ledger.runs == [policy.count_release]


def test_owner_refuses_a_policy_of_the_data_scientists_making(datasite):
    """The reviewed code, but its 'policy' input is any object the data scientist owns (say sigma = 0.01)."""
    import syft as sy
    from syft.service.policy.policy import OutputPolicyExecuteCount

    owner, ledger, policy, client = datasite
    assets = client.datasets["mnist"].assets
    function = sy.syft_function(
        input_policy=sy.MixedInputPolicy(client=client, images=assets["images"], labels=assets["labels"],
                                         weights=dict, policy=list),
        output_policy=OutputPolicyExecuteCount(limit=1))(dp_fedavg.dp_train)
    client.code.request_code_execution(function)
    with pytest.raises(dp_fedavg.DPRequestRefused, match="do not pin"):
        dp_fedavg.approve_dp_training(owner, ledger, policy)
    assert ledger.runs == [policy.count_release]
