"""secure_ai.costs: time and bytes per owner and round, for each protection of the series."""
import time

import numpy as np
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


def test_compare_methods_on_one_round_of_updates():
    from secure_ai import secret_sharing as ss

    rng = np.random.default_rng(0)
    vectors = [rng.normal(0, 0.1, 5000).astype(np.float32) for _ in range(3)]
    counts = [300, 120, 580]
    exact = np.average(np.stack(vectors).astype(np.float64), axis=0, weights=counts)
    flooded = exact + rng.normal(0, 1e-4, exact.size)
    table = cost_model.compare_methods(vectors, counts, flooded, repeat=1)
    assert list(table) == ["plain FedAvg", "double masking", "CKKS"]
    assert table["plain FedAvg"]["bytes"] == 5000 * 4 and table["double masking"]["bytes"] == 5001 * 8
    assert table["CKKS"]["bytes"] > 10 * table["double masking"]["bytes"]   # 2 ciphertexts, a few 100 kB
    assert 0 < table["plain FedAvg"]["error"] < 1e-7                         # float32 rounding
    fixed_point = 3 * 2.0**-(ss.FRACTION_BITS + 1) / sum(counts) + 1e-15    # each n*w rounded to 2^-25
    assert table["double masking"]["error"] <= fixed_point
    assert 0 < table["CKKS"]["own error"] < 1e-9                             # CKKS's own, before flooding
    assert table["CKKS"]["error"] == np.abs(flooded - exact).max()           # the key holder's, handed out
    assert all(row["seconds"] > 0 for row in table.values())
    with pytest.raises(ValueError, match="at least 2 vectors"):
        cost_model.compare_methods(vectors[:1], counts[:1], flooded)
