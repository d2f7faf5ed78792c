"""Fixed-point encoding of bounded real vectors into the ring Z_{2^32}.

A value ``x`` with ``|x| <= B`` (the *value bound*) is encoded as
``round(x * 2^f) mod 2^32`` and stored as ``numpy.uint32`` (two's complement:
negative values wrap to the top half of the ring). Encodings are added with
uint32 wraparound, which is exactly addition in Z_{2^32}; pairwise masks
cancel in that ring. A *sum* of ``n`` encodings is decoded by centring it
(words ``>= 2^31`` are negative) and dividing by ``2^f``.

Choice of ``f`` (:func:`choose_frac_bits`): the largest integer with

    n * round(B' * 2^f) <= 2^(31 - h) - 1,   B' = B (1 + 2^-20),   h = HEADROOM_BITS = 4,

which implies ``n * B * 2^f < 2^27``. Every partial sum of at most ``n``
encodings then lies in ``[-(2^27 - 1), 2^27 - 1]`` and the centred decoding is
exact: no wraparound ambiguity, whatever the signs. The ``h`` spare bits are
headroom for checking a sum (:func:`out_of_range`): a sum of ``n`` well-formed
encodings never leaves ``[-n round(B' 2^f), n round(B' 2^f)]``, which covers at
most ``2^-h`` of the ring, so an upload that is not well formed (a value outside
``[-B, B]``, or any word of garbage) shows up as a sum outside that range,
unless it was chosen to land inside it. The tiny slack in ``B'``
lets a float32 input clipped to ``float32(B)`` (which may exceed ``B`` by a
relative ``2^-24``) pass: values are checked against ``B`` rounded to the
input's precision, so ``np.clip(x, -B, B)`` in float32 is always accepted.

Resolution: one encoded value is off by at most ``2^-(f+1)`` (rounding to the
nearest multiple of ``2^-f``), so a decoded sum of ``n`` values is within
``n * 2^-(f+1)`` of the real sum (:func:`max_sum_error`). Since ``2^f`` is
within a factor 2 of ``2^27 / (n B)``, the resolution ``2^-f`` is about
``n * B / 2^27`` to ``n * B / 2^26``. Example: ``B = 1``, ``n = 943`` gives
``f = 17``, resolution ``7.6e-6`` and a worst-case sum error of ``3.6e-3``
(the typical error is far smaller: rounding errors are centred and cancel,
about ``sqrt(n / 12) 2^-f = 6.8e-5``).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "HEADROOM_BITS",
    "MAX_ABS_SUM",
    "RING_BITS",
    "RING_MODULUS",
    "centre",
    "check_values",
    "choose_frac_bits",
    "decode_sum",
    "encode",
    "max_sum_error",
    "out_of_range",
    "resolution",
    "sum_bound",
]

RING_BITS = 32
RING_MODULUS = 1 << RING_BITS
HEADROOM_BITS = 4
"""Spare bits between the largest well-formed sum and the ring's half-width (see module doc)."""
MAX_ABS_SUM = (1 << (RING_BITS - 1 - HEADROOM_BITS)) - 1
"""Largest magnitude a sum of well-formed encodings may reach: 2^27 - 1."""

_MAX_LISTED = 5  # clients named in a rejection message
_CHECK_CHUNK = 1 << 22  # elements checked per block
_BOUND_SLACK = 1.0 + 2.0**-20  # covers B rounded to float32 (relative error <= 2^-24)


def _check_bound(value_bound: float) -> float:
    bound = float(value_bound)
    if not (math.isfinite(bound) and bound > 0.0):
        raise ValueError(f"value_bound must be a finite number > 0, got {value_bound!r}")
    return bound


def _largest_word(bound: float, frac_bits: int) -> int:
    """round(B' 2^f), ties up: the largest magnitude a well-formed encoding can have."""
    return math.floor(math.ldexp(bound * _BOUND_SLACK, frac_bits) + 0.5)


def _fits(bound: float, max_summands: int, frac_bits: int) -> bool:
    """True when ``max_summands`` encodings of magnitude ``<= bound * (1 + 2^-20)`` stay within
    :data:`MAX_ABS_SUM` (the ring's half-width less the headroom)."""
    return max_summands * _largest_word(bound, frac_bits) <= MAX_ABS_SUM


