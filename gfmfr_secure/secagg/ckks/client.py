"""The client role of CKKS aggregation: encrypts its vector with the client context."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from gfmfr_secure.secagg.ckks.messages import Scratch, check_context, chunk_bounds, has_public_key, load_context
from gfmfr_secure.secagg.ckks.words import pack, word_layout, words_from_seal
from gfmfr_secure.secagg.ckks.params import CKKSParams
from gfmfr_secure.secagg.ckks.primitives import (
    CKKSError,
    WireFormat,
    check_dim,
    check_n_threads,
    check_wire,
    coefficients_to_slots,
    sealapi_module,
    tenseal_module,
)

__all__ = ["Encryptor"]


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
        self._dim = check_dim(dim)
        self._wire = check_wire(wire)
        self._ctx = load_context(context_bytes, check_n_threads(n_threads), "client context")
        check_context(self._ctx, params, "client context")
        self._bounds = chunk_bounds(params, self._dim, self._wire)
        if not (self._ctx.is_private() or has_public_key(self._ctx)):
            raise CKKSError("the client context holds neither a public key nor a secret key: it cannot encrypt")
        if wire == "seeded" and not self._ctx.is_private():
            raise CKKSError(
                "the 'seeded' wire format uses secret-key encryption: it needs the shared secret context "
                "('shared-clients' custody), not a public context"
            )
        self._symmetric = bool(self._ctx.is_private())
        if wire in ("seeded", "packed"):
            sealapi = sealapi_module()
            seal_context = self._ctx.seal_context().data
            key = self._ctx.secret_key().data if self._symmetric else self._ctx.public_key().data
            self._seal_encryptor = sealapi.Encryptor(seal_context, key)
            self._encoder = sealapi.CKKSEncoder(seal_context)
            self._scratch = Scratch()
            # packed, public key: the ciphertext's words travel (see words.py); seeded: SEAL's bytes
            self._words = word_layout(seal_context) if wire == "packed" and not self._symmetric else None

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
        ts = tenseal_module()
        return [ts.ckks_vector(self._ctx, v[a:b]).serialize() for a, b in self._bounds]

    def _encrypt_packed(self, v: NDArray[np.float64]) -> list[bytes]:
        degree = self._params.poly_modulus_degree
        rows = np.zeros((len(self._bounds), degree))
        rows.reshape(-1)[: self._dim] = v
        slots = coefficients_to_slots(rows)  # [C, N/2]: encodes to round(Delta * rows)
        return [self._encrypt_plain(row.tolist()) for row in slots]

    def _encrypt_plain(self, values: list[float] | list[complex]) -> bytes:
        sealapi = sealapi_module()
        plain = sealapi.Plaintext()
        self._encoder.encode(values, self._params.scale, plain)
        if self._symmetric:  # seeded: the second polynomial travels as the seed of its PRNG
            return self._scratch.save(self._seal_encryptor.encrypt_symmetric(plain))
        ct = sealapi.Ciphertext()
        self._seal_encryptor.encrypt(plain, ct)
        if self._words is not None:
            return pack(words_from_seal(self._scratch.save(ct), self._words, self._params.scale), self._words)
        return self._scratch.save(ct)
