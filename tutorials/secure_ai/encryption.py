"""Homomorphic encryption of model updates with TenSEAL's CKKS scheme, and a key holder that checks sums.

CKKS encrypts a vector of real numbers approximately; anyone holding only the *public* context can add
ciphertexts, and only the holder of the secret key can decrypt. One ciphertext holds ``poly_modulus_degree
/ 2`` numbers (4096 with our parameters), so a model update becomes a list of ciphertexts
(:class:`EncryptedVector`).

Parameters: ``N = 8192`` with a 200-bit coefficient modulus ``(60, 40, 40, 60)`` is within the 128-bit
classical security bound of the Homomorphic Encryption Standard (N = 8192 allows up to 218 bits). The 40-bit
middle primes match the 2**40 scale, so one multiplication by a plaintext can be rescaled; the 60-bit
primes hold the integer part and the decryption headroom. The public context carries only the public
encryption key (no relinearization or Galois keys), so whoever holds it can add ciphertexts and multiply
them by plaintexts, but not multiply two ciphertexts or rotate slots.

Who holds what: the :class:`KeyHolder` makes the keys and hands out the public context (its bytes, whose
SHA-256 each owner fixes at setup); owners encrypt ``[n*w, n]`` and authenticate the ciphertext with a MAC
key they share with the key holder (:func:`authenticate`); the aggregator relays and may add them; the
key holder verifies every tag, requires at least ``min_owners`` distinct owners of the current round, adds
the ciphertexts itself, decrypts once per round, and floods the result with Gaussian noise before it goes
back (Li and Micciancio 2021: exact CKKS decryptions returned to a party that holds the ciphertexts can
leak the secret key).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import struct
from collections.abc import Mapping, Sequence

import numpy as np
import tenseal as ts

POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES = (60, 40, 40, 60)
SCALE_BITS = 40
_MAGIC = b"SAIckks1"
# A high-probability bound on one fresh ciphertext's error per slot: the dominant term 8*sqrt(2)*sigma*N of
# Cheon et al. (2017)'s bound for error sigma = 3.2, over the scale (2.7e-7; measured: at most ~6e-9)
FRESH_ERROR_BOUND = 8 * 2**0.5 * 3.2 * POLY_MODULUS_DEGREE / 2.0**SCALE_BITS
# Noise flooding of decrypted sums (in their units): about 2**25 times the measured error's spread (1.5e-9)
FLOOD_SIGMA = 2.0**-4


def make_context(poly_modulus_degree: int = POLY_MODULUS_DEGREE,
                 coeff_mod_bit_sizes: Sequence[int] = COEFF_MOD_BIT_SIZES,
                 scale_bits: int = SCALE_BITS) -> ts.Context:
    """Key holder side: a fresh CKKS context with the secret key. Keep it; hand out :func:`public_context`."""
    context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=poly_modulus_degree,
                         coeff_mod_bit_sizes=list(coeff_mod_bit_sizes))
    context.global_scale = 2.0**scale_bits
    return context


def context_to_bytes(context: ts.Context) -> bytes:
    """The context without its secret key, as bytes (what crosses the network to owners and aggregator)."""
    return context.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False,
                             save_relin_keys=False)


def context_from_bytes(data: bytes) -> ts.Context:
    """Load a context from :func:`context_to_bytes`: it can encrypt and add, never decrypt."""
    return ts.context_from(data)


def public_context(context: ts.Context) -> ts.Context:
    """A copy of ``context`` without the secret key (round trip through :func:`context_to_bytes`)."""
    return context_from_bytes(context_to_bytes(context))


def slot_count(context: ts.Context) -> int:
    """How many numbers one ciphertext holds: half the polynomial modulus degree."""
    return context.seal_context().data.first_context_data().parms().poly_modulus_degree() // 2


class EncryptedVector:
    """A flat float vector encrypted as ``ceil(length / slots)`` CKKS ciphertexts."""

    def __init__(self, chunks: Sequence[ts.CKKSVector], length: int):
        if not chunks or sum(c.size() for c in chunks) != length:
            raise ValueError(f"the chunks hold {sum(c.size() for c in chunks)} numbers, not {length}")
        self.chunks, self.length = list(chunks), int(length)

    def __repr__(self) -> str:
        return f"EncryptedVector({self.length} numbers in {len(self.chunks)} ciphertexts)"

    def __add__(self, other: EncryptedVector) -> EncryptedVector:
        if not isinstance(other, EncryptedVector):
            return NotImplemented
        if other.length != self.length or len(other.chunks) != len(self.chunks):
            raise ValueError(f"cannot add encrypted vectors of lengths {self.length} and {other.length}")
        return EncryptedVector([a + b for a, b in zip(self.chunks, other.chunks)], self.length)

    def to_bytes(self) -> bytes:
        """Serialized ciphertexts (no key material): ``len()`` of this is what an owner sends."""
        parts = [c.serialize() for c in self.chunks]
        header = _MAGIC + struct.pack("<QI", self.length, len(parts))
        return header + b"".join(struct.pack("<Q", len(p)) + p for p in parts)

    @classmethod
    def from_bytes(cls, context: ts.Context, data: bytes) -> EncryptedVector:
        """Load ciphertexts from :meth:`to_bytes` under ``context`` (a public one suffices to add them)."""
        data = bytes(data)
        if not data.startswith(_MAGIC):
            raise ValueError("these bytes are not an EncryptedVector (wrong header)")
        offset = len(_MAGIC)
        length, count = struct.unpack_from("<QI", data, offset)
        offset += struct.calcsize("<QI")
        chunks = []
        for _ in range(count):
            (size,) = struct.unpack_from("<Q", data, offset)
            offset += 8
            chunks.append(ts.ckks_vector_from(context, data[offset : offset + size]))
            offset += size
        if offset != len(data):
            raise ValueError("truncated or padded EncryptedVector bytes")
        return cls(chunks, length)

    def decrypt(self, secret_context: ts.Context) -> np.ndarray:
        """Key holder side: the plaintext vector (float64, approximate). Needs the secret key."""
        if not secret_context.has_secret_key():
            raise ValueError("this context holds no secret key: only the key holder can decrypt")
        key = secret_context.secret_key()
        return np.concatenate([np.asarray(c.decrypt(key), dtype=np.float64) for c in self.chunks])


def encrypt(context: ts.Context, vector) -> EncryptedVector:
    """Owner side: encrypt a flat vector (tensor or array) with a public (or secret) context."""
    values = np.asarray(vector.detach().cpu() if hasattr(vector, "detach") else vector, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"expected a non-empty flat vector, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("cannot encrypt NaN or infinite values")
    slots = slot_count(context)
    chunks = [ts.ckks_vector(context, values[i : i + slots].tolist()) for i in range(0, values.size, slots)]
    return EncryptedVector(chunks, values.size)


def aggregate(encrypted: Sequence[EncryptedVector]) -> EncryptedVector:
    """Aggregator side: the encrypted sum of the owners' encrypted vectors (no secret key involved)."""
    if len(encrypted) == 0:
        raise ValueError("aggregate needs at least one encrypted vector")
    total = encrypted[0]
    for item in encrypted[1:]:
        total = total + item
    return total


