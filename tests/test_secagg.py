"""secure_ai.secagg: double-masked secure aggregation, played against a cheating aggregator.

Every test below that names an attack plays the aggregator (the data scientist): it controls every
``request`` dict, may call each owner-side function as often as it likes, and keeps what comes back.
"""
import hmac

import numpy as np
import pytest
from scipy import stats
from secure_ai import aggregator, secagg
from secure_ai import encryption as he
from secure_ai import imprint as im
from secure_ai import secret_sharing as ss
from secure_ai import training as tr

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
    """The ``call`` of :func:`aggregator.secure_round`, with the owner functions run directly (no syft)."""
    def call(name, function, request):
        secret_key, config = owners[name]
        if function == "train_and_mask":
            return secagg.owner_mask(made(updates[name]), secret_key, config, request)
        if function == "confirm_survivors":
            return secagg.owner_confirm(secret_key, config, request)
        return secagg.owner_unmask(secret_key, config, request)
    return call


def made(update):
    """A ``train`` for owner_mask that returns an update made before (every owner gets the same message)."""
    return lambda message: update


def mask_all(owners, updates, r, names=OWNERS):
    answers = {n: secagg.owner_mask(made(updates[n]), *owners[n], {"round": r}) for n in names}
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
    total = aggregator.secure_round(call_owner(owners, updates), OWNERS, 0, {}, log=log)
    np.testing.assert_array_equal(total, sum(updates.values()))
    masked = [answer["masked"] for _, function, answer in log if function == "train_and_mask"]
    assert len(masked) == 3
    for vector in masked:
        assert uniform_p_value(vector) > 1e-6
    assert all(uniform_p_value(u) < 1e-6 for u in updates.values())  # the check has power


def test_round_with_a_dropout_gives_the_survivors_sum(owners, updates):
    total = aggregator.secure_round(call_owner(owners, updates), OWNERS, 4, {}, survivors=["joe", "jane"])
    np.testing.assert_array_equal(total, updates["joe"] + updates["jane"])


def test_refusals_come_back_as_a_reason_and_unwrap_raises(owners, updates):
    answer = secagg.owner_mask(made(updates["joe"]), *owners["joe"], {"round": -1})
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
    masked = secagg.unwrap("joe", secagg.owner_mask(made(updates["joe"]), *owners["joe"], request))["masked"]
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
    answer = secagg.owner_mask(made(updates["joe"]), keys["jane"][0], config, {"round": 0})
    assert "does not match" in refusal(answer)


def test_a_replayed_round_is_refused(owners, updates):
    mask_all(owners, updates, 5)
    for r in (5, 3):
        answer = secagg.owner_mask(made(updates["joe"]), *owners["joe"], {"round": r})
        assert "already masked" in refusal(answer)


def test_the_ledger_survives_an_owner_restart(owners, updates, keys, roster, tmp_path):
    mask_all(owners, updates, 7)
    reloaded = secagg.make_config(RUN, "joe", roster, tmp_path / "joe.json").to_asset()  # a new process
    answer = secagg.owner_mask(made(updates["joe"]), keys["joe"][0], reloaded, {"round": 7})
    assert "already masked" in refusal(answer)
    other_run = secagg.make_config("other-run", "joe", roster, tmp_path / "joe.json").to_asset()
    answer = secagg.owner_mask(made(updates["joe"]), keys["joe"][0], other_run, {"round": 8})
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
    total = aggregator.unmask({n: masked[n] for n in ("jane", "joe")}, revealed, OWNERS)
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
    everyone = aggregator.secure_round(call, OWNERS, 0, {})
    two = aggregator.secure_round(call, OWNERS, 1, {}, survivors=["jane", "joe"])
    np.testing.assert_array_equal(everyone - two, updates["jill"])


