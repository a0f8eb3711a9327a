"""secure_ai.remote: the data scientist's one way to request a function on a datasite and to run it."""
import threading

import pytest
from secure_ai import remote


def total_plus(x, weights):
    return float(x.sum()) + weights["k"]


@pytest.fixture(scope="module")
def owner_and_ds(start_owner):
    owner, ds = start_owner("remote-joe")
    return owner, ds, {"x": ds.datasets["numbers"].assets["x"]}


def test_a_request_runs_once_approved_and_at_most_rounds_times(owner_and_ds):
    owner, ds, assets = owner_and_ds
    submitted = remote.request(ds, total_plus, rounds=2, assets=assets)
    assert submitted.func_name == "total_plus"
    review = owner.code_of("total_plus")
    assert "at most 2 runs" in review and "x = asset numbers/x" in review
    assert "weights = any dict of the data scientist's" in review  # the one input chosen on every call
    owner.approve("total_plus")
    assert remote.run(ds, "total_plus", {"k": 1}, assets) == 16.0
    answers = []  # from a worker thread, as scale.remote_trainer calls it
    worker = threading.Thread(target=lambda: answers.append(remote.run(ds, "total_plus", {"k": 2}, assets,
                                                                        threaded=True)))
    worker.start()
    worker.join(60)
    assert answers == [17.0]
    used_up = r"not valid \(the owner approved a limited number of runs and they are used up\)"
    with pytest.raises(remote.RemoteError, match=used_up):
        remote.run(ds, "total_plus", {"k": 3}, assets)
    assert owner.runs("total_plus") == 2


def test_a_pending_or_unknown_function_is_a_clear_error(owner_and_ds):
    owner, ds, assets = owner_and_ds

    def mean_of(x, weights):
        return float(x.mean())

    remote.request(ds, mean_of, rounds=1, assets=assets)
    pending = "not reviewed this request yet|waiting for approval"
    with pytest.raises(remote.RemoteError, match=pending) as info:
        remote.run(ds, "mean_of", {}, assets)
    assert "<class" not in str(info.value)
    owner.deny("mean_of", reason="no means")
    with pytest.raises(remote.RemoteError, match="no means"):
        remote.run(ds, "mean_of", {}, assets)
    with pytest.raises(ValueError, match="has no function 'nope'; request it with request_step"):
        remote.run(ds, "nope", {}, assets, requested_with="request_step")


@pytest.mark.parametrize("rounds", [0, -1, 1.5, "2", None])
def test_rounds_must_be_a_positive_integer(owner_and_ds, rounds):
    _, ds, assets = owner_and_ds
    with pytest.raises(ValueError, match="rounds must be a positive integer"):
        remote.request(ds, total_plus, rounds=rounds, assets=assets)


def test_syft_messages_lose_their_class_prefix_and_gain_a_hint():
    assert remote.clean_message("<class 'syft.X'> plain reason ") == "plain reason"
    assert remote.clean_message("Output policy is not valid") == (
        "Output policy is not valid (the owner approved a limited number of runs and they are used up)")
    hinted = remote.clean_message("is waiting for approval")
    assert hinted == "is waiting for approval (the owner has not reviewed this request yet)"
    pinned = remote.clean_message("Input with uid: 921f for `weights` not in allowed inputs: {ServerIdentity "
                                  "<name=joe, id=8ff3>: {'images': <UID: bbde>, 'weights': <UID: 6157>}}")
    assert pinned == ("Input with uid: 921f for `weights` not in allowed inputs "
                      "(the approval pins the objects this function may run on)")
