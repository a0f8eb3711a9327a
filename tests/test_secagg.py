"""secure_ai.secagg: double-masked secure aggregation, played against a cheating aggregator.

Every test below that names an attack plays the aggregator (the data scientist): it controls every
``request`` dict, may call each owner-side function as often as it likes, and keeps what comes back.
"""
import hmac

import numpy as np
import pytest
from scipy import stats
from secure_ai import secagg
from secure_ai import secret_sharing as ss

OWNERS = ("jane", "jill", "joe")
RUN = "run-test"


def uniform_p_value(values) -> float:
    top = (np.asarray(values, dtype=np.uint64) >> np.uint64(56)).astype(np.int64)
    return stats.chisquare(np.bincount(top.ravel(), minlength=256)).pvalue


@pytest.fixture(scope="module")
def keys():
    return {name: ss.generate_keypair() for name in OWNERS}


@pytest.fixture(scope="module")
def roster(keys):
    return {name: public for name, (_, public) in keys.items()}


@pytest.fixture
def owners(keys, roster, tmp_path):
    """Each owner's (secret key, config asset), with a fresh ledger file per test."""
    return {name: (keys[name][0], secagg.make_config(RUN, name, roster, tmp_path / f"{name}.json").to_asset())
            for name in OWNERS}


@pytest.fixture(scope="module")
def updates():
    rng = np.random.default_rng(0)
    return {name: ss.encode(rng.normal(0, 0.1, 4000)) for name in OWNERS}


def call_owner(owners, updates):
    """The ``call`` of :func:`secagg.secure_round`, with the owner functions run directly (no syft)."""
    def call(name, function, request):
        secret_key, config = owners[name]
        if function == "train_and_mask":
            return secagg.owner_mask(updates[name], secret_key, config, request)
        if function == "confirm_survivors":
            return secagg.owner_confirm(secret_key, config, request)
        return secagg.owner_unmask(secret_key, config, request)
    return call


def mask_all(owners, updates, r, names=OWNERS):
    answers = {n: secagg.owner_mask(updates[n], *owners[n], {"round": r}) for n in names}
    return {n: secagg.unwrap(n, answer)["masked"] for n, answer in answers.items()}


def confirm_and_unmask(owners, r, survivors):
    announce = {"round": r, "survivors": sorted(survivors)}
    tags = {n: secagg.unwrap(n, secagg.owner_confirm(*owners[n], announce))["tags"] for n in survivors}
    return {n: secagg.unwrap(n, secagg.owner_unmask(*owners[n], announce | {
        "tags": {p: tags[p][n] for p in survivors if p != n}})) for n in survivors}


def refusal(answer) -> str:
    assert set(answer) == {"refused"}, answer
    return answer["refused"]


# --- honest path --------------------------------------------------------------------------------------
def test_honest_round_gives_the_exact_sum_and_each_vector_looks_random(owners, updates):
    log = []
    total = secagg.secure_round(call_owner(owners, updates), OWNERS, 0, {}, log=log)
    np.testing.assert_array_equal(total, sum(updates.values()))
    masked = [answer["masked"] for _, function, answer in log if function == "train_and_mask"]
    assert len(masked) == 3
    for vector in masked:
        assert uniform_p_value(vector) > 1e-6
    assert all(uniform_p_value(u) < 1e-6 for u in updates.values())  # the check has power


def test_round_with_a_dropout_gives_the_survivors_sum(owners, updates):
    total = secagg.secure_round(call_owner(owners, updates), OWNERS, 4, {}, survivors=["joe", "jane"])
    np.testing.assert_array_equal(total, updates["joe"] + updates["jane"])


def test_refusals_come_back_as_a_reason_and_unwrap_raises(owners, updates):
    answer = secagg.owner_mask(updates["joe"], *owners["joe"], {"round": -1})
    assert "non-negative integer" in refusal(answer)
    with pytest.raises(secagg.Refused, match="joe refused: .*non-negative integer"):
        secagg.unwrap("joe", answer)


