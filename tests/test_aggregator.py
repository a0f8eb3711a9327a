"""secure_ai.aggregator's in-process owners and what-if key holder: the tools Appendix A measures with.

Each tool is checked against what it stands for: the owners' own configs refuse what the real owners refuse,
a config with a check left out lets the attack through, and repeated flooded decryptions average the
noise down as sqrt(times).
"""
import os

import numpy as np
import pytest
from secure_ai import aggregator, secagg
from secure_ai import encryption as he
from secure_ai import secret_sharing as ss

OWNERS = ("jane", "jill", "joe")


@pytest.fixture(scope="module")
def updates():
    rng = np.random.default_rng(0)
    return {name: ss.encode(rng.normal(0, 0.1, 3000)) for name in OWNERS}


def test_in_process_owners_run_a_round_and_keep_their_ledgers(updates):
    with aggregator.InProcessOwners(OWNERS, "run-a") as owners:
        trained = []
        trains = {n: (lambda message, n=n: trained.append(message["seed"]) or updates[n]) for n in OWNERS}
        total = aggregator.secure_round(owners.call(trains), OWNERS, 0, {"seed": 7})
        np.testing.assert_array_equal(total, sum(updates.values()))
        assert trained == [7, 7, 7]                          # each owner trained from the request
        replay = owners.call(updates)("joe", "train_and_mask", {"round": 0})
        assert "already masked" in replay["refused"]         # the same ledger, call after call
        again = owners.call(updates, {"joe": owners.config("joe", ledger=False)})("joe", "train_and_mask",
                                                                                   {"round": 0})
        assert "masked" in again                             # no ledger: round 0 is new to it
        apart = owners.call(updates, {"joe": owners.config("joe", ledger="apart")})
        assert "masked" in apart("joe", "train_and_mask", {"round": 0})         # a fresh ledger apart...
        assert "already masked" in apart("joe", "train_and_mask", {"round": 0})["refused"]   # ...kept
        ledger = secagg.load_config(owners.config("joe")).ledger
        assert os.path.exists(ledger)
    assert not os.path.exists(os.path.dirname(ledger))       # close() deleted the ledgers
    with pytest.raises(ValueError, match="no owner step"):
        owners.call(updates)("joe", "steal", {})
    with pytest.raises(ValueError, match="2 distinct"):
        aggregator.InProcessOwners(["joe", "joe"])


def sybil_round(owners, target, target_config, updates, r):
    """The aggregator plays every owner but ``target``, with its own keys and zero updates."""
    mallory = {n: ss.generate_keypair() for n in OWNERS if n != target}
    forged = owners.roster | {n: public for n, (_, public) in mallory.items()}
    configs = {n: owners.config(n, roster=forged, ledger="sybil") for n in mallory} | {target: target_config}
    keys = {n: secret for n, (secret, _) in mallory.items()}
    zeros = {n: np.zeros_like(updates[n]) for n in mallory} | {target: updates[target]}
    return aggregator.secure_round(owners.call(zeros, configs, keys), OWNERS, r, {})


def test_the_owners_own_config_refuses_sybils_and_a_roster_of_the_aggregators_does_not(updates):
    with aggregator.InProcessOwners(OWNERS, "run-b") as owners:
        with pytest.raises(secagg.Refused, match="jane refused: .*no valid confirmation"):
            sybil_round(owners, "jane", owners.config("jane"), updates, 0)
        forged = owners.roster | {n: ss.generate_keypair()[1] for n in ("jill", "joe")}
        naive = owners.config("jane", roster=forged, ledger="naive")
        with pytest.raises(secagg.Refused):                   # another roster than the sybils' own
            sybil_round(owners, "jane", naive, updates, 1)
        with pytest.raises(ValueError, match="ledger must be"):
            owners.config("jane", ledger="../elsewhere")


def test_a_config_with_the_aggregators_roster_gives_the_target_update_away(updates):
    with aggregator.InProcessOwners(OWNERS, "run-c") as owners:
        mallory = {n: ss.generate_keypair() for n in ("jill", "joe")}
        forged = owners.roster | {n: public for n, (_, public) in mallory.items()}
        configs = {n: owners.config(n, roster=forged, ledger="what_if") for n in OWNERS}
        keys = {n: secret for n, (secret, _) in mallory.items()}
        zeros = {n: np.zeros_like(updates[n]) for n in mallory} | {"jane": updates["jane"]}
        leaked = aggregator.secure_round(owners.call(zeros, configs, keys), OWNERS, 0, {})
        np.testing.assert_array_equal(leaked, updates["jane"])


def test_configs_carry_the_key_holders_context_and_mac_key(tmp_path):
    holder = he.KeyHolder("run-d", OWNERS, length=10, max_rounds=1)
    with aggregator.InProcessOwners(OWNERS, "run-d", key_holder=holder) as owners:
        config = secagg.load_config(owners.config("joe"))
        assert config.ckks_mac_key == holder.mac_key("joe") and config.roster == owners.roster
        request = {"round": 0, "context": holder.public_context_bytes}
        sent = {n: secagg.unwrap(n, owners.encrypt(n, (np.full(10, 0.5), 4), request)) for n in OWNERS}
        average, n_total = holder.decrypt_average(0, sent)
        assert n_total == 12 and np.abs(average - 0.5).max() < 8 * holder.flood_sigma / 12
        assert "already encrypted" in owners.encrypt("joe", (np.zeros(10), 4), request)["refused"]
        assert "tag" in owners.encrypt("joe", (np.zeros(10), 4), request,
                                       config=owners.config("joe", ledger=False))


def test_flooded_decryptions_average_the_noise_down():
    """Asked again and again, a key holder without its round check would let the noise average out."""
    holder = he.KeyHolder("run-e", OWNERS, length=6000, max_rounds=1)
    with aggregator.InProcessOwners(OWNERS, "run-e", key_holder=holder) as owners:
        request = {"round": 0, "context": holder.public_context_bytes}
        sent = {n: secagg.unwrap(n, owners.encrypt(n, (np.full(6000, 0.25), 2), request)) for n in OWNERS}
    rows = aggregator.flooded_decryptions(holder, sent, times=16)
    exact = np.append(np.full(6000, 1.5), 6 * he.COUNT_SCALE)     # sum of n * w, and of n * COUNT_SCALE
    sigma = holder.flood_sigma
    assert rows.shape == (16, 6001)
    assert 0.95 * sigma < (rows[0] - exact).std() < 1.05 * sigma   # each one flooded as the key holder does
    assert 0.95 * sigma / 4 < (rows.mean(0) - exact).std() < 1.05 * sigma / 4
    assert holder.rounds_decrypted == 0                          # the real key holder was not asked
    with pytest.raises(ValueError, match="positive integer"):
        aggregator.flooded_decryptions(holder, sent, times=0)
