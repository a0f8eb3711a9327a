"""Ring maths for secure aggregation: fixed point, additive sharing, key agreement and pairwise masks.

Everything works over the ring of 64-bit integers. (Bonawitz et al. also Shamir-share each owner's keys,
so that a round survives an owner dropping out while unmasking; this package does not, see
:mod:`secure_ai.secagg`.)

* Fixed point: a float ``x`` becomes the integer ``round(x * 2**fraction_bits)`` modulo ``2**64`` (negative
  numbers wrap around, as in two's complement). NumPy's ``uint64`` arithmetic wraps by itself, so adding
  encoded numbers in the ring adds the floats.
* Additive secret sharing: ``n`` random ring elements that add up to the secret. Any ``n - 1`` of them are
  uniformly random and tell nothing about it, whatever the attacker's computing power
  (information-theoretic); adding shares party by party adds the secrets.
* Pairwise masking (Bonawitz et al., CCS 2017): every pair of owners agrees on a secret by Diffie-Hellman and
  derives from it one seed *per run and round* (:func:`round_seed`); one owner adds the seed's expansion, the
  other subtracts it. A masked vector is *pseudorandom* (indistinguishable from uniform only for an attacker
  who cannot break Diffie-Hellman or the SHAKE-256 expansion: a computational guarantee). When an owner drops
  out, survivors reveal this round's seeds with it (:func:`recovery_seeds`): earlier and later rounds' seeds
  stay secret. The full protocol, with self masks and the owners' checks, is in :mod:`secure_ai.secagg`.

Shares and masks come from the operating system's CSPRNG (``os.urandom``) and SHAKE-256; pass a seeded
``numpy`` generator to :func:`share` only for reproducible demonstrations and tests.
"""
from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

RING_BITS = 64
FRACTION_BITS = 24  # resolution 2**-24 = 6e-8; largest magnitude 2**39 = 5.5e11


def max_magnitude(fraction_bits: int = FRACTION_BITS) -> float:
    """The largest ``|x|`` that :func:`encode` accepts: the ring's signed range, in fixed point."""
    return float(2 ** (RING_BITS - 1 - fraction_bits))


def _check_fraction_bits(fraction_bits: int) -> None:
    if not isinstance(fraction_bits, (int, np.integer)) or not 0 <= fraction_bits <= 52:
        raise ValueError(f"fraction_bits must be an integer between 0 and 52, got {fraction_bits!r}")


def encode(values, fraction_bits: int = FRACTION_BITS) -> np.ndarray:
    """Floats -> ring elements (``uint64``): ``round(x * 2**fraction_bits) mod 2**64``.

    Raises ``ValueError`` for NaN, infinities and values outside ``±max_magnitude(fraction_bits)``.
    Keep in mind that a *sum* of encoded values must stay inside that range as well: the ring wraps silently.
    """
    _check_fraction_bits(fraction_bits)
    values = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError("cannot encode NaN or infinite values")
    scaled = np.rint(values * 2.0**fraction_bits)
    if values.size and np.abs(scaled).max() >= 2.0 ** (RING_BITS - 1):
        raise ValueError(
            f"value {np.abs(values).max():.4g} overflows the 64-bit ring with {fraction_bits} fraction bits: "
            f"encode only magnitudes below {max_magnitude(fraction_bits):.4g} (or use fewer fraction bits)"
        )
    return scaled.astype(np.int64).view(np.uint64)


def decode(ring_values, fraction_bits: int = FRACTION_BITS) -> np.ndarray:
    """Ring elements (``uint64``) -> floats (``float64``); the upper half of the ring holds negatives."""
    _check_fraction_bits(fraction_bits)
    ring_values = as_ring(ring_values, "decode")
    return ring_values.view(np.int64).astype(np.float64) / 2.0**fraction_bits


def as_ring(values, what: str) -> np.ndarray:
    """``values`` as a uint64 array (ring elements); ``ValueError`` naming ``what`` for any other dtype."""
    values = np.asarray(values)
    if values.dtype != np.uint64:
        raise ValueError(f"{what} needs ring elements (uint64), got {values.dtype}: encode() floats first")
    return values


def random_ring(shape, rng: np.random.Generator | None = None) -> np.ndarray:
    """Uniformly random ring elements: from ``os.urandom``, or from ``rng`` for reproducible demos."""
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
    count = int(np.prod(shape, dtype=np.int64))
    if rng is None:
        return np.frombuffer(os.urandom(8 * count), dtype="<u8").astype(np.uint64).reshape(shape)
    return rng.integers(0, 2**64, size=shape, dtype=np.uint64, endpoint=False)


