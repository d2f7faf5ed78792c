"""Interaction-level membership inference: which uploaded item rows are the user's positives?

In FedNCF / FedRAP / GFMFR a client trains on its positives and sampled negatives
and uploads the item-table rows it touched. The server (honest but curious) sees
each client's uploaded rows and wants to know which ones are real interactions.

Two attacks are provided.

Update magnitude (:func:`row_magnitude_scores`)
    rows with larger updates are guessed to be interactions. Without uploads of
    negatives every uploaded row is a positive; with negative sampling the
    magnitude still differs between the classes because ``|p - y|`` does.

IMIA (:func:`imia_scores`)
    Yuan et al., WWW 2023, "Interaction-level Membership Inference Attack Against
    Federated Recommender Systems": the server knows the broadcast model, simulates
    the client's local training under guessed labels and keeps, per item, the label
    whose simulated update matches the observed one.

Model and notation
------------------
The head is the NCF-style network of :mod:`gfmfr_secure.models.backbones`: for a
user embedding ``e [d]`` and item vector ``x [d]``::

    z = W1u e + W1i x + b1          [h]
    logit = w2 . relu(z) + b2,      p = sigmoid(logit),     BCE loss

so one SGD step on a sample with label ``y`` moves the item row by
``-lr (p - y) g`` with ``g = dlogit/dx = W1i^T (w2 * [z > 0])``. A positive moves
the row along ``+g`` (by ``lr (1 - p)``), a negative along ``-g`` (by ``lr p``).

The attacker does not know ``e``. IMIA estimates it per client by alternating

1. labels: ``s_r = sign(<delta_r, g_r(e)>)`` for every uploaded row ``r``;
2. refit: a few Adam steps on ``e`` maximising ``sum_r s_r cos(delta_r, g_r(e))``,
   with the ReLU gate ``[z > 0]`` relaxed to ``sigmoid(z / tau)`` so that the
   objective has a gradient in ``e``,

from several random starts (plus ``e = 0``), keeping per client the start with the
best agreement ``sum_r |cos(delta_r, g_r(e))|`` under hard gates. Each row is then
scored ``cos(delta_r, u+_r) - cos(delta_r, u-_r)`` with the simulated positive and
negative updates ``u+ = lr (1 - p) g`` and ``u- = -lr p g`` (``lr`` cancels; as
both are parallel to ``g`` the score is ``2 cos(delta_r, g_r)``).

Directions alone cannot always tell ``g`` from ``-g``: complementary ReLU gates
give nearly opposite gradients (exactly so when ``b1 = 0`` and the item vectors are
small, as early in training), so the fit can land in the mode that swaps a
client's labels. The protocol's class balance breaks the tie: pass
``pos_fraction = 1 / (1 + num_negatives)`` and each client's labelling is oriented
to match it (the server knows ``num_negatives``; it is a protocol setting).

Assumptions (documented limits)
-------------------------------
- ``item_delta`` is *uploaded row minus broadcast row* (as the clients in
  :mod:`gfmfr_secure.client` compute it); rows a client did not upload are absent.
- The head the attacker uses is the broadcast one; the client's own head moves
  during local training, so the simulated directions approximate the first local
  step, as does ``x = C[i]`` under FedRAP, where the client's private ``P_u[i]``
  is added to the item vector. Under PFedRec the head is private: the attacker
  must substitute a guess (e.g. the initial head), which this module does not do.
- Several local epochs add updates taken at slightly different ``e``, ``x`` and
  head; the fitted ``e`` is an "effective" embedding for the whole round.
- Regularisers that move every row (FedRAP's ``beta |C|_1``), the distillation
  term and DP noise are not modelled; they lower the attack's accuracy.
- ``emb_scale`` should match the scale of the clients' embeddings (the library
  initialises them ``N(0, 1)``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from attacks.base import as_array, make_rng

__all__ = [
    "IMIA_SCORES",
    "dense_to_csr",
    "imia_row_scores",
    "dot_imia_row_scores",
    "imia_scores",
    "row_magnitude_scores",
    "row_norms",
    "scatter_rows",
]


IMIA_SCORES: tuple[str, ...] = ("cosine", "projection")

# --------------------------------------------------------------------------- helpers


def _check_csr(row_ptr: np.ndarray | Sequence[int], row_items: np.ndarray | Sequence[int], n_items: int) -> tuple[np.ndarray, np.ndarray]:
    ptr = as_array("row_ptr", row_ptr, ndim=1, dtype=np.int64)
    it = as_array("row_items", row_items, ndim=1, dtype=np.int64)
    if ptr.size < 1 or ptr[0] != 0 or ptr[-1] != it.size or np.any(np.diff(ptr) < 0):
        raise ValueError(f"row_ptr must start at 0, be non-decreasing and end at len(row_items)={it.size}")
    if it.size and (it.min() < 0 or it.max() >= n_items):
        raise ValueError(f"row_items must be in [0, {n_items}), got range [{it.min()}, {it.max()}]")
    return ptr, it


def dense_to_csr(item_delta: np.ndarray, uploaded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense per-client deltas to the CSR layout used by the attacks.

    Parameters
    ----------
    item_delta : [n, I, d] uploaded row minus broadcast row (zeros where not uploaded).
    uploaded : [n, I] bool, which rows each client uploaded; default: rows with any
        non-zero entry (an uploaded row whose ReLU gates stayed closed never moves
        and is then taken as not uploaded; pass the mask when it is known).

    Returns
    -------
    row_ptr [n + 1], row_items [R], rows [R, d] (client-major, items ascending).
    """
    dense = as_array("item_delta", item_delta, ndim=3)
    n, n_items, _ = dense.shape
    if uploaded is None:
        mask = np.any(dense != 0.0, axis=2)
    else:
        mask = as_array("uploaded", uploaded, dtype=np.bool_, shape=(n, n_items))
    clients, items = np.nonzero(mask)
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(clients, minlength=n), out=ptr[1:])
    return ptr, items.astype(np.int64), dense[clients, items]