# --- item 1: per-round secrets --------------------------------------------------------------------------
def test_recovery_does_not_unmask_the_dropped_owners_earlier_rounds(keys, roster, updates):
    """Single (pairwise) masks: jill's round-1 vector survives the survivors' round-2 recovery seeds."""
    earlier = ss.mask(updates["jill"], "jill", keys["jill"][0], roster, 1, RUN)
    revealed = {n: ss.recovery_seeds(n, keys[n][0], roster, ["jill"], ["jane", "joe"], 2, RUN)
                for n in ("jane", "joe")}
    attempt = earlier.copy()
    for survivor, seeds in revealed.items():   # the aggregator removes what it was given, as if for round 1
        pad = ss.expand_seed(seeds["jill"], attempt.size)
        attempt = attempt - pad if survivor > "jill" else attempt + pad
    assert np.mean(attempt == updates["jill"]) < 1e-3
    assert uniform_p_value(attempt) > 1e-6
    # and the revealed seeds are not the round-1 ones, nor the long-term pairwise secret
    round_1 = ss.round_seed(ss.shared_seed(keys["joe"][0], roster["jill"]), RUN, 1)
    assert revealed["joe"]["jill"] not in (round_1, ss.shared_seed(keys["joe"][0], roster["jill"]))
    # with round 2's seeds, round 2 (and only round 2) does unmask
    now = ss.mask(updates["jill"], "jill", keys["jill"][0], roster, 2, RUN)
    for survivor, seeds in revealed.items():
        pad = ss.expand_seed(seeds["jill"], now.size)
        now = now - pad if survivor > "jill" else now + pad
    np.testing.assert_array_equal(now, updates["jill"])


def test_double_masked_earlier_round_stays_masked_after_a_dropout(owners, updates):
    first = mask_all(owners, updates, 1)
    confirm_and_unmask(owners, 1, OWNERS)
    mask_all(owners, updates, 2, ["jane", "joe"])                   # jill drops in round 2
    revealed = confirm_and_unmask(owners, 2, ["jane", "joe"])
    attempt = first["jill"].copy()
    for survivor, answer in revealed.items():
        pad = ss.expand_seed(answer["pair_seeds"]["jill"], attempt.size)
        attempt = attempt - pad if survivor > "jill" else attempt + pad
    assert np.mean(attempt == updates["jill"]) < 1e-3 and uniform_p_value(attempt) > 1e-6


def test_round_seeds_differ_by_run_and_round(keys, roster):
    pair = ss.shared_seed(keys["joe"][0], roster["jane"])
    seeds = {ss.round_seed(pair, run, r) for run in ("a", "b") for r in (0, 1, 2)}
    assert len(seeds) == 6


# --- item 2: the owner checks what the aggregator sends --------------------------------------------------
def test_roster_with_a_duplicate_key_or_without_me_is_refused_at_setup(keys, roster, tmp_path):
    forged = dict(roster) | {"mallory": roster["jill"]}   # jill's real key listed under an invented name
    with pytest.raises(ValueError, match="several names"):
        secagg.make_config(RUN, "joe", forged, tmp_path / "l.json")
    with pytest.raises(ValueError, match="not in the roster"):
        secagg.make_config(RUN, "bob", roster, tmp_path / "l.json")
    with pytest.raises(ValueError, match="strict majority"):
        secagg.make_config(RUN, "joe", roster, tmp_path / "l.json", threshold=1)


def test_the_aggregator_cannot_supply_keys_or_names(owners, updates, keys, roster):
    """Keys in the request are ignored: the masks use the roster fixed owner-side."""
    mallory_secret, mallory_public = ss.generate_keypair()
    request = {"round": 0, "public_keys": {"joe": roster["joe"], "jane": mallory_public}, "me": "jane"}
    masked = secagg.unwrap("joe", secagg.owner_mask(updates["joe"], *owners["joe"], request))["masked"]
    # mallory's seed with joe does not remove joe's masks
    attempt = masked - ss.expand_seed(ss.round_seed(ss.shared_seed(mallory_secret, roster["joe"]), RUN, 0),
                                      masked.size)
    assert np.mean(attempt == updates["joe"]) < 1e-3


def test_invented_or_repeated_names_and_too_few_survivors_are_refused(owners, updates):
    mask_all(owners, updates, 0)
    for survivors, reason in [(["joe", "mallory"], "unknown owners"), (["joe", "joe", "jane"], "twice"),
                              (["joe"], "fewer than the threshold"), (["jane", "jill"], "not among"),
                              ("joe", "must be a list")]:
        assert reason in refusal(secagg.owner_confirm(*owners["joe"], {"round": 0, "survivors": survivors}))