def encrypt_weighted(context: ts.Context, vector, n_samples: int) -> EncryptedVector:
    """Owner side: encrypt ``[n_samples * vector, n_samples]``, so that a sum of these gives FedAvg."""
    values = np.asarray(vector.detach().cpu() if hasattr(vector, "detach") else vector, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"expected a flat vector, got shape {values.shape}")
    if not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    return encrypt(context, np.append(values * n_samples, n_samples))


def decrypt_weighted_average(total: EncryptedVector, secret_context: ts.Context) -> tuple[np.ndarray, int]:
    """Key holder side: ``(FedAvg average, total samples)`` from a sum of :func:`encrypt_weighted` vectors."""
    values = total.decrypt(secret_context)
    if values.size < 2:
        raise ValueError(f"expected an encrypted [n*w, n] vector, got {values.size} numbers")
    n_total = int(round(values[-1]))  # CKKS is approximate: the count comes back as e.g. 14999.9999997
    if n_total < 1 or abs(values[-1] - n_total) > 1e-3:
        raise ValueError(f"the decrypted sample count is {values[-1]}: not a sum of encrypt_weighted vectors")
    return values[:-1] / n_total, n_total


# --- owners' checks and the key holder ------------------------------------------------------------------
def check_public_context(data, expected_sha256: str | None) -> ts.Context:
    """Owner side: load the relayed context; refuse one that holds a secret key or is not the key holder's.

    ``expected_sha256`` is the digest of the key holder's public context, fixed by the owner at setup.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"the CKKS context must arrive as bytes, got {type(data).__name__}")
    context = context_from_bytes(bytes(data))
    if context.has_secret_key():
        raise ValueError("this CKKS context holds a secret key: whoever made it could decrypt this update")
    if expected_sha256 is None or hashlib.sha256(bytes(data)).hexdigest() != expected_sha256:
        raise ValueError("this is not the key holder's public context (its SHA-256 differs from the one "
                         "fixed at setup): whoever made it may hold the secret key")
    return context


def authenticate(mac_key: bytes, run_id: str, round_number: int, owner: str, ciphertext: bytes) -> bytes:
    """HMAC-SHA256 of a ciphertext, bound to the run, the round and the owner who encrypted it."""
    message = json.dumps([run_id, int(round_number), owner, hashlib.sha256(bytes(ciphertext)).hexdigest()])
    return hmac.new(bytes(mac_key), message.encode(), hashlib.sha256).digest()


class KeyHolder:
    """The CKKS key holder: decrypts only flooded sums of authenticated updates, once per round.

    Trust: the owners trust it not to collude with the aggregator (it could decrypt any ciphertext it is
    given) and to run these checks. ``mac_key(owner)`` goes to each owner privately at setup. The flooding
    noise comes from a generator seeded by the OS; pass a seeded ``rng`` only for reproducible demonstrations
    (whoever knows the seed can subtract the noise). NumPy's Gaussian sampler is not hardened against
    floating-point side channels (Mironov 2012); production code uses a vetted sampler.
    """

    def __init__(self, run_id: str, owners: Sequence[str], min_owners: int = 2,
                 flood_sigma: float = FLOOD_SIGMA, rng: np.random.Generator | None = None):
        if not 2 <= min_owners <= len(set(owners)):
            raise ValueError(f"min_owners must be from 2 to the {len(set(owners))} owners, got {min_owners}")
        if not 0 <= flood_sigma <= 2**-4:  # the count rounds right unless the noise exceeds 8 sigma (1e-15)
            raise ValueError(f"flood_sigma must be in [0, 1/16] so counts round right, got {flood_sigma}")
        self.run_id, self.min_owners, self.flood_sigma = run_id, int(min_owners), float(flood_sigma)
        self.context = make_context()
        self.public_context_bytes = context_to_bytes(self.context)
        self._mac_keys = {name: os.urandom(32) for name in owners}
        self.last_round = -1
        self._rng = np.random.default_rng(secrets.randbits(128)) if rng is None else rng

    def mac_key(self, owner: str) -> bytes:
        """Key-holder side, at setup: the MAC key for ``owner`` (sent to it over a private channel)."""
        return self._mac_keys[owner]

    def decrypt_average(self, round_number: int,
                        submissions: Mapping[str, Mapping]) -> tuple[np.ndarray, int]:
        """``(FedAvg average, total samples)`` from ``{owner: {"encrypted": bytes, "tag": bytes}}``.

        Raises ``ValueError`` (and decrypts nothing) for an old round, an unknown owner, a bad tag, or fewer
        than ``min_owners`` owners.
        """
        if isinstance(round_number, bool) or not isinstance(round_number, (int, np.integer)):
            raise ValueError(f"round_number must be an integer, got {round_number!r}")
        if round_number <= self.last_round:
            raise ValueError(f"round {round_number} is not after round {self.last_round}, already decrypted: "
                             "the key holder decrypts once per round")
        unknown = set(submissions) - set(self._mac_keys)
        if unknown:
            raise ValueError(f"ciphertexts from unknown owners {sorted(unknown)}")
        if len(submissions) < self.min_owners:
            raise ValueError(f"{len(submissions)} owner(s) submitted, fewer than {self.min_owners}: a sum of "
                             "fewer owners would reveal an individual update")
        for owner, item in submissions.items():
            tag = authenticate(self._mac_keys[owner], self.run_id, round_number, owner, item["encrypted"])
            if not hmac.compare_digest(tag, bytes(item["tag"])):
                raise ValueError(f"the ciphertext said to be {owner}'s for round {round_number} fails its "
                                 "MAC: not encrypted by that owner for this round")
        self.last_round = int(round_number)
        total = aggregate([EncryptedVector.from_bytes(self.context, bytes(item["encrypted"]))
                           for item in submissions.values()])
        values = total.decrypt(self.context)
        values = values + self._rng.normal(0, self.flood_sigma, values.size)   # noise flooding
        if values.size < 2:
            raise ValueError(f"expected an encrypted [n*w, n] vector, got {values.size} numbers")
        n_total = int(round(values[-1]))
        if n_total < 1:
            raise ValueError(f"the decrypted sample count is {values[-1]:.3f}: not a sum of [n*w, n] vectors")
        return values[:-1] / n_total, n_total
