"""secure_ai.secret_sharing: fixed point, additive shares, per-round pairwise masks and dropout recovery.

The full protocol (self masks, owner-side checks, cheating aggregator) is tested in test_secagg.py.
"""
import numpy as np
import pytest
import torch
from scipy import stats
from secure_ai import secret_sharing as ss
from secure_ai.training import fedavg

OWNERS = ("jane", "jill", "joe")


def top_bytes(values: np.ndarray) -> np.ndarray:
    return (np.asarray(values, dtype=np.uint64) >> np.uint64(56)).astype(np.int64)


def uniform_p_value(values: np.ndarray) -> float:
    """Chi-square goodness of fit of the values' top byte against the uniform distribution on 256 bins."""
    counts = np.bincount(top_bytes(values).ravel(), minlength=256)
    return stats.chisquare(counts).pvalue


@pytest.fixture(scope="module")
def keys():
    return {name: ss.generate_keypair() for name in OWNERS}


@pytest.fixture(scope="module")
def public_keys(keys):
    return {name: public for name, (_, public) in keys.items()}


# --- fixed point ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction_bits", [0, 16, 24, 40])
def test_encode_decode_round_trip_over_ranges(fraction_bits):
    rng = np.random.default_rng(fraction_bits)
    limit = ss.max_magnitude(fraction_bits)
    values = np.concatenate([
        rng.uniform(-1, 1, 1000),
        rng.uniform(-1e4, 1e4, 1000),
        rng.uniform(-limit / 2, limit / 2, 1000),
        [0.0, -0.0, 1.0, -1.0, 2.0**-fraction_bits, -(2.0**-fraction_bits)],
        [limit * (1 - 2**-20), -limit * (1 - 2**-20)],  # just inside the ring's signed range
    ])
    encoded = ss.encode(values, fraction_bits)
    assert encoded.dtype == np.uint64 and encoded.shape == values.shape
    decoded = ss.decode(encoded, fraction_bits)
    resolution = 2.0**-fraction_bits
    tolerance = np.maximum(resolution / 2, np.abs(values) * 2.0**-52)  # fixed-point step, or float64's own
    assert (np.abs(decoded - values) <= tolerance).all()
    assert ss.decode(ss.encode(-3.0, fraction_bits), fraction_bits) == -3.0  # negatives wrap and come back


def test_negative_numbers_use_the_upper_half_of_the_ring():
    assert ss.encode(-1.0, 0) == np.uint64(2**64 - 1)
    assert ss.encode(1.0, 0) == np.uint64(1)


def test_adding_in_the_ring_adds_the_floats():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 100, 5000), rng.normal(0, 100, 5000)
    total = ss.encode(a) + ss.encode(b)  # wraps modulo 2**64
    assert np.abs(ss.decode(total) - (a + b)).max() <= 2.0**-ss.FRACTION_BITS


def test_torch_tensors_and_shapes_are_accepted():
    x = torch.linspace(-3, 3, 12).reshape(3, 4)
    np.testing.assert_allclose(ss.decode(ss.encode(x)), x.numpy(), atol=1e-7)


@pytest.mark.parametrize("bad", [ss.max_magnitude(), -ss.max_magnitude(), 1e30, np.nan, np.inf, -np.inf])
def test_overflow_and_non_finite_values_raise(bad):
    with pytest.raises(ValueError, match="overflows the 64-bit ring|NaN or infinite"):
        ss.encode(np.array([0.0, bad]))


def test_overflow_message_names_the_limit():
    with pytest.raises(ValueError, match="below 5.498e\\+11"):
        ss.encode(1e12)


def test_decode_and_share_need_ring_elements():
    with pytest.raises(ValueError, match="encode\\(\\) floats first"):
        ss.decode(np.array([1.5]))
    with pytest.raises(ValueError, match="encode\\(\\) floats first"):
        ss.share(np.array([1.5]), 3)
    with pytest.raises(ValueError, match="fraction_bits"):
        ss.encode([1.0], fraction_bits=60)