def choose_frac_bits(value_bound: float, max_summands: int) -> int:
    """Largest number of fractional bits for which a sum cannot overflow.

    Parameters
    ----------
    value_bound : B > 0, the largest ``|x|`` any client may encode.
    max_summands : n >= 1, the largest number of encodings that will be added.

    Returns
    -------
    int
        ``f >= 0`` with ``n * round(B * 2^f) <= 2^27 - 1`` (hence ``n * B * 2^f < 2^27``,
        leaving :data:`HEADROOM_BITS` spare bits); ``f + 1`` violates it. The resolution is
        ``2^-f`` (see the module docstring).

    Raises
    ------
    ValueError
        When even ``f = 0`` overflows (``n * B`` too large for a 32-bit ring with headroom).
    """
    bound = _check_bound(value_bound)
    if isinstance(max_summands, bool) or int(max_summands) != max_summands or max_summands < 1:
        raise ValueError(f"max_summands must be an integer >= 1, got {max_summands!r}")
    n = int(max_summands)
    if not _fits(bound, n, 0):
        raise ValueError(
            f"value_bound={bound} with {n} summands overflows the 32-bit ring even without "
            f"fractional bits (n * B must stay below 2^{RING_BITS - 1 - HEADROOM_BITS}, the ring "
            f"less {HEADROOM_BITS} bits of headroom); scale the values down"
        )
    frac_bits = max(0, math.floor(math.log2(MAX_ABS_SUM / (n * bound))))
    while not _fits(bound, n, frac_bits):
        frac_bits -= 1
    while _fits(bound, n, frac_bits + 1):
        frac_bits += 1
    return frac_bits


def sum_bound(n_summands: int, frac_bits: int, value_bound: float) -> int:
    """Largest ``|centre(sum)|`` that ``n_summands`` well-formed encodings can produce: ``n round(B' 2^f)``."""
    return int(n_summands) * _largest_word(_check_bound(value_bound), int(frac_bits))


def out_of_range(total: np.ndarray, n_summands: int, frac_bits: int, value_bound: float) -> np.ndarray:
    """Indices of the coordinates of a ring sum that no ``n_summands`` well-formed uploads can give.

    Parameters
    ----------
    total : uint32 [D], a sum of encodings (after unmasking).
    n_summands : n, how many uploads were summed.
    frac_bits, value_bound : f and B of the encoding.

    Returns
    -------
    np.ndarray
        int64 [k], sorted: the coordinates with ``|centre(total)| > n round(B' 2^f)``. Empty when the
        sum is consistent with n uploads bounded by B (it may still hold a malicious upload chosen
        to land in range: individual uploads cannot be range-checked under masking).
    """
    limit = sum_bound(n_summands, frac_bits, value_bound)
    return np.flatnonzero(np.abs(centre(total)) > limit).astype(np.int64)


def resolution(frac_bits: int) -> float:
    """The quantisation step ``2^-frac_bits``."""
    return math.ldexp(1.0, -int(frac_bits))


def max_sum_error(n_summands: int, frac_bits: int) -> float:
    """Worst-case absolute error of a decoded sum of ``n_summands`` values: ``n * 2^-(f+1)``."""
    return n_summands * math.ldexp(1.0, -int(frac_bits) - 1)


