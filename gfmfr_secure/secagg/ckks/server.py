"""The server role of CKKS aggregation: validates uploads and adds them under encryption.

It holds the public context only (a context with the secret key is refused) and never
imports the client role or the key holder (a test walks the imports).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from gfmfr_secure.secagg.ckks.messages import (
    Scratch,
    as_blob,
    check_context,
    check_format,
    check_seal_ciphertext,
    chunk_bounds,
    has_public_key,
    load_context,
    load_error,
)
from gfmfr_secure.secagg.ckks.params import CKKSParams
from gfmfr_secure.secagg.ckks.words import add_into, pack, unpack, word_layout
from gfmfr_secure.secagg.ckks.primitives import CKKSError, WireFormat, check_dim, check_n_threads, check_wire, sealapi_module, tenseal_module

__all__ = ["CKKSAggregator"]


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
        self._dim = check_dim(dim)
        self._wire = check_wire(wire)
        self._ctx = load_context(public_context, check_n_threads(n_threads), "public context")
        if self._ctx.is_private():
            raise CKKSError("the aggregator must be built from public context bytes only, this context holds a secret key")
        check_context(self._ctx, params, "public context")
        self._bounds = chunk_bounds(params, self._dim, self._wire)
        self._acc: list[Any] | None = None
        self._n_added = 0
        if wire != "tenseal":
            self.sealapi_module = sealapi_module()
            self._seal_context = self._ctx.seal_context().data
            self._evaluator = self.sealapi_module.Evaluator(self._seal_context)
            self._scratch = Scratch()
        # packed under a public key: uploads are words (see words.py), added here in numpy
        self._words = word_layout(self._seal_context) if wire == "packed" and has_public_key(self._ctx) else None

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
            One TenSEAL ``CKKSVector`` (``"tenseal"``), SEAL ``Ciphertext`` (``"seeded"``,
            ``"packed"`` under a symmetric key) or uint64 [2, L, N] words (``"packed"``
            under a public key: :mod:`.words`) per ciphertext.

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
        if self._words is not None:
            return unpack(as_blob(blob, where), self._words, where)
        if self._wire != "tenseal":
            return self._scratch.load_checked(self._seal_context, self._params, self._wire, blob, where)
        data = as_blob(blob, where)
        check_format(data, self._wire, where)
        a, b = self._bounds[k]
        ts = tenseal_module()
        try:
            vec = ts.ckks_vector_from(self._ctx, data)
            size = vec.size()
            cts = vec.ciphertext()
        except (ValueError, RuntimeError) as exc:
            raise load_error(where, exc) from exc
        if size != b - a:
            raise CKKSError(f"{where}: encodes {size} values, expected {b - a}")
        if len(cts) != 1:
            raise CKKSError(f"{where}: holds {len(cts)} SEAL ciphertexts, expected 1")
        check_seal_ciphertext(cts[0], self._params, where)
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
        elif self._words is not None:
            for acc, words in zip(self._acc, parts, strict=True):
                add_into(acc, words, self._words)
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
        if self._words is not None:
            return [pack(words, self._words) for words in self._acc]
        if self._wire != "tenseal":
            return [self._scratch.save(ct) for ct in self._acc]
        return [vec.serialize() for vec in self._acc]

    def aggregate(self, uploads: Iterable[Sequence[bytes]]) -> list[bytes]:
        """Add every upload and return the encrypted sum (see :meth:`add`, :meth:`result`)."""
        for upload in uploads:
            self.add(upload)
        return self.result()