# --- additive shares ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_parties", [2, 3, 5])
@pytest.mark.parametrize("shape", [(), (7,), (3, 4)])
def test_reconstruction_is_exact(n_parties, shape):
    secret = ss.encode(np.random.default_rng(0).normal(0, 10, shape))
    shares = ss.share(secret, n_parties)
    assert [s.party for s in shares] == list(range(n_parties))
    assert all(s.values.shape == secret.shape and s.values.dtype == np.uint64 for s in shares)
    np.testing.assert_array_equal(ss.reconstruct(shares), secret)
    np.testing.assert_array_equal(ss.reconstruct(shares[::-1]), secret)  # order does not matter


def test_adding_shares_then_reconstructing_adds_the_secrets():
    rng = np.random.default_rng(2)
    secrets = [rng.normal(0, 1, 100) for _ in range(3)]
    shared = [ss.share(ss.encode(s), 4, rng) for s in secrets]
    sums = [ss.add_shares([owner[party] for owner in shared]) for party in range(4)]
    exact = ss.encode(secrets[0]) + ss.encode(secrets[1]) + ss.encode(secrets[2])
    np.testing.assert_array_equal(ss.reconstruct(sums), exact)
    assert np.abs(ss.decode(ss.reconstruct(sums)) - sum(secrets)).max() <= 2e-7


def test_each_share_of_a_fixed_secret_is_uniform():
    """200 sharings of one fixed secret: every party's share is indistinguishable from uniform noise."""
    rng = np.random.default_rng(3)
    secret = ss.encode(np.full(1000, 0.5))  # one value repeated: any leak would pile up in one bin
    sharings = [ss.share(secret, 3, rng) for _ in range(200)]
    for party in range(3):
        values = np.concatenate([s[party].values for s in sharings])
        assert uniform_p_value(values) > 1e-3, f"party {party}'s share is not uniform"
        low_bytes = (values & np.uint64(255)).astype(np.int64)
        assert stats.chisquare(np.bincount(low_bytes, minlength=256)).pvalue > 1e-3


def test_the_uniformity_check_has_power():
    """The same chi-square test rejects values that are only slightly non-uniform."""
    rng = np.random.default_rng(4)
    leaky = rng.integers(0, 2**64, 200_000, dtype=np.uint64)
    leaky[:20_000] = ss.encode(np.full(20_000, 0.5))  # 10% of values are the plain secret
    assert uniform_p_value(leaky) < 1e-6


def test_shares_of_different_secrets_look_the_same():
    """Two-sample chi-square: share bytes of secret A and of secret B come from the same distribution."""
    rng = np.random.default_rng(5)
    a, b = ss.encode(np.zeros(50_000)), ss.encode(np.full(50_000, -1234.5))
    counts = [np.bincount(top_bytes(ss.share(s, 2, rng)[1].values), minlength=256) for s in (a, b)]
    assert stats.chi2_contingency(np.array(counts)).pvalue > 1e-3


def test_os_random_shares_are_uniform_too():
    # No seed: os.urandom. False alarm rate of this check is 1e-6.
    values = ss.share(ss.encode(np.full(100_000, 3.0)), 2)[0].values
    assert uniform_p_value(values) > 1e-6


def test_wrong_share_counts_and_shapes_raise():
    secret = ss.encode(np.arange(6.0))
    shares = ss.share(secret, 3)
    with pytest.raises(ValueError, match="one share from each of the 3 parties"):
        ss.reconstruct(shares[:2])
    with pytest.raises(ValueError, match="one share from each of the 3 parties"):
        ss.reconstruct([shares[0], shares[0], shares[2]])
    with pytest.raises(ValueError, match="got none"):
        ss.reconstruct([])
    other = ss.share(ss.encode(np.arange(4.0)), 3)
    with pytest.raises(ValueError, match="different shapes"):
        ss.reconstruct([shares[0], shares[1], other[2]])
    with pytest.raises(ValueError, match="different shapes"):
        ss.add_shares([shares[0], other[0]])
    with pytest.raises(ValueError, match="same party"):
        ss.add_shares([shares[0], shares[1]])
    with pytest.raises(ValueError, match="at least one share"):
        ss.add_shares([])
    for n in (1, 0, 2.5):
        with pytest.raises(ValueError, match="at least 2 parties"):
            ss.share(secret, n)


