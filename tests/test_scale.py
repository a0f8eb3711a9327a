"""secure_ai.scale: concurrent rounds, deadlines, dropouts and cheating owners; real HTTP owners killed
(with secure_ai.datasites' process control)."""
import contextlib
import threading
import time

import numpy as np
import psutil
import pytest
from secure_ai import data, datasites, scale
from secure_ai import federated as fl
from secure_ai import training as tr
from secure_ai.datasites import TEMP_ROOT, DataOwner, port_is_free

RECIPE = {"model": "mlp", "lr": 0.05, "momentum": 0.0, "batch_size": 32, "seed": 3}
EMAIL, PASSWORD = "ds@example.org", "scale-tests"
SIZE = sum(p.numel() for p in tr.MLP().parameters())


def start_vector(seed=0):
    tr.set_seed(seed)
    return tr.model_to_vector(tr.MLP()).numpy()


def fixed(vector, n, log=None, name=None):
    """A fake owner that answers ``vector`` with ``n`` samples (and notes what it was sent)."""
    def train(message):
        if log is not None:
            log[name] = message
        return {"weights": {"vector": np.asarray(vector, dtype=np.float32)}, "n_samples": n}
    return train


def failing(message):
    raise ConnectionError("server went away")


# --- the round's logic, on owners simulated in this process ---------------------------------------------
def test_concurrent_round_equals_sequential_and_the_owners_own_fedavg():
    images, labels = data.mnist_raw(True)
    shards = {"a": slice(0, 300), "b": slice(300, 500), "c": slice(500, 600)}   # unequal: weights matter
    trainers = {k: scale.local_trainer(scale.train_local_epoch, images[s], labels[s])
                for k, s in shards.items()}
    w0 = start_vector()
    together, rec1 = scale.Federation(trainers).round(w0, RECIPE)
    apart, rec2 = scale.Federation(trainers, concurrent=False).round(w0, RECIPE)
    np.testing.assert_allclose(together, apart, atol=1e-6)
    replies = [scale.train_local_epoch(images[s], labels[s], {**RECIPE, "vector": w0})
               for s in shards.values()]
    expected = tr.fedavg([r["weights"]["vector"] for r in replies], [300, 200, 100]).numpy()
    np.testing.assert_allclose(together, expected, atol=1e-6)
    assert rec1.answered == rec2.answered == {"a": 300, "b": 200, "c": 100} and not rec1.dropped
    assert not np.allclose(together, w0)


def test_the_owners_epoch_trains_full_batches_of_16_to_256_only():
    """FL review 2: batch_size = n - 1 made the epoch's second step a one-digit step (ben's 1,800 digits
    with 1,799). With full batches only, the digit left in the tail does not move the reply at all."""
    images, labels = data.mnist_raw(True)
    images, labels = images[:100].copy(), labels[:100]
    message = {**RECIPE, "batch_size": 99, "vector": start_vector()}
    tail = int(np.setdiff1d(np.arange(100), tr.epoch_indices(100, 99, seed=RECIPE["seed"]))[0])
    first = scale.train_local_epoch(images, labels, message)
    images[tail] = 255 - images[tail]
    second = scale.train_local_epoch(images, labels, message)
    assert np.array_equal(first["weights"]["vector"], second["weights"]["vector"])
    assert first["n_samples"] == 100
    for batch_size in (15, 257, 10**9):
        with pytest.raises(ValueError, match="batch_size"):
            scale.train_local_epoch(images, labels, {**message, "batch_size": batch_size})
    no_step = scale.train_local_epoch(images[:40], labels[:40], message)   # fewer digits than one batch
    assert np.array_equal(no_step["weights"]["vector"], message["vector"]) and np.isnan(no_step["loss"])


