"""CKKS homomorphic aggregation of float vectors, with explicit key custody.

Every client encrypts its update vector ``x_i`` [D] under one CKKS key; the
aggregator adds the ciphertexts without being able to decrypt them; the key
holder decrypts only the sum (optionally adding Gaussian noise before it
releases it). Only additions are performed: no multiplication, rescaling,
relinearisation or rotation, which is what makes a very short modulus chain
possible.

Roles and data flow
-------------------
``KeyHolder``
    Creates the TenSEAL context (secret key included). Hands out
    :meth:`KeyHolder.public_context_bytes` (no secret key) to the aggregator and
    :meth:`KeyHolder.client_context_bytes` to clients, and builds the
    :class:`Decryptor`.
``Encryptor`` (client)
    Packs ``x`` [D] into ``ceil(D / slots)`` ciphertexts and returns them as a
    list of bytes, one element per ciphertext.
``CKKSAggregator`` (server)
    Built from public context bytes only (it refuses a context that holds a
    secret key). Deserialises and validates every upload, adds it to a running
    encrypted sum and returns the encrypted sum as a list of bytes.
``Decryptor`` (key holder)
    Decrypts the encrypted sum to float64 [D], floods every value with Gaussian
    noise (below: an exact decryption reveals the key) and, through a passed-in
    callable, adds DP noise before release (the hook central DP uses, so that nobody but the
    decryptor ever sees a noiseless sum).

Key custody and what collusion reveals
--------------------------------------
``custody="authority"`` (asymmetric encryption)
    A key authority, separate from the aggregator, holds the secret key and
    decrypts. Clients and the aggregator only get the public key.

    * The aggregator alone sees IND-CPA ciphertexts: nothing but their sizes.
    * The authority alone sees only what it is asked to decrypt. If the aggregator
      is honest that is the sum over the cohort.
    * **Authority + aggregator collusion decrypts individual uploads**: the
      aggregator forwards any single client's ciphertexts. A *malicious*
      aggregator can achieve the same without the authority's knowledge by
      submitting one client's upload as "the sum": nothing here proves that the
      encrypted sum contains every upload. The setting is semi-honest.
    * The authority can decrypt any upload it gets hold of, so uploads must
      reach the aggregator over channels the authority cannot read.
    * Clients colluding with the aggregator learn nothing beyond the released
      aggregate (minus their own inputs), as with any sum.
    * The authority sees the noiseless sum; everyone else gets what it releases.
``custody="shared-clients"`` (symmetric encryption)
    A secret key generated once (by a designated client or a set-up ceremony) is
    shared by all clients; any client can decrypt the sum. There is no separate
    authority to trust, but:

    * **Any single client colluding with the aggregator decrypts every client's
      upload** (and so does any client that can observe uploads on the network
      without transport encryption). With n = 943 clients, one compromised
      client suffices.
    * The aggregator alone still learns nothing.
    * The client that decrypts sees the noiseless sum; the others get what it
      releases and must trust it to add the noise.

Threshold decryption (no single party holding the whole key) would remove the
single decryptor from both modes; TenSEAL does not offer it, so it is not
implemented here.

Parameters and security
-----------------------
:class:`CKKSParams` rejects any ring degree N / total modulus ``log2(q)`` pair
above the HomomorphicEncryption.org standard's 128-bit classical-security
limits for ternary secrets (``HE_STANDARD_MAX_LOG_Q``: 1024:27, 2048:54,
4096:109, 8192:218, 16384:438, 32768:881); SEAL enforces the same table.

Two ways to place values in a ciphertext (``PACKING``):

* **slots** (wire formats ``tenseal``, ``seeded``): CKKS's canonical encoding,
  ``N / 2`` real values per ciphertext. The error of one value is a sum over
  all N coefficients of the error polynomial, ``sqrt(N / 2)`` times larger
  than a coefficient's.
* **coefficients** (wire format ``packed``, the backend's): value ``j`` of a
  chunk is coefficient ``j`` of the plaintext polynomial, ``round(Delta x_j)``:
  N values per ciphertext, every coefficient used. Additions act on
  coefficients, which is all aggregation needs. SEAL's encoder is reused: the
  client evaluates its chunk as a polynomial at SEAL's slot roots
  (:func:`coefficients_to_slots`, one FFT), and encoding those slot values
  gives back the polynomial; the decryptor inverts it after decoding
  (:func:`slots_to_coefficients`).

The backend's parameters (:func:`gfmfr_secure.aggregation.ckks.ckks_params_for`
with ``packing="coefficients"``): ``N = 4096``, one 60-bit data prime and a
49-bit special prime, 109 bits in all: the standard's limit for 128-bit security
at N = 4096. The scale is the largest the data prime holds: ``Delta = 2**46``
for 943 summands of ``|x| <= 8``. Then:

* **Bytes**: a fresh ciphertext is sent at the data prime only (the special
  prime lives in the public key): two polynomials of N 64-bit words, 16 bytes
  per value under public-key encryption (4.0x float32), 8 under the seeded
  symmetric form. The slot parameters below send 34 + 34-bit primes for N / 2
  values: ~40 bytes per value.
* **Capacity**: a sum of n vectors with ``|x| <= B`` has coefficients up to
  ``Delta * n * B``, which must stay below ``q_data / 2`` or the sum wraps
  around (:attr:`CKKSParams.capacity`, checked on construction;
  :class:`CKKSAggregator` refuses more than ``max_summands`` uploads; the
  decryptor checks the flooding noise fits too).
* **Precision**: per value and ciphertext, the public-key error has variance
  ``(1 + ||s||^2) / 12 <= (1 + N) / 12`` (the rounding when the ciphertext
  drops the special prime, ``r0 + r1 s``), the symmetric error SEAL's fresh
  error, variance 10.5; independent ciphertexts add in variance
  (:meth:`CKKSParams.error_std`).

Slot parameters (wire formats ``tenseal`` and ``seeded``; the ``default``
preset): ``N = 4096``, ``(34, 34, 41)``, ``Delta = 2**56``, ``|x| <= 1``, 1000
summands. The public-key error of slot k is ``~N / (6 Delta)``, proportional to
``|s(zeta_k)|`` (the key at that slot's root of unity), so a few slots are ~3x
noisier than average in every ciphertext; symmetric: ``~3.2 sqrt(N / 2) / Delta``.

Releasing decryptions: noise flooding
-------------------------------------
CKKS decryption is approximate: the decrypted phase is ``m + e`` with an error
``e`` that depends on the secret key. Whoever holds the ciphertext and receives
the exact decryption turns it back into ``c0 + c1 s = Delta m + e`` (one value
per coefficient: multiply by Delta and round; slots: re-encode the real parts,
which gives ``p + conj(p)``), a linear system in ``s`` modulo ``q0``: one
``packed`` ciphertext or two slot ciphertexts under one key solve it (Li and
Micciancio, Eurocrypt 2021; ``tests/security/test_ckks_key_recovery.py`` and
``test_ckks_packed_key_recovery.py`` run the attack). Every value
:class:`Decryptor` releases therefore carries Gaussian *flooding* noise of std
``sigma_flood`` (:meth:`CKKSParams.flooding_std`), drawn from a 256-bit secret
key through ChaCha20 in float64:

* Let ``delta`` [D] be the key-dependent part of what is released: the
  lattice error (and, for slots, the floating-point error of decoding). Real
  release: ``m + delta + G``; ideal release, computable without the key:
  ``m + G``, ``G ~ N(0, sigma_flood^2 I_D)``. Their Kullback-Leibler divergence
  is ``||delta||^2 / (2 sigma_flood^2)`` (and at most that for the joint
  distribution with the ciphertexts, by convexity, whatever ``delta`` is).
* With ``sigma_flood >= 2^(lambda / 2) * B_delta / sqrt(2)`` for a bound
  ``||delta||_2 <= B_delta`` the divergence is at most ``2^-lambda``: the
  statistical distance is at most ``2^-(lambda + 1) / 2`` (Pinsker), and a
  search problem such as key recovery keeps ``lambda`` bits of security
  (Micciancio and Walter, Eurocrypt 2018; the same bound as Li, Micciancio,
  Schultz and Sorrell, Crypto 2022). ``lambda = STAT_SECURITY_BITS = 40``.
* Coefficients (``packed``): the decryptor adds the flooding as an integer
  polynomial ``F`` (coefficients ``round(N(0, (sigma_flood Delta)^2))``,
  through a plaintext) to the ciphertext *before* decrypting, so it decrypts
  ``Delta m + e + F`` and everything after (decoding in floating point) is
  post-processing, which cannot increase the divergence; shifting a rounded
  Gaussian by an integer ``e`` is no worse than shifting the Gaussian. Each
  coefficient of ``e`` is a sum over ``n_max = max_summands`` ciphertexts of
  independent terms of variance at most ``v = (1 + N) / 12`` (public key, any
  ternary key: ``||s||^2 <= N``; the fresh error divided by the special prime
  adds ~1e-20) or ``v = 10.5`` (symmetric), so ``E ||e||^2 <= D n_max v``.
  ``e`` is a linear image of independent bounded rounding errors, so by the
  Hanson-Wright inequality ``||e||^2`` exceeds four times that mean with
  probability ``exp(-c t)``, ``t ~ D n_max N / (12 max_k |s(zeta_k)|^2)``:
  ``t ~ 10^4`` at the backend's parameters for all but a fraction 1e-6 of keys
  (the key tail of the slot model). Hence ``B_delta = 2 sqrt(D n_max v) / Delta``.
  At the backend's
  parameters (943 summands, ``Delta = 2**46``, D = 579,850 values)
  ``sigma_flood = 9.1e-3`` on each value of a sum, ``1e-5`` on a mean over
  943 clients. The noise fits the data prime with room to spare: its ``10
  sigma_flood`` is checked against the capacity.
* Slots (``tenseal``, ``seeded``; flooded after decoding, in float64):
  ``B_delta = sqrt(D) * (2 * error_std(n_max) + u_fp)``; the squared norm of D
  such values exceeds ``4 D`` times their variance with probability below
  ``exp(-0.8 D / 30)`` even when single slots are 30x noisier than average.
  ``u_fp = (log2 N + 2) 2^-53 n_max B`` bounds the per-value error of
  decoding in double precision (coefficients to double, then an N/2-point
  FFT). At ``(34, 34, 41)``, ``Delta = 2**53``, 1024 summands of ``|x| <= 8``
  and D = 579,850: ``sigma_flood = 9.9e-3``. A single 42-bit prime would need
  ``sigma_flood ~ 1e5``: useless, hence the second data prime there.
* Keys are fresh every round (:mod:`gfmfr_secure.aggregation.ckks`): D is one
  round's vector, and a key broken despite this opens one round only.

Wire formats
------------
``"tenseal"``
    Each ciphertext is a serialised one-ciphertext ``tenseal.CKKSVector``
    (slots). Under ``authority`` custody the clients encrypt with the public
    key; under ``shared-clients`` TenSEAL's symmetric mode is used.
``"seeded"`` (``shared-clients`` only; its default)
    Raw SEAL ciphertexts (slots) from ``Encryptor.encrypt_symmetric``, whose
    second polynomial is replaced by the seed of the PRNG that generated it:
    half the bytes.
``"packed"`` (either custody; the backend's)
    Raw SEAL ciphertexts with one value per coefficient: public-key encrypted
    under ``authority``, seeded symmetric under ``shared-clients``.

The SEAL formats go through ``tenseal.sealapi``, whose ``save`` / ``load`` only
take file paths: the ciphertext bytes (never keys) pass through a private
temporary directory.

Simulating a round (:func:`encrypted_sum`): with ``workers > 1`` the clients are
split over forked processes, each of which also runs the server's ingestion
(validate and add, public context only) of its clients' uploads; the server
merges the partial encrypted sums (:meth:`CKKSAggregator.merge`). Clients encrypt
on their own machines in a deployment, so the per-client encryption time is the
figure that carries over; the simulation's wall time is what a benchmark on one
machine sees.

Options looked at and not used: one large ``CKKSVector`` holding all chunks
(same bytes; prints a warning and makes a malformed chunk impossible to name);
``ckks_tensor`` batching (same bytes, slower decryption); Python threads
(TenSEAL's and SEAL's bindings hold the GIL); a ring of N = 8192 (the same
bytes and time per value); a single data prime without a special prime (the
public-key error grows ~16x, so the flooding noise would too).

Randomness
----------
Encryption randomness comes from SEAL's system PRNG and cannot be seeded:
ciphertexts differ between runs, decrypted sums agree within
:meth:`CKKSParams.release_tolerance`. The flooding noise is drawn from a 32-byte
key: fresh from the operating system unless the caller passes one (the
``reproducible`` simulation mode derives it from the run seed, and then protects
nothing against whoever holds the seed). A ``seed`` drives the DP release noise
of :func:`encrypted_sum` only.

Limitations
-----------
No integrity: a ciphertext made under a different key with the *same*
parameters is indistinguishable from a valid one (it decrypts to garbage), and
nothing stops a client from encrypting values above ``max_abs_value`` with its
own code (the bound is checked by :class:`Encryptor` only); parameter, level,
scale, size and format mismatches are detected.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from types import ModuleType
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from gfmfr_secure.errors import GfmfrError

__all__ = [
    "HE_STANDARD_MAX_LOG_Q",
    "PACKING",
    "PRESETS",
    "STAT_SECURITY_BITS",
    "CKKSAggregator",
    "CKKSCost",
    "CKKSError",
    "CKKSParams",
    "Custody",
    "Decryptor",
    "Encryptor",
    "KeyHolder",
    "WireFormat",
    "coefficients_to_slots",
    "default_wire",
    "encrypted_sum",
    "flooding_noise",
    "gaussian_noise",
    "slots_to_coefficients",
]

Custody = Literal["authority", "shared-clients"]
WireFormat = Literal["tenseal", "seeded", "packed"]
Packing = Literal["slots", "coefficients"]

CUSTODIES: tuple[str, ...] = ("authority", "shared-clients")
WIRE_FORMATS: tuple[str, ...] = ("tenseal", "seeded", "packed")
#: How each wire format places values: one per slot (N / 2 per ciphertext) or one per coefficient (N).
PACKING: dict[str, Packing] = {"tenseal": "slots", "seeded": "slots", "packed": "coefficients"}

#: Largest total ``log2(q)`` per ring degree for 128-bit classical security with
#: ternary secrets (HomomorphicEncryption.org security standard, Table 1).
HE_STANDARD_MAX_LOG_Q: dict[int, int] = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}

#: Standard deviation of SEAL's fresh error distribution.
_ERROR_STD = 3.2
#: Variance of one coefficient of SEAL's fresh error: a centred binomial of 42 coins (|e| <= 21),
#: SEAL's default stand-in for a Gaussian of std 3.2.
_CBD_VARIANCE = 10.5
#: Fraction of secret keys for which :meth:`CKKSParams.sum_tolerance` may be exceeded.
_KEY_TAIL = 1e-6
#: Statistical security parameter lambda of every released decryption (see "noise flooding").
STAT_SECURITY_BITS = 40
#: Unit roundoff of float64, for the floating-point error of decoding.
_UNIT_ROUNDOFF = 2.0**-53
#: SEAL's smallest and largest prime sizes in a coefficient modulus.
_MIN_PRIME_BITS, _MAX_PRIME_BITS = 2, 60
#: First bytes of a SEAL-serialised object (magic 0xA15E, little endian).
_SEAL_MAGIC = b"\x5e\xa1"
#: First byte of a serialised TenSEAL CKKSVector (protobuf field 1, length-delimited).
_TENSEAL_VECTOR_TAG = 0x0A


class CKKSError(GfmfrError, ValueError):
    """Invalid CKKS parameters, context, plaintext or ciphertext."""


def _check_packing(packing: str) -> Packing:
    if packing not in ("slots", "coefficients"):
        raise CKKSError(f"packing must be 'slots' or 'coefficients', got {packing!r}")
    return packing  # type: ignore[return-value]


def _tenseal() -> ModuleType:
    """Import TenSEAL (and its SEAL bindings, which register the SEAL types), or say how to get it."""
    try:
        import tenseal  # type: ignore[import-untyped]
        from tenseal import sealapi  # noqa: F401  (registers seal::Modulus & co. with pybind11)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the CKKS secure-aggregation backend needs TenSEAL: install it with "
            "`pip install tenseal==0.3.18` (wheels for CPython on x86-64 Linux, macOS and Windows), "
            "or choose another secure-aggregation backend"
        ) from exc
    return tenseal


def _sealapi() -> ModuleType:
    """TenSEAL's SEAL bindings (``tenseal.sealapi``)."""
    _tenseal()
    from tenseal import sealapi

    return sealapi


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 2**64."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in small:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


