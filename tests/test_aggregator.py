"""secure_ai.aggregator: one round run in process gives the aggregator exactly the weighted average, and the
owners' model binding refuses a round in which they were sent different models (issue 18 leak 1), with masks
and with CKKS."""
import numpy as np
import pytest
from secure_ai import aggregator, secagg
from secure_ai import encryption as he

OWNERS = ("joe", "jane", "jill")


def flooding(length: int, total: int) -> float:
    """8 standard deviations of the key holder's flooding noise on an average of ``total`` samples."""
    return 8 * he.flooding_sigma(he.ciphertexts_for(length), error_bound=3 * he.FRESH_ERROR_BOUND) / total


def train(name, message):
    """Each owner's update: the model it was sent, moved by an amount of its own, and its count."""
    k = OWNERS.index(name) + 1
    return np.asarray(message["vector"], dtype=np.float64) + k, 10 * k


def test_a_round_under_one_model_gives_the_weighted_average():
    same = {name: {"vector": np.zeros(50, np.float32), "seed": 1} for name in OWNERS}
    average, total = aggregator.masked_round(same, train)
    assert total == 60 and np.allclose(average, (10 * 1 + 20 * 2 + 30 * 3) / 60, atol=1e-9)
    average, total = aggregator.ckks_round(same, train)
    assert total == 60 and np.allclose(average, 140 / 60, atol=flooding(50, 60))


def test_different_models_to_different_owners_are_refused():
    sent = {name: {"vector": np.full(50, i, np.float32), "seed": 1} for i, name in enumerate(OWNERS)}
    with pytest.raises(secagg.Refused, match="that they trained the model"):
        aggregator.masked_round(sent, train)
    with pytest.raises(ValueError, match="trained different models"):
        aggregator.ckks_round(sent, train)
    recipe = {name: {"vector": np.zeros(50, np.float32), "seed": i} for i, name in enumerate(OWNERS)}
    with pytest.raises(secagg.Refused):   # the recipe is part of the model an owner confirms
        aggregator.masked_round(recipe, train)


def test_updates_handed_in_give_what_the_aggregator_would_get_without_the_binding():
    vectors = [np.full(20, v) for v in (1.0, 2.0, 4.0)]
    average, total = aggregator.masked_average(vectors, [1, 1, 2])
    assert total == 4 and np.allclose(average, 11 / 4, atol=1e-9)
    average, total = aggregator.ckks_average(vectors, [1, 1, 2])
    assert total == 4 and np.allclose(average, 11 / 4, atol=flooding(20, 4))
