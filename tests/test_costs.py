"""secure_ai.costs: time and bytes per owner and round, for each protection of the series."""
import time

import pytest
import torch
from secure_ai import costs as cost_model


def test_round_costs():
    update = lambda private: torch.ones(1000) * (2.0 if private else 1.0)
    costs = cost_model.round_costs(update, n_samples=10, repeat=1)
    assert costs["plain FedAvg"]["bytes vs plain"] == 1 and costs["plain FedAvg"]["time vs plain"] == 1
    assert costs["secure aggregation (masks)"]["bytes"] == 1001 * 8  # [n * w, n] as 64-bit ring elements
    assert costs["CKKS"]["bytes vs plain"] > costs["secure aggregation (masks)"]["bytes vs plain"]
    assert all(c["seconds"] > 0 for c in costs.values())


def test_best_time_is_the_fastest_run_and_returns_the_result():
    durations = iter([0.05, 0.01, 0.03])
    best, result = cost_model.best_time(lambda: time.sleep(next(durations)) or "done", repeat=3)
    assert 0.01 <= best < 0.03 and result == "done"
    with pytest.raises(ValueError, match="repeat"):
        cost_model.best_time(lambda: None, repeat=0)


def test_local_update_trains_one_epoch_plain_or_private(mnist):
    (x, y), _ = mnist
    plain = cost_model.local_update(x[:64], y[:64], private=False, hidden=16)
    again = cost_model.local_update(x[:64], y[:64], private=False, hidden=16)
    private = cost_model.local_update(x[:64], y[:64], private=True, hidden=16, dp_batch=32)
    assert plain.shape == private.shape == (784 * 16 + 16 + 16 * 10 + 10,)
    assert torch.equal(plain, again)                                    # plain SGD: seeded
    assert not torch.equal(plain, private)                              # clipped, noisy steps