def check_values(x: np.ndarray, value_bound: float, *, client: int | None = None) -> None:
    """Reject non-finite values and values with ``|x| > value_bound``.

    Parameters
    ----------
    x : float [D] (one client's vector) or float [n, D] (one row per client).
    value_bound : B.
    client : the client id used in the message for a 1-D ``x`` (rows are named by index).

    Raises
    ------
    ValueError
        Naming the offending client(s) and how many coordinates are NaN/inf or out of range.
    """
    bound = _check_bound(value_bound)
    arr = np.asarray(x)
    if arr.ndim not in (1, 2):
        raise ValueError(f"expected a [D] or [n, D] array, got shape {arr.shape}")
    if arr.dtype not in (np.float32, np.float64):
        raise ValueError(f"expected a float32 or float64 array, got dtype {arr.dtype}")
    rows = arr.reshape(1, -1) if arr.ndim == 1 else arr
    limit = np.asarray(bound, dtype=arr.dtype)[()]  # B in the input's precision (see module doc)
    chunk = max(1, _CHECK_CHUNK // max(1, rows.shape[1]))  # bounded temporaries for large [n, D]
    bad_rows = [
        start + np.flatnonzero(~((block.max(axis=1) <= limit) & (block.min(axis=1) >= -limit)))
        for start in range(0, rows.shape[0], chunk)
        for block in (rows[start : start + chunk],)
    ]  # a row holding NaN has a NaN max, which compares False, so it is caught here too
    bad = np.concatenate(bad_rows) if bad_rows else np.zeros(0, dtype=np.int64)
    if bad.size == 0:
        return
    parts = []
    for r in bad[:_MAX_LISTED]:
        row = rows[r]
        finite = np.isfinite(row)
        out_of_range = finite & ~(np.abs(row) <= limit)
        n_nonfinite = int((~finite).sum())
        n_out = int(out_of_range.sum())
        first = int(np.flatnonzero(~finite | out_of_range)[0])
        name = client if (arr.ndim == 1 and client is not None) else int(r)
        parts.append(
            f"client {name}: {n_nonfinite + n_out} of {rows.shape[1]} coordinates "
            f"({n_nonfinite} NaN/inf, {n_out} with |x| > {bound}; "
            f"first at index {first}: {float(row[first])!r})"
        )
    more = f"; and {bad.size - _MAX_LISTED} more clients" if bad.size > _MAX_LISTED else ""
    raise ValueError(
        f"{bad.size} client(s) have values outside [-value_bound, value_bound] or "
        f"non-finite values: " + "; ".join(parts) + more
    )


def encode(
    x: np.ndarray, *, frac_bits: int, value_bound: float, client: int | None = None
) -> np.ndarray:
    """Encode real values into Z_{2^32}: ``round(x * 2^f) mod 2^32``.

    Parameters
    ----------
    x : float32 or float64 [D] or [n, D]; every value must satisfy ``|x| <= value_bound``.
    frac_bits : f, normally from :func:`choose_frac_bits`.
    value_bound : B, checked here (see :func:`check_values`).
    client : id used in error messages for a 1-D ``x``.

    Returns
    -------
    np.ndarray
        uint32, same shape as ``x`` (a new array); negative values in two's complement.
    """
    check_values(x, value_bound, client=client)
    arr = np.asarray(x)
    # Scaling by 2^f is exact in the input's own precision (no overflow: |x 2^f| < 2^31), and so
    # is rounding; |round(x 2^f)| <= 2^31 - 1 by the choice of f, so the int32 cast is safe.
    work = np.float32 if arr.dtype == np.float32 else np.float64
    # |x| <= B (in the input's precision) was checked above, so one scalar bound covers every value
    if _largest_word(_check_bound(value_bound), int(frac_bits)) > MAX_ABS_SUM:
        raise ValueError(f"frac_bits={frac_bits} is too large for value_bound={value_bound}")
    # a product with 2^f rounds like ldexp (both are exact here) and takes half the time
    scaled = np.multiply(arr, work(2.0 ** int(frac_bits)), dtype=work)
    return np.rint(scaled, out=scaled).astype(np.int32).view(np.uint32)


def centre(total: np.ndarray) -> np.ndarray:
    """Map ring elements to integers in ``[-2^31, 2^31)``.

    Parameters
    ----------
    total : uint32 [...], e.g. a sum of encodings.

    Returns
    -------
    np.ndarray
        int64, same shape: words ``>= 2^31`` become negative.
    """
    arr = np.asarray(total)
    if arr.dtype != np.uint32:
        raise ValueError(f"expected a uint32 ring array, got dtype {arr.dtype}")
    return arr.view(np.int32).astype(np.int64)


def decode_sum(total: np.ndarray, *, frac_bits: int) -> np.ndarray:
    """Decode a sum of encodings (or one encoding) back to real numbers.

    Parameters
    ----------
    total : uint32 [...], the ring sum of at most ``n`` encodings made with the same ``frac_bits``.
    frac_bits : f.

    Returns
    -------
    np.ndarray
        float64, same shape: ``centre(total) * 2^-f``.
    """
    return np.ldexp(centre(total).astype(np.float64), -int(frac_bits))
