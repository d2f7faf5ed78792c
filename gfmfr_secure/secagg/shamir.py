"""Shamir secret sharing over a 256-bit prime field: pure functions.

A secret ``s`` in ``[0, p)`` is hidden as the constant term of a random
polynomial ``f`` of degree ``t - 1`` over GF(p); holder ``i`` receives the
point ``(x_i, f(x_i))``. Any ``t`` points determine ``f(0) = s`` by Lagrange
interpolation, while ``t - 1`` points are consistent with every secret
(information-theoretic hiding): interpolating them gives an unrelated value.

The field is GF(p) with ``p = 2^256 - 2^32 - 977`` (the secp256k1 base-field
prime), so any 32-byte secret below ``p`` is shared in one piece; the
secure-aggregation code only shares values below ``2^255`` (clamped X25519
private keys and 255-bit seeds). Shares are 32 bytes each.

Randomness is an argument (``randomness`` bytes, e.g. an AES-256-CTR keystream),
so ``split_secret`` is a pure, deterministic function of its inputs. Each
coefficient takes 40 bytes reduced mod ``p``: the bias from the reduction is
below ``2^-64``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

__all__ = [
    "COEFFICIENT_BYTES",
    "PRIME",
    "SECRET_BYTES",
    "Share",
    "int_to_secret",
    "interpolate_at_zero",
    "randomness_bytes_needed",
    "reconstruct_secret",
    "secret_to_int",
    "split_secret",
]

PRIME = (1 << 256) - (1 << 32) - 977
SECRET_BYTES = 32
COEFFICIENT_BYTES = 40


@dataclass(frozen=True, slots=True)
class Share:
    """One point ``(x, y = f(x))`` of a sharing polynomial, ``0 < x < p``, ``0 <= y < p``."""

    x: int
    y: int


def randomness_bytes_needed(threshold: int) -> int:
    """Bytes of randomness :func:`split_secret` consumes for a threshold ``t``: ``40 (t - 1)``."""
    _check_threshold(threshold)
    return COEFFICIENT_BYTES * (int(threshold) - 1)


def _check_threshold(threshold: int) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, Integral) or threshold < 1:
        raise ValueError(f"threshold must be an integer >= 1, got {threshold!r}")


def _check_xs(xs: Sequence[int], prime: int) -> list[int]:
    points = [int(x) for x in xs]
    for x in points:
        if not 0 < x < prime:
            raise ValueError(f"share x-coordinates must lie in [1, p), got {x}")
    if len(set(points)) != len(points):
        raise ValueError("share x-coordinates must be distinct")
    return points


def split_secret(
    secret: int, threshold: int, xs: Sequence[int], randomness: bytes, *, prime: int = PRIME
) -> tuple[Share, ...]:
    """Share ``secret`` so that any ``threshold`` of the returned shares recover it.

    Parameters
    ----------
    secret : integer in ``[0, prime)``.
    threshold : t, ``1 <= t <= len(xs)``.
    xs : distinct x-coordinates in ``[1, prime)``, one per holder (length H).
    randomness : at least :func:`randomness_bytes_needed` ``(t)`` bytes (extra bytes are ignored);
        must be secret and uniformly random for the sharing to hide ``secret``.
    prime : the field modulus.

    Returns
    -------
    tuple[Share, ...]
        H shares, in the order of ``xs``.
    """
    _check_threshold(threshold)
    points = _check_xs(xs, prime)
    if threshold > len(points):
        raise ValueError(f"threshold {threshold} exceeds the number of holders {len(points)}")
    if not 0 <= secret < prime:
        raise ValueError("secret must lie in [0, p)")
    needed = randomness_bytes_needed(threshold)
    if len(randomness) < needed:
        raise ValueError(
            f"need {needed} bytes of randomness for threshold {threshold}, got {len(randomness)}"
        )
    coeffs = [secret] + [
        int.from_bytes(randomness[i : i + COEFFICIENT_BYTES], "little") % prime
        for i in range(0, needed, COEFFICIENT_BYTES)
    ]
    shares = []
    for x in points:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % prime
        shares.append(Share(x, acc))
    return tuple(shares)


def interpolate_at_zero(shares: Sequence[Share], *, prime: int = PRIME) -> int:
    """Lagrange-interpolate the polynomial through ``shares`` and evaluate it at 0.

    With at least ``t`` shares of a degree ``t - 1`` sharing this is the secret; with fewer it is
    a value unrelated to the secret. O(len(shares)^2) field operations.
    """
    if not shares:
        raise ValueError("need at least one share")
    xs = _check_xs([s.x for s in shares], prime)
    total = 0
    for i, share in enumerate(shares):
        num = 1
        den = 1
        xi = xs[i]
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % prime
                den = den * (xj - xi) % prime
        total = (total + share.y * num * pow(den, -1, prime)) % prime
    return total


def reconstruct_secret(shares: Sequence[Share], threshold: int, *, prime: int = PRIME) -> int:
    """Recover the secret from at least ``threshold`` shares (the first ``threshold`` are used).

    Raises
    ------
    ValueError
        With fewer than ``threshold`` shares, or duplicate / invalid x-coordinates.
    """
    _check_threshold(threshold)
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares available, {threshold} required to reconstruct")
    return interpolate_at_zero(list(shares)[:threshold], prime=prime)


def secret_to_int(secret: bytes, *, prime: int = PRIME) -> int:
    """A 32-byte secret as a field element (little-endian); it must be below ``prime``."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    value = int.from_bytes(secret, "little")
    if value >= prime:
        raise ValueError("secret is not below the field prime")
    return value


def int_to_secret(value: int) -> bytes:
    """Inverse of :func:`secret_to_int`: 32 little-endian bytes."""
    if not 0 <= value < 1 << (8 * SECRET_BYTES):
        raise ValueError("value does not fit in 32 bytes")
    return value.to_bytes(SECRET_BYTES, "little")