# --- pairwise masks -------------------------------------------------------------------------------------
def test_pairwise_seeds_agree(keys):
    (sk_a, pk_a), (sk_b, pk_b) = keys["joe"], keys["jane"]
    assert ss.shared_seed(sk_a, pk_b) == ss.shared_seed(sk_b, pk_a)
    assert ss.shared_seed(sk_a, pk_b) != ss.shared_seed(sk_a, keys["jill"][1])
    assert ss.public_key_of(sk_a) == pk_a


def test_masks_cancel_in_the_sum_and_hide_each_update(keys, public_keys):
    rng = np.random.default_rng(6)
    updates = {name: ss.encode(rng.normal(0, 0.1, 20_000)) for name in OWNERS}
    masked = {name: ss.mask(updates[name], name, keys[name][0], public_keys, 1) for name in OWNERS}
    np.testing.assert_array_equal(ss.unmask_sum(masked, OWNERS), sum(updates.values()))
    for name in OWNERS:
        assert uniform_p_value(masked[name]) > 1e-6  # the plain update is far from uniform:
        assert uniform_p_value(updates[name]) < 1e-6
        assert np.mean(masked[name] == updates[name]) < 0.001


def test_masks_are_fresh_every_round(keys, public_keys):
    zero = ss.encode(np.zeros(1000))
    first, second = (ss.mask(zero, "joe", keys["joe"][0], public_keys, r) for r in (0, 1))
    assert np.mean(first == second) < 0.001
    other_run = ss.mask(zero, "joe", keys["joe"][0], public_keys, 0, run_id="another-run")
    assert np.mean(first == other_run) < 0.001


def test_dropped_owner_is_recovered_from_the_survivors_seeds(keys, public_keys):
    rng = np.random.default_rng(7)
    updates = {name: ss.encode(rng.normal(0, 0.1, 5000)) for name in OWNERS}
    masked = {name: ss.mask(updates[name], name, keys[name][0], public_keys, 3, "r") for name in OWNERS}
    survivors = {name: masked[name] for name in ("joe", "jane")}  # jill dropped after the key agreement
    with pytest.raises(ValueError, match="dropped out"):
        ss.unmask_sum(survivors, OWNERS)
    recovery = {
        name: ss.recovery_seeds(name, keys[name][0], public_keys, dropped=["jill"], survivors=list(survivors),
                                round_number=3, run_id="r")
        for name in survivors
    }
    total = ss.unmask_sum(survivors, OWNERS, recovery)
    np.testing.assert_array_equal(total, updates["joe"] + updates["jane"])
    # Without the recovery, the survivors' sum is still noise:
    partial = survivors["joe"] + survivors["jane"]
    assert uniform_p_value(partial) > 1e-6


def test_recovery_refuses_what_would_expose_one_owner(keys, public_keys):
    sk = keys["joe"][0]
    with pytest.raises(ValueError, match="only 1 owner"):
        ss.recovery_seeds("joe", sk, public_keys, dropped=["jane", "jill"], survivors=["joe"], round_number=0)
    for weak in (1, 0, -1, 1.5):
        with pytest.raises(ValueError, match="min_survivors must be an integer >= 2"):
            ss.recovery_seeds("joe", sk, public_keys, ["jane", "jill"], ["joe"], 0, min_survivors=weak)
    with pytest.raises(ValueError, match="reveals no seeds"):
        ss.recovery_seeds("joe", sk, public_keys, dropped=["joe"], survivors=["jane", "jill"], round_number=0)
    with pytest.raises(ValueError, match="either a survivor or dropped"):
        ss.recovery_seeds("joe", sk, public_keys, dropped=["jill"], survivors=["joe"], round_number=0)
    with pytest.raises(ValueError, match="unknown owners"):
        ss.recovery_seeds("joe", sk, public_keys, ["bob"], ["joe", "jane", "jill"], round_number=0)
    with pytest.raises(ValueError, match="listed twice"):
        ss.recovery_seeds("joe", sk, public_keys, ["jill"], ["joe", "joe", "jane"], round_number=0)


def test_duplicate_public_keys_are_refused(keys, public_keys):
    """The aggregator lists jill's real key a second time under an invented name: refused, not masked."""
    forged = dict(public_keys) | {"mallory": public_keys["jill"]}
    with pytest.raises(ValueError, match="several names"):
        ss.mask(ss.encode(np.zeros(4)), "joe", keys["joe"][0], forged, 0)
    with pytest.raises(ValueError, match="several names"):
        ss.recovery_seeds("joe", keys["joe"][0], forged, ["mallory"], ["joe", "jane", "jill"], 0)


