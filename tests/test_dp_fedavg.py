"""secure_ai.dp_fedavg: what each owner fixes, checks and charges; federated DP-SGD through real datasites."""
import numpy as np
import pytest
import torch
from secure_ai import dp_fedavg
from secure_ai import privacy as dp
from secure_ai import training as tr
from secure_ai.dp_sgd import TanhCNN, make_private
from secure_ai.remote import RemoteError

# --- federated DP-SGD: what the owner fixes, checks and charges -----------------------------------------
POLICY = dict(noise_multiplier=1.0, max_grad_norm=0.1, batch_size=50, epochs=1, lr=0.5,
              count_noise=15.0)  # 300 records: 2 rounds fit the budget of 5 and 4 do not, whatever the count
                                 # (3.5 sigma either way: eps 4.64 after 2 rounds at 247, 5.62 after 4 at 352)


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
        ledger = dp.PrivacyLedger("dpowner", budget=5.0, path=dp_fedavg.ledger_path(owner))
        policy = dp_fedavg.publish_policy(owner, ledger, len(labels), **POLICY)
        owner.add_data_scientist("ds@example.org", "pw")
        yield owner, ledger, policy, owner.login("ds@example.org", "pw")
    finally:
        owner.shutdown()
        dp_fedavg.ledger_path(owner).unlink(missing_ok=True)


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
    # DP review 3.9 (b): finite as float64, inf after the cast to float32
    ({**tr.get_weights(TanhCNN()), "net.0.bias": np.full(16, 1e300)}, r"within \+-1000 as float32"),
    ({**tr.get_weights(TanhCNN()), "net.9.weight": np.full((10, 32), -3e38, np.float32)}, "within"),
    ({**tr.get_weights(TanhCNN()), "net.9.bias": np.full(10, np.inf, np.float32)}, "finite"),
])
def test_the_owner_checks_the_weights_the_data_scientist_sends(forged, message):
    images, labels = owner_data(64)
    policy = dp_fedavg.DPPolicy(1.0, 0.1, 16, 1, 0.5, 0.9, noisy_count=64, count_noise=50.0)
    with pytest.raises(ValueError, match=message):
        dp_fedavg.dp_local_update(images, labels, forged, policy)


def test_dp_fedavg_through_syft_is_charged_owner_side(datasite, mnist):
    from secure_ai import federated as fl

    owner, ledger, policy, client = datasite
    assert ledger.runs == [policy.count_release]
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
    assert set(results["dpowner"]) == {"weights", "noisy_count"}
    assert results["dpowner"]["noisy_count"] == policy.noisy_count
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


# --- the data scientist's seeds, its weights, its requests ----------------------------------------------
def test_the_owners_dp_noise_cannot_be_replayed_from_a_seed_the_data_scientist_sets():
    """DP review 3.11 (issue 18, leak 4): tr.set_seed(0) runs in the owner's process; two updates after it,
    with the same inputs, were identical, so a local replay subtracted the noise exactly."""
    images, labels = owner_data(300)
    policy = dp_fedavg.DPPolicy(1.0, 0.1, 50, 1, 0.5, 0.0, noisy_count=310, count_noise=50.0)
    start = tr.get_weights(TanhCNN())
    updates = []
    for _ in range(2):   # the owner's run, then the data scientist's replay with the same seed and inputs
        tr.set_seed(0)
        updates.append(dp_fedavg.dp_local_update(images, labels, start, policy)["weights"])
    gaps = np.concatenate([(updates[0][k] - updates[1][k]).ravel() for k in start])
    nominal = policy.lr * policy.noise_multiplier * policy.max_grad_norm / policy.batch_size   # per step
    assert gaps.std() > nominal   # 6 steps of independent noise on each side: about sqrt(12) = 3.5x nominal


def zero_gradient_update(noise_multiplier=1.0, clip=0.1, n=64, lr=0.5):
    """One DP-SGD step from the all-zero TanhCNN: every per-sample gradient is 0 except the last layer's
    bias, so the other 26,000 weights move by exactly -lr * noise / batch_size."""
    images, labels = owner_data(n)
    policy = dp_fedavg.DPPolicy(noise_multiplier, clip, n, 1, lr, 0.9, noisy_count=n, count_noise=50.0)
    assert policy.steps == 1   # sample rate 1: one step on every record
    zeros = {name: np.zeros_like(w) for name, w in tr.get_weights(TanhCNN()).items()}
    after = dp_fedavg.dp_local_update(images, labels, zeros, policy)["weights"]
    moved = np.concatenate([after[k].ravel() for k in after if k != "net.9.bias"])
    return moved.std() * n / lr, moved.mean() * n / lr