# --- issue 18: what the owners' checks are for, each played by the aggregator ---------------------------
def test_an_owner_unmasks_only_a_set_it_confirmed_itself(owners, updates):
    """Without jill's and joe's own-confirmation check, these two answers give jill's update away: jill
    reveals b_jill and her seed with jane ({jill, joe}: joe confirmed it), joe his seed with jill ({jane,
    joe}: jane confirmed it). Each owner unmasks only the survivor set it confirmed itself."""
    masked = mask_all(owners, updates, 0)
    tags = {"joe": secagg.unwrap("joe", secagg.owner_confirm(*owners["joe"], {"round": 0,
                                                                           "survivors": ["jill", "joe"]})),
            "jane": secagg.unwrap("jane", secagg.owner_confirm(*owners["jane"], {"round": 0,
                                                                              "survivors": ["jane", "joe"]}))}
    jill = secagg.owner_unmask(*owners["jill"], {"round": 0, "survivors": ["jill", "joe"],
                                                 "tags": {"joe": tags["joe"]["tags"]["jill"]}})
    joe = secagg.owner_unmask(*owners["joe"], {"round": 0, "survivors": ["jane", "joe"],
                                               "tags": {"jane": tags["jane"]["tags"]["joe"]}})
    assert "jill confirmed None" in refusal(jill)
    assert "joe confirmed [0, ['jill', 'joe']]" in refusal(joe)
    assert np.mean(masked["jill"] == updates["jill"]) < 1e-3


def test_no_two_owners_unmask_different_survivor_sets_in_one_round(owners, updates):
    """Each tag covers its survivor set: joe's confirmation of all three is no confirmation of {jane, joe}."""
    mask_all(owners, updates, 0)
    everyone, two = {"round": 0, "survivors": list(OWNERS)}, {"round": 0, "survivors": ["jane", "joe"]}
    tags = {"joe": secagg.owner_confirm(*owners["joe"], everyone)["tags"],
            "jill": secagg.owner_confirm(*owners["jill"], everyone)["tags"],
            "jane": secagg.owner_confirm(*owners["jane"], two)["tags"]}
    answers = {("jane", "jane joe"): secagg.owner_unmask(*owners["jane"], two | {"tags": {
                   "joe": tags["joe"]["jane"]}}),
               ("joe", "all"): secagg.owner_unmask(*owners["joe"], everyone | {"tags": {
                   "jane": tags["jane"]["joe"], "jill": tags["jill"]["joe"]}})}
    unmasked = {survivors for (_, survivors), answer in answers.items() if "refused" not in answer}
    assert len(unmasked) <= 1, unmasked
    assert all("no valid confirmation" in refusal(answer) for answer in answers.values())


def test_an_owner_dropping_after_it_confirmed_stalls_the_round(owners, updates):
    """What we simplified from Bonawitz et al. (no Shamir sharing): jill confirms, then never answers the
    unmasking request. Nobody can remove her self mask: the round stalls, and a new round is needed."""
    masked = mask_all(owners, updates, 0)
    announce = {"round": 0, "survivors": list(OWNERS)}
    tags = {n: secagg.unwrap(n, secagg.owner_confirm(*owners[n], announce))["tags"] for n in OWNERS}
    answers = {n: secagg.unwrap(n, secagg.owner_unmask(*owners[n], announce | {
        "tags": {p: tags[p][n] for p in OWNERS if p != n}})) for n in ("jane", "joe")}
    with pytest.raises(ValueError, match="every survivor must answer"):
        aggregator.unmask(masked, answers, OWNERS)
    partial = masked["jane"] + masked["jill"] + masked["joe"]   # the pairwise masks cancel in the sum...
    for answer in answers.values():
        partial -= ss.expand_seed(answer["self_seed"], partial.size)
    exact = updates["jane"] + updates["jill"] + updates["joe"]   # ...jill's self mask does not
    assert np.mean(partial == exact) < 1e-3 and uniform_p_value(partial) > 1e-6
    assert "already confirmed" in refusal(secagg.owner_confirm(*owners["joe"], announce | {
        "survivors": ["jane", "joe"]}))                       # nor can the survivors change their minds
    total = aggregator.secure_round(call_owner(owners, updates), OWNERS, 1, {}, survivors=["jane", "joe"])
    np.testing.assert_array_equal(total, updates["jane"] + updates["joe"])   # a new round, new masks