@lru_cache(maxsize=64)
def _primes(poly_modulus_degree: int, bit_sizes: tuple[int, ...]) -> tuple[int, ...]:
    """The primes SEAL's ``CoeffModulus.Create`` picks for ``bit_sizes`` at ring degree N.

    SEAL takes, for each bit size b, the largest primes below ``2**b`` that are
    ``1 mod 2N``, and hands them out smallest first in the order of
    ``bit_sizes``; reproduced here so parameters validate without TenSEAL
    (a test checks the two agree).
    """
    factor = 2 * poly_modulus_degree
    found: dict[int, list[int]] = {}
    for b in sorted(set(bit_sizes)):
        want, value, lower = bit_sizes.count(b), ((1 << b) - 1) // factor * factor + 1, 1 << (b - 1)
        primes: list[int] = []
        while len(primes) < want and value > lower:
            if _is_prime(value):
                primes.append(value)
            value -= factor
        if len(primes) < want:
            raise CKKSError(
                f"failed to find enough qualifying primes: there are only {len(primes)} primes of {b} bits that are "
                f"1 mod {factor}, the chain {list(bit_sizes)} needs {want} (at ring degree {poly_modulus_degree} a "
                f"prime needs more than {factor.bit_length() - 1} bits)"
            )
        found[b] = primes
    return tuple(found[b].pop() for b in bit_sizes)