def test_a_secret_key_that_is_not_the_rosters_is_refused(owners, updates, keys):
    _, config = owners["joe"]
    answer = secagg.owner_mask(updates["joe"], keys["jane"][0], config, {"round": 0})
    assert "does not match" in refusal(answer)


def test_a_replayed_round_is_refused(owners, updates):
    mask_all(owners, updates, 5)
    for r in (5, 3):
        assert "already masked" in refusal(secagg.owner_mask(updates["joe"], *owners["joe"], {"round": r}))


def test_the_ledger_survives_an_owner_restart(owners, updates, keys, roster, tmp_path):
    mask_all(owners, updates, 7)
    reloaded = secagg.make_config(RUN, "joe", roster, tmp_path / "joe.json").to_asset()  # a new process
    answer = secagg.owner_mask(updates["joe"], keys["joe"][0], reloaded, {"round": 7})
    assert "already masked" in refusal(answer)
    other_run = secagg.make_config("other-run", "joe", roster, tmp_path / "joe.json").to_asset()
    answer = secagg.owner_mask(updates["joe"], keys["joe"][0], other_run, {"round": 8})
    assert "belongs to run" in refusal(answer)


def test_each_owner_confirms_and_unmasks_once_per_round(owners, updates):
    mask_all(owners, updates, 0)
    announce = {"round": 0, "survivors": list(OWNERS)}
    assert "did not mask round 9" in refusal(secagg.owner_confirm(*owners["joe"], announce | {"round": 9}))
    answers = confirm_and_unmask(owners, 0, OWNERS)
    assert "already confirmed" in refusal(secagg.owner_confirm(*owners["joe"], announce))
    tags = {"jane": b"x", "jill": b"y"}
    assert "confirmation" in refusal(secagg.owner_unmask(*owners["joe"], announce | {"tags": tags}))
    assert answers["joe"]["pair_seeds"] == {}   # nobody dropped: no pairwise seed is revealed


def test_forged_confirmations_are_refused(owners, updates):
    mask_all(owners, updates, 0)
    announce = {"round": 0, "survivors": ["jane", "joe"]}
    secagg.unwrap("joe", secagg.owner_confirm(*owners["joe"], announce))
    forged = hmac.new(b"aggregator's own key", b"survivors", "sha256").digest()
    assert "no valid confirmation from jane" in refusal(
        secagg.owner_unmask(*owners["joe"], announce | {"tags": {"jane": forged}}))


# --- item 3: a late dropout claim ------------------------------------------------------------------------
def test_a_late_dropout_claim_does_not_unmask_the_owner(owners, updates):
    """jill's vector arrived; the aggregator still claims she dropped, and tries every way to get b_jill."""
    masked = mask_all(owners, updates, 0)
    revealed = confirm_and_unmask(owners, 0, ["jane", "joe"])     # joe and jane believe jill dropped
    # Everything the aggregator now knows about jill's vector: this round's seeds with joe and with jane
    attempt = masked["jill"].copy()
    for survivor, answer in revealed.items():
        pad = ss.expand_seed(answer["pair_seeds"]["jill"], attempt.size)
        attempt = attempt - pad if survivor > "jill" else attempt + pad
    assert np.mean(attempt == updates["jill"]) < 1e-3 and uniform_p_value(attempt) > 1e-6
    # jill reveals b_jill only with every other survivor's confirmation of the same set: none can be had
    for survivors in (["jane", "jill", "joe"], ["jill", "joe"], ["jane", "jill"]):
        announce = {"round": 0, "survivors": survivors}
        secagg.owner_confirm(*owners["jill"], announce)   # jill confirms (once); it does not help
        others = [n for n in survivors if n != "jill"]
        for other in others:                              # joe and jane already confirmed another set
            assert "already confirmed" in refusal(secagg.owner_confirm(*owners[other], announce))
        answer = secagg.owner_unmask(*owners["jill"], announce | {"tags": {n: b"\0" * 32 for n in others}})
        assert "no valid confirmation" in refusal(answer)
    # and the survivors' sum is exact: nothing else was needed
    total = secagg.unmask({n: masked[n] for n in ("jane", "joe")}, revealed, OWNERS)
    np.testing.assert_array_equal(total, updates["jane"] + updates["joe"])