def test_weights_are_the_survivors_counts_and_drops_are_recorded():
    ones, threes = np.ones(SIZE), np.full(SIZE, 3.0)
    fed = scale.Federation({"a": fixed(ones, 100), "b": failing, "c": fixed(threes, 300)})
    new, record = fed.round(np.zeros(SIZE, np.float32), RECIPE)
    np.testing.assert_allclose(new, 2.5)                  # (100 * 1 + 300 * 3) / 400, b not counted
    assert record.answered == {"a": 100, "c": 300}
    assert record.weights == {"a": 0.25, "c": 0.75}
    assert record.dropped == {"b": "ConnectionError: server went away"} and record.late == []
    assert set(record.failed_after) == {"b"} and 0 <= record.failed_after["b"] < 1
    assert scale.dropouts(fed.records) == {"b": [1]}


@pytest.mark.parametrize("reply, why", [
    ({"weights": {"vector": np.full(SIZE, np.nan, np.float32)}, "n_samples": 10}, "NaN"),
    ({"weights": {"vector": np.ones(5, np.float32)}, "n_samples": 10}, "shape"),
    ({"weights": {"vector": np.ones(SIZE)}, "n_samples": 10}, "float32"),
    ({"weights": {"vector": np.ones(SIZE, np.float32)}, "n_samples": 10**9}, "declared 50"),
    ({"weights": {"vector": np.ones(SIZE, np.float32)}, "n_samples": -1}, "positive"),
    ({"weights": {"vector": np.ones(SIZE, np.float32)}, "n_samples": True}, "positive"),
    ("all my data", "dict"),
])
def test_a_cheating_owner_is_dropped_and_never_enters_the_average(reply, why):
    # Malicious owner: a forged reply (bad weights, or a huge count to dominate the average) is refused.
    cheat = lambda message: reply
    cheat.max_samples = 50
    fed = scale.Federation({"honest": fixed(np.ones(SIZE), 40), "cheat": cheat})
    new, record = fed.round(np.zeros(SIZE, np.float32), RECIPE)
    np.testing.assert_array_equal(new, np.ones(SIZE, np.float32))
    assert record.answered == {"honest": 40} and why in record.dropped["cheat"]


def test_a_deadline_that_passes_does_not_hang_and_the_straggler_comes_back():
    release = threading.Event()
    log = {}

    def slow(message):
        release.wait(60)                                  # a frozen owner: answers only when released
        return fixed(np.full(SIZE, 9.0), 1000)(message)

    slow.max_samples = 1000
    fed = scale.Federation({"fast": fixed(np.ones(SIZE), 10, log, "fast"), "slow": slow}, deadline=0.5)
    tic = time.perf_counter()
    new, record = fed.round(np.zeros(SIZE, np.float32), RECIPE)
    assert time.perf_counter() - tic < 5
    np.testing.assert_array_equal(new, np.ones(SIZE, np.float32))    # the late answer is not waited for
    assert record.late == ["slow"] and "deadline" in record.dropped["slow"]
    new, record = fed.round(new, RECIPE)                               # still busy: not asked twice
    assert record.dropped == {"slow": "still busy with round 1"}
    release.set()
    assert fed.settle(timeout=5) == []
    new, record = fed.round(np.zeros(SIZE, np.float32), RECIPE)       # back: used again
    assert record.answered == {"fast": 10, "slow": 1000} and not record.dropped
    np.testing.assert_allclose(new, (10 + 9 * 1000) / 1010, rtol=1e-6)
    assert [len(r.answered) for r in fed.records] == [1, 1, 2]
    assert log["fast"]["seed"] == RECIPE["seed"] and log["fast"]["vector"].shape == (SIZE,)