@dataclass(frozen=True)
class CKKSParams:
    """CKKS parameters for additive aggregation, validated on construction.

    Parameters
    ----------
    poly_modulus_degree : ring degree N, a power of two in ``HE_STANDARD_MAX_LOG_Q``;
        a ciphertext holds ``N / 2`` values (slots).
    coeff_mod_bit_sizes : bit sizes of the primes of the coefficient modulus, at
        least two: data primes, then the special prime. Fresh ciphertexts live at
        the level of the data primes only; their total is ``data_modulus_bits``.
    global_scale_bits : ``log2`` of the CKKS scale Delta.
    max_abs_value : B, the largest ``|x|`` an :class:`Encryptor` accepts.
    max_summands : n_max, the most ciphertexts that may be added; together with B
        it must fit the data modulus (see :attr:`capacity`).

    Raises
    ------
    CKKSError
        On a ring degree / modulus pair above the 128-bit security limit, a chain
        SEAL cannot build, or a sum that could overflow the data modulus.
    """

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (34, 34, 41)
    global_scale_bits: int = 56
    max_abs_value: float = 1.0
    max_summands: int = 1000

    def __post_init__(self) -> None:
        n = self.poly_modulus_degree
        if isinstance(n, bool) or not isinstance(n, int) or n not in HE_STANDARD_MAX_LOG_Q:
            raise CKKSError(f"poly_modulus_degree must be one of {sorted(HE_STANDARD_MAX_LOG_Q)}, got {n!r}")
        bits = self.coeff_mod_bit_sizes
        if isinstance(bits, list):
            bits = tuple(bits)
            object.__setattr__(self, "coeff_mod_bit_sizes", bits)
        if not isinstance(bits, tuple) or any(isinstance(b, bool) or not isinstance(b, int) for b in bits):
            raise CKKSError(f"coeff_mod_bit_sizes must be a tuple of ints, got {bits!r}")
        if len(bits) < 2:
            raise CKKSError(
                f"coeff_mod_bit_sizes needs at least two primes (data primes, then the special prime that "
                f"TenSEAL's key generation requires), got {bits!r}"
            )
        if any(not _MIN_PRIME_BITS <= b <= _MAX_PRIME_BITS for b in bits):
            raise CKKSError(f"each prime must have {_MIN_PRIME_BITS}..{_MAX_PRIME_BITS} bits, got {bits!r}")
        total, limit = sum(bits), HE_STANDARD_MAX_LOG_Q[n]
        if total > limit:
            raise CKKSError(
                f"insecure CKKS parameters: total log2(q) = {total} bits exceeds the 128-bit classical-security "
                f"limit of {limit} bits for ring degree {n} (HomomorphicEncryption.org standard); "
                f"use fewer or smaller primes, or a larger ring degree"
            )
        sb = self.global_scale_bits
        if isinstance(sb, bool) or not isinstance(sb, int) or not 1 <= sb < self.data_modulus_bits:
            raise CKKSError(
                f"global_scale_bits must be an int in [1, {self.data_modulus_bits}) "
                f"(the data modulus has {self.data_modulus_bits} bits), got {sb!r}"
            )
        b = self.max_abs_value
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0:
            raise CKKSError(f"max_abs_value must be a finite number > 0, got {b!r}")
        m = self.max_summands
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise CKKSError(f"max_summands must be an int >= 1, got {m!r}")
        if m * b > self.capacity:
            raise CKKSError(
                f"a sum of {m} vectors with |x| <= {b} can overflow: it needs max_summands * max_abs_value <= "
                f"{self.capacity:.1f} (half the data modulus / scale, less a noise margin); lower "
                f"global_scale_bits, max_summands or max_abs_value, or use a larger first prime"
            )

    @property
    def slots(self) -> int:
        """Values per ciphertext, ``N / 2``."""
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        """The CKKS scale Delta, ``2 ** global_scale_bits``."""
        return float(2**self.global_scale_bits)

    @property
    def data_modulus_bits(self) -> int:
        """Bits of the modulus fresh ciphertexts are sent at (the chain minus the special prime)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def primes(self) -> tuple[int, ...]:
        """The primes SEAL uses for ``coeff_mod_bit_sizes``, special prime last."""
        return _primes(self.poly_modulus_degree, self.coeff_mod_bit_sizes)

    @property
    def capacity(self) -> float:
        """Largest ``sum_i max|x_i|`` that decodes without wrap-around.

        ``(q_data / 2 - margin) / Delta``, with ``q_data`` the product of the data
        primes and a margin of the error tolerance of a 65536-term sum (negligible).
        """
        q_data = math.prod(self.primes[:-1])
        margin = self.scale * self.sum_tolerance(65536, symmetric=False)
        return (q_data / 2 - margin) / self.scale

    def values_per_ciphertext(self, packing: Packing = "slots") -> int:
        """``N / 2`` with one value per slot, ``N`` with one value per coefficient."""
        return self.slots if _check_packing(packing) == "slots" else self.poly_modulus_degree

    def n_ciphertexts(self, dim: int, packing: Packing = "slots") -> int:
        """Ciphertexts per vector of ``dim`` values, ``ceil(dim / values_per_ciphertext)``."""
        return -(-_check_dim(dim) // self.values_per_ciphertext(packing))

    def _variances(self, symmetric: bool, packing: Packing = "slots") -> tuple[float, float]:
        """Per-ciphertext error variance of one value, in units of the scale squared.

        Returns ``(mean, worst)``: averaged over slots and keys, and for the worst
        slot under a key that is unlucky with probability at most ``_KEY_TAIL``
        (coefficients: for every ternary key, since ``||s||^2 <= N``).
        """
        if _check_packing(packing) == "coefficients":
            return self._coefficient_variances(symmetric)
        n = self.poly_modulus_degree
        encode = n / 24.0  # rounding the encoded coefficients to integers
        if symmetric:
            fresh = _ERROR_STD**2 * n / 2.0  # the fresh error, independent of the key
            return encode + fresh, encode + fresh
        # Dropping the special prime p leaves r0 + r1 * s (r0, r1 uniform in [-1/2, 1/2]),
        # plus the fresh error u * e_pk + e0 + e1 * s divided by p. In slot k the r1 * s
        # term has variance (N / 24) |s(zeta_k)|^2: |s(zeta_k)|^2 has mean 2N/3 over slots
        # and keys, and is roughly exponential, so its largest value over N/2 slots stays
        # below (2N/3) (ln(N/2) + ln(1/tail)) except for a fraction `tail` of keys.
        special = self.primes[-1]
        s2_mean = 2.0 * n / 3.0
        s2_worst = s2_mean * (math.log(n / 2.0) + math.log(1.0 / _KEY_TAIL))
        fresh = (n / 2.0) * _ERROR_STD**2 * (1.0 + 4.0 * n / 3.0) / special**2
        mean = encode + n / 24.0 + (n / 24.0) * s2_mean + fresh
        worst = encode + n / 24.0 + (n / 24.0) * s2_worst + fresh * s2_worst / s2_mean
        return mean, worst

    def _coefficient_variances(self, symmetric: bool, *, lattice_only: bool = False) -> tuple[float, float]:
        """:meth:`_variances` for one value per coefficient (the ``packed`` wire format).

        A coefficient carries ``round(Delta x)`` (encoding error 1/12, made by the client
        before encryption) plus the decryption error of the ciphertext. Symmetric
        encryption: SEAL's fresh error, a centred binomial of variance 10.5. Public key:
        dropping the special prime p leaves ``r0 + r1 * s`` with r0, r1 uniform in
        [-1/2, 1/2], of variance ``(1 + ||s||^2) / 12`` per coefficient, mean
        ``(1 + 2N/3) / 12`` over keys and at most ``(1 + N) / 12`` for any ternary key,
        plus the fresh error ``(u e_pk + e0 + e1 s) / p``. ``lattice_only`` leaves out
        the encoding error (the part of the error that depends on the key).
        """
        n = self.poly_modulus_degree
        encode = 0.0 if lattice_only else 1.0 / 12.0
        if symmetric:
            return encode + _CBD_VARIANCE, encode + _CBD_VARIANCE
        special = self.primes[-1]
        fresh_mean = _CBD_VARIANCE * (1.0 + 4.0 * n / 3.0) / special**2
        fresh_worst = _CBD_VARIANCE * (1.0 + 2.0 * n) / special**2
        return encode + (1.0 + 2.0 * n / 3.0) / 12.0 + fresh_mean, encode + (1.0 + n) / 12.0 + fresh_worst

    def error_std(self, n_summands: int, *, symmetric: bool = False, packing: Packing = "slots") -> float:
        """Per-value standard deviation of the error of a decrypted sum, averaged over values.

        Model (units of the scale, real part of one slot, N the ring degree, one
        ciphertext): encoding rounding ``N / 24``, plus for symmetric encryption the
        fresh error ``3.2**2 * N / 2``; for public-key encryption the rounding when
        the ciphertext drops the special prime, ``N / 24 + (N / 24) |s(zeta_k)|^2``
        with ``|s(zeta_k)|^2`` of mean ``2N / 3`` (so ``~N^2 / 36``), plus the fresh
        error divided by the special prime. Independent ciphertexts add their
        variances. Matches the measured error to within 2 %. With one value per
        coefficient (``packing="coefficients"``) no slot transform spreads the error
        over the values: :meth:`_coefficient_variances`, about ``sqrt(N / 2)`` times smaller.

        Parameters
        ----------
        n_summands : ciphertexts in the sum, >= 1.
        symmetric : secret-key encryption (``shared-clients``) instead of public-key.
        packing : ``"slots"`` (wire formats ``tenseal``, ``seeded``) or ``"coefficients"`` (``packed``).

        Returns
        -------
        float
            The standard deviation, in the units of the plaintext values.
        """
        if isinstance(n_summands, bool) or not isinstance(n_summands, int) or n_summands < 1:
            raise CKKSError(f"n_summands must be an int >= 1, got {n_summands!r}")
        return math.sqrt(n_summands * self._variances(symmetric, packing)[0]) / self.scale

    def sum_tolerance(self, n_summands: int, *, symmetric: bool = False, z: float = 7.0, packing: Packing = "slots") -> float:
        """Absolute tolerance for every value of a decrypted sum of ``n_summands`` fresh ciphertexts.

        ``z`` standard deviations of the error of the *worst* slot: with public-key
        encryption a slot's error scales with ``|s(zeta_k)|`` (the secret key
        evaluated at that slot's root of unity), the same for every ciphertext, so
        a few slots are up to ~4.5x noisier than :meth:`error_std` (bounded for all
        but a fraction 1e-6 of keys). With ``z = 7`` a Gaussian error exceeds the
        tolerance with probability ~2.6e-12 per value. With one value per coefficient
        every value has the same error variance, at most ``(1 + N) / 12`` per
        public-key ciphertext for any key.

        Returns
        -------
        float
            ``z * sqrt(n_summands * worst_variance) / Delta``.
        """
        if isinstance(n_summands, bool) or not isinstance(n_summands, int) or n_summands < 1:
            raise CKKSError(f"n_summands must be an int >= 1, got {n_summands!r}")
        return z * math.sqrt(n_summands * self._variances(symmetric, packing)[1]) / self.scale

    def flooding_std(
        self, dim: int, *, symmetric: bool = False, stat_bits: int = STAT_SECURITY_BITS, packing: Packing = "slots"
    ) -> float:
        """Std of the Gaussian noise flooding every released value of a decrypted sum of ``dim`` values.

        ``sigma_flood = 2^(lambda / 2) * B_delta / sqrt(2)``: the Kullback-Leibler
        divergence between the flooded release and one computed from the exact sum
        alone is then at most ``2^-lambda`` (derivation in the module docstring,
        "noise flooding"). With one value per slot (``tenseal``, ``seeded``, flooded
        after decoding) ``B_delta = sqrt(dim) * (2 * error_std(max_summands) + u_fp)``
        with ``u_fp = (log2 N + 2) * 2^-53 * max_summands * max_abs_value``, the
        floating-point error of decoding. With one value per coefficient (``packed``,
        flooded as an integer polynomial added to the ciphertext before decryption, so
        decoding is post-processing) ``B_delta = 2 sqrt(dim * max_summands * v) / Delta``
        with ``v = (1 + N) / 12`` (public key, any ternary key) or 10.5 (symmetric), the
        largest per-coefficient variance of the decryption error. The bound uses
        ``max_summands``, not the count an aggregator claims, so a lying aggregator
        cannot shrink it.

        Parameters
        ----------
        dim : D, the values released under one key (one round's vector).
        symmetric : secret-key encryption (``shared-clients``).
        stat_bits : lambda, the statistical security parameter.
        packing : ``"slots"`` or ``"coefficients"``.

        Returns
        -------
        float
            sigma_flood, in the units of the plaintext values.
        """
        d = _check_dim(dim)
        if isinstance(stat_bits, bool) or not isinstance(stat_bits, int) or stat_bits < 1:
            raise CKKSError(f"stat_bits must be an int >= 1, got {stat_bits!r}")
        n_max = self.max_summands
        if _check_packing(packing) == "coefficients":
            worst = self._coefficient_variances(symmetric, lattice_only=True)[1]
            bound = 2.0 * math.sqrt(d * n_max * worst) / self.scale
        else:
            lattice = 2.0 * self.error_std(n_max, symmetric=symmetric)
            fp = (math.log2(self.poly_modulus_degree) + 2.0) * _UNIT_ROUNDOFF * n_max * self.max_abs_value
            bound = math.sqrt(d) * (lattice + fp)
        return 2.0 ** (stat_bits / 2.0) * bound / math.sqrt(2.0)

    def release_tolerance(
        self, n_summands: int, dim: int, *, symmetric: bool = False, z: float = 7.0, packing: Packing = "slots"
    ) -> float:
        """Absolute tolerance for every released value: :meth:`sum_tolerance` plus ``z`` flooding stds."""
        return self.sum_tolerance(n_summands, symmetric=symmetric, z=z, packing=packing) + z * self.flooding_std(
            dim, symmetric=symmetric, packing=packing
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view of the parameters."""
        out = asdict(self)
        out["coeff_mod_bit_sizes"] = list(self.coeff_mod_bit_sizes)
        return out


#: Named parameter sets (the benchmark's ``--params`` choices).
PRESETS: dict[str, CKKSParams] = {
    # N = 4096, 34 + 34-bit data primes, Delta = 2**56, 1000 summands of |x| <= 1:
    # flooding std 5.0e-4 on each value of a sum of D = 100,000 values (it grows as sqrt(D)).
    "default": CKKSParams(),
    # ~7 % more bytes, room for 2000 summands of |x| <= 1 at Delta = 2**59 (flooding 7.5e-4 at D = 1e5).
    "large-cohort": CKKSParams(4096, (36, 36, 37), 59, max_summands=2000),
    # The ``packed`` wire format's (the backend's for 943 clients, |x| <= 8): one 60-bit data
    # prime, Delta = 2**46, flooding std 9.1e-3 on a sum of D = 579,850 values (public key).
    "packed": CKKSParams(4096, (60, 49), 46, max_abs_value=8.0, max_summands=943),
}
# A ring of N = 2048 (at most 54 bits of modulus) cannot keep the flooding noise
# below ~1e2 for any useful D, so there is no such preset any more.


def _check_dim(dim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise CKKSError(f"dim must be an int >= 1, got {dim!r}")
    return int(dim)


def _check_custody(custody: str) -> Custody:
    if custody not in CUSTODIES:
        raise CKKSError(f"custody must be one of {CUSTODIES}, got {custody!r}")
    return custody  # type: ignore[return-value]


def _check_wire(wire: str) -> WireFormat:
    if wire not in WIRE_FORMATS:
        raise CKKSError(f"wire format must be one of {WIRE_FORMATS}, got {wire!r}")
    return wire  # type: ignore[return-value]


def default_wire(custody: Custody) -> WireFormat:
    """``"tenseal"`` under ``authority``, ``"seeded"`` (half the bytes) under ``shared-clients``."""
    return "seeded" if _check_custody(custody) == "shared-clients" else "tenseal"


def _chunk_bounds(params: CKKSParams, dim: int, wire: WireFormat = "tenseal") -> list[tuple[int, int]]:
    """``[(start, stop)]`` of each ciphertext's values in a vector of ``dim`` values."""
    packing = PACKING[wire]
    s = params.values_per_ciphertext(packing)
    return [(i * s, min(dim, (i + 1) * s)) for i in range(params.n_ciphertexts(dim, packing))]


def _load_context(data: bytes, n_threads: int, what: str) -> Any:
    """Deserialise a TenSEAL context, turning TenSEAL's errors into :class:`CKKSError`."""
    ts = _tenseal()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CKKSError(f"{what} must be bytes, got {type(data).__name__}")
    try:
        ctx = ts.context_from(bytes(data), n_threads=n_threads)
    except (ValueError, RuntimeError) as exc:
        raise CKKSError(f"{what} cannot be loaded as a TenSEAL context: {exc}") from exc
    return ctx


def _check_context(ctx: Any, params: CKKSParams, what: str) -> None:
    """Check that a TenSEAL context uses exactly ``params``."""
    parms = ctx.seal_context().data.key_context_data().parms()
    degree = int(parms.poly_modulus_degree())
    primes = tuple(int(m.value()) for m in parms.coeff_modulus())
    if degree != params.poly_modulus_degree or primes != params.primes:
        bits = [int(m.bit_count()) for m in parms.coeff_modulus()]
        raise CKKSError(
            f"{what} has ring degree {degree} and primes of {bits} bits, but the parameters say "
            f"{params.poly_modulus_degree} and {list(params.coeff_mod_bit_sizes)}"
        )
    if ctx.global_scale != params.scale:
        raise CKKSError(f"{what} has scale {ctx.global_scale!r}, the parameters say 2**{params.global_scale_bits}")


def _check_n_threads(n_threads: int) -> int:
    if isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1:
        raise CKKSError(f"n_threads must be an int >= 1, got {n_threads!r}")
    return n_threads


def _as_blob(blob: object, where: str) -> bytes:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise CKKSError(f"{where}: expected bytes, got {type(blob).__name__}")
    data = bytes(blob)
    if not data:
        raise CKKSError(f"{where}: empty ciphertext")
    return data


def _check_format(data: bytes, wire: WireFormat, where: str) -> None:
    """Cheap check of the first bytes, to name a wire-format mix-up."""
    looks_seal = data[:2] == _SEAL_MAGIC
    looks_tenseal = data[0] == _TENSEAL_VECTOR_TAG
    if wire == "tenseal" and not looks_tenseal:
        hint = " (it looks like a raw SEAL ciphertext: the 'seeded' wire format)" if looks_seal else ""
        raise CKKSError(f"{where}: malformed ciphertext, not a serialised TenSEAL CKKSVector{hint}")
    if wire in ("seeded", "packed") and not looks_seal:
        hint = " (it looks like a TenSEAL CKKSVector: the 'tenseal' wire format)" if looks_tenseal else ""
        raise CKKSError(f"{where}: malformed ciphertext, no SEAL header{hint}")


def _check_seal_ciphertext(ct: Any, params: CKKSParams, where: str) -> None:
    """A fresh or summed ciphertext: 2 polynomials at the data level, NTT form, scale Delta."""
    levels = len(params.coeff_mod_bit_sizes) - 1
    if ct.size() != 2:
        raise CKKSError(f"{where}: ciphertext has {ct.size()} polynomials, expected 2")
    if ct.coeff_modulus_size() != levels:
        raise CKKSError(f"{where}: ciphertext is at a level with {ct.coeff_modulus_size()} primes, expected {levels}")
    if not ct.is_ntt_form():
        raise CKKSError(f"{where}: ciphertext is not in NTT form, not a CKKS ciphertext")
    if ct.scale != params.scale:
        raise CKKSError(f"{where}: ciphertext scale is {ct.scale!r}, expected 2**{params.global_scale_bits}")


def _load_error(where: str, exc: Exception) -> CKKSError:
    """Name the likely cause of a TenSEAL / SEAL load failure."""
    text = str(exc)
    if "invalid" in text:
        return CKKSError(
            f"{where}: ciphertext is not valid for this context: made under different encryption "
            f"parameters, or corrupted (TenSEAL: {text})"
        )
    return CKKSError(f"{where}: malformed or truncated ciphertext (TenSEAL: {text})")


class _Scratch:
    """Private temporary files for ``tenseal.sealapi``, whose save/load take paths only.

    Only ciphertexts go through them, never keys. The folder lives in
    ``/dev/shm`` (memory) when it is writable, else in the default temporary
    folder; every transfer uses a fresh file that is removed at once (rewriting a
    file in place can make the file system flush it to disk first).
    """

    def __init__(self) -> None:
        shm = "/dev/shm"
        where = shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None
        self._dir = tempfile.TemporaryDirectory(prefix="gfmfr-ckks-", dir=where)
        self._count = 0

    def _path(self) -> str:
        self._count += 1
        return os.path.join(self._dir.name, f"{self._count}.bin")

    def save(self, obj: Any) -> bytes:
        """Serialise a SEAL object (or ``Serializable``) to bytes."""
        path = self._path()
        try:
            obj.save(path)
            with open(path, "rb") as f:
                return f.read()
        finally:
            if os.path.exists(path):
                os.unlink(path)

    def load_ciphertext(self, sealapi: ModuleType, seal_context: Any, data: bytes) -> Any:
        """Deserialise a SEAL ciphertext; TenSEAL's ValueError / RuntimeError pass through."""
        path = self._path()
        try:
            with open(path, "wb") as f:
                f.write(data)
            ct = sealapi.Ciphertext()
            ct.load(seal_context, path)
            return ct
        finally:
            os.unlink(path)

    def load_checked(self, seal_context: Any, params: CKKSParams, wire: WireFormat, blob: object, where: str) -> Any:
        """A SEAL ciphertext from untrusted bytes, validated against ``params`` (:class:`CKKSError` otherwise)."""
        data = _as_blob(blob, where)
        _check_format(data, wire, where)
        try:
            ct = self.load_ciphertext(_sealapi(), seal_context, data)
        except (ValueError, RuntimeError) as exc:
            raise _load_error(where, exc) from exc
        _check_seal_ciphertext(ct, params, where)
        return ct

    def close(self) -> None:
        """Remove the folder now (a worker process ends without running finalisers)."""
        self._dir.cleanup()


@lru_cache(maxsize=8)
def _embedding(degree: int) -> tuple[NDArray[np.complex128], NDArray[np.int64]]:
    """``(twist, index)`` mapping coefficients to SEAL's CKKS slots at ring degree N.

    SEAL's slot k holds ``p(zeta^(3^k mod 2N)) / Delta`` with ``zeta = exp(i pi / N)``
    (the other odd powers hold the complex conjugates). With ``twist[j] = zeta^j`` the
    values at all odd powers ``zeta^(2m + 1)`` are ``N * ifft(p * twist)[m]``, and slot k
    is the one with ``m = index[k] = (3^k mod 2N - 1) / 2``.
    """
    twist = np.exp(1j * np.pi * np.arange(degree) / degree)
    exps = np.empty(degree // 2, dtype=np.int64)
    e = 1
    for k in range(degree // 2):
        exps[k] = e
        e = e * 3 % (2 * degree)
    return twist, (exps - 1) // 2


def coefficients_to_slots(coefficients: NDArray[np.float64]) -> NDArray[np.complex128]:
    """The slot values whose CKKS encoding is the polynomial with the given coefficients.

    Encoding the returned slots at scale Delta (SEAL's ``CKKSEncoder``) gives the plaintext
    polynomial ``round(Delta * coefficients)``: one value per coefficient, N per ciphertext.

    Parameters
    ----------
    coefficients : float64 [C, N], one row per ciphertext.

    Returns
    -------
    complex128 [C, N / 2]
    """
    degree = coefficients.shape[-1]
    twist, index = _embedding(degree)
    return (np.fft.ifft(coefficients * twist, axis=-1) * degree)[..., index]


def slots_to_coefficients(slots: NDArray[np.complex128]) -> NDArray[np.float64]:
    """Inverse of :func:`coefficients_to_slots`: float64 [C, N] from complex [C, N / 2] slots."""
    half = slots.shape[-1]
    degree = 2 * half
    twist, index = _embedding(degree)
    full = np.empty((*slots.shape[:-1], degree), dtype=np.complex128)
    full[..., index] = slots
    full[..., degree - 1 - index] = np.conj(slots)  # p(zeta^-e) = conj(p(zeta^e)) for a real p
    return (np.fft.fft(full, axis=-1) * np.conj(twist)).real / degree


class KeyHolder:
    """Creates the CKKS keys and decides who gets which part of them.

    Parameters
    ----------
    params : the CKKS parameters (default :class:`CKKSParams`).
    custody : ``"authority"`` (public-key encryption; this object is a key
        authority separate from the aggregator) or ``"shared-clients"``
        (symmetric encryption; the secret key is handed to every client). See the
        module docstring for what collusion reveals in each.
    n_threads : threads of the TenSEAL context (used by TenSEAL's batched tensor
        operations only; the vector operations used here run on the caller's thread).
    """

    def __init__(self, params: CKKSParams | None = None, *, custody: Custody = "authority", n_threads: int = 1) -> None:
        ts = _tenseal()
        self._params = params if params is not None else CKKSParams()
        if not isinstance(self._params, CKKSParams):
            raise CKKSError(f"params must be a CKKSParams, got {type(self._params).__name__}")
        self._custody = _check_custody(custody)
        self._n_threads = _check_n_threads(n_threads)
        kind = ts.ENCRYPTION_TYPE.SYMMETRIC if custody == "shared-clients" else ts.ENCRYPTION_TYPE.ASYMMETRIC
        p = self._params
        try:
            ctx = ts.context(
                ts.SCHEME_TYPE.CKKS,
                p.poly_modulus_degree,
                coeff_mod_bit_sizes=list(p.coeff_mod_bit_sizes),
                encryption_type=kind,
                n_threads=n_threads,
            )
        except (ValueError, RuntimeError) as exc:
            raise CKKSError(f"TenSEAL cannot create a CKKS context for {p}: {exc}") from exc
        ctx.global_scale = p.scale
        self._context = ctx

    @property
    def params(self) -> CKKSParams:
        """The CKKS parameters."""
        return self._params

    @property
    def custody(self) -> Custody:
        """``"authority"`` or ``"shared-clients"``."""
        return self._custody

    @property
    def symmetric(self) -> bool:
        """Whether clients encrypt with the secret key (``shared-clients``)."""
        return self._custody == "shared-clients"

    @property
    def default_wire(self) -> WireFormat:
        """The smallest wire format this custody allows."""
        return default_wire(self._custody)

    def public_context_bytes(self) -> bytes:
        """The context without its secret key: for the aggregator.

        Relinearisation and Galois keys are left out (only additions are done);
        the public key is included under ``authority`` custody, and under
        ``shared-clients`` there is none (the context then holds the parameters only).

        Raises
        ------
        CKKSError
            If the serialised context would still hold a secret key (a safety check).
        """
        data = self._context.serialize(
            save_public_key=not self.symmetric, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
        )
        check = _load_context(data, 1, "public context")
        if check.is_private():
            raise CKKSError("the public context still holds a secret key; refusing to release it")
        return data

    def client_context_bytes(self) -> bytes:
        """What every client receives.

        Under ``authority``: :meth:`public_context_bytes`. Under
        ``shared-clients``: the context *with* the secret key (every client can
        decrypt everything it sees).
        """
        if not self.symmetric:
            return self.public_context_bytes()
        return self._context.serialize(save_secret_key=True, save_galois_keys=False, save_relin_keys=False)

    def encryptor(self, dim: int, *, wire: WireFormat | None = None) -> Encryptor:
        """An :class:`Encryptor` built from :meth:`client_context_bytes` (what a client would build)."""
        w = self.default_wire if wire is None else wire
        return Encryptor(self.client_context_bytes(), self._params, dim, wire=w, n_threads=self._n_threads)

    def aggregator(self, dim: int, *, wire: WireFormat | None = None) -> CKKSAggregator:
        """A :class:`CKKSAggregator` built from :meth:`public_context_bytes`."""
        w = self.default_wire if wire is None else wire
        return CKKSAggregator(self.public_context_bytes(), self._params, dim, wire=w, n_threads=self._n_threads)

    def decryptor(self, dim: int, *, wire: WireFormat | None = None) -> Decryptor:
        """A :class:`Decryptor` sharing this key holder's secret context (no serialisation of the key)."""
        w = self.default_wire if wire is None else wire
        return Decryptor._from_context(self._context, self._params, dim, wire=w, symmetric=self.symmetric)


class Encryptor:
    """Client side: encrypts a float vector [D] into ``ceil(D / values per ciphertext)`` ciphertexts.

    Parameters
    ----------
    context_bytes : :meth:`KeyHolder.client_context_bytes`: the public context
        under ``authority``, the secret context under ``shared-clients``.
    params : the CKKS parameters; must match the context.
    dim : D, the length of every vector.
    wire : ``"tenseal"``, ``"seeded"`` (needs the secret key) or ``"packed"`` (one
        value per coefficient; seeded when the context holds the secret key).
    n_threads : threads of the deserialised context.
    """

    def __init__(
        self, context_bytes: bytes, params: CKKSParams, dim: int, *, wire: WireFormat = "tenseal", n_threads: int = 1
    ) -> None:
        self._params = params
        self._dim = _check_dim(dim)
        self._wire = _check_wire(wire)
        self._ctx = _load_context(context_bytes, _check_n_threads(n_threads), "client context")
        _check_context(self._ctx, params, "client context")
        self._bounds = _chunk_bounds(params, self._dim, self._wire)
        if self._ctx.is_private():
            can_encrypt = True
        else:
            try:
                can_encrypt = self._ctx.has_public_key()
            except ValueError:  # a public context of a symmetric-encryption key: parameters only
                can_encrypt = False
        if not can_encrypt:
            raise CKKSError("the client context holds neither a public key nor a secret key: it cannot encrypt")
        if wire == "seeded" and not self._ctx.is_private():
            raise CKKSError(
                "the 'seeded' wire format uses secret-key encryption: it needs the shared secret context "
                "('shared-clients' custody), not a public context"
            )
        self._symmetric = bool(self._ctx.is_private())
        if wire in ("seeded", "packed"):
            sealapi = _sealapi()
            seal_context = self._ctx.seal_context().data
            key = self._ctx.secret_key().data if self._symmetric else self._ctx.public_key().data
            self._seal_encryptor = sealapi.Encryptor(seal_context, key)
            self._encoder = sealapi.CKKSEncoder(seal_context)
            self._scratch = _Scratch()

    @property
    def dim(self) -> int:
        """D."""
        return self._dim

    @property
    def n_ciphertexts(self) -> int:
        """Ciphertexts per upload, ``ceil(D / values per ciphertext)``."""
        return len(self._bounds)

    def close(self) -> None:
        """Release the temporary folder of the SEAL wire formats (a no-op for ``tenseal``)."""
        if self._wire != "tenseal":
            self._scratch.close()

    def encrypt(self, x: ArrayLike) -> list[bytes]:
        """Encrypt one vector.

        Parameters
        ----------
        x : float [D], finite, ``|x| <= params.max_abs_value``.

        Returns
        -------
        list of bytes
            ``ceil(D / v)`` serialised ciphertexts, ``v`` values each (``v = N / 2`` slots,
            or ``N`` coefficients for ``packed``); ciphertext ``k`` holds ``x[k v:(k + 1) v]``.
        """
        v = np.asarray(x, dtype=np.float64)
        if v.shape != (self._dim,):
            raise CKKSError(f"expected a vector of shape ({self._dim},), got {v.shape}")
        if not np.all(np.isfinite(v)):
            raise CKKSError("the vector holds NaN or infinite values")
        bound = self._params.max_abs_value
        peak = float(np.max(np.abs(v)))
        if peak > bound:
            raise CKKSError(f"|x| reaches {peak:.6g} > max_abs_value {bound}: clip before encrypting")
        if self._wire == "packed":
            return self._encrypt_packed(v)
        if self._wire == "seeded":
            return [self._encrypt_plain(v[a:b].tolist()) for a, b in self._bounds]
        ts = _tenseal()
        return [ts.ckks_vector(self._ctx, v[a:b]).serialize() for a, b in self._bounds]

    def _encrypt_packed(self, v: NDArray[np.float64]) -> list[bytes]:
        degree = self._params.poly_modulus_degree
        rows = np.zeros((len(self._bounds), degree))
        rows.reshape(-1)[: self._dim] = v
        slots = coefficients_to_slots(rows)  # [C, N/2]: encodes to round(Delta * rows)
        return [self._encrypt_plain(row.tolist()) for row in slots]

    def _encrypt_plain(self, values: list[float] | list[complex]) -> bytes:
        sealapi = _sealapi()
        plain = sealapi.Plaintext()
        self._encoder.encode(values, self._params.scale, plain)
        if self._symmetric:  # seeded: the second polynomial travels as the seed of its PRNG
            return self._scratch.save(self._seal_encryptor.encrypt_symmetric(plain))
        ct = sealapi.Ciphertext()
        self._seal_encryptor.encrypt(plain, ct)
        return self._scratch.save(ct)


class CKKSAggregator:
    """Server side: validates uploads and adds them under encryption.

    Parameters
    ----------
    public_context : :meth:`KeyHolder.public_context_bytes`; a context that holds
        a secret key is refused.
    params : the CKKS parameters; must match the context.
    dim : D, the length of every client's vector.
    wire : the clients' wire format.
    n_threads : threads of the deserialised context.
    """

    def __init__(
        self, public_context: bytes, params: CKKSParams, dim: int, *, wire: WireFormat = "tenseal", n_threads: int = 1
    ) -> None:
        self._params = params
        self._dim = _check_dim(dim)
        self._wire = _check_wire(wire)
        self._ctx = _load_context(public_context, _check_n_threads(n_threads), "public context")
        if self._ctx.is_private():
            raise CKKSError("the aggregator must be built from public context bytes only, this context holds a secret key")
        _check_context(self._ctx, params, "public context")
        self._bounds = _chunk_bounds(params, self._dim, self._wire)
        self._acc: list[Any] | None = None
        self._n_added = 0
        if wire != "tenseal":
            self._sealapi = _sealapi()
            self._seal_context = self._ctx.seal_context().data
            self._evaluator = self._sealapi.Evaluator(self._seal_context)
            self._scratch = _Scratch()

    @property
    def context(self) -> Any:
        """The aggregator's TenSEAL context (public: ``is_private()`` is False)."""
        return self._ctx

    @property
    def n_added(self) -> int:
        """Uploads added so far."""
        return self._n_added

    @property
    def n_ciphertexts(self) -> int:
        """Ciphertexts per upload, ``ceil(D / slots)``."""
        return len(self._bounds)

    def load(self, upload: Sequence[bytes]) -> list[Any]:
        """Deserialise and validate one upload (a list of ``ceil(D / slots)`` ciphertext bytes).

        Returns
        -------
        list
            One TenSEAL ``CKKSVector`` (``"tenseal"``) or SEAL ``Ciphertext``
            (``"seeded"``, ``"packed"``) per ciphertext.

        Raises
        ------
        CKKSError
            Wrong count of ciphertexts; bytes that are empty, malformed, truncated,
            of the other wire format, or made under different parameters; a
            ciphertext at the wrong level, scale or length.
        """
        if isinstance(upload, (bytes, bytearray, memoryview, str)) or not isinstance(upload, Sequence):
            raise CKKSError(f"an upload must be a list of ciphertext bytes, got {type(upload).__name__}")
        if len(upload) != len(self._bounds):
            raise CKKSError(
                f"wrong count of ciphertexts: expected {len(self._bounds)} for D = {self._dim} "
                f"({self._params.slots} values each), got {len(upload)}"
            )
        return [self._load_one(blob, k) for k, blob in enumerate(upload)]

    def _load_one(self, blob: object, k: int) -> Any:
        where = f"ciphertext {k}"
        if self._wire != "tenseal":
            return self._scratch.load_checked(self._seal_context, self._params, self._wire, blob, where)
        data = _as_blob(blob, where)
        _check_format(data, self._wire, where)
        a, b = self._bounds[k]
        ts = _tenseal()
        try:
            vec = ts.ckks_vector_from(self._ctx, data)
            size = vec.size()
            cts = vec.ciphertext()
        except (ValueError, RuntimeError) as exc:
            raise _load_error(where, exc) from exc
        if size != b - a:
            raise CKKSError(f"{where}: encodes {size} values, expected {b - a}")
        if len(cts) != 1:
            raise CKKSError(f"{where}: holds {len(cts)} SEAL ciphertexts, expected 1")
        _check_seal_ciphertext(cts[0], self._params, where)
        return vec

    def add(self, upload: Sequence[bytes]) -> None:
        """Validate one upload, then add it to the encrypted sum (all or nothing).

        Raises
        ------
        CKKSError
            On an invalid upload (see :meth:`load`), or when the sum already has
            ``params.max_summands`` terms (more could overflow the modulus).
        """
        if self._n_added >= self._params.max_summands:
            raise CKKSError(
                f"the sum already has max_summands = {self._params.max_summands} terms; adding more could overflow"
            )
        self._accumulate(self.load(upload))
        self._n_added += 1

    def _accumulate(self, parts: list[Any]) -> None:
        if self._acc is None:
            self._acc = parts
        elif self._wire != "tenseal":
            for acc, ct in zip(self._acc, parts, strict=True):
                self._evaluator.add_inplace(acc, ct)
        else:
            for acc, vec in zip(self._acc, parts, strict=True):
                acc.add_(vec)

    def merge(self, partial: Sequence[bytes], n_summands: int) -> None:
        """Add the encrypted sum of ``n_summands`` uploads made by another aggregator.

        A server that ingests uploads on several cores keeps one partial sum per core
        and merges them; each partial sum is validated like an upload and counts
        ``n_summands`` terms towards ``params.max_summands``.
        """
        if isinstance(n_summands, bool) or not isinstance(n_summands, int) or n_summands < 1:
            raise CKKSError(f"n_summands must be an int >= 1, got {n_summands!r}")
        if self._n_added + n_summands > self._params.max_summands:
            raise CKKSError(
                f"merging {n_summands} terms into a sum of {self._n_added} exceeds max_summands = "
                f"{self._params.max_summands}; more could overflow"
            )
        self._accumulate(self.load(partial))
        self._n_added += n_summands

    def close(self) -> None:
        """Release the temporary folder of the SEAL wire formats (a no-op for ``tenseal``)."""
        if self._wire != "tenseal":
            self._scratch.close()

    def result(self) -> list[bytes]:
        """The encrypted sum of the uploads added so far, one bytes object per ciphertext."""
        if self._acc is None:
            raise CKKSError("no upload has been added: there is no sum to return")
        if self._wire != "tenseal":
            return [self._scratch.save(ct) for ct in self._acc]
        return [vec.serialize() for vec in self._acc]

    def aggregate(self, uploads: Iterable[Sequence[bytes]]) -> list[bytes]:
        """Add every upload and return the encrypted sum (see :meth:`add`, :meth:`result`)."""
        for upload in uploads:
            self.add(upload)
        return self.result()


NoiseFn = Callable[[int], NDArray[np.float64]]


def flooding_noise(key: bytes, dim: int, std: float) -> NDArray[np.float64]:
    """float64 [dim] Gaussian flooding noise N(0, std^2) from a 32-byte secret ``key``.

    ChaCha20 keystream of ``key``, two 53-bit uniforms per pair of values, Box-Muller
    in float64. Full double precision matters: noise on a coarser grid (float32)
    would leave the low-order bits of the decrypted values, where the decryption
    error lives, readable in the release.
    """
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
        raise CKKSError("the flooding key must be 32 bytes")
    d = _check_dim(dim)
    if not (math.isfinite(std) and std >= 0):
        raise CKKSError(f"std must be finite and >= 0, got {std!r}")
    pairs = (d + 1) // 2
    raw = Cipher(algorithms.ChaCha20(bytes(key), bytes(16)), mode=None).encryptor().update(bytes(16 * pairs))
    bits = np.frombuffer(raw, dtype="<u8").reshape(2, pairs) >> np.uint64(11)
    u1 = (bits[0].astype(np.float64) + 0.5) * 2.0**-53  # in (0, 1), never 0
    u2 = bits[1].astype(np.float64) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(u1)) * float(std)
    out = np.concatenate([radius * np.cos(2.0 * math.pi * u2), radius * np.sin(2.0 * math.pi * u2)])
    return out[:d]


def gaussian_noise(std: float, rng: np.random.Generator) -> NoiseFn:
    """A noise hook for :meth:`Decryptor.decrypt`: ``D -> N(0, std^2)`` float64 [D]."""
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or std < 0:
        raise CKKSError(f"std must be a finite number >= 0, got {std!r}")
    if not isinstance(rng, np.random.Generator):
        raise CKKSError(f"rng must be a numpy Generator, got {type(rng).__name__}")

    def draw(dim: int) -> NDArray[np.float64]:
        return rng.normal(0.0, float(std), size=dim)

    return draw


class Decryptor:
    """Key holder side: decrypts an encrypted sum to float64 [D].

    Parameters
    ----------
    secret_context : serialised context *with* the secret key (the key holder's;
        under ``shared-clients`` any client's :meth:`KeyHolder.client_context_bytes`).
    params : the CKKS parameters; must match the context.
    dim : D.
    wire : the wire format of the ciphertexts.
    symmetric : the clients encrypt with the secret key (``shared-clients``); sizes
        the flooding noise (public-key encryption, the default, needs more).

    Every :meth:`decrypt` floods each released value with Gaussian noise of std
    :attr:`flooding_std` (``params.flooding_std(D)``): an exact decryption handed
    to whoever holds the ciphertext reveals the secret key.
    """

    def __init__(
        self, secret_context: bytes, params: CKKSParams, dim: int, *, wire: WireFormat = "tenseal", symmetric: bool = False
    ) -> None:
        ctx = _load_context(secret_context, 1, "secret context")
        self._setup(ctx, params, dim, wire, symmetric)

    @classmethod
    def _from_context(cls, ctx: Any, params: CKKSParams, dim: int, *, wire: WireFormat, symmetric: bool) -> Decryptor:
        obj = cls.__new__(cls)
        obj._setup(ctx, params, dim, wire, symmetric)
        return obj

    @property
    def flooding_std(self) -> float:
        """Std of the flooding noise on every released value."""
        return self._flooding_std

    def _setup(self, ctx: Any, params: CKKSParams, dim: int, wire: WireFormat, symmetric: bool) -> None:
        if not ctx.is_private():
            raise CKKSError("the decryptor needs the context with the secret key")
        _check_context(ctx, params, "secret context")
        self._ctx = ctx
        self._params = params
        self._dim = _check_dim(dim)
        self._wire = _check_wire(wire)
        self._bounds = _chunk_bounds(params, self._dim, self._wire)
        packing = PACKING[self._wire]
        self._flooding_std = params.flooding_std(self._dim, symmetric=bool(symmetric), packing=packing)
        if packing == "coefficients" and params.max_summands * params.max_abs_value + 10.0 * self._flooding_std > params.capacity:
            raise CKKSError(
                f"the flooding noise (std {self._flooding_std:.3g}, added before decryption) can overflow a sum of "
                f"{params.max_summands} values |x| <= {params.max_abs_value}: lower global_scale_bits"
            )
        if self._wire != "tenseal":
            sealapi = _sealapi()
            self._sealapi = sealapi
            self._seal_context = ctx.seal_context().data
            self._seal_decryptor = sealapi.Decryptor(self._seal_context, ctx.secret_key().data)
            self._encoder = sealapi.CKKSEncoder(self._seal_context)
            self._evaluator = sealapi.Evaluator(self._seal_context)
            self._scratch = _Scratch()

    def decrypt(
        self, encrypted_sum: Sequence[bytes], *, noise: NoiseFn | None = None, flood_key: bytes | None = None
    ) -> NDArray[np.float64]:
        """Decrypt a sum, flood it, then add release noise if a hook is given.

        Parameters
        ----------
        encrypted_sum : :meth:`CKKSAggregator.result`, ``ceil(D / slots)`` bytes objects.
        noise : ``noise(D)`` -> float [D] added to the decrypted sum before it is
            returned (e.g. :func:`gaussian_noise`), so only the decryptor ever
            holds the noiseless sum.
        flood_key : 32 secret bytes the flooding noise is drawn from
            (:func:`flooding_noise`); default: fresh from the operating system.
            Never reuse a key for two releases.

        Returns
        -------
        ndarray
            float64 [D], the decrypted sum plus N(0, flooding_std^2) on every value
            (plus the hook's noise).
        """
        if isinstance(encrypted_sum, (bytes, bytearray, memoryview, str)) or not isinstance(encrypted_sum, Sequence):
            raise CKKSError(f"encrypted_sum must be a list of ciphertext bytes, got {type(encrypted_sum).__name__}")
        if len(encrypted_sum) != len(self._bounds):
            raise CKKSError(f"wrong count of ciphertexts: expected {len(self._bounds)}, got {len(encrypted_sum)}")
        key = os.urandom(32) if flood_key is None else flood_key
        if self._wire == "packed":
            out = self._decrypt_packed(encrypted_sum, key)
        else:
            out = np.empty(self._dim, dtype=np.float64)
            for k, ((a, b), blob) in enumerate(zip(self._bounds, encrypted_sum, strict=True)):
                out[a:b] = self._decrypt_one(blob, k, b - a)
            out += flooding_noise(key, self._dim, self._flooding_std)
        if noise is not None:
            extra = np.asarray(noise(self._dim), dtype=np.float64)
            if extra.shape != (self._dim,):
                raise CKKSError(f"the noise hook returned shape {extra.shape}, expected ({self._dim},)")
            if not np.all(np.isfinite(extra)):
                raise CKKSError("the noise hook returned NaN or infinite values")
            out += extra
        return out

    def _decrypt_packed(self, encrypted_sum: Sequence[bytes], key: bytes) -> NDArray[np.float64]:
        """Flood each ciphertext with an integer Gaussian polynomial, decrypt, decode one value per coefficient.

        The flooding polynomial ``F`` (coefficients ``round(N(0, (sigma Delta)^2))``) is added
        to the ciphertext as a plaintext, so the decrypted polynomial is ``Delta m + e + F``
        and everything after (decoding in floating point) is post-processing of it.
        """
        p = self._params
        degree, scale = p.poly_modulus_degree, p.scale
        flood = np.zeros((len(self._bounds), degree))
        flood.reshape(-1)[: self._dim] = np.rint(flooding_noise(key, self._dim, self._flooding_std * scale))
        flood_slots = coefficients_to_slots(flood / scale)
        slots = np.empty((len(self._bounds), degree // 2), dtype=np.complex128)
        for k, blob in enumerate(encrypted_sum):
            ct = self._load_seal(blob, f"encrypted sum, ciphertext {k}")
            noise = self._sealapi.Plaintext()
            self._encoder.encode(flood_slots[k].tolist(), scale, noise)
            self._evaluator.add_plain_inplace(ct, noise)
            plain = self._sealapi.Plaintext()
            self._seal_decryptor.decrypt(ct, plain)
            slots[k] = self._encoder.decode_complex(plain)
        return slots_to_coefficients(slots).reshape(-1)[: self._dim]

    def _load_seal(self, blob: object, where: str) -> Any:
        return self._scratch.load_checked(self._seal_context, self._params, self._wire, blob, where)

    def _decrypt_one(self, blob: object, k: int, size: int) -> NDArray[np.float64]:
        where = f"encrypted sum, ciphertext {k}"
        if self._wire == "seeded":
            ct = self._load_seal(blob, where)
            plain = self._sealapi.Plaintext()
            self._seal_decryptor.decrypt(ct, plain)
            return np.asarray(self._encoder.decode_double(plain)[:size], dtype=np.float64)
        data = _as_blob(blob, where)
        _check_format(data, self._wire, where)
        ts = _tenseal()
        try:
            vec = ts.ckks_vector_from(self._ctx, data)
            n_values = vec.size()
            cts = vec.ciphertext()
        except (ValueError, RuntimeError) as exc:
            raise _load_error(where, exc) from exc
        if n_values != size or len(cts) != 1:
            raise CKKSError(f"{where}: encodes {n_values} values in {len(cts)} ciphertexts, expected {size} in 1")
        _check_seal_ciphertext(cts[0], self._params, where)
        return np.asarray(vec.decrypt(), dtype=np.float64)


@dataclass(frozen=True)
class CKKSCost:
    """Bytes and seconds of one simulated encrypted sum.

    Attributes
    ----------
    n_clients, dim, n_ciphertexts : n, D and ``ceil(D / slots)``.
    custody, wire : the key custody and the ciphertext format.
    bytes_up_per_client : mean bytes of one upload (all its ciphertexts).
    bytes_down_per_client : bytes of the context each client downloads once
        (public key under ``authority``, secret key under ``shared-clients``).
    bytes_public_context : bytes of the aggregator's context.
    bytes_encrypted_sum : bytes the aggregator sends to the decryptor.
    keygen_s : key holder's context creation.
    encrypt_s_mean : mean seconds one client spends encrypting (serialisation included).
    aggregate_s : server seconds for all uploads (deserialise, validate, add) plus
        serialising the sum; summed over the worker processes that shared the work.
    decrypt_s : decryption of the sum (noise included).
    flooding_std : std of the flooding noise on every released value.
    workers : processes the simulated clients and the server's ingestion ran on.
    """

    n_clients: int
    dim: int
    n_ciphertexts: int
    custody: str
    wire: str
    bytes_up_per_client: float
    bytes_down_per_client: int
    bytes_public_context: int
    bytes_encrypted_sum: int
    keygen_s: float
    encrypt_s_mean: float
    aggregate_s: float
    decrypt_s: float
    flooding_std: float = 0.0
    workers: int = 1

    @property
    def bytes_per_value(self) -> float:
        """Upload bytes per value of the vector."""
        return self.bytes_up_per_client / self.dim

    @property
    def ratio_to_float32(self) -> float:
        """Upload bytes over the ``4 * D`` bytes of the float32 vector."""
        return self.bytes_up_per_client / (4.0 * self.dim)

    @property
    def aggregate_s_per_client(self) -> float:
        """Server seconds per added client."""
        return self.aggregate_s / self.n_clients

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view, derived ratios included."""
        out = asdict(self)
        out.update(
            bytes_per_value=self.bytes_per_value,
            ratio_to_float32=self.ratio_to_float32,
            aggregate_s_per_client=self.aggregate_s_per_client,
        )
        return out


def encrypted_sum(
    vectors: ArrayLike,
    *,
    params: CKKSParams | None = None,
    custody: Custody = "authority",
    seed: int = 0,
    wire: WireFormat | None = None,
    noise_std: float = 0.0,
    noise: NoiseFn | None = None,
    flood_key: bytes | None = None,
    n_threads: int = 1,
    workers: int = 1,
) -> tuple[NDArray[np.float64], CKKSCost]:
    """Simulate one round: n clients encrypt, the server sums, the key holder decrypts.

    Fresh keys are made for every call (one key per released sum). With ``workers > 1``
    the clients are split into contiguous shards, one per forked process: each process
    plays its clients (encryption with the client context) and the server's ingestion
    of their uploads (validation and addition with the public context only), and the
    server merges the partial encrypted sums (:meth:`CKKSAggregator.merge`). The result
    does not depend on ``workers``: ciphertext addition is exact.

    Parameters
    ----------
    vectors : float32 or float64 [n, D], one row per client, ``|x| <= params.max_abs_value``.
    params : CKKS parameters (default :class:`CKKSParams`).
    custody : ``"authority"`` or ``"shared-clients"``.
    seed : root seed of the release noise (``numpy_rng(seed, "ckks", "release-noise")``).
        Encryption randomness cannot be seeded: ciphertexts differ between runs,
        decrypted sums agree within ``params.sum_tolerance(n)``.
    wire : ciphertext format; default :func:`default_wire` of ``custody``.
    noise_std : std of the Gaussian noise the decryptor adds before release (0: none).
    noise : a release-noise hook for :meth:`Decryptor.decrypt` instead of ``noise_std``.
    flood_key : 32 secret bytes of the flooding noise (default: fresh from the OS).
    n_threads : threads of every TenSEAL context.
    workers : processes to spread the clients over (1: all in this process; needs ``fork``).

    Returns
    -------
    total : float64 [D], the decrypted sum of the rows, flooded (:meth:`CKKSParams.flooding_std`)
        and, with ``noise_std`` or ``noise``, noised.
    cost : :class:`CKKSCost`.
    """
    from gfmfr_secure.rng import numpy_rng

    x = vectors if isinstance(vectors, np.ndarray) and vectors.dtype in (np.float32, np.float64) else np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise CKKSError(f"vectors must be a non-empty [n, D] array, got shape {x.shape}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise CKKSError(f"workers must be an int >= 1, got {workers!r}")
    if noise is not None and noise_std > 0:
        raise CKKSError("pass either noise_std or a noise hook, not both")
    n, dim = x.shape
    t0 = time.perf_counter()
    holder = KeyHolder(params, custody=custody, n_threads=n_threads)
    keygen_s = time.perf_counter() - t0
    w = holder.default_wire if wire is None else _check_wire(wire)
    client_ctx = holder.client_context_bytes()
    public_ctx = holder.public_context_bytes()
    decryptor = holder.decryptor(dim, wire=w)
    job = _ShardJob(x, client_ctx, public_ctx, holder.params, w, n_threads)
    shards = _shards(n, workers if n * dim >= _PARALLEL_MIN_VALUES else 1)
    if len(shards) == 1:
        parts = [job.run(0, n)]
    else:
        parts = _run_forked(job, shards)

    server = CKKSAggregator(public_ctx, holder.params, dim, wire=w, n_threads=n_threads)
    t0 = time.perf_counter()
    for part in parts:
        server.merge(part.partial, part.count)
    enc_sum = server.result()
    agg_s = time.perf_counter() - t0 + sum(part.aggregate_s for part in parts)
    server.close()

    hook = noise if noise is not None else (gaussian_noise(noise_std, numpy_rng(seed, "ckks", "release-noise")) if noise_std > 0 else None)
    t0 = time.perf_counter()
    total = decryptor.decrypt(enc_sum, noise=hook, flood_key=flood_key)
    dec_s = time.perf_counter() - t0

    cost = CKKSCost(
        n_clients=n,
        dim=dim,
        n_ciphertexts=holder.params.n_ciphertexts(dim, PACKING[w]),
        custody=holder.custody,
        wire=w,
        bytes_up_per_client=sum(part.bytes_up for part in parts) / n,
        bytes_down_per_client=len(client_ctx),
        bytes_public_context=len(public_ctx),
        bytes_encrypted_sum=sum(len(b) for b in enc_sum),
        keygen_s=keygen_s,
        encrypt_s_mean=sum(part.encrypt_s for part in parts) / n,
        aggregate_s=agg_s,
        decrypt_s=dec_s,
        flooding_std=decryptor.flooding_std,
        workers=len(shards),
    )
    return total, cost


#: Below this many values in all (n * D) a round runs in one process: forking costs more.
_PARALLEL_MIN_VALUES = 1 << 22


@dataclass(frozen=True)
class _ShardResult:
    """What one shard hands back: its partial encrypted sum and its costs."""

    partial: list[bytes]
    count: int
    bytes_up: int
    encrypt_s: float
    aggregate_s: float


@dataclass(frozen=True, eq=False)
class _ShardJob:
    """Clients ``start:stop`` encrypt their rows; the server's ingestion adds them (public context only)."""

    vectors: np.ndarray
    client_context: bytes
    public_context: bytes
    params: CKKSParams
    wire: WireFormat
    n_threads: int

    def run(self, start: int, stop: int) -> _ShardResult:
        dim = self.vectors.shape[1]
        encryptor = Encryptor(self.client_context, self.params, dim, wire=self.wire, n_threads=self.n_threads)
        server = CKKSAggregator(self.public_context, self.params, dim, wire=self.wire, n_threads=self.n_threads)
        enc_s = agg_s = 0.0
        up_bytes = 0
        try:
            for i in range(start, stop):
                t0 = time.perf_counter()
                upload = encryptor.encrypt(self.vectors[i])
                t1 = time.perf_counter()
                server.add(upload)
                agg_s += time.perf_counter() - t1
                enc_s += t1 - t0
                up_bytes += sum(len(c) for c in upload)
            t0 = time.perf_counter()
            partial = server.result()
            agg_s += time.perf_counter() - t0
        finally:
            encryptor.close()
            server.close()
        return _ShardResult(partial, stop - start, up_bytes, enc_s, agg_s)


def _shards(n: int, workers: int) -> list[tuple[int, int]]:
    """``workers`` contiguous ``(start, stop)`` ranges covering ``range(n)`` (fewer when n is small)."""
    k = max(1, min(int(workers), n))
    if k > 1 and "fork" not in multiprocessing.get_all_start_methods():
        k = 1
    edges = np.linspace(0, n, k + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


_FORKED_JOB: _ShardJob | None = None


def _forked_shard(bounds: tuple[int, int]) -> _ShardResult:
    if _FORKED_JOB is None:  # pragma: no cover - only reachable if the pool was not forked
        raise CKKSError("the shard worker was not forked from the process that set up the job")
    return _FORKED_JOB.run(*bounds)


def _run_forked(job: _ShardJob, shards: list[tuple[int, int]]) -> list[_ShardResult]:
    """Run the shards in forked processes; the vectors reach them through the fork, not a pipe."""
    global _FORKED_JOB
    _FORKED_JOB = job
    try:
        with ProcessPoolExecutor(len(shards), mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_forked_shard, shards))
    finally:
        _FORKED_JOB = None