def test_owner_mask_trains_from_the_very_request_it_digests(owners, updates, tmp_path):
    seen = []
    request = {"round": 0, "model": np.arange(3.0), "seed": 1}
    secagg.unwrap("joe", secagg.owner_mask(lambda message: seen.append(message) or updates["joe"],
                                           *owners["joe"], request))
    assert seen[0] is not request and set(seen[0]) == set(request) and seen[0]["seed"] == 1
    assert np.array_equal(seen[0]["model"], request["model"])          # a copy of the request itself
    ledger = secagg.Ledger(tmp_path / "joe.json", RUN).read()
    assert ledger["model"] == [0, tr.message_digest(request)]
    answer = secagg.owner_mask(updates["joe"], *owners["joe"], request | {"round": 1})   # not a train()
    assert "trains from the request itself" in refusal(answer)


def test_the_message_digest_covers_model_recipe_and_round():
    model = {"w": np.zeros((2, 3), np.float32), "b": np.ones(3, np.float32)}
    message = {"model": model, "seed": 3, "round": 2, "context": b"ctx"}
    same = {"round": 2, "seed": 3, "context": b"ctx", "model": {k: v.copy() for k, v in model.items()}}
    assert tr.message_digest(message) == tr.message_digest(same)
    changed = [message | {"seed": 4}, message | {"round": 3}, message | {"lr": 0.1},
               message | {"model": model | {"b": np.ones(3, np.float64)}},   # same values, another dtype
               message | {"model": model | {"b": model["b"].view(np.int32)}},  # same bytes, another dtype
               message | {"model": model | {"w": np.zeros((3, 2), np.float32)}},
               message | {"model": model | {"b": np.array([1, 1, 1.5], np.float32)}}]
    assert len({tr.message_digest(m) for m in changed} | {tr.message_digest(message)}) == len(changed) + 1
    with pytest.raises(TypeError, match="cannot hold a object"):
        tr.message_digest({"model": object()})


HIDDEN = 100   # Part 4's MLP: 79,510 weights


@pytest.fixture(scope="module")
def digits(mnist):
    """Each owner's 300 raw training digits."""
    from secure_ai.data import mnist_raw

    images, labels = mnist_raw(train=True)
    order = np.random.default_rng(0).permutation(len(labels))
    return {name: (images[order[i * 300:(i + 1) * 300]], labels[order[i * 300:(i + 1) * 300]])
            for i, name in enumerate(OWNERS)}


@pytest.fixture(scope="module")
def sent():
    """Issue 18 leak 1: what a cheating aggregator sends in one round. joe gets the real model (with one
    dead unit that counts his digits), jane and jill the all-zero model, whose update it knows."""
    import torch

    torch.manual_seed(0)
    real = tr.model_to_vector(tr.MLP(hidden=HIDDEN)).numpy()
    return dict(zip(OWNERS, im.inconsistent_models(real, 3, target=OWNERS.index("joe"), hidden=HIDDEN)))


def local_epoch(message, digits):
    """Part 2's approved training, from the model of the message an owner was sent."""
    return im.local_epoch(message["model"], *digits, lr=0.1, batch_size=32, hidden=HIDDEN)