def test_a_round_with_fewer_answers_than_the_minimum_keeps_the_model():
    """FL review 20 (M9): survivor-only averaging weights the model toward the owners who answer; with
    ``min_answers`` a round that too few answered keeps the previous model, and FedAvgM's velocity."""
    good = fixed(np.full(SIZE, 2.0), 30)
    w0 = np.zeros(SIZE, np.float32)
    strict = scale.Federation({"good": good, "down": failing}, min_answers=2)
    kept, record = strict.round(w0, RECIPE)
    np.testing.assert_array_equal(kept, w0)
    assert record.applied is False and record.skipped == "1 answer, 2 needed"
    assert record.answered == {"good": 30} and "down" in record.dropped
    assert record.row()["global model"] == "kept (1 answer, 2 needed)"
    lenient, record = scale.Federation({"good": good, "down": failing}).round(w0, RECIPE)
    np.testing.assert_array_equal(lenient, np.full(SIZE, 2.0, np.float32))      # the survivor's update alone
    assert record.applied is True and record.row()["global model"] == "averaged"
    # FedAvgM: a kept round leaves the velocity alone (rounds 1 and 3 step as two consecutive rounds would)
    answers = iter([fixed(np.ones(SIZE), 5), failing, fixed(np.full(SIZE, 2.0), 5)])
    flaky = lambda message: next(answers)(message)
    fed = scale.Federation({"a": flaky, "b": fixed(np.ones(SIZE), 5)}, min_answers=2, server_momentum=0.5)
    w1, _ = fed.round(w0, RECIPE)                   # v = -1; w1 = 1
    w2, record = fed.round(w1, RECIPE)              # a fails: kept
    w3, _ = fed.round(w2, RECIPE)                   # v = 0.5 * -1 + (1 - 1.5) = -1; w3 = 2
    np.testing.assert_allclose(w1, 1.0)
    np.testing.assert_array_equal(w2, w1)
    assert record.applied is False
    np.testing.assert_allclose(w3, 2.0)


def test_a_late_answer_is_received_and_left_out():
    """FL review 21 (M10): an answer that comes after the deadline reaches the data scientist (it is
    released, and counts for DP), but it never enters an average."""
    release = threading.Event()

    def slow(message):
        release.wait(60)
        return fixed(np.full(SIZE, 100.0), 77)(message)

    slow.max_samples = 77
    fed = scale.Federation({"fast": fixed(np.ones(SIZE), 10), "slow": slow}, deadline=0.3)
    new, record = fed.round(np.zeros(SIZE, np.float32), RECIPE)
    np.testing.assert_array_equal(new, np.ones(SIZE, np.float32))
    assert record.late == ["slow"] and record.late_received == {}
    release.set()
    assert fed.settle(timeout=5) == []
    assert record.late_received == {"slow": 77}
    np.testing.assert_array_equal(new, np.ones(SIZE, np.float32))     # still out of round 1's average
    assert "received but not averaged" in record.row()["dropped"]
    newer, record2 = fed.round(new, RECIPE)                             # both answer round 2 in time
    assert record2.answered == {"fast": 10, "slow": 77} and record2.late_received == {}
    # a late answer found by the next round (without settle) is recorded in its own round too
    gate = threading.Event()
    late_again = lambda message: (gate.wait(60), fixed(np.zeros(SIZE), 5)(message))[1]
    fed = scale.Federation({"fast": fixed(np.ones(SIZE), 10), "late": late_again}, deadline=0.3)
    fed.round(np.zeros(SIZE, np.float32), RECIPE)
    gate.set()
    time.sleep(0.2)
    fed.round(np.zeros(SIZE, np.float32), RECIPE)
    assert fed.records[0].late_received == {"late": 5} and fed.records[1].answered == {"fast": 10, "late": 5}


def test_a_round_where_everybody_fails_keeps_the_model():
    fed = scale.Federation({"a": failing, "b": failing})
    w0 = np.arange(SIZE, dtype=np.float32)
    new, record = fed.round(w0, RECIPE)
    np.testing.assert_array_equal(new, w0)
    assert set(record.dropped) == {"a", "b"} and record.answered == {}


def test_client_sampling_asks_a_fraction_of_the_owners_reproducibly():
    log = {}
    trainers = {f"o{i}": fixed(np.ones(SIZE), 10, log, f"o{i}") for i in range(10)}
    picks = []
    for _ in range(2):
        fed = scale.Federation(trainers, fraction=0.3, seed=7)
        picks.append([fed.round(np.zeros(SIZE, np.float32), RECIPE)[1].sampled for _ in range(4)])
    assert picks[0] == picks[1] and all(len(p) == 3 for p in picks[0])
    assert len({tuple(p) for p in picks[0]}) > 1                     # a new sample every round
    assert set(log) == set().union(*picks[0])


