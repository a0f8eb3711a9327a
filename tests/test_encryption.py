"""secure_ai.encryption: CKKS contexts, chunked encryption, ciphertext sums, and who can decrypt."""
import numpy as np
import pytest
import torch
from secure_ai import encryption as he


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
    assert relative_error(decrypted, values) <= 1e-4
    assert np.abs(decrypted - values).max() > 0  # CKKS is approximate: never bit-exact


def test_large_magnitudes(key_holder, public):
    values = np.random.default_rng(1).uniform(-2e4, 2e4, 5000)
    assert relative_error(he.encrypt(public, values).decrypt(key_holder), values) <= 1e-4


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
    assert relative_error(result, exact) <= 1e-4


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
    assert relative_error(average, fedavg(vectors, counts).numpy()) <= 1e-4


def test_weighted_encryption_errors(key_holder, public):
    with pytest.raises(ValueError, match="flat vector"):
        he.encrypt_weighted(public, np.zeros((2, 2)), 3)
    with pytest.raises(ValueError, match="n_samples"):
        he.encrypt_weighted(public, np.zeros(4), 0)
    with pytest.raises(ValueError, match="sample count"):
        he.decrypt_weighted_average(he.encrypt(public, np.array([0.5, 0.25, 2.5])), key_holder)
    with pytest.raises(ValueError, match="2 numbers|got 1 numbers"):
        he.decrypt_weighted_average(he.encrypt(public, np.array([3.0])), key_holder)