def test_a_dropped_owner_never_reveals_its_self_mask(owners, updates):
    mask_all(owners, updates, 0)
    assert "not among the survivors" in refusal(
        secagg.owner_unmask(*owners["jill"], {"round": 0, "survivors": ["jane", "joe"], "tags": {}}))


# --- issue 14 item 9: what secure aggregation does not hide ----------------------------------------------
def test_sums_of_two_subsets_reveal_the_difference(owners, updates):
    """A limit, not a protection: the aggregator picks each round's model. If two rounds train from the same
    model (so each owner's update repeats), all-three minus joe-and-jane is jill's update, exactly."""
    call = call_owner(owners, updates)
    everyone = secagg.secure_round(call, OWNERS, 0, {})
    two = secagg.secure_round(call, OWNERS, 1, {}, survivors=["jane", "joe"])
    np.testing.assert_array_equal(everyone - two, updates["jill"])


# --- the mock path ---------------------------------------------------------------------------------------
def test_the_mock_config_has_no_ledger_and_its_own_key(keys, roster, tmp_path, updates):
    config = secagg.make_config(RUN, "joe", roster, tmp_path / "joe.json")
    mock_key, _ = ss.generate_keypair()
    mock = secagg.mock_config(config, mock_key)
    assert mock.ledger is None and mock.roster["joe"] != roster["joe"]
    for r in (3, 3):   # no ledger on the mock: syft may run it with any round
        assert "masked" in secagg.owner_mask(updates["joe"], mock_key, mock.to_asset(), {"round": r})
    assert not (tmp_path / "joe.json").exists()
    loaded = secagg.load_config(config.to_asset())
    assert loaded == config


# --- through syft: setup assets, the mock run, refusals that reach the data scientist --------------------
def mask_step(secret_key, config, weights):
    from secure_ai import secagg
    from secure_ai import secret_sharing as ss

    return secagg.owner_mask(ss.encode(weights["x"]), secret_key, config, weights)


def confirm_step(secret_key, config, weights):
    from secure_ai import secagg

    return secagg.owner_confirm(secret_key, config, weights)


def unmask_step(secret_key, config, weights):
    from secure_ai import secagg

    return secagg.owner_unmask(secret_key, config, weights)


def test_a_round_through_syft_datasites():
    from secure_ai.datasites import DataOwner

    names = ("sjane", "sjoe")
    keys = {name: ss.generate_keypair() for name in names}
    roster = {name: public for name, (_, public) in keys.items()}
    owners = {name: DataOwner(name) for name in names}
    try:
        clients = {}
        for name, owner in owners.items():
            config = secagg.make_config("syft-run", name, roster, secagg.ledger_path(owner, "syft-run"))
            secagg.setup_owner(owner, config, keys[name][0])
            owner.add_data_scientist("ds@example.org", "pw")
            clients[name] = owner.login("ds@example.org", "pw")
            for step in (mask_step, confirm_step, unmask_step):
                secagg.request_step(clients[name], step, rounds=2)
                owner.code_of(step.__name__)  # the owner reviews, then approves what it reviewed
                owner.approve(step.__name__)
        steps = dict(zip(("train_and_mask", "confirm_survivors", "reveal_masks"),
                         ("mask_step", "confirm_step", "unmask_step")))
        x = {"sjane": np.array([0.5, -1.0]), "sjoe": np.array([0.25, 3.0])}
        call = lambda name, function, request: secagg.call_step(clients[name], steps[function],
                                                                 request | {"x": x[name]})
        total = secagg.secure_round(call, names, 0, {})
        np.testing.assert_array_equal(ss.decode(total), [0.75, 2.0])
        assert secagg.ledger_path(owners["sjoe"], "syft-run").exists()     # in the owner's datasite folder
        with pytest.raises(secagg.Refused, match="sjoe refused: .*already masked"):
            secagg.unwrap("sjoe", call("sjoe", "train_and_mask", {"round": 0}))
    finally:
        for owner in owners.values():
            owner.shutdown()
    assert not secagg.ledger_path(owners["sjoe"], "syft-run").exists()