def test_masking_input_errors(keys, public_keys):
    zero = ss.encode(np.zeros(10))
    with pytest.raises(ValueError, match="not among the owners"):
        ss.mask(zero, "bob", keys["joe"][0], public_keys, 0)
    with pytest.raises(ValueError, match="not a valid public key"):
        ss.shared_seed(keys["joe"][0], b"\x01" * 10)
    with pytest.raises(ValueError, match="not a valid public key"):
        ss.shared_seed(keys["joe"][0], (1).to_bytes(256, "big"))
    with pytest.raises(ValueError, match="32 bytes"):
        ss.mask(zero, "joe", b"short", public_keys, 0)
    with pytest.raises(ValueError, match="round_number"):
        ss.round_seed(b"x" * 32, "run", -1)
    with pytest.raises(ValueError, match="32 bytes"):
        ss.expand_seed(b"x" * 31, 10)
    with pytest.raises(ValueError, match="different shapes"):
        ss.unmask_sum({"joe": zero, "jane": ss.encode(np.zeros(3))}, OWNERS)
    with pytest.raises(ValueError, match="unknown owners"):
        ss.unmask_sum({"bob": zero}, OWNERS)
    with pytest.raises(ValueError, match="no masked updates"):
        ss.unmask_sum({}, OWNERS)


def test_secret_keys_as_uint8_arrays_work(keys, public_keys):
    """On a datasite the secret key is stored as a uint8 array asset."""
    secret = np.frombuffer(keys["joe"][0], dtype=np.uint8)[None]
    zero = ss.encode(np.zeros(8))
    np.testing.assert_array_equal(
        ss.mask(zero, "joe", secret, public_keys, 5), ss.mask(zero, "joe", keys["joe"][0], public_keys, 5)
    )


# --- FedAvg through the ring ----------------------------------------------------------------------------
def test_weighted_encoding_gives_fedavg(keys, public_keys):
    rng = np.random.default_rng(8)
    vectors = [rng.normal(0, 0.2, 3000).astype(np.float32) for _ in OWNERS]
    counts = [5000, 3000, 12000]
    masked = {
        name: ss.mask(ss.encode_weighted(v, n), name, keys[name][0], public_keys, 9)
        for name, v, n in zip(OWNERS, vectors, counts)
    }
    average, n_total = ss.decode_weighted_average(ss.unmask_sum(masked, OWNERS))
    assert n_total == sum(counts)
    # Fixed point: each n*w is off by at most half a step (2**-25), so the average by at most 3 * 2**-25 / n;
    # fedavg itself returns float32, rounded to within 2**-24 * |w| (|w| < 1)
    bound = len(OWNERS) * 2.0 ** -(ss.FRACTION_BITS + 1) / sum(counts) + 1e-15
    assert np.abs(average - np.average(np.array(vectors, np.float64), axis=0, weights=counts)).max() <= bound
    assert np.abs(average - fedavg(vectors, counts).numpy()).max() <= bound + 2.0**-24


def test_a_wrong_secret_key_is_caught_when_decoding(keys, public_keys):
    """Masks made with the wrong key (e.g. a mock key) do not cancel; the summed sample count shows it."""
    update = ss.encode_weighted(np.zeros(10), 100)
    masked = {name: ss.mask(update, name, keys[name][0], public_keys, 2) for name in OWNERS}
    masked["joe"] = ss.mask(update, "joe", keys["jane"][0], public_keys, 2)
    with pytest.raises(ValueError, match="masks did not cancel"):
        ss.decode_weighted_average(ss.unmask_sum(masked, OWNERS))


def test_weighted_encoding_errors(keys, public_keys):
    with pytest.raises(ValueError, match="flat vector"):
        ss.encode_weighted(np.zeros((2, 2)), 3)
    with pytest.raises(ValueError, match="n_samples"):
        ss.encode_weighted(np.zeros(4), 0)
    masked = ss.mask(ss.encode_weighted(np.zeros(4), 3), "joe", keys["joe"][0], public_keys, 0)
    with pytest.raises(ValueError, match="masks did not cancel"):
        ss.decode_weighted_average(masked)