def scatter_rows(row_ptr: np.ndarray, row_items: np.ndarray, values: np.ndarray, n_items: int, fill_value: float = 0.0) -> np.ndarray:
    """Per-row values [R] to a dense [n, I] matrix (``fill_value`` where not uploaded).

    A client may list each item at most once; duplicates raise ``ValueError``.
    """
    ptr, it = _check_csr(row_ptr, row_items, n_items)
    vals = as_array("values", values, ndim=1, shape=(it.size,))
    out = np.full((ptr.size - 1, n_items), float(fill_value))
    clients = np.repeat(np.arange(ptr.size - 1), np.diff(ptr))
    if np.unique(clients * n_items + it).size != it.size:
        raise ValueError("row_items lists an item more than once for the same client")
    out[clients, it] = vals
    return out


def row_norms(row_ptr: np.ndarray, row_items: np.ndarray, item_delta: np.ndarray, n_items: int) -> np.ndarray:
    """L2 norms of uploaded rows as a dense [n, I] matrix (0 where not uploaded).

    Parameters
    ----------
    row_ptr : [n + 1] CSR pointer; client ``c``'s rows are ``row_ptr[c]:row_ptr[c + 1]``.
    row_items : [R] item id of each uploaded row.
    item_delta : [R, d] the rows (uploaded minus broadcast).
    n_items : I.
    """
    it = as_array("row_items", row_items, ndim=1, dtype=np.int64)
    rows = as_array("item_delta", item_delta, ndim=2, shape=(it.size, None))
    return scatter_rows(row_ptr, it, np.linalg.norm(rows, axis=1), n_items)


def row_magnitude_scores(norms: np.ndarray, *, per_client: bool = False) -> np.ndarray:
    """Update-magnitude membership test: larger row updates => interacted.

    Parameters
    ----------
    norms : [n_clients, I] norm of each client's uploaded update of each item row
        (0 for rows the client did not upload; :func:`row_norms` builds it).
    per_client : divide each client's norms by the mean of its non-zero norms, so
        that clients with different step counts are comparable when scores of
        several clients are pooled into one ROC curve.

    Returns
    -------
    np.ndarray [n_clients, I] float64; higher = more likely an interaction, 0 for
    rows not uploaded.
    """
    x = as_array("norms", norms, ndim=2)
    if x.size and x.min() < 0:
        raise ValueError("norms must be non-negative")
    if not per_client:
        return x.copy()
    nz = (x > 0).sum(axis=1, keepdims=True)
    mean = np.divide(x.sum(axis=1, keepdims=True), nz, out=np.ones((x.shape[0], 1)), where=nz > 0)
    return x / mean


# --------------------------------------------------------------------------- IMIA


