"""Homomorphic encryption of model updates with TenSEAL's CKKS scheme, and a key holder that checks sums.

CKKS encrypts a vector of real numbers approximately; anyone holding only the *public* context can add
ciphertexts, and only the holder of the secret key can decrypt. One ciphertext holds ``poly_modulus_degree
/ 2`` numbers (4096 with our parameters), so a model update becomes a list of ciphertexts
(:class:`EncryptedVector`).

Parameters: ``N = 8192`` with a 200-bit coefficient modulus ``(60, 40, 40, 60)`` is within the 128-bit
classical security bound of the Homomorphic Encryption Standard (N = 8192 allows up to 218 bits). The 40-bit
middle primes match the 2**40 scale, so one multiplication by a plaintext can be rescaled; the 60-bit
primes hold the integer part and the decryption headroom. Numbers are scaled by 2**40 before rounding, and
encryption noise uses up about 14 of those bits: on the sum of three owners' ``n*w`` (79,510 weights, n =
60,000) the largest error measured is 2**-25.5 to 2**-25.9, so **about 26 bits of fraction** remain
(``tests/test_encryption.py::test_about_26_bits_of_fraction_remain_on_the_sum``). The error is absolute: it
does not grow with ``n*w``. The public context carries only the public encryption key (no relinearization
or Galois keys): its holder can add ciphertexts and multiply them by plain numbers. Without relinearization
keys it can still multiply two ciphertexts into a larger one, which only the secret key decrypts; that does
not matter here, because the key holder decrypts only authenticated owner ciphertexts that it adds itself.

Who holds what: the :class:`KeyHolder` makes the keys and hands out the public context (its bytes, whose
SHA-256 each owner fixes at setup); owners encrypt ``n*w`` and, in a ciphertext of its own, ``n *
COUNT_SCALE`` (so that the flooding noise cannot change the count's rounding), and authenticate the
ciphertexts with a MAC key they share with the key holder, over the run, the round, the owner and the digest
of the training message (:func:`authenticate`); the aggregator relays and may add them. The key holder
verifies every tag, requires at least ``min_owners`` distinct owners and one model digest for all of them,
adds the ciphertexts itself, decrypts each round number at most once and in increasing order (round numbers
come from the aggregator), and never more ciphertexts than its noise was sized for.

Noise flooding: exact CKKS decryptions returned to a party that holds the ciphertexts can leak the secret
key (Li and Micciancio, Eurocrypt 2021), so the key holder adds Gaussian noise to every decrypted sum. Its
standard deviation follows Li, Micciancio, Schultz and Sorrell (CRYPTO 2022): it grows with the number of
decryptions ``N_d`` and the statistical security ``s``, ``sigma = E * 2**(s/2) * sqrt(64 * N_d)``
(:func:`flooding_sigma`), where ``E`` bounds the error of one decrypted sum (owners x
:data:`FRESH_ERROR_BOUND`). OpenFHE, which implements that paper, uses ``sqrt(12 * N_d)`` in place of
``sqrt(64 * N_d)`` and ``s = 30`` by default (``gen-cryptocontext-ckksrns-internal.h``,
``CKKS_NOISE_FLOODING.md``); we keep the larger constant, 2.3 times more noise: the "prior art" bound as
the reference code of "IND-CPA-D and KR-D Security with Reduced Noise from the HintLWE Problem" states it.
``N_d`` counts ciphertexts: ``max_rounds * (ceil(length / 4096) + 1)``, 2 x (20 + 1) = 42
for Part 5's 2 rounds of 79,510 weights, which with s = 30 and 3 owners gives sigma = 1.4 in units of
``sum n_i w_i`` (2.3e-5 on an average weight at n = 60,000; 3 rounds: 63 and 1.7). This is a heuristic,
not a proof: ``E`` holds with high probability only, and we add the noise to the decoded numbers rather
than to the plaintext polynomial as the paper and OpenFHE do (the ratio sigma / E is what matters; both
are taken in the decoded numbers here).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
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
COUNT_SCALE = 2**12   # the count travels as n * COUNT_SCALE, in a ciphertext of its own
STATISTICAL_SECURITY = 30   # s of the flooding noise: OpenFHE's default for NOISE_FLOODING_DECRYPT
# The largest flooding noise the count tolerates: 8 sigma within a quarter of COUNT_SCALE (chance of a
# wrong or refused count about 1e-15 per decryption)
MAX_FLOOD_SIGMA = COUNT_SCALE / 32


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
    """Owner side: ``n_samples * vector``, and ``n_samples * COUNT_SCALE`` in one more ciphertext of its own.

    A sum of these gives FedAvg's numerator and, exactly after rounding, its denominator.
    """
    values = np.asarray(vector.detach().cpu() if hasattr(vector, "detach") else vector, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"expected a flat vector, got shape {values.shape}")
    if not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    data = encrypt(context, values * n_samples)
    count = ts.ckks_vector(context, [float(n_samples) * COUNT_SCALE])
    return EncryptedVector([*data.chunks, count], values.size + 1)


def ciphertexts_for(length: int) -> int:
    """How many ciphertexts one :func:`encrypt_weighted` of ``length`` numbers holds, the count's included."""
    return -(-int(length) // (POLY_MODULUS_DEGREE // 2)) + 1


def decode_weighted(values) -> tuple[np.ndarray, int]:
    """``(FedAvg average, total samples)`` from a decrypted sum of :func:`encrypt_weighted` vectors.

    The count is ``round(v / COUNT_SCALE)``; ``ValueError`` when ``v / COUNT_SCALE`` is more than 0.25 from an
    integer of at least 1 (not a sum of owners' counts, or more noise than the count tolerates).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size < 2:
        raise ValueError(f"expected a decrypted [n*w | n * COUNT_SCALE] vector, got shape {values.shape}")
    count = values[-1] / COUNT_SCALE
    n_total = int(round(count))
    if n_total < 1 or abs(count - n_total) > 0.25:
        raise ValueError(f"the decrypted sample count is {count:.4f}: not a sum of encrypt_weighted vectors")
    return values[:-1] / n_total, n_total


def decrypt_weighted_average(total: EncryptedVector, secret_context: ts.Context) -> tuple[np.ndarray, int]:
    """Key holder side: ``(FedAvg average, total samples)`` from a sum of :func:`encrypt_weighted` vectors,
    without flooding (for measuring CKKS's own error; :class:`KeyHolder` floods what it hands out)."""
    if total.chunks[-1].size() != 1:
        raise ValueError("the last ciphertext holds no count of its own: not a sum of encrypt_weighted "
                         "vectors")
    return decode_weighted(total.decrypt(secret_context))


def flooding_sigma(n_decryptions: int, statistical_security: int = STATISTICAL_SECURITY,
                   error_bound: float = 3 * FRESH_ERROR_BOUND) -> float:
    """The flooding noise's standard deviation for ``n_decryptions`` ciphertexts, ``s`` bits of statistical
    security and a bound ``error_bound`` on a decrypted sum's own error: ``E * 2**(s/2) * sqrt(64 * N_d)``
    (Li, Micciancio, Schultz and Sorrell 2022; see the module's docstring for the constant)."""
    if not isinstance(n_decryptions, (int, np.integer)) or n_decryptions < 1:
        raise ValueError(f"n_decryptions must be a positive integer, got {n_decryptions!r}")
    return float(error_bound) * 2.0 ** (statistical_security / 2) * math.sqrt(64 * int(n_decryptions))


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


def authenticate(mac_key: bytes, run_id: str, round_number: int, owner: str, model: str,
                 ciphertext: bytes) -> bytes:
    """HMAC-SHA256 of a ciphertext, bound to the run, the round, the owner who encrypted it and ``model``,
    the digest of the training message it was trained from (``secure_ai.training.message_digest``)."""
    message = json.dumps([run_id, int(round_number), owner, str(model),
                          hashlib.sha256(bytes(ciphertext)).hexdigest()])
    return hmac.new(bytes(mac_key), message.encode(), hashlib.sha256).digest()


class KeyHolder:
    """The CKKS key holder: decrypts only flooded sums of authenticated updates of one model, once per round.

    ``length`` is the number of weights an update has and ``max_rounds`` the rounds the key holder will ever
    decrypt: together they fix ``n_decryptions`` (N_d, in ciphertexts) and the flooding noise
    ``flood_sigma`` (:func:`flooding_sigma`, with ``statistical_security`` bits). Past ``max_rounds``, or
    for updates of another length, it refuses. Trust: the owners trust it not to collude with the aggregator
    (it could decrypt any ciphertext it is given) and to run these checks. ``mac_key(owner)`` goes to each
    owner privately at setup. The flooding noise is drawn, at every decryption, from a generator seeded by
    the operating system: no caller can seed it. NumPy's Gaussian sampler is not hardened against
    floating-point side channels (Mironov 2012); production code uses a vetted sampler.
    """

    def __init__(self, run_id: str, owners: Sequence[str], length: int, max_rounds: int, min_owners: int = 2,
                 statistical_security: int = STATISTICAL_SECURITY):
        if not 2 <= min_owners <= len(set(owners)):
            raise ValueError(f"min_owners must be from 2 to the {len(set(owners))} owners, got {min_owners}")
        for name, value in (("length", length), ("max_rounds", max_rounds)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.run_id, self.min_owners, self.length = run_id, int(min_owners), int(length)
        self.max_rounds, self.statistical_security = int(max_rounds), statistical_security
        self.n_decryptions = self.max_rounds * ciphertexts_for(self.length)
        self.flood_sigma = flooding_sigma(self.n_decryptions, statistical_security,
                                          len(set(owners)) * FRESH_ERROR_BOUND)
        if self.flood_sigma > MAX_FLOOD_SIGMA:
            raise ValueError(f"{self.n_decryptions} decryptions at {statistical_security} bits need flooding "
                             f"noise {self.flood_sigma:.3g}, more than the count tolerates "
                             f"({MAX_FLOOD_SIGMA}): allow fewer rounds, or fewer bits")
        self.context = make_context()
        self.public_context_bytes = context_to_bytes(self.context)
        self._mac_keys = {name: os.urandom(32) for name in owners}
        self.last_round, self.rounds_decrypted = -1, 0

    def mac_key(self, owner: str) -> bytes:
        """Key-holder side, at setup: the MAC key for ``owner`` (sent to it over a private channel)."""
        return self._mac_keys[owner]

    def decrypt_average(self, round_number: int,
                        submissions: Mapping[str, Mapping]) -> tuple[np.ndarray, int]:
        """``(FedAvg average, total samples)`` from ``{owner: {"encrypted", "model", "tag"}}``, flooded.

        Raises ``ValueError`` (and decrypts nothing) for an old round, a round past ``max_rounds``, an
        unknown owner, fewer than ``min_owners`` owners, a bad tag, ciphertexts of different models, or
        updates of another length.
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
            if not isinstance(item, Mapping) or not {"encrypted", "model", "tag"} <= set(item):
                raise ValueError(f"{owner}'s submission is not {{'encrypted', 'model', 'tag'}}")
            tag = authenticate(self._mac_keys[owner], self.run_id, round_number, owner, item["model"],
                               item["encrypted"])
            if not hmac.compare_digest(tag, bytes(item["tag"])):
                raise ValueError(f"the ciphertext said to be {owner}'s for round {round_number} fails its "
                                 "MAC: not encrypted by that owner for this round and model")
        models = {owner: str(item["model"])[:12] for owner, item in submissions.items()}
        if len(set(models.values())) != 1:
            raise ValueError(f"the owners trained different models this round (digests {models}): a sum of "
                             "different models can give one owner's update away")
        if self.rounds_decrypted >= self.max_rounds:
            raise ValueError(f"the key holder was sized for {self.max_rounds} rounds ({self.n_decryptions} "
                             "decryptions) and decrypted them all: its noise does not cover more")
        sized, total = ciphertexts_for(self.length), None
        for item in submissions.values():  # one owner's ciphertexts at a time: a third of the memory
            encrypted = EncryptedVector.from_bytes(self.context, bytes(item["encrypted"]))
            if (encrypted.length != self.length + 1 or len(encrypted.chunks) != sized
                    or encrypted.chunks[-1].size() != 1):
                raise ValueError(f"updates must have {self.length} weights and a count of their own, as "
                                 "sized")
            total = encrypted if total is None else total + encrypted
        self.last_round, self.rounds_decrypted = int(round_number), self.rounds_decrypted + 1
        values = total.decrypt(self.context)
        noise = np.random.default_rng(secrets.randbits(128)).normal(0, self.flood_sigma, values.size)
        return decode_weighted(values + noise)   # noise flooding, then the count's rounding