def test_server_momentum_is_fedavgm():
    target = np.full(SIZE, 1.0)
    fed = scale.Federation({"a": fixed(target, 5)}, server_momentum=0.5)
    w0 = np.zeros(SIZE, np.float32)
    w1, _ = fed.round(w0, RECIPE)          # v = w0 - avg = -1; w1 = w0 - v = 1
    w2, _ = fed.round(w1, RECIPE)          # v = 0.5 * -1 + (1 - 1) = -0.5; w2 = 1.5
    np.testing.assert_allclose(w1, 1.0)
    np.testing.assert_allclose(w2, 1.5)


@pytest.mark.parametrize("kwargs, match", [
    ({"trainers": {}}, "at least one data owner"),
    ({"deadline": 0}, "deadline"),
    ({"deadline": -1.0}, "deadline"),
    ({"deadline": float("nan")}, "deadline"),
    ({"fraction": 0}, r"fraction .* \(0, 1\]"),
    ({"fraction": 1.5}, r"fraction"),
    ({"server_momentum": 1.0}, "server_momentum"),
    ({"min_answers": 0}, "min_answers"),
    ({"min_answers": 2}, "asks only 1 owner"),
    ({"trainers": {"a": failing, "b": failing}, "fraction": 0.5, "min_answers": 2}, "asks only 1 owner"),
    ({"trainers": {"a": "not callable"}}, "callable"),
])
def test_bad_settings_raise_clear_errors(kwargs, match):
    trainers = kwargs.pop("trainers", {"a": failing})
    with pytest.raises(ValueError, match=match):
        scale.Federation(trainers, **kwargs)


def test_local_trainer_and_model_shape_are_checked():
    with pytest.raises(ValueError, match="as many labels"):
        scale.local_trainer(scale.train_local_epoch, np.zeros((3, 28, 28), np.uint8), np.zeros(2))
    with pytest.raises(ValueError, match="flat vector"):
        scale.Federation({"a": failing}).round(np.zeros((2, 2)), RECIPE)


# --- real HTTP owners, real processes ---------------------------------------------------------------------
@contextlib.contextmanager
def http_owner(name, lo, hi, runs=6):
    """An HTTP owner with digits lo..hi and an approved ``train_local_epoch``: ``(owner, client, pid)``.
    Shut down on the way out, where nothing of it may be left behind (when the body did not fail)."""
    images, labels = data.mnist_raw(True)
    owner = DataOwner(name, port=datasites.free_port())
    fl.upload_mnist(owner, images[lo:hi], labels[lo:hi], mock_size=8)
    owner.add_data_scientist(EMAIL, PASSWORD)
    client = owner.login(EMAIL, PASSWORD)
    fl.request_training(client, scale.train_local_epoch, rounds=runs)
    owner.code_of("train_local_epoch")
    owner.approve("train_local_epoch")
    pid = datasites.server_process(owner).pid
    try:
        yield owner, client, pid
    finally:
        owner.shutdown()
    assert left_behind(owner, pid) == []


def left_behind(owner, pid):
    """What of a shut-down HTTP owner is still there: its process, its port, its folder."""
    from syft.server.utils import get_named_server_uid

    left = []
    if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        left.append(f"process {pid}")
    if not port_is_free(owner.port):
        left.append(f"port {owner.port}")
    if (TEMP_ROOT / str(get_named_server_uid(owner.name))).exists():
        left.append("temp folder")
    return left


@pytest.fixture(scope="module")
def web_owner():
    with http_owner("scale-a", 0, 200, runs=8) as (owner, client, _):
        yield owner, client