@dataclass(frozen=True)
class Share:
    """Party ``party``'s share (of ``n_parties``) of a secret ring tensor. Alone, it is uniform noise."""

    party: int
    n_parties: int
    values: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.values.nbytes


def share(secret, n_parties: int, rng: np.random.Generator | None = None) -> list[Share]:
    """Split ``secret`` (ring elements from :func:`encode`) into ``n_parties`` additive shares.

    The first ``n_parties - 1`` shares are uniformly random; the last is ``secret - (their sum)``.
    """
    secret = as_ring(secret, "share")
    if not isinstance(n_parties, (int, np.integer)) or n_parties < 2:
        raise ValueError(f"secret sharing needs at least 2 parties, got {n_parties!r}")
    randoms = [random_ring(secret.shape, rng) for _ in range(n_parties - 1)]
    last = secret.copy()
    for r in randoms:
        last -= r  # uint64 arithmetic wraps: this is subtraction modulo 2**64
    values = [*randoms, last]
    return [Share(i, int(n_parties), v) for i, v in enumerate(values)]


def add_shares(shares: Sequence[Share]) -> Share:
    """One party adds its shares of several secrets: the result is its share of the secrets' sum."""
    if len(shares) == 0:
        raise ValueError("add_shares needs at least one share")
    first = shares[0]
    for s in shares[1:]:
        if (s.party, s.n_parties) != (first.party, first.n_parties):
            raise ValueError(
                f"only shares held by the same party can be added: party {first.party} of {first.n_parties} "
                f"and party {s.party} of {s.n_parties}"
            )
        if s.values.shape != first.values.shape:
            raise ValueError(f"shares have different shapes: {first.values.shape} and {s.values.shape}")
    total = first.values.copy()
    for s in shares[1:]:
        total += s.values
    return Share(first.party, first.n_parties, total)


def reconstruct(shares: Sequence[Share]) -> np.ndarray:
    """Add all ``n_parties`` shares back together: the secret (ring elements). Needs every party's share."""
    if len(shares) == 0:
        raise ValueError("reconstruct needs the shares of all parties, got none")
    n = shares[0].n_parties
    parties = sorted(s.party for s in shares)
    if any(s.n_parties != n for s in shares) or parties != list(range(n)):
        raise ValueError(
            f"reconstruct needs exactly one share from each of the {n} parties, got parties {parties}"
        )
    shapes = {s.values.shape for s in shares}
    if len(shapes) != 1:
        raise ValueError(f"shares have different shapes: {sorted(shapes)}")
    total = np.zeros(shares[0].values.shape, dtype=np.uint64)
    for s in shares:
        total += as_ring(s.values, "reconstruct")
    return total


# --- pairwise masks (Bonawitz et al. 2017) ---------------------------------------------------------------
# Diffie-Hellman in the 2048-bit MODP group 14 of RFC 3526, with generator 2: about 112-bit security (NIST
# SP 800-57), below the 128 bits of the CKKS parameters. Bonawitz et al. use elliptic-curve Diffie-Hellman;
# our key derivation is SHA-256 with a label, not HKDF. Enough for a tutorial, not a security level we claim.
MODP_PRIME = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DD"
    "EF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F"
    "83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6955817183995497CEA956AE515D2261898FA0510"
    "15728E5A8AACAA68FFFFFFFFFFFFFFFF",
    16,
)
MODP_GENERATOR = 2
_KEY_BYTES = 256  # public keys are 2048-bit numbers
_SECRET_BYTES = 32  # 256-bit secret exponents


def raw_bytes(key) -> bytes:
    """Keys travel as ``bytes``, or as ``uint8`` arrays where they are stored as datasite assets."""
    return bytes(key) if isinstance(key, (bytes, bytearray)) else np.asarray(key).tobytes()


def _secret_int(secret_key) -> int:
    raw = raw_bytes(secret_key)
    if len(raw) != _SECRET_BYTES:
        raise ValueError(f"a secret key has {_SECRET_BYTES} bytes, got {len(raw)}")
    return int.from_bytes(raw, "big")


def _public_int(public_key) -> int:
    raw = raw_bytes(public_key)
    value = int.from_bytes(raw, "big")
    if len(raw) != _KEY_BYTES or not 2 <= value <= MODP_PRIME - 2:
        raise ValueError(f"not a valid public key: expected {_KEY_BYTES} bytes encoding 2 <= y <= p - 2")
    return value