def test_different_models_in_one_round_are_never_unmasked(owners, digits, sent):
    """Every owner confirms the model it trained; each refuses to unmask when another trained another."""
    messages = {n: {"model": sent[n], "seed": 0, "round": 0} for n in OWNERS}
    for n in OWNERS:
        train = lambda message, n=n: ss.encode_weighted(local_epoch(message, digits[n]), len(digits[n][1]))
        secagg.unwrap(n, secagg.owner_mask(train, *owners[n], messages[n]))
    announce = {"round": 0, "survivors": list(OWNERS)}      # no dropout claim: all three survive
    tags = {n: secagg.unwrap(n, secagg.owner_confirm(*owners[n], announce))["tags"] for n in OWNERS}
    for n in OWNERS:
        mine = {p: tags[p][n] for p in OWNERS if p != n}
        answer = secagg.owner_unmask(*owners[n], announce | {"tags": mine})
        assert f"and that they trained the model {n} trained" in refusal(answer)
    # What the binding prevents: the same round's sum, unmasked, gives joe's exact count and weights
    afters = {n: local_epoch(messages[n], digits[n]) for n in OWNERS}
    count, weights = im.recover_target(*aggregator.masked_average(list(afters.values()), [300] * 3),
                                       hidden=HIDDEN)
    assert count == 300 and np.abs(weights[:-10] - afters["joe"][:-10]).max() < 1e-8


def test_different_models_in_one_round_are_not_decrypted(digits, sent, tmp_path):
    holder = he.KeyHolder(RUN, OWNERS, length=im.mlp_size(HIDDEN), max_rounds=1)
    roster = {name: ss.generate_keypair()[1] for name in OWNERS}
    submitted = {}
    for n in OWNERS:
        config = secagg.make_config(RUN, n, roster, tmp_path / f"{n}.json",
                                    ckks_public_context=holder.public_context_bytes,
                                    ckks_mac_key=holder.mac_key(n)).to_asset()
        train = lambda message, n=n: (local_epoch(message, digits[n]), len(digits[n][1]))
        message = {"model": sent[n], "seed": 0, "round": 0, "context": holder.public_context_bytes}
        submitted[n] = secagg.unwrap(n, secagg.owner_encrypt(train, config, message))
    with pytest.raises(ValueError, match="trained different models"):
        holder.decrypt_average(0, submitted)
    relabelled = {n: submitted[n] | {"model": submitted["joe"]["model"]} for n in OWNERS}
    with pytest.raises(ValueError, match="jane's for round 0 fails its MAC"):
        holder.decrypt_average(0, relabelled)
    assert holder.rounds_decrypted == 0
    # What the binding prevents: joe's count and weights, to within the flooding noise
    afters = [local_epoch({"model": sent[n]}, digits[n]) for n in OWNERS]
    average, n_total = aggregator.ckks_average(afters, [300] * 3)
    sigma = he.flooding_sigma(he.ciphertexts_for(im.mlp_size(HIDDEN)), error_bound=3 * he.FRESH_ERROR_BOUND)
    count, weights = im.recover_target(average, n_total, hidden=HIDDEN)
    assert abs(count - 300) <= 5 * sigma
    error = np.abs(weights[:-10] * count / 300 - afters[2][:-10]).max()
    assert error < 8 * sigma / 300, error


# --- the mock path ---------------------------------------------------------------------------------------
def test_the_mock_config_has_no_ledger_and_its_own_key(keys, roster, tmp_path, updates):
    config = secagg.make_config(RUN, "joe", roster, tmp_path / "joe.json")
    mock_key, _ = ss.generate_keypair()
    mock = secagg.mock_config(config, mock_key)
    assert mock.ledger is None and mock.roster["joe"] != roster["joe"]
    for r in (3, 3):   # no ledger on the mock: syft may run it with any round
        assert "masked" in secagg.owner_mask(made(updates["joe"]), mock_key, mock.to_asset(), {"round": r})
    assert not (tmp_path / "joe.json").exists()
    loaded = secagg.load_config(config.to_asset())
    assert loaded == config


# --- through syft: setup assets, the mock run, refusals that reach the data scientist --------------------
def mask_step(secret_key, config, weights):
    from secure_ai import secagg
    from secure_ai import secret_sharing as ss

    me = secagg.load_config(config).me   # each owner's own toy update: the message's x times len(its name)
    return secagg.owner_mask(lambda message: ss.encode(message["x"] * len(me)), secret_key, config, weights)