def test_concurrent_http_round_equals_sequential_and_local(web_owner):
    owner_a, client_a = web_owner
    with http_owner("scale-b", 200, 320) as (owner_b, client_b, _):
        trainers = {"a": scale.remote_trainer(client_a, "train_local_epoch", max_samples=200),
                    "b": scale.remote_trainer(client_b, "train_local_epoch", max_samples=120)}
        w0 = start_vector(1)
        together, record = scale.Federation(trainers).round(w0, RECIPE)
        apart, _ = scale.Federation(trainers, concurrent=False).round(w0, RECIPE)
        assert record.answered == {"a": 200, "b": 120}, record.dropped
        np.testing.assert_allclose(together, apart, atol=1e-6)
        images, labels = data.mnist_raw(True)
        local = {"a": scale.local_trainer(scale.train_local_epoch, images[:200], labels[:200]),
                 "b": scale.local_trainer(scale.train_local_epoch, images[200:320], labels[200:320])}
        np.testing.assert_allclose(together, scale.Federation(local).round(w0, RECIPE)[0], atol=1e-6)


def test_a_server_killed_mid_round_leaves_a_completed_round_and_a_record(web_owner):
    owner_a, client_a = web_owner
    with http_owner("scale-victim", 320, 400) as (victim, client_v, pid):
        fed = scale.Federation({"a": scale.remote_trainer(client_a, "train_local_epoch"),
                                "victim": scale.remote_trainer(client_v, "train_local_epoch")}, deadline=120)
        datasites.pause_owner(victim)                          # its call will hang until ...
        killer = threading.Timer(2.0, datasites.kill_owner, [victim])  # ... its process is killed, mid-round
        killer.start()
        tic = time.perf_counter()
        new, record = fed.round(start_vector(2), RECIPE)
        killer.join()
        assert time.perf_counter() - tic < 100            # ended by the kill, not by the deadline
        assert record.answered == {"a": 200} and record.late == []
        assert "Connection" in record.dropped["victim"], record.dropped
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        # the run goes on: the next round, with the survivor only, starts from the completed round
        newer, record2 = fed.round(new, RECIPE)
        assert record2.answered == {"a": 200} and "victim" in record2.dropped
        assert scale.dropouts(fed.records) == {"victim": [1, 2]} and not np.allclose(newer, new)


def test_a_round_without_deadline_survives_a_frozen_owner(web_owner):
    """FL review 32 (M8): a frozen owner (SIGSTOP: the kernel still accepts its connections, as a cut-off
    machine would leave a request unanswered) costs a round without deadline the data scientist's HTTP
    timeout, not forever. A killed local process would have failed in milliseconds instead."""
    from secure_ai import remote

    owner_a, client_a = web_owner
    images, labels = data.mnist_raw(True)
    fed = scale.Federation({"a": scale.remote_trainer(client_a, "train_local_epoch"),
                            "local": scale.local_trainer(scale.train_local_epoch, images[:64], labels[:64])})
    remote.set_http_timeout(client_a, 2)
    datasites.pause_owner(owner_a)
    try:
        tic = time.perf_counter()
        new, record = fed.round(start_vector(4), RECIPE)
        took = time.perf_counter() - tic
    finally:
        datasites.resume_owner(owner_a)
        remote.set_http_timeout(client_a, None)
    assert took < 15 and record.answered == {"local": 64} and record.late == [], record
    assert record.dropped["a"].startswith("RemoteTimeout"), record.dropped
    assert 2 <= record.failed_after["a"] < 10, record.failed_after


def test_owner_memory_is_its_share_not_its_resident_set(web_owner):
    """FL review 38 (M11): an owner server forked from this process shares most of its pages with it. Its
    memory is read as PSS (each shared page split among the processes that map it), well below its RSS,
    which counts every shared page in full again for every owner."""
    owner, _ = web_owner
    share = datasites.memory_mb(owner)
    resident = datasites.server_process(owner).memory_info().rss / 1e6
    assert 10 < share < 0.8 * resident, (share, resident)