def generate_keypair() -> tuple[bytes, bytes]:
    """An owner's Diffie-Hellman key pair ``(secret_key, public_key)``; only the public key is ever shared."""
    secret = 0
    while secret < 2:
        secret = secrets.randbits(8 * _SECRET_BYTES)
    public = pow(MODP_GENERATOR, secret, MODP_PRIME)
    return secret.to_bytes(_SECRET_BYTES, "big"), public.to_bytes(_KEY_BYTES, "big")


def public_key_of(secret_key) -> bytes:
    """The public key that belongs to ``secret_key``."""
    return pow(MODP_GENERATOR, _secret_int(secret_key), MODP_PRIME).to_bytes(_KEY_BYTES, "big")


def shared_seed(my_secret_key, their_public_key) -> bytes:
    """The long-term 32-byte secret two owners agree on. Never revealed: only :func:`round_seed` of it is."""
    value = pow(_public_int(their_public_key), _secret_int(my_secret_key), MODP_PRIME)
    return hashlib.sha256(b"secure-ai pairwise mask seed" + value.to_bytes(_KEY_BYTES, "big")).digest()


def round_seed(pair_secret: bytes, run_id: str, round_number: int, purpose: str = "mask") -> bytes:
    """A 32-byte seed for one ``purpose``, run and round, derived from a pair's long-term secret (SHA-256).

    Knowing the seeds of some rounds tells nothing about another round's seed (SHA-256 as a PRF).
    """
    if len(pair_secret) != 32:
        raise ValueError(f"a pairwise secret has 32 bytes, got {len(pair_secret)}")
    if not isinstance(round_number, (int, np.integer)) or round_number < 0:
        raise ValueError(f"round_number must be a non-negative integer, got {round_number!r}")
    label = f"secure-ai {purpose}|{run_id}|{int(round_number)}".encode()
    return hashlib.sha256(len(label).to_bytes(4, "big") + label + bytes(pair_secret)).digest()


def expand_seed(seed: bytes, size: int) -> np.ndarray:
    """A pseudorandom mask of ``size`` ring elements from a 32-byte ``seed`` (SHAKE-256)."""
    if len(seed) != 32:
        raise ValueError(f"a mask seed has 32 bytes, got {len(seed)}")
    stream = hashlib.shake_256(bytes(seed)).digest(8 * int(size))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def _sign(me: str, peer: str) -> int:
    """The owner whose name sorts first adds the pair's mask, the other subtracts it."""
    return 1 if me < peer else -1


def check_roster(public_keys: Mapping[str, bytes]) -> None:
    """Refuse a roster with fewer than 2 owners, a malformed key, or one key listed under two names."""
    if len(public_keys) < 2:
        raise ValueError("pairwise masking needs at least 2 owners")
    raw = {name: raw_bytes(key) for name, key in public_keys.items()}
    for key in raw.values():
        _public_int(key)
    if len(set(raw.values())) != len(raw):
        twice = sorted(name for name, key in raw.items() if list(raw.values()).count(key) > 1)
        raise ValueError(f"one public key is listed under several names {twice}: each owner needs its own")


def _check_me(me: str, secret_key, public_keys: Mapping[str, bytes]) -> None:
    # A secret key that does not match public_keys[me] is not an error here: syft also runs approved code on
    # the mocks, with a mock key. Its masks then cancel with nothing, which decode_weighted_average reports.
    if me not in public_keys:
        raise ValueError(f"{me!r} is not among the owners {sorted(public_keys)}")
    check_roster(public_keys)
    _secret_int(secret_key)


def mask(encoded, me: str, secret_key, public_keys: Mapping[str, bytes], round_number: int,
         run_id: str = "") -> np.ndarray:
    """Owner side: ``encoded + sum of ±PRG(round seed of (me, peer))`` over every other owner.

    ``public_keys`` maps every owner's name (``me`` included) to its public key.
    """
    encoded = as_ring(encoded, "mask")
    _check_me(me, secret_key, public_keys)
    masked = encoded.reshape(-1).copy()
    for peer, public in sorted(public_keys.items()):
        if peer == me:
            continue
        pad = expand_seed(round_seed(shared_seed(secret_key, public), run_id, round_number), masked.size)
        if _sign(me, peer) > 0:
            masked += pad
        else:
            masked -= pad
    return masked.reshape(encoded.shape)


