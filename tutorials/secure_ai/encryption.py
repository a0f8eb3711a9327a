"""Homomorphic encryption of model updates with TenSEAL's CKKS scheme.

CKKS encrypts a vector of real numbers approximately; anyone holding only the *public* context can add
ciphertexts, and only the holder of the secret key can decrypt. One ciphertext holds ``poly_modulus_degree
/ 2`` numbers (4096 with our parameters), so a model update becomes a list of ciphertexts
(:class:`EncryptedVector`). Who holds what:

* the key holder calls :func:`make_context` (secret key inside) and hands out :func:`public_context`;
* owners :func:`encrypt` their flat updates with the public context and send ``to_bytes()``;
* the aggregator loads them with :meth:`EncryptedVector.from_bytes` and adds them, with no secret key;
* the key holder decrypts only the sum (:meth:`EncryptedVector.decrypt`).
"""
from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import tenseal as ts

POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES = (60, 40, 40, 60)
SCALE_BITS = 40
_MAGIC = b"SAIckks1"


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