def test_the_noise_added_is_the_policys_sigma_times_c():
    """A dp_local_update that quietly adds less noise (sigma / 10) would still be charged the policy's sigma
    on the ledger. Measure the noise it adds: std sigma * C within 3% (26,000 draws: 0.4% standard error)."""
    for sigma, clip in ((1.0, 0.1), (2.0, 0.05)):
        std, mean = zero_gradient_update(sigma, clip)
        assert std == pytest.approx(sigma * clip, rel=0.03) and abs(mean) < 0.03 * sigma * clip


def test_a_request_with_a_hidden_second_function_is_refused_and_charged_nothing(datasite):
    """Malicious data scientist (issue 18): one request carries dp_train and a second code change, a
    function that returns the owner's images. The owner refuses the whole request; neither runs."""
    import syft as sy
    from secure_ai.quiet import quiet
    from secure_ai.remote import call
    from syft.service.code.user_code import UserCodeStatus
    from syft.service.policy.policy import OutputPolicyExecuteCount
    from syft.service.request.request import SubmitRequest, UserCodeStatusChange
    from syft.store.linked_obj import LinkedObject

    owner, ledger, policy, client = datasite
    assets = client.datasets["mnist"].assets
    policy_asset = client.datasets[dp_fedavg.POLICY_DATASET].assets["policy"]

    def leak(images):
        return images

    with quiet():
        client.code.submit(sy.syft_function(
            input_policy=sy.MixedInputPolicy(client=client, images=assets["images"], labels=assets["labels"],
                                             weights=dict, policy=policy_asset),
            output_policy=OutputPolicyExecuteCount(limit=2))(dp_fedavg.dp_train))
        client.code.submit(sy.syft_function(
            input_policy=sy.MixedInputPolicy(client=client, images=assets["images"]),
            output_policy=OutputPolicyExecuteCount(limit=1))(leak))
        codes = {c.service_func_name: c for c in client.code.get_all()}
        client.api.services.request.submit(SubmitRequest(changes=[
            UserCodeStatusChange(value=UserCodeStatus.APPROVED, linked_obj=codes[n].status_link,
                                 linked_user_code=LinkedObject.from_obj(codes[n], server_uid=client.id))
            for n in ("dp_train", "leak")]))
    before = ledger.runs
    with pytest.raises(dp_fedavg.DPRequestRefused, match="carries 2 changes"):
        dp_fedavg.approve_dp_training(owner, ledger, policy)
    assert ledger.runs == before and owner.pending_requests() == []
    with pytest.raises(RemoteError):
        call(client.code.leak, images=assets["images"])
    assert owner.runs("leak") == 0 and owner.runs("dp_train") == 0


def test_every_approved_round_is_charged_before_the_approval(datasite, monkeypatch):
    """The data scientist may call the moment a request is approved (and 4 calls at once, issue 18 leak 3):
    the ledger must already hold every approved round then, on its file."""
    owner, ledger, policy, client = datasite
    dp_fedavg.request_dp_training(client, rounds=2)
    seen = []
    approve = owner.approve
    monkeypatch.setattr(owner, "approve", lambda *args, **kwargs: (
        seen.append(dp.PrivacyLedger("dpowner", path=ledger.path).runs), approve(*args, **kwargs))[1])
    assert dp_fedavg.approve_dp_training(owner, ledger, policy) == 2
    assert seen == [[policy.count_release] + [policy.run] * 2]


def test_a_restarted_owner_keeps_its_ledger_and_refuses_past_its_budget(datasite):
    """DP review 3.12: the owner's datasite restarts (syft empties its folder); its ledger file does not,
    so the rounds approved before the restart still count against the budget."""
    from secure_ai import federated as fl
    from secure_ai.datasites import DataOwner

    owner, ledger, policy, client = datasite
    dp_fedavg.request_dp_training(client, rounds=2)
    dp_fedavg.approve_dp_training(owner, ledger, policy)
    spent = ledger.epsilon
    restarted = DataOwner("dpowner")   # replaces the running datasite of that name
    try:
        images, labels = owner_data()
        fl.upload_mnist(restarted, images, labels, mock_size=8)
        again = dp.PrivacyLedger("dpowner", budget=5.0, path=dp_fedavg.ledger_path(restarted))
        assert again.epsilon == pytest.approx(spent)
        assert again.runs == [policy.count_release] + [policy.run] * 2
        assert policy.epsilon(2) <= 5.0   # a forgetful owner would approve 2 more rounds: this one refuses
        with pytest.raises(dp.BudgetExceeded):
            again.charge(*policy.run, times=2)
    finally:
        restarted.shutdown()


def test_the_noisy_count_takes_no_seed():
    """DP review 3.10: publish_policy(seed=...) let the notebook's seeds 0 and 1 give the exact counts."""
    import inspect

    assert "seed" not in inspect.signature(dp_fedavg.publish_policy).parameters
