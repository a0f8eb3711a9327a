"""secure_ai.encryption: CKKS contexts, chunked encryption, ciphertext sums, who can decrypt, and a key
holder played against a cheating aggregator."""
import numpy as np
import pytest
import torch
from secure_ai import encryption as he
from secure_ai import secagg
from secure_ai import secret_sharing as ss

BOUND = he.FRESH_ERROR_BOUND  # per slot and ciphertext, whatever the magnitude (CKKS error is absolute)


def relative_error(approx, exact) -> float:
    return float(np.abs(np.asarray(approx) - np.asarray(exact)).max() / np.abs(exact).max())


@pytest.fixture(scope="module")
def key_holder():
    return he.make_context()


@pytest.fixture(scope="module")
def public(key_holder):
    return he.public_context(key_holder)


def test_contexts_and_who_holds_the_secret_key(key_holder, public):
    assert he.slot_count(key_holder) == he.POLY_MODULUS_DEGREE // 2 == 4096
    assert key_holder.has_secret_key()
    assert not public.has_secret_key()
    assert not he.context_from_bytes(he.context_to_bytes(key_holder)).has_secret_key()
    assert key_holder.global_scale == 2.0**he.SCALE_BITS


@pytest.mark.parametrize("length", [1, 4096, 10_000])
def test_encrypt_decrypt_round_trip(key_holder, public, length):
    values = np.random.default_rng(length).normal(0, 0.1, length)
    encrypted = he.encrypt(public, values)
    assert len(encrypted.chunks) == -(-length // 4096) and encrypted.length == length
    decrypted = encrypted.decrypt(key_holder)
    assert decrypted.shape == (length,)
    assert np.abs(decrypted - values).max() <= BOUND
    assert np.abs(decrypted - values).max() > 0  # CKKS is approximate: never bit-exact


def test_large_magnitudes(key_holder, public):
    values = np.random.default_rng(1).uniform(-2e4, 2e4, 5000)
    assert np.abs(he.encrypt(public, values).decrypt(key_holder) - values).max() <= BOUND


def test_aggregator_adds_serialized_ciphertexts_without_the_secret_key(key_holder, public):
    rng = np.random.default_rng(2)
    updates = [torch.from_numpy(rng.normal(0, 0.1, 9000)).float() for _ in range(3)]
    sent = [he.encrypt(public, u).to_bytes() for u in updates]  # owners
    aggregator_context = he.context_from_bytes(he.context_to_bytes(key_holder))
    total = he.aggregate([he.EncryptedVector.from_bytes(aggregator_context, b) for b in sent])
    with pytest.raises(ValueError, match="only the key holder can decrypt"):
        total.decrypt(aggregator_context)
    result = he.EncryptedVector.from_bytes(key_holder, total.to_bytes()).decrypt(key_holder)
    exact = sum(u.double() for u in updates).numpy()
    assert np.abs(result - exact).max() <= 3 * BOUND   # errors add up


def test_another_secret_key_decrypts_garbage(key_holder, public):
    values = np.random.default_rng(3).normal(0, 0.1, 100)
    stranger = he.make_context()
    garbage = he.EncryptedVector.from_bytes(stranger, he.encrypt(public, values).to_bytes()).decrypt(stranger)
    assert relative_error(garbage, values) > 1e3


def test_ciphertext_size(public):
    encrypted = he.encrypt(public, np.zeros(5000))
    size = len(encrypted.to_bytes())
    assert 2 * 100_000 < size < 2 * 1_000_000  # two ciphertexts of a few hundred kB each


def test_bad_input_raises(key_holder, public):
    with pytest.raises(ValueError, match="flat vector"):
        he.encrypt(public, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="flat vector"):
        he.encrypt(public, np.zeros(0))
    with pytest.raises(ValueError, match="NaN or infinite"):
        he.encrypt(public, np.array([1.0, np.nan]))
    short, long = he.encrypt(public, np.zeros(10)), he.encrypt(public, np.zeros(20))
    with pytest.raises(ValueError, match="lengths 10 and 20"):
        short + long
    with pytest.raises(ValueError, match="at least one"):
        he.aggregate([])
    with pytest.raises(ValueError, match="wrong header"):
        he.EncryptedVector.from_bytes(public, b"not a ciphertext")
    with pytest.raises(ValueError, match="truncated or padded"):
        he.EncryptedVector.from_bytes(public, short.to_bytes() + b"\0")
    with pytest.raises(ValueError, match="chunks hold"):
        he.EncryptedVector(short.chunks, 11)


def test_weighted_encryption_gives_fedavg(key_holder, public):
    from secure_ai.training import fedavg

    rng = np.random.default_rng(4)
    vectors = [rng.normal(0, 0.2, 5000).astype(np.float32) for _ in range(3)]
    counts = [5000, 3000, 12000]
    total = he.aggregate([he.encrypt_weighted(public, v, n) for v, n in zip(vectors, counts)])
    average, n_total = he.decrypt_weighted_average(total, key_holder)
    assert n_total == sum(counts)
    exact = np.average(np.array(vectors, np.float64), axis=0, weights=counts)
    assert np.abs(average - exact).max() <= 3 * BOUND / n_total
    assert np.abs(average - fedavg(vectors, counts).numpy()).max() <= 3 * BOUND / n_total + 2.0**-24


def test_weighted_encryption_errors(key_holder, public):
    with pytest.raises(ValueError, match="flat vector"):
        he.encrypt_weighted(public, np.zeros((2, 2)), 3)
    with pytest.raises(ValueError, match="n_samples"):
        he.encrypt_weighted(public, np.zeros(4), 0)
    with pytest.raises(ValueError, match="no count of its own"):
        he.decrypt_weighted_average(he.encrypt(public, np.array([0.5, 0.25, 2.5])), key_holder)
    with pytest.raises(ValueError, match=r"got shape \(1,\)"):
        he.decrypt_weighted_average(he.encrypt(public, np.array([3.0])), key_holder)
    half = he.EncryptedVector([*he.encrypt(public, np.zeros(3)).chunks,
                               he.encrypt(public, np.array([2.5 * he.COUNT_SCALE])).chunks[0]], 4)
    with pytest.raises(ValueError, match="sample count is 2.5000"):
        he.decrypt_weighted_average(half, key_holder)


def test_the_count_travels_in_a_ciphertext_of_its_own(key_holder, public):
    encrypted = he.encrypt_weighted(public, np.zeros(5000), 7)
    assert [c.size() for c in encrypted.chunks] == [4096, 904, 1] and he.ciphertexts_for(5000) == 3
    assert encrypted.chunks[-1].decrypt(key_holder.secret_key())[0] == pytest.approx(7 * he.COUNT_SCALE)


def test_the_count_comes_back_exact_at_the_largest_allowed_sigma():
    """The count's rounding tolerates MAX_FLOOD_SIGMA: 1,000 flooded decryptions, never a wrong count."""
    rng = np.random.default_rng(0)
    values = np.append(np.zeros(10), 60_000 * he.COUNT_SCALE)
    for _ in range(1000):
        _, n_total = he.decode_weighted(values + rng.normal(0, he.MAX_FLOOD_SIGMA, values.size))
        assert n_total == 60_000


def test_about_26_bits_of_fraction_remain_on_the_sum(key_holder, public):
    """DP review 4.8: Part 5's sizes (3 owners, 79,510 weights, n = 60,000): scaled by 2**40, the sum of
    n*w comes back with an error of about 2**-26 (the figure in the module's docstring)."""
    rng = np.random.default_rng(8)
    vectors, counts = [rng.normal(0, 0.05, 79_510) for _ in range(3)], [15_000, 20_000, 25_000]
    total = he.aggregate([he.encrypt_weighted(public, v, n) for v, n in zip(vectors, counts)])
    values = total.decrypt(key_holder)
    exact = sum(n * v for v, n in zip(vectors, counts))
    bits = -np.log2(np.abs(values[:-1] - exact).max())
    print(f"fraction bits left on sum n*w: {bits:.1f}")
    assert 23 < bits < 29


def test_parameters_are_those_the_chapter_states(key_holder, public):
    """128-bit security per the HE Standard needs N = 8192 with at most 218 coefficient bits; ours: 200."""
    assert he.POLY_MODULUS_DEGREE == 8192 and sum(he.COEFF_MOD_BIT_SIZES) == 200 <= 218
    assert he.COEFF_MOD_BIT_SIZES[1:-1] == (he.SCALE_BITS, he.SCALE_BITS)
    restored = he.context_from_bytes(he.context_to_bytes(key_holder))
    assert not restored.has_secret_key() and not restored.has_relin_keys() and not restored.has_galois_keys()
    a, b = he.encrypt(public, np.ones(4)), he.encrypt(public, np.full(4, 2.0))
    with pytest.raises(ValueError):   # two ciphertexts cannot be multiplied: no relinearization key
        a.chunks[0] * b.chunks[0]


# --- owners' checks and the key holder, against a cheating aggregator ------------------------------------
OWNERS = ("jane", "jill", "joe")


@pytest.fixture(scope="module")
def holder():
    return he.KeyHolder("run-test", OWNERS, length=10, max_rounds=5)


def owner_configs(holder, tmp_path):
    keys = {name: ss.generate_keypair() for name in OWNERS}
    roster = {name: public for name, (_, public) in keys.items()}
    return {name: secagg.make_config("run-test", name, roster, tmp_path / f"{name}.json",
                                     ckks_public_context=holder.public_context_bytes,
                                     ckks_mac_key=holder.mac_key(name)).to_asset() for name in OWNERS}


def made(vector, n):
    """A ``train`` for owner_encrypt that returns an update made before (every owner gets one message)."""
    return lambda message: (vector, n)


def test_owners_refuse_a_context_with_a_secret_key_or_of_another_maker(holder, tmp_path):
    configs = owner_configs(holder, tmp_path)
    own = he.make_context()    # the aggregator's own keys
    with_secret = own.serialize(save_secret_key=True)
    for context, reason in [(with_secret, "holds a secret key"),
                            (he.context_to_bytes(own), "not the key holder's public context"),
                            ("not bytes", "must arrive as bytes")]:
        answer = secagg.owner_encrypt(made(np.zeros(3), 5), configs["joe"], {"round": 0, "context": context})
        assert reason in answer["refused"]
    answer = secagg.owner_encrypt(made(np.zeros(3), 5), configs["joe"],
                                  {"round": 0, "context": holder.public_context_bytes})
    assert set(answer) == {"encrypted", "model", "tag"}


def encrypted_round(holder, configs, r, vectors, counts):
    request = {"round": r, "context": holder.public_context_bytes}
    encrypt = lambda name: secagg.owner_encrypt(made(vectors[name], counts[name]), configs[name], request)
    return {name: secagg.unwrap(name, encrypt(name)) for name in vectors}


def test_owners_encrypt_once_per_round_in_increasing_rounds(holder, tmp_path):
    """DP review 4.10: an owner's ledger, as for masks; round numbers come from the aggregator."""
    configs = owner_configs(holder, tmp_path)
    request = {"round": 4, "context": holder.public_context_bytes}
    secagg.unwrap("joe", secagg.owner_encrypt(made(np.zeros(10), 5), configs["joe"], request))
    for r in (4, 2):
        answer = secagg.owner_encrypt(made(np.ones(10), 5), configs["joe"], request | {"round": r})
        assert "already encrypted" in answer["refused"]
    assert "tag" in secagg.owner_encrypt(made(np.ones(10), 5), configs["joe"], request | {"round": 5})


def test_key_holder_decrypts_an_authenticated_sum_once_per_round(tmp_path):
    holder = he.KeyHolder("run-test", OWNERS, length=5000, max_rounds=3)
    configs = owner_configs(holder, tmp_path)
    rng = np.random.default_rng(5)
    vectors = {name: rng.normal(0, 0.1, 5000) for name in OWNERS}
    counts = {"jane": 100, "jill": 300, "joe": 600}
    submitted = encrypted_round(holder, configs, 0, vectors, counts)
    average, n_total = holder.decrypt_average(0, submitted)
    exact = sum(counts[n] * vectors[n] for n in OWNERS) / 1000
    assert n_total == 1000 and np.abs(average - exact).max() <= (8 * holder.flood_sigma + 3 * BOUND) / n_total
    with pytest.raises(ValueError, match="once per round"):      # the same round again
        holder.decrypt_average(0, {n: submitted[n] for n in ("jane", "joe")})
    with pytest.raises(ValueError, match="fails its MAC"):       # round-0 ciphertexts replayed as round 1
        holder.decrypt_average(1, {n: submitted[n] for n in ("jane", "joe")})


def test_key_holder_refuses_what_is_not_a_sum_of_owners(holder, tmp_path):
    configs = owner_configs(holder, tmp_path)
    vectors = {name: np.full(10, 0.5) for name in OWNERS}
    submitted = encrypted_round(holder, configs, 3, vectors, dict.fromkeys(OWNERS, 10))
    with pytest.raises(ValueError, match="fewer than 2"):                  # joe's update alone
        holder.decrypt_average(3, {"joe": submitted["joe"]})
    public = he.context_from_bytes(holder.public_context_bytes)
    fake = he.encrypt_weighted(public, np.zeros(10), 1).to_bytes()         # the aggregator's own ciphertext
    for tag in (submitted["jane"]["tag"], b"\0" * 32):
        with pytest.raises(ValueError, match="jane's for round 3 fails its MAC"):
            holder.decrypt_average(3, {"joe": submitted["joe"], "jane": submitted["jane"] | {
                "encrypted": fake, "tag": tag}})
    swapped = {"joe": submitted["joe"], "jane": submitted["jill"]}           # jill's ciphertext as jane's
    with pytest.raises(ValueError, match="fails its MAC"):
        holder.decrypt_average(3, swapped)
    with pytest.raises(ValueError, match="unknown owners"):
        holder.decrypt_average(3, {"joe": submitted["joe"], "mallory": submitted["jane"]})
    with pytest.raises(ValueError, match="is not {'encrypted', 'model', 'tag'}"):
        holder.decrypt_average(3, {"joe": submitted["joe"], "jane": {"encrypted": fake}})
    assert holder.last_round < 3   # nothing was decrypted
    average, n_total = holder.decrypt_average(3, submitted)
    assert n_total == 30


def test_flooding_sigma_grows_as_the_root_of_decryptions_and_2_to_the_s_over_2():
    """DP review 4.7: sigma = E 2**(s/2) sqrt(64 N_d); 3 rounds of Part 5's model: N_d = 3 x 21 = 63, 1.7."""
    assert he.flooding_sigma(4 * 63) == pytest.approx(2 * he.flooding_sigma(63))
    assert he.flooding_sigma(63, 32) == pytest.approx(2 * he.flooding_sigma(63, 30))
    part4 = he.KeyHolder("r", OWNERS, length=79_510, max_rounds=3)
    assert he.ciphertexts_for(79_510) == 21 and part4.n_decryptions == 63
    assert part4.flood_sigma == pytest.approx(3 * BOUND * 2**15 * 8 * 63**0.5)
    assert 1.6 < part4.flood_sigma < 1.8
    with pytest.raises(ValueError, match="more than the count tolerates"):
        he.KeyHolder("r", OWNERS, length=79_510, max_rounds=3, statistical_security=50)


def test_key_holder_refuses_more_decryptions_than_sized(tmp_path):
    holder = he.KeyHolder("run-test", OWNERS, length=10, max_rounds=1)
    configs = owner_configs(holder, tmp_path)
    vectors = {name: np.full(10, 0.5) for name in ("jane", "joe")}
    longer = encrypted_round(holder, configs, 0, {n: np.zeros(4100) for n in ("jane", "jill")},
                             dict.fromkeys(OWNERS, 1))
    with pytest.raises(ValueError, match="must have 10 weights"):          # more ciphertexts than sized
        holder.decrypt_average(0, longer)
    holder.decrypt_average(1, encrypted_round(holder, configs, 1, vectors, dict.fromkeys(OWNERS, 2)))
    with pytest.raises(ValueError, match="sized for 1 rounds"):
        holder.decrypt_average(2, encrypted_round(holder, configs, 2, vectors, dict.fromkeys(OWNERS, 2)))


def test_decrypted_sums_are_flooded_with_the_stated_noise(tmp_path):
    """Li-Micciancio mitigation: the decryption's own error (std ~1.5e-9) is drowned in N(0, sigma)."""
    holder = he.KeyHolder("run-test", OWNERS, length=8000, max_rounds=1)
    configs = owner_configs(holder, tmp_path)
    vectors = {name: np.zeros(8000) for name in OWNERS}
    average, n_total = holder.decrypt_average(0, encrypted_round(holder, configs, 0, vectors,
                                                                 dict.fromkeys(OWNERS, 1)))
    assert n_total == 3
    noise, sigma = average * n_total, holder.flood_sigma
    assert 0.95 * sigma < noise.std() < 1.05 * sigma   # 8000 samples: std within ~1.6%
    assert abs(noise.mean()) < 5 * sigma / np.sqrt(noise.size)


def test_the_flooding_noise_cannot_be_seeded_by_its_caller(tmp_path):
    """Issue 18: the key holder draws its noise from the OS; its caller can neither seed it nor pass one."""
    with pytest.raises(TypeError):
        he.KeyHolder("r", OWNERS, length=10, max_rounds=1, rng=np.random.default_rng(0))
    noises = []
    for _ in range(2):
        np.random.seed(0)
        torch.manual_seed(0)
        holder = he.KeyHolder("run-test", OWNERS, length=100, max_rounds=1)
        configs = owner_configs(holder, tmp_path / str(len(noises)))
        zeros = {n: np.zeros(100) for n in OWNERS}
        submitted = encrypted_round(holder, configs, 0, zeros, dict.fromkeys(OWNERS, 1))
        noises.append(holder.decrypt_average(0, submitted)[0])
    # CKKS's own error differs by ~1e-9 between the two encryptions; the noise by ~sigma / 3
    assert np.abs(noises[0] - noises[1]).mean() > 0.1 * holder.flood_sigma / 3


def test_key_holder_arguments():
    with pytest.raises(ValueError, match="min_owners"):
        he.KeyHolder("r", OWNERS, length=10, max_rounds=1, min_owners=1)
    for length, rounds in ((0, 1), (10, 0), (10, True)):
        with pytest.raises(ValueError, match="positive integer"):
            he.KeyHolder("r", OWNERS, length=length, max_rounds=rounds)