def _head_tensors(
    item_table: np.ndarray, w1_user: np.ndarray, w1_item: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: float
) -> tuple[torch.Tensor, ...]:
    table = as_array("item_table", item_table, ndim=2)
    d = table.shape[1]
    wu = as_array("w1_user", w1_user, ndim=2, shape=(None, d))
    h = wu.shape[0]
    wi = as_array("w1_item", w1_item, shape=(h, d))
    bb = as_array("b1", b1, shape=(h,))
    ww = as_array("w2", w2, shape=(h,))
    b2a = as_array("b2", b2).reshape(-1)
    if b2a.size != 1:
        raise ValueError(f"b2 must be a scalar, got shape {list(np.shape(b2))}")
    return tuple(torch.as_tensor(t, dtype=torch.float32) for t in (table, wu, wi, bb, ww, b2a[0]))


def imia_row_scores(
    row_ptr: np.ndarray | Sequence[int],
    row_items: np.ndarray | Sequence[int],
    item_delta: np.ndarray,
    item_table: np.ndarray,
    w1_user: np.ndarray,
    w1_item: np.ndarray,
    b1: np.ndarray,
    w2: np.ndarray,
    b2: float,
    *,
    seed: int | np.random.Generator,
    n_iter: int = 3,
    n_restarts: int = 3,
    fit_steps: int = 20,
    fit_lr: float = 0.1,
    temperature: float = 0.2,
    emb_scale: float = 1.0,
    pos_fraction: float | None = None,
    score: str = "cosine",
    chunk_rows: int = 65536,
    return_embeddings: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """IMIA score of every uploaded row (CSR input); see the module docstring.

    Parameters
    ----------
    row_ptr : [n + 1] client ``c``'s rows are ``row_ptr[c]:row_ptr[c + 1]``.
    row_items : [R] item id of each uploaded row.
    item_delta : [R, d] uploaded row minus broadcast row.
    item_table : [I, d] broadcast item table.
    w1_user, w1_item : [h, d] broadcast first layer (user and item halves).
    b1 : [h]; w2 : [h]; b2 : scalar -- broadcast head.
    seed : int or :class:`numpy.random.Generator`; seeds the random starts of ``e``.
    n_iter : label / refit alternations.
    n_restarts : random starts of ``e`` per client (``e = 0`` is always added).
    fit_steps : Adam steps on ``e`` per alternation.
    fit_lr : Adam learning rate (in units of ``emb_scale``).
    temperature : gate relaxation ``sigmoid(z / tau)`` with ``tau = temperature *``
        the typical size of ``z``: ``sqrt(mean (W1i x + b1)^2 + emb_scale^2 mean_k |W1u_k|^2)``
        over the uploaded rows.
    emb_scale : standard deviation of the random starts of ``e``.
    pos_fraction : expected fraction of positives among a client's uploaded rows
        (``1 / (1 + num_negatives)`` under negative sampling), or None. Directions
        alone cannot always tell ``g`` from ``-g`` (complementary ReLU gates give
        nearly opposite gradients, exactly so when ``b1 = 0`` and the item vectors
        are small), so a client's labels can come out swapped. With a prior, each
        client's scores are negated when the swapped labelling matches it better:
        the fraction of rows scored > 0 is compared with ``pos_fraction``.
    score : ``"cosine"`` (the IMIA score above, in ``[-2, 2]``) or ``"projection"``:
        the signed length of the observed update along the simulated gradient,
        divided by the client's mean row norm (uses the magnitude too: positives
        move by ``lr (1 - p)``, negatives by ``lr p``).
    chunk_rows : clients are processed in chunks of about this many rows (memory
        grows as ``chunk_rows * (n_restarts + 1) * h``).
    return_embeddings : also return the fitted embeddings [n, d] (before any
        ``pos_fraction`` sign flip; a flipped client's embedding is the swapped mode).

    Returns
    -------
    scores : [R] float64; higher = more likely a positive. A row whose observed
        update or simulated gradient is zero scores 0.
    embeddings : [n, d] (only with ``return_embeddings``).
    """
    table, wu, wi, bb, ww, b2t = _head_tensors(item_table, w1_user, w1_item, b1, w2, b2)
    n_items, d = table.shape
    ptr, it = _check_csr(row_ptr, row_items, n_items)
    rows = as_array("item_delta", item_delta, ndim=2, shape=(it.size, d))
    for name, v in (("n_iter", n_iter), ("fit_steps", fit_steps), ("chunk_rows", chunk_rows)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if n_restarts < 0 or emb_scale <= 0 or temperature <= 0 or fit_lr <= 0:
        raise ValueError("need n_restarts >= 0 and positive emb_scale, temperature, fit_lr")
    if pos_fraction is not None and not 0.0 < pos_fraction < 1.0:
        raise ValueError(f"pos_fraction must be in (0, 1) or None, got {pos_fraction}")
    if score not in IMIA_SCORES:
        raise ValueError(f"unknown score {score!r}; known: {', '.join(IMIA_SCORES)}")
    n_clients = ptr.size - 1
    gen = torch.Generator().manual_seed(int(make_rng(seed).integers(0, 2**62)))
    # random starts drawn up front, so results do not depend on the chunking
    starts_e = torch.randn(n_clients, n_restarts + 1, d, generator=gen) * emb_scale
    starts_e[:, 0] = 0.0

    item_part = table @ wi.T + bb  # [I, h]
    used = item_part[torch.from_numpy(it)] if it.size else item_part[:0]
    item_ms = float((used**2).mean()) if used.numel() else 0.0
    user_ms = emb_scale**2 * float((wu**2).sum(dim=1).mean())
    tau = temperature * max(np.sqrt(item_ms + user_ms), 1e-12)

    cos_scores = np.zeros(it.size)
    proj_scores = np.zeros(it.size)
    emb_out = np.zeros((n_clients, d))
    # chunk boundaries over clients, each holding about chunk_rows rows
    starts = [0]
    while starts[-1] < n_clients:
        target = ptr[starts[-1]] + chunk_rows
        nxt = int(np.searchsorted(ptr, target, side="right")) - 1
        starts.append(min(max(nxt, starts[-1] + 1), n_clients))
    for c0, c1 in itertools.pairwise(starts):
        r0, r1 = int(ptr[c0]), int(ptr[c1])
        cs, pj, e = _imia_chunk(
            torch.from_numpy(np.diff(ptr[c0 : c1 + 1])),
            item_part[torch.from_numpy(it[r0:r1])],
            torch.as_tensor(rows[r0:r1], dtype=torch.float32),
            wu, wi, ww, b2t, starts_e[c0:c1],
            n_iter=n_iter, fit_steps=fit_steps, fit_lr=fit_lr * emb_scale, tau=tau,
        )
        cos_scores[r0:r1] = cs
        proj_scores[r0:r1] = pj
        emb_out[c0:c1] = e
    owner = np.repeat(np.arange(n_clients), np.diff(ptr))
    counts = np.maximum(np.diff(ptr), 1)
    if score == "cosine":
        scores = cos_scores
    else:
        mean_norm = np.bincount(owner, np.linalg.norm(rows, axis=1), minlength=n_clients) / counts
        scores = proj_scores / np.where(mean_norm > 0, mean_norm, 1.0)[owner]
    if pos_fraction is not None:
        frac = np.bincount(owner, (cos_scores > 0).astype(np.float64), minlength=n_clients) / counts
        flip = np.abs(1.0 - frac - pos_fraction) < np.abs(frac - pos_fraction)
        scores = np.where(flip[owner], -scores, scores)
    return (scores, emb_out) if return_embeddings else scores


def _imia_chunk(
    counts: torch.Tensor,
    item_part: torch.Tensor,
    delta: torch.Tensor,
    wu: torch.Tensor,
    wi: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    e_start: torch.Tensor,
    *,
    n_iter: int,
    fit_steps: int,
    fit_lr: float,
    tau: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IMIA on one chunk of clients: rows [R, *], per-client row counts [n], starts [n, K, d].

    With ``a_r = w2 * (W1i dhat_r)`` [h] and ``M = diag(w2) W1i W1i^T diag(w2)`` [h, h],
    the cosine between the unit delta ``dhat_r`` and ``g = W1i^T (w2 * gate)`` is
    ``gate . a_r / sqrt(gate^T M gate)``, so the fit never forms ``g`` [R, K, d]; the
    gradient in ``e`` is written out (``z = W1u e + ...``, ``gate = sigmoid(z / tau)``).

    Returns
    -------
    cosine scores [R], projections [R], fitted embeddings [n, d].
    """
    n, k, _ = e_start.shape
    owner = torch.repeat_interleave(torch.arange(n), counts)  # [R]
    norms = delta.norm(dim=1)
    live = (norms > 0).to(delta.dtype)  # [R]
    dn = delta / norms.clamp_min(1e-30)[:, None]  # [R, d] unit deltas
    a = (dn @ wi.T) * w2  # [R, h]
    m = (wi @ wi.T) * torch.outer(w2, w2)  # [h, h]

    def gates(e: torch.Tensor, soft: bool) -> tuple[torch.Tensor, torch.Tensor]:
        z = (e @ wu.T)[owner] + item_part[:, None, :]  # [R, K, h]
        return z, (torch.sigmoid(z / tau) if soft else (z > 0).to(z.dtype))

    def cosines(gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        num = (gate * a[:, None, :]).sum(-1)  # [R, K]
        mg = gate @ m  # [R, K, h]
        norm = (gate * mg).sum(-1).clamp_min(0.0).sqrt().clamp_min(1e-30)  # [R, K] = |g|
        return num / norm * live[:, None], num, mg, norm

    e = e_start.clone()
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for _ in range(n_iter):
        labels = torch.sign(cosines(gates(e, soft=False)[1])[0]) * live[:, None]  # [R, K]
        m1 = torch.zeros_like(e)
        m2 = torch.zeros_like(e)
        for step in range(1, fit_steps + 1):
            _, gate = gates(e, soft=True)
            _, num, mg, norm = cosines(gate)
            # d/dgate of labels * num / norm, then through the sigmoid to z
            coef = (labels / norm)[..., None]
            dgate = coef * (a[:, None, :] - (num / norm**2)[..., None] * mg)
            dz = dgate * gate * (1.0 - gate) / tau  # [R, K, h]
            grad = -(torch.zeros(n, k, dz.shape[-1]).index_add_(0, owner, dz) @ wu)  # ascent -> minimise
            m1.mul_(beta1).add_(grad, alpha=1.0 - beta1)
            m2.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            m_hat = m1 / (1.0 - beta1**step)
            v_hat = m2 / (1.0 - beta2**step)
            e = e - fit_lr * m_hat / (v_hat.sqrt() + eps)
    z, gate = gates(e, soft=False)
    cos_all = cosines(gate)[0]
    fit = torch.zeros(n, k).index_add_(0, owner, cos_all.abs())  # [n, K]
    best = fit.argmax(dim=1)  # [n]
    e_best = e[torch.arange(n), best]  # [n, d]
    pick = best[owner]
    rows = torch.arange(owner.numel())
    z_b, gate_b = z[rows, pick], gate[rows, pick]  # [R, h]
    g_b = (gate_b * w2) @ wi  # [R, d]
    p = torch.sigmoid(torch.relu(z_b) @ w2 + b2)  # [R]
    u_pos = (1.0 - p)[:, None] * g_b
    u_neg = -p[:, None] * g_b

    def cos(u: torch.Tensor) -> torch.Tensor:
        return (u * dn).sum(1) / u.norm(dim=1).clamp_min(1e-30) * live

    score = cos(u_pos) - cos(u_neg)
    # signed length of the observed update along the simulated gradient
    proj = (delta * g_b).sum(1) / g_b.norm(dim=1).clamp_min(1e-30)
    return score.double().numpy(), proj.double().numpy(), e_best.double().numpy()


def imia_scores(
    item_delta: np.ndarray,
    item_table: np.ndarray,
    w1_user: np.ndarray,
    w1_item: np.ndarray,
    b1: np.ndarray,
    w2: np.ndarray,
    b2: float,
    *,
    seed: int | np.random.Generator,
    row_ptr: np.ndarray | Sequence[int] | None = None,
    row_items: np.ndarray | Sequence[int] | None = None,
    uploaded: np.ndarray | None = None,
    n_iter: int = 3,
    n_restarts: int = 3,
    fit_steps: int = 20,
    fit_lr: float = 0.1,
    temperature: float = 0.2,
    emb_scale: float = 1.0,
    pos_fraction: float | None = None,
    score: str = "cosine",
    fill_value: float | None = None,
    chunk_rows: int = 65536,
) -> np.ndarray:
    """IMIA scores as a dense [n, I] matrix (dense or CSR input).

    Parameters
    ----------
    item_delta : either dense [n, I, d] (uploaded minus broadcast, zeros where not
        uploaded), or, with ``row_ptr`` and ``row_items``, the uploaded rows [R, d]
        in CSR order (no dense ``n x I x d`` array is ever built).
    item_table, w1_user, w1_item, b1, w2, b2 : the broadcast model, shapes as in
        :func:`imia_row_scores`.
    seed : seeds the random starts.
    row_ptr, row_items : CSR layout ([n + 1], [R]); both or neither.
    uploaded : [n, I] bool for dense input (default: rows with a non-zero entry).
    fill_value : score of rows a client did not upload; default: below every
        uploaded row's score (-2 for ``"cosine"``, the lowest possible value; the
        smallest uploaded score minus 1 for ``"projection"``), since the server
        knows those rows were not trained on this round.
    n_iter, n_restarts, fit_steps, fit_lr, temperature, emb_scale, pos_fraction,
    score, chunk_rows : see :func:`imia_row_scores`.

    Returns
    -------
    np.ndarray [n, I] float64; higher = more likely an interaction.
    """
    n_items = as_array("item_table", item_table, ndim=2).shape[0]
    if (row_ptr is None) != (row_items is None):
        raise ValueError("pass both row_ptr and row_items (CSR input) or neither (dense input)")
    if row_ptr is None:
        dense = as_array("item_delta", item_delta, ndim=3, shape=(None, n_items, None))
        ptr, it, rows = dense_to_csr(dense, uploaded)
    else:
        if uploaded is not None:
            raise ValueError("uploaded applies to dense input only")
        ptr, it = _check_csr(row_ptr, row_items, n_items)
        rows = as_array("item_delta", item_delta, ndim=2, shape=(it.size, None))
    s = imia_row_scores(
        ptr, it, rows, item_table, w1_user, w1_item, b1, w2, b2,
        seed=seed, n_iter=n_iter, n_restarts=n_restarts, fit_steps=fit_steps, fit_lr=fit_lr,
        temperature=temperature, emb_scale=emb_scale, pos_fraction=pos_fraction, score=score,
        chunk_rows=chunk_rows,
    )
    if fill_value is None:
        fill_value = -2.0 if score == "cosine" else (float(s.min()) - 1.0 if s.size else -1.0)
    return scatter_rows(ptr, it, s, n_items, fill_value)


def dot_imia_row_scores(row_ptr: np.ndarray, item_delta: np.ndarray, *, pos_fraction: float, iterations: int = 30) -> np.ndarray:
    """IMIA against the ``dot`` scorer: every uploaded row moves along the client's user vector.

    With ``logit = v . x + b`` (``v = e_u + w2``), one SGD step moves a row by
    ``-lr (p - y) v``: a positive along ``+v``, a negative along ``-v``. The attacker
    does not know ``e_u`` but every row of a client shares the direction, so the
    client's dominant direction (top right-singular vector of its rows, found by
    power iteration over all clients at once) estimates ``v``; each row is scored by
    its projection on it, and the sign of a client's scores is chosen so that the
    share of positive scores is closest to ``pos_fraction`` (the protocol's
    ``1 / (1 + num_negatives)``, which the server knows).

    Parameters
    ----------
    row_ptr : int64 [n + 1] each client's range of rows.
    item_delta : float [R, d] uploaded row minus broadcast row.

    Returns
    -------
    float64 [R] scores (higher = more likely a positive).
    """
    ptr = np.asarray(row_ptr, dtype=np.int64)
    delta = torch.as_tensor(np.asarray(item_delta), dtype=torch.float64)
    n = ptr.size - 1
    owner = torch.from_numpy(np.repeat(np.arange(n), np.diff(ptr)))
    # start from each client's row of largest norm (never orthogonal to the dominant direction)
    norms = delta.norm(dim=1)
    start = torch.zeros(n, delta.shape[1], dtype=torch.float64)
    best = torch.full((n,), -1.0, dtype=torch.float64).scatter_reduce(0, owner, norms, reduce="amax")
    first = (norms == best[owner]).nonzero().squeeze(1)
    start[owner[first]] = delta[first]
    v = start / start.norm(dim=1, keepdim=True).clamp(min=1e-300)
    for _ in range(iterations):
        proj = (delta * v[owner]).sum(1, keepdim=True)  # [R, 1]
        v = torch.zeros_like(v).index_add_(0, owner, proj * delta)
        v = v / v.norm(dim=1, keepdim=True).clamp(min=1e-300)
    score = (delta * v[owner]).sum(1)  # [R]
    counts = torch.bincount(owner, minlength=n).clamp(min=1).double()
    share = torch.zeros(n, dtype=torch.float64).index_add_(0, owner, (score > 0).double()) / counts
    flip = (1.0 - share - pos_fraction).abs() < (share - pos_fraction).abs()
    sign = torch.where(flip, -1.0, 1.0).double()
    return (score * sign[owner]).numpy()