def recovery_seeds(me: str, secret_key, public_keys: Mapping[str, bytes], dropped: Sequence[str],
                   survivors: Sequence[str], round_number: int, run_id: str = "",
                   min_survivors: int = 2) -> dict[str, bytes]:
    """Survivor side: *this round's* seeds that ``me`` shares with the ``dropped`` owners.

    Refuses ``min_survivors < 2``, fewer survivors than ``min_survivors`` (removing the masks would reveal a
    lone survivor's update), duplicate names or keys, and ``me`` counted as dropped. The long-term secret
    stays with ``me``: the seeds of other rounds cannot be computed from what is revealed.
    """
    if not isinstance(min_survivors, (int, np.integer)) or min_survivors < 2:
        raise ValueError(f"min_survivors must be an integer >= 2, got {min_survivors!r}")
    _check_me(me, secret_key, public_keys)
    if len(set(dropped)) != len(dropped) or len(set(survivors)) != len(survivors):
        raise ValueError("an owner is listed twice among the survivors or the dropped")
    dropped, survivors = set(dropped), set(survivors)
    unknown = (dropped | survivors) - set(public_keys)
    if unknown:
        raise ValueError(f"unknown owners {sorted(unknown)}; owners are {sorted(public_keys)}")
    if dropped & survivors or dropped | survivors != set(public_keys):
        raise ValueError("every owner must be either a survivor or dropped, not both")
    if me not in survivors:
        raise ValueError(f"{me!r} is listed as dropped: a dropped owner reveals no seeds")
    if len(survivors) < min_survivors:
        raise ValueError(
            f"only {len(survivors)} owner(s) survive, fewer than {min_survivors}: revealing the seeds would "
            "expose a single owner's update"
        )
    return {peer: round_seed(shared_seed(secret_key, public_keys[peer]), run_id, round_number)
            for peer in sorted(dropped)}


def unmask_sum(masked: Mapping[str, np.ndarray], owners: Sequence[str],
               recovery: Mapping[str, Mapping[str, bytes]] | None = None) -> np.ndarray:
    """Aggregator side: the sum of the received masked vectors with every pairwise mask removed.

    ``owners`` are all owners that agreed on masks this round; ``masked`` holds the vectors that arrived.
    When some owners dropped out, ``recovery`` must give, for every survivor, this round's seeds from
    :func:`recovery_seeds`. The result is the sum of the survivors' encoded updates, nothing more.
    """
    if not masked:
        raise ValueError("no masked updates arrived")
    owners = set(owners)
    survivors = set(masked)
    if survivors - owners:
        raise ValueError(f"updates from unknown owners {sorted(survivors - owners)}")
    vectors = [as_ring(masked[name], "unmask_sum") for name in sorted(masked)]
    shapes = {v.shape for v in vectors}
    if len(shapes) != 1:
        raise ValueError(f"masked updates have different shapes: {sorted(shapes)}")
    total = np.zeros(vectors[0].shape, dtype=np.uint64)
    for v in vectors:
        total += v
    dropped = owners - survivors
    if not dropped:
        return total
    recovery = recovery or {}
    flat = total.reshape(-1)
    for survivor in sorted(survivors):
        seeds = recovery.get(survivor, {})
        if set(seeds) != dropped:
            raise ValueError(
                f"owners {sorted(dropped)} dropped out: survivor {survivor} must reveal the seeds it shares "
                f"with each of them (recovery_seeds); got seeds for {sorted(seeds)}"
            )
        for peer, seed in seeds.items():
            pad = expand_seed(seed, flat.size)
            if _sign(survivor, peer) > 0:  # the survivor added this pad: take it away
                flat -= pad
            else:
                flat += pad
    return total


# --- FedAvg on top: a weighted sum that reveals only the totals ------------------------------------------
def encode_weighted(vector, n_samples: int, fraction_bits: int = FRACTION_BITS) -> np.ndarray:
    """Owner side: ``[n_samples * vector, n_samples]`` in the ring, ready to be masked or shared.

    Summing these over owners gives ``sum(n_i * w_i)`` and ``sum(n_i)``: the FedAvg average, while no
    single owner's sample count is revealed either.
    """
    vector = np.asarray(vector.detach().cpu() if hasattr(vector, "detach") else vector, dtype=np.float64)
    if vector.ndim != 1:
        raise ValueError(f"expected a flat vector, got shape {vector.shape}")
    if not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    return encode(np.append(vector * n_samples, n_samples), fraction_bits)


def decode_weighted_average(total, fraction_bits: int = FRACTION_BITS) -> tuple[np.ndarray, int]:
    """Aggregator side: ``(FedAvg average as float64, total samples)`` from the summed ring vector."""
    values = decode(total, fraction_bits)
    if values.ndim != 1 or values.size < 2:
        raise ValueError(f"expected a summed [n*w, n] vector, got shape {values.shape}")
    n_total = values[-1]
    if not n_total >= 1 or n_total != round(n_total):
        raise ValueError(
            f"the summed sample count is {n_total}: the masks did not cancel or the sum overflowed"
        )
    return values[:-1] / n_total, int(round(n_total))
