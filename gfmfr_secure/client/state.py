"""Client-private state, stored so that memory grows with interactions, not users x items.

Semantics of the personal item table ``P_u`` (FedRAP): every row starts at zero.
A row that client ``u`` never touched (never had item ``i`` in a training batch)
is kept implicitly and reads as zero, so an untouched item is scored with the
shared table alone. Rows are materialised the first time they are trained and are
kept thereafter. Because the trainers apply no weight decay to item-table rows
(FedRAP's L1 / MSE terms regularise them), an implicit row is exactly what a dense
table initialised at zero would hold: the sparse store is a lossless
representation, not an approximation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ClientStateStore", "RowStore"]


class RowStore:
    """Sparse rows of a [U, I, d] tensor keyed by ``user * n_items + item``; absent rows are zero.

    Keys are kept sorted (int64 numpy array) so look-ups are ``np.searchsorted``.
    """

    def __init__(self, n_users: int, n_items: int, dim: int) -> None:
        self.n_users = int(n_users)
        self.n_items = int(n_items)
        self.dim = int(dim)
        self.keys = np.empty(0, dtype=np.int64)
        self.values = torch.empty(0, dim)

    def __len__(self) -> int:
        return int(self.keys.size)

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.values.numel() * self.values.element_size())

    def make_keys(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return np.asarray(users, dtype=np.int64) * self.n_items + np.asarray(items, dtype=np.int64)

    def _locate(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.searchsorted(self.keys, keys)
        found = np.zeros(keys.shape, dtype=bool)
        inside = pos < self.keys.size
        found[inside] = self.keys[pos[inside]] == keys[inside]
        return pos, found

    def gather(self, keys: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows for ``keys`` [n] -> [n, d]; zeros where a row was never stored.

        ``out``, if given, is a zero-filled ``[n, d]`` tensor of the store's dtype that
        receives the rows (and is returned); it saves a copy when the caller needs the
        rows inside a larger buffer.
        """
        keys = np.asarray(keys, dtype=np.int64)
        if out is None:
            out = torch.zeros(keys.size, self.dim, dtype=self.values.dtype)
        elif out.shape != (keys.size, self.dim) or out.dtype != self.values.dtype:
            raise ValueError(
                f"out must be a {self.values.dtype} tensor of shape {(keys.size, self.dim)}, "
                f"got {out.dtype} {tuple(out.shape)}"
            )
        if self.keys.size == 0 or keys.size == 0:
            return out
        pos, found = self._locate(keys)
        if found.any():
            out[torch.from_numpy(np.flatnonzero(found))] = self.values[torch.from_numpy(pos[found])]
        return out

    def put(self, keys: np.ndarray, values: torch.Tensor) -> None:
        """Store ``values`` [n, d] at unique ``keys`` [n] (insert or overwrite)."""
        keys = np.asarray(keys, dtype=np.int64)
        if values.shape != (keys.size, self.dim):
            raise ValueError(f"values must have shape {(keys.size, self.dim)}, got {tuple(values.shape)}")
        ascending = bool(np.all(keys[1:] > keys[:-1]))  # sorted and unique: the trainers' case
        if not ascending and keys.size and np.unique(keys).size != keys.size:
            raise ValueError("RowStore.put needs unique keys")
        values = values.detach().to(self.values.dtype)
        pos, found = self._locate(keys)
        if found.any():
            self.values[torch.from_numpy(pos[found])] = values[torch.from_numpy(np.flatnonzero(found))]
        new = ~found
        if new.any():
            # Linear-time merge of two sorted key lists (no re-sort): each key's final
            # position is its own rank plus the number of keys of the other list before it.
            add = np.flatnonzero(new)
            if not ascending:
                add = add[np.argsort(keys[add], kind="stable")]
            add_keys = keys[add]
            n_old, n_add = self.keys.size, add_keys.size
            add_dest = np.searchsorted(self.keys, add_keys) + np.arange(n_add)
            old_dest = np.arange(n_old) + np.searchsorted(add_keys, self.keys)
            merged = np.empty(n_old + n_add, dtype=np.int64)
            merged[old_dest] = self.keys
            merged[add_dest] = add_keys
            out = torch.empty(n_old + n_add, self.dim, dtype=self.values.dtype)
            out[torch.from_numpy(old_dest)] = self.values
            out[torch.from_numpy(add_dest)] = values[torch.from_numpy(add)]
            self.keys = merged
            self.values = out

    def user_rows(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """All stored rows of ``users`` [B]: (position in ``users`` [n], item [n], values [n, d])."""
        users = np.asarray(users, dtype=np.int64)
        start = np.searchsorted(self.keys, users * self.n_items)
        stop = np.searchsorted(self.keys, (users + 1) * self.n_items)
        lengths = stop - start
        owner = np.repeat(np.arange(users.size), lengths)
        idx = np.repeat(start - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())
        items = self.keys[idx] - users[owner] * self.n_items
        return owner, items, self.values[torch.from_numpy(idx)]

    def copy(self) -> RowStore:
        out = RowStore(self.n_users, self.n_items, self.dim)
        out.keys = self.keys.copy()
        out.values = self.values.clone()
        return out


@dataclass
class ClientStateStore:
    """Everything private to the clients, for all users (a simulation convenience).

    Only client-side code (trainers, client-side evaluation) may read it; server
    code receives :class:`~gfmfr_secure.types.CohortUpdate` objects or aggregates.

    Attributes
    ----------
    user_embedding : [U, d] private user embeddings (zeros and unused when the backbone has none).
    personal : sparse personal item tables (FedRAP), or None.
    ema_ratio : [U] float64, each client's running ratio of base loss to distillation loss (NaN until first used).
    heads : [U, H] private heads (PFedRec), or None.
    group : [U] int64, the group each client was last told or chose (-1 = none).
    """

    user_embedding: torch.Tensor
    personal: RowStore | None
    ema_ratio: torch.Tensor
    heads: torch.Tensor | None
    group: np.ndarray

    @classmethod
    def create(
        cls,
        n_users: int,
        n_items: int,
        latent_dim: int,
        *,
        user_embedding: bool,
        personal_items: bool,
        private_head: torch.Tensor | None,
        generator: torch.Generator,
        user_std: float = 1.0,
    ) -> ClientStateStore:
        """Fresh state: user embeddings ``N(0, user_std^2)`` (as ``nn.Embedding``), empty personal tables."""
        emb = torch.randn(n_users, latent_dim, generator=generator) * user_std if user_embedding else torch.zeros(n_users, latent_dim)
        heads = private_head.reshape(1, -1).repeat(n_users, 1) if private_head is not None else None
        return cls(
            user_embedding=emb,
            personal=RowStore(n_users, n_items, latent_dim) if personal_items else None,
            ema_ratio=torch.full((n_users,), float("nan"), dtype=torch.float64),
            heads=heads,
            group=np.full(n_users, -1, dtype=np.int64),
        )

    def snapshot(self) -> ClientStateStore:
        return ClientStateStore(
            user_embedding=self.user_embedding.clone(),
            personal=self.personal.copy() if self.personal is not None else None,
            ema_ratio=self.ema_ratio.clone(),
            heads=self.heads.clone() if self.heads is not None else None,
            group=self.group.copy(),
        )

    @property
    def nbytes(self) -> int:
        n = self.user_embedding.numel() * 4 + self.ema_ratio.numel() * 8 + self.group.nbytes
        if self.personal is not None:
            n += self.personal.nbytes
        if self.heads is not None:
            n += self.heads.numel() * 4
        return int(n)