def confirm_step(secret_key, config, weights):
    from secure_ai import secagg

    return secagg.owner_confirm(secret_key, config, weights)


def unmask_step(secret_key, config, weights):
    from secure_ai import secagg

    return secagg.owner_unmask(secret_key, config, weights)


@pytest.fixture(scope="module")
def datasites():
    """Two owners (sjane, sjoe) with their secure-aggregation assets, and the data scientist's clients."""
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
        yield owners, clients
    finally:
        for owner in owners.values():
            owner.shutdown()
        assert not secagg.ledger_path(owners["sjoe"], "syft-run").exists()


def test_a_round_through_syft_datasites(datasites):
    owners, clients = datasites
    for name, owner in owners.items():
        for step in (mask_step, confirm_step, unmask_step):
            secagg.request_step(clients[name], step, rounds=2)
            secagg.approve_step(owner, owner.code_of(step.__name__))  # reviewed, and its inputs pinned
    steps = dict(zip(("train_and_mask", "confirm_survivors", "reveal_masks"),
                     ("mask_step", "confirm_step", "unmask_step")))
    call = lambda name, function, request: secagg.call_step(clients[name], steps[function],
                                                             request | {"x": np.array([0.5, -1.0])})
    total = aggregator.secure_round(call, list(owners), 0, {})
    np.testing.assert_array_equal(ss.decode(total), [4.5, -9.0])   # 0.5 * (5 + 4), -1 * (5 + 4)
    assert secagg.ledger_path(owners["sjoe"], "syft-run").exists()     # in the owner's datasite folder
    with pytest.raises(secagg.Refused, match="sjoe refused: .*already masked"):
        secagg.unwrap("sjoe", call("sjoe", "train_and_mask", {"round": 0}))


def reveal_with_my_config(secret_key, config, weights):
    from secure_ai import secagg

    return secagg.owner_unmask(secret_key, config, weights)


def reveal_with_my_key(secret_key, config, weights):
    from secure_ai import secagg

    return secagg.owner_unmask(secret_key, config, weights)


def encrypt_step(config, weights):
    from secure_ai import secagg

    return secagg.owner_encrypt(lambda message: (message["x"], 1), config, weights)


def test_a_request_with_its_own_config_is_refused_at_approval(datasites):
    """DP review 4.6: the data scientist binds ``config`` to a dict of its own (its roster, no ledger)."""
    from secure_ai import remote

    owners, clients = datasites
    sjoe, client = owners["sjoe"], clients["sjoe"]
    remote.request(client, encrypt_step, 1, {"config": secagg.assets(client)["config"]})
    secagg.approve_step(sjoe, sjoe.code_of("encrypt_step"))   # a step without a key: its config is pinned
    own = {"secret_key": secagg.assets(client)["secret_key"], "config": dict}
    remote.request(client, reveal_with_my_config, 1, own)
    review = sjoe.code_of("reveal_with_my_config")
    assert "config = any dict" in review.splitlines()[1]              # what the owner was shown
    with pytest.raises(secagg.Refused, match="config is bound to any dict of the data scientist's"):
        secagg.approve_step(sjoe, review)
    assert "reveal_with_my_config" not in [c.service_func_name for r in sjoe.pending_requests()
                                           for c in [r.code]]
    with pytest.raises(remote.RemoteError):                               # denied: it never runs
        remote.run(client, "reveal_with_my_config", {"round": 0}, {"secret_key": own["secret_key"],
                                                                   "config": {"ledger": None}})
    key_of_mine = {"secret_key": dict, "config": secagg.assets(client)["config"]}
    remote.request(client, reveal_with_my_key, 1, key_of_mine)
    with pytest.raises(secagg.Refused, match="secret_key is bound to any dict"):
        secagg.approve_step(sjoe, sjoe.code_of("reveal_with_my_key"))    # a key of the data scientist's
