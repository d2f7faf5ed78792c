"""CKKS parameters: ring degree, coefficient modulus (SEAL's primes), scale; error model and flooding bound.

See the package docstring for the security level of each parameter set and the
derivation of the flooding noise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from gfmfr_secure.secagg.ckks.primitives import CKKSError, Packing, check_dim, check_packing, sealapi_module

__all__ = ["HE_STANDARD_MAX_LOG_Q", "PRESETS", "STAT_SECURITY_BITS", "CKKSParams", "seal_primes"]

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


@lru_cache(maxsize=64)
def seal_primes(poly_modulus_degree: int, bit_sizes: tuple[int, ...]) -> tuple[int, ...]:
    """The primes of SEAL's ``CoeffModulus.Create(N, bit_sizes)``, in chain order, as ints.

    For each bit size b SEAL takes the largest primes below ``2**b`` that are ``1 mod 2N``.

    Raises
    ------
    CKKSError
        When there are not enough such primes for the chain (SEAL: "failed to find enough
        qualifying primes"), or a bit size SEAL rejects.
    """
    try:
        moduli = sealapi_module().CoeffModulus.Create(int(poly_modulus_degree), [int(b) for b in bit_sizes])
    except (RuntimeError, ValueError) as exc:
        raise CKKSError(
            f"SEAL cannot build the coefficient modulus {list(bit_sizes)} at ring degree {poly_modulus_degree}: {exc} "
            f"(a prime must be 1 mod {2 * poly_modulus_degree}, so it needs more than {(2 * poly_modulus_degree).bit_length() - 1} "
            f"bits, and each size has only so many)"
        ) from exc
    return tuple(int(m.value()) for m in moduli)


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
        return seal_primes(self.poly_modulus_degree, self.coeff_mod_bit_sizes)

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
        return self.slots if check_packing(packing) == "slots" else self.poly_modulus_degree

    def n_ciphertexts(self, dim: int, packing: Packing = "slots") -> int:
        """Ciphertexts per vector of ``dim`` values, ``ceil(dim / values_per_ciphertext)``."""
        return -(-check_dim(dim) // self.values_per_ciphertext(packing))

    def _variances(self, symmetric: bool, packing: Packing = "slots") -> tuple[float, float]:
        """Per-ciphertext error variance of one value, in units of the scale squared.

        Returns ``(mean, worst)``: averaged over slots and keys, and for the worst
        slot under a key that is unlucky with probability at most ``_KEY_TAIL``
        (coefficients: for every ternary key, since ``||s||^2 <= N``).
        """
        if check_packing(packing) == "coefficients":
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
        d = check_dim(dim)
        if isinstance(stat_bits, bool) or not isinstance(stat_bits, int) or stat_bits < 1:
            raise CKKSError(f"stat_bits must be an int >= 1, got {stat_bits!r}")
        n_max = self.max_summands
        if check_packing(packing) == "coefficients":
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
    # The ``packed`` wire format's (the backend's for 943 clients, |x| <= 8): N = 8192, 60 + 20-bit
    # data primes, Delta = 2**66, flooding std 1.2e-8 on a sum of D = 579,850 values (public key).
    "packed": CKKSParams(8192, (60, 20, 45), 66, max_abs_value=8.0, max_summands=943),
    # The smallest ``packed`` ring: N = 4096, one 60-bit data prime (16 bytes per value against
    # 22), Delta = 2**46, flooding std 9.1e-3 on the same sum.
    "packed-4096": CKKSParams(4096, (60, 49), 46, max_abs_value=8.0, max_summands=943),
}
# A ring of N = 2048 (at most 54 bits of modulus) cannot keep the flooding noise
# below ~1e2 for any useful D, so there is no such preset any more.
