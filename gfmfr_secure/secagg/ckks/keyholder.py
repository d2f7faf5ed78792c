"""The key holder role of CKKS aggregation: makes the keys, hands out their public parts, decrypts the sum.

Under ``authority`` custody this is the key authority, a party apart from the
aggregator; under ``shared-clients`` the clients hold the secret key and one of them
decrypts. Every release is flooded (see the package docstring).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gfmfr_secure.secagg.ckks.client import Encryptor
from gfmfr_secure.secagg.ckks.messages import Scratch, as_blob, check_context, check_format, check_seal_ciphertext, chunk_bounds, load_context, load_error
from gfmfr_secure.secagg.ckks.params import CKKSParams
from gfmfr_secure.secagg.ckks.words import seal_from_words, unpack, word_layout
from gfmfr_secure.secagg.ckks.primitives import (
    PACKING,
    CKKSError,
    Custody,
    NoiseFn,
    WireFormat,
    check_custody,
    check_dim,
    check_n_threads,
    check_wire,
    coefficients_to_slots,
    default_wire,
    flooding_noise,
    sealapi_module,
    slots_to_coefficients,
    tenseal_module,
)
from gfmfr_secure.secagg.ckks.server import CKKSAggregator

__all__ = ["Decryptor", "KeyHolder"]


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
        ts = tenseal_module()
        self._params = params if params is not None else CKKSParams()
        if not isinstance(self._params, CKKSParams):
            raise CKKSError(f"params must be a CKKSParams, got {type(self._params).__name__}")
        self._custody = check_custody(custody)
        self._n_threads = check_n_threads(n_threads)
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
        check = load_context(data, 1, "public context")
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

    def secret_context_bytes(self) -> bytes:
        """The context with its secret key, for the key holder's own storage between messages.

        Under ``authority`` this never leaves the key holder: a :class:`Decryptor` built from
        it later decrypts the sum (a key holder that answers one message per process keeps it
        in its own state file).
        """
        return self._context.serialize(save_public_key=not self.symmetric, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)

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
        ctx = load_context(secret_context, 1, "secret context")
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
        check_context(ctx, params, "secret context")
        self._ctx = ctx
        self._params = params
        self._dim = check_dim(dim)
        self._wire = check_wire(wire)
        self._bounds = chunk_bounds(params, self._dim, self._wire)
        packing = PACKING[self._wire]
        self._flooding_std = params.flooding_std(self._dim, symmetric=bool(symmetric), packing=packing)
        if packing == "coefficients" and params.max_summands * params.max_abs_value + 10.0 * self._flooding_std > params.capacity:
            raise CKKSError(
                f"the flooding noise (std {self._flooding_std:.3g}, added before decryption) can overflow a sum of "
                f"{params.max_summands} values |x| <= {params.max_abs_value}: lower global_scale_bits"
            )
        if self._wire != "tenseal":
            sealapi = sealapi_module()
            self.sealapi_module = sealapi
            self._seal_context = ctx.seal_context().data
            self._seal_decryptor = sealapi.Decryptor(self._seal_context, ctx.secret_key().data)
            self._encoder = sealapi.CKKSEncoder(self._seal_context)
            self._evaluator = sealapi.Evaluator(self._seal_context)
            self._scratch = Scratch()
        self._words = word_layout(self._seal_context) if self._wire == "packed" and not symmetric else None

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
            noise = self.sealapi_module.Plaintext()
            self._encoder.encode(flood_slots[k].tolist(), scale, noise)
            self._evaluator.add_plain_inplace(ct, noise)
            plain = self.sealapi_module.Plaintext()
            self._seal_decryptor.decrypt(ct, plain)
            slots[k] = self._encoder.decode_complex(plain)
        return slots_to_coefficients(slots).reshape(-1)[: self._dim]

    def _load_seal(self, blob: object, where: str) -> Any:
        if self._words is None:
            return self._scratch.load_checked(self._seal_context, self._params, self._wire, blob, where)
        words = unpack(as_blob(blob, where), self._words, where)
        try:  # SEAL validates the rebuilt ciphertext once more as it loads it
            ct = self._scratch.load_ciphertext(self.sealapi_module, self._seal_context, seal_from_words(words, self._words, self._params.scale))
        except (ValueError, RuntimeError) as exc:
            raise load_error(where, exc) from exc
        check_seal_ciphertext(ct, self._params, where)
        return ct

    def _decrypt_one(self, blob: object, k: int, size: int) -> NDArray[np.float64]:
        where = f"encrypted sum, ciphertext {k}"
        if self._wire == "seeded":
            ct = self._load_seal(blob, where)
            plain = self.sealapi_module.Plaintext()
            self._seal_decryptor.decrypt(ct, plain)
            return np.asarray(self._encoder.decode_double(plain)[:size], dtype=np.float64)
        data = as_blob(blob, where)
        check_format(data, self._wire, where)
        ts = tenseal_module()
        try:
            vec = ts.ckks_vector_from(self._ctx, data)
            n_values = vec.size()
            cts = vec.ciphertext()
        except (ValueError, RuntimeError) as exc:
            raise load_error(where, exc) from exc
        if n_values != size or len(cts) != 1:
            raise CKKSError(f"{where}: encodes {n_values} values in {len(cts)} ciphertexts, expected {size} in 1")
        check_seal_ciphertext(cts[0], self._params, where)
        return np.asarray(vec.decrypt(), dtype=np.float64)
