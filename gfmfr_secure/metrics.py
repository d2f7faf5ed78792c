"""Full-ranking evaluation: pessimistic ranks, HR / NDCG / Recall / MRR at K.

Protocol (see the README's "Evaluation protocol"): every user with a held-out
item is scored against **all** items; the items the user trained on are masked
out (and, for the test split, the validation item too); the held-out item's
rank is the number of remaining items that score at least as high as it, so a
tie always counts against the model. Ranks are 0-based: rank 0 is the top.

With one held-out item per user, Recall@K equals HR@K; both are reported so
that tables line up with papers that use either name.

Everything runs in batched tensor operations. :func:`evaluate_ranking` walks
the users in chunks so that peak memory is ``O(chunk_size x n_items)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from gfmfr_secure.errors import DataError

__all__ = [
    "METRIC_NAMES",
    "SplitLike",
    "evaluate_ranking",
    "metrics_from_ranks",
    "pessimistic_ranks",
    "train_mask",
]

#: Metric names in the order they appear in results and tables.
METRIC_NAMES: tuple[str, ...] = ("HR", "NDCG", "Recall", "MRR")

ScoreFn = Callable[[Tensor], Tensor]


class SplitLike(Protocol):
    """The fields of :class:`gfmfr_secure.data.Split` that evaluation reads.

    Attributes
    ----------
    n_users, n_items : int
    train_indptr : int64 array, shape [U + 1]
        CSR row pointer of the training interactions.
    train_items : int64 array, shape [N]
        CSR column indices (item ids), sorted within each user.
    val_items, test_items : int64 array, shape [U]
        Held-out item per user; ``-1`` means the user has none.
    """

    n_users: int
    n_items: int
    train_indptr: np.ndarray | Tensor
    train_items: np.ndarray | Tensor
    val_items: np.ndarray | Tensor
    test_items: np.ndarray | Tensor


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    out = tuple(ks)
    if not out:
        raise ValueError("ks must name at least one cut-off, got an empty sequence")
    for k in out:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"every cut-off in ks must be an integer >= 1, got {k!r} in {out}")
    if len(set(out)) != len(out):
        raise ValueError(f"cut-offs in ks must be distinct, got {out}")
    return tuple(int(k) for k in out)


def pessimistic_ranks(scores: Tensor, targets: Tensor, exclude: Tensor) -> Tensor:
    """0-based rank of each target item among the items that are not excluded.

    The rank counts the non-excluded items ``j != target`` with
    ``scores[j] >= scores[target]``: an item that ties with the target is
    ranked above it (pessimistic tie-breaking), so a constant scorer gets the
    worst possible rank rather than a lucky one.

    Parameters
    ----------
    scores : Tensor, shape [B, I], floating point
        Score of every item for each of B users.
    targets : Tensor, shape [B], int64
        Held-out item of each user, in ``[0, I)``.
    exclude : Tensor, shape [B, I], bool
        True where an item is masked out of the ranking (e.g. training items).
        The target is never treated as excluded, whatever this holds for it.

    Returns
    -------
    Tensor, shape [B], int64
        Rank of each target; 0 is the top of the list.

    Raises
    ------
    ValueError
        If shapes disagree, a target is out of range, or any score is NaN.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape [B, I], got {tuple(scores.shape)}")
    if not torch.is_floating_point(scores):
        raise ValueError(f"scores must be floating point, got dtype {scores.dtype}")
    n_rows, n_items = scores.shape
    if targets.shape != (n_rows,):
        raise ValueError(f"targets must have shape [{n_rows}], got {tuple(targets.shape)}")
    if exclude.shape != scores.shape:
        raise ValueError(
            f"exclude must have the shape of scores {tuple(scores.shape)}, got {tuple(exclude.shape)}"
        )
    if exclude.dtype != torch.bool:
        raise ValueError(f"exclude must be a bool tensor, got dtype {exclude.dtype}")
    if n_rows == 0:
        return torch.zeros(0, dtype=torch.int64, device=scores.device)
    targets = targets.to(device=scores.device, dtype=torch.int64)
    if int(targets.min()) < 0 or int(targets.max()) >= n_items:
        raise ValueError(
            f"targets must lie in [0, {n_items}), got values in "
            f"[{int(targets.min())}, {int(targets.max())}]"
        )
    _check_no_nan(scores)
    rows = torch.arange(n_rows, device=scores.device)
    target_scores = scores[rows, targets].unsqueeze(1)  # [B, 1]
    above = (scores >= target_scores) & ~exclude.to(scores.device)  # [B, I]
    above[rows, targets] = False
    return above.sum(dim=1)


def _check_no_nan(scores: Tensor) -> None:
    """Raise ValueError naming the rows of ``scores`` [B, I] that hold a NaN.

    A row whose sum is finite holds no NaN (NaN propagates), so only rows with a
    non-finite sum (a NaN, or an infinity) are searched.
    """
    suspect = ~torch.isfinite(scores.sum(dim=1))
    if not bool(suspect.any()):
        return
    nan_rows = torch.zeros_like(suspect)
    nan_rows[suspect] = torch.isnan(scores[suspect]).any(dim=1)
    if bool(nan_rows.any()):
        first = int(nan_rows.nonzero()[0, 0])
        raise ValueError(
            f"scores contain NaN in {int(nan_rows.sum())} of {scores.shape[0]} rows (first: row {first})"
        )


def _sparse_ranks(
    scores: Tensor, targets: Tensor, ex_rows: Tensor, ex_items: Tensor, buffer: Tensor
) -> Tensor:
    """:func:`pessimistic_ranks` with the excluded items given as a sparse list, not a mask.

    The rank is the number of items scoring at least the target, less the target
    itself, less the excluded items (other than the target) that score at least it;
    no ``[B, I]`` mask is built, and the comparison is written into ``buffer``
    (float, at least ``B x I`` entries), reused across chunks.

    Parameters
    ----------
    scores : Tensor, shape [B, I], floating point, without NaN.
    targets : Tensor, shape [B], int64.
    ex_rows, ex_items : Tensor, shape [T], int64
        Row and item of each excluded entry; each (row, item) pair at most once.
    buffer : Tensor, float32, at least ``B * I`` entries.

    Returns
    -------
    Tensor, shape [B], int64.
    """
    n_rows, n_items = scores.shape
    rows = torch.arange(n_rows, device=scores.device)
    target_scores = scores[rows, targets]  # [B]
    ex_above = (scores[ex_rows, ex_items] >= target_scores[ex_rows]) & (ex_items != targets[ex_rows])
    ex_count = torch.bincount(ex_rows[ex_above], minlength=n_rows)
    hits = torch.ge(scores, target_scores.unsqueeze(1), out=buffer[: n_rows * n_items].view(n_rows, n_items))
    # a float32 sum of zeros and ones is exact below 2^24 items
    at_least = hits.sum(dim=1, dtype=torch.float32 if n_items < 2**24 else torch.float64)
    return at_least.to(torch.int64) - 1 - ex_count


def metrics_from_ranks(ranks: Tensor, ks: Sequence[int] = (10, 20, 50)) -> dict[str, float]:
    """Mean HR, NDCG, Recall and MRR at each cut-off, from 0-based ranks.

    For a user whose held-out item has rank ``r``:
    ``HR@k = Recall@k = [r < k]``, ``NDCG@k = [r < k] / log2(r + 2)`` and
    ``MRR@k = [r < k] / (r + 1)``. Each metric is the mean over users.

    Parameters
    ----------
    ranks : Tensor, shape [U], integer
        Rank of each user's held-out item (see :func:`pessimistic_ranks`).
    ks : sequence of int
        Distinct cut-offs, each >= 1.

    Returns
    -------
    dict[str, float]
        Keys ``"HR@k"`` for every k, then ``"NDCG@k"``, ``"Recall@k"`` and
        ``"MRR@k"`` (metric-major order, cut-offs in the order given).

    Raises
    ------
    ValueError
        If ``ranks`` is empty, not 1-D, not integer or negative, or ``ks`` is invalid.
    """
    ks = _check_ks(ks)
    if ranks.ndim != 1:
        raise ValueError(f"ranks must be 1-D [U], got shape {tuple(ranks.shape)}")
    if ranks.numel() == 0:
        raise ValueError("ranks is empty: there is no user to average over")
    if torch.is_floating_point(ranks) or ranks.dtype == torch.bool:
        raise ValueError(f"ranks must be an integer tensor, got dtype {ranks.dtype}")
    if int(ranks.min()) < 0:
        raise ValueError(f"ranks must be >= 0, got minimum {int(ranks.min())}")
    r = ranks.to(torch.float64)
    ndcg_gain = 1.0 / torch.log2(r + 2.0)
    rr_gain = 1.0 / (r + 1.0)
    per_metric: dict[str, dict[int, float]] = {name: {} for name in METRIC_NAMES}
    for k in ks:
        hit = r < k
        hr = float(hit.to(torch.float64).mean())
        per_metric["HR"][k] = hr
        per_metric["NDCG"][k] = float(torch.where(hit, ndcg_gain, 0.0).mean())
        per_metric["Recall"][k] = hr
        per_metric["MRR"][k] = float(torch.where(hit, rr_gain, 0.0).mean())
    return {f"{name}@{k}": per_metric[name][k] for name in METRIC_NAMES for k in ks}


def _as_long(array: np.ndarray | Tensor, name: str) -> Tensor:
    tensor = torch.as_tensor(array)
    if torch.is_floating_point(tensor) or tensor.dtype == torch.bool:
        raise DataError(f"split.{name} must hold integers, got dtype {tensor.dtype}")
    return tensor.to(torch.int64)


def _csr_entries(users: Tensor, indptr: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
    """(row in ``users`` [T], item [T]) of every CSR entry of ``users`` [B], row by row."""
    starts = indptr[users]
    lengths = indptr[users + 1] - starts  # [B]
    total = int(lengths.sum())
    rows = torch.repeat_interleave(torch.arange(users.numel()), lengths)  # [T]
    # Position of each entry inside its user's segment, then its CSR offset.
    seg_offsets = torch.cumsum(lengths, 0) - lengths  # [B]
    within = torch.arange(total) - torch.repeat_interleave(seg_offsets, lengths)
    return rows, items[torch.repeat_interleave(starts, lengths) + within]


def train_mask(
    users: Tensor, indptr: Tensor, items: Tensor, n_items: int, device: torch.device | str = "cpu"
) -> Tensor:
    """Boolean mask of each user's training items, built from the CSR arrays.

    Parameters
    ----------
    users : Tensor, shape [B], int64
        Users (rows of the CSR) to build the mask for.
    indptr : Tensor, shape [U + 1], int64
    items : Tensor, shape [N], int64
    n_items : int
    device : torch device for the result.

    Returns
    -------
    Tensor, shape [B, n_items], bool
        ``mask[b, i]`` is True iff item ``i`` is in the training set of ``users[b]``.
    """
    rows, cols = _csr_entries(users, indptr, items)  # [T], [T]
    mask = torch.zeros(users.numel(), n_items, dtype=torch.bool, device=device)
    mask[rows.to(device), cols.to(device)] = True
    return mask


def evaluate_ranking(
    score_fn: ScoreFn,
    split: SplitLike,
    which: str = "test",
    ks: Sequence[int] = (10, 20, 50),
    chunk_size: int = 1024,
    users: np.ndarray | Tensor | None = None,
) -> dict[str, float]:
    """Full-ranking leave-one-out evaluation of ``score_fn`` on one held-out split.

    Every user with a held-out item for ``which`` is evaluated (or, with ``users``,
    every such user among them); users are scored ``chunk_size`` at a time. For
    each user the training items are masked; for ``which == "test"`` the
    validation item is masked as well (it is known history by test time). The
    held-out item's rank is pessimistic (:func:`pessimistic_ranks`); it is
    computed from the masked items as a list, without a ``[B, I]`` mask, so
    besides the scores a chunk costs one reused ``[B, I]`` float buffer.

    Parameters
    ----------
    score_fn : callable
        ``score_fn(users)`` with ``users: LongTensor [B]`` returns scores of
        shape ``[B, n_items]``. It is called under :func:`torch.no_grad`.
    split : Split-like
        Object with the fields of :class:`SplitLike` (numpy arrays or tensors).
    which : {"val", "test"}
        Which held-out item to rank.
    ks : sequence of int
        Cut-offs.
    chunk_size : int
        Users scored per call of ``score_fn``; bounds memory to ``O(chunk_size x n_items)``.
    users : int64 array or tensor [S], optional
        Evaluate only these users (a sample of a large population); those without
        a ``which`` item are skipped. Default: all users.

    Returns
    -------
    dict[str, float]
        The metrics of :func:`metrics_from_ranks`, plus ``"users"``: the
        number of users evaluated.

    Raises
    ------
    ValueError
        For a bad ``which`` or ``chunk_size``, or if ``score_fn`` returns a
        wrongly shaped result or NaN.
    DataError
        If the split's arrays are inconsistent, or no user (of ``users``) has a
        ``which`` item.
    """
    if which not in ("val", "test"):
        raise ValueError(f"which must be 'val' or 'test', got {which!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    ks = _check_ks(ks)
    n_users, n_items = int(split.n_users), int(split.n_items)
    indptr = _as_long(split.train_indptr, "train_indptr")
    items = _as_long(split.train_items, "train_items")
    val_items = _as_long(split.val_items, "val_items")
    test_items = _as_long(split.test_items, "test_items")
    if indptr.shape != (n_users + 1,):
        raise DataError(
            f"split.train_indptr must have shape [{n_users + 1}], got {tuple(indptr.shape)}"
        )
    if int(indptr[-1]) != items.numel():
        raise DataError(
            f"split.train_indptr ends at {int(indptr[-1])} but train_items has {items.numel()} entries"
        )
    for name, held in (("val_items", val_items), ("test_items", test_items)):
        if held.shape != (n_users,):
            raise DataError(f"split.{name} must have shape [{n_users}], got {tuple(held.shape)}")
        if held.numel() and int(held.max()) >= n_items:
            raise DataError(f"split.{name} holds item {int(held.max())} >= n_items={n_items}")

    targets_all = val_items if which == "val" else test_items
    has_target = targets_all >= 0
    if users is not None:
        chosen = torch.zeros(n_users, dtype=torch.bool)
        chosen[_as_long(users, "users (evaluated)")] = True
        has_target &= chosen
    users_all = torch.nonzero(has_target).flatten()
    if users_all.numel() == 0:
        raise DataError(f"no user{' of the given ones' if users is not None else ''} has a {which} item: nothing to evaluate")

    rank_chunks: list[Tensor] = []
    buffer: Tensor | None = None
    with torch.no_grad():
        for start in range(0, users_all.numel(), chunk_size):
            chunk = users_all[start : start + chunk_size]  # [B]
            scores = score_fn(chunk)  # [B, I]
            if not isinstance(scores, Tensor) or tuple(scores.shape) != (chunk.numel(), n_items):
                got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
                raise ValueError(
                    f"score_fn must return a tensor of shape [{chunk.numel()}, {n_items}], got {got}"
                )
            if not torch.is_floating_point(scores):
                raise ValueError(f"scores must be floating point, got dtype {scores.dtype}")
            _check_no_nan(scores)
            ex_rows, ex_items = _csr_entries(chunk, indptr, items)
            keys = ex_rows * n_items + ex_items
            if which == "test":  # the validation item is known history by test time
                held_val = val_items[chunk]
                has_val = torch.nonzero(held_val >= 0).flatten()
                keys = torch.cat([keys, has_val * n_items + held_val[has_val]])
            keys = torch.unique(keys)  # an item masked twice is still one item
            ex_rows, ex_items = keys // n_items, keys % n_items
            if buffer is None or buffer.numel() < scores.numel() or buffer.device != scores.device:
                buffer = torch.empty(scores.numel(), dtype=torch.float32, device=scores.device)
            device = scores.device
            ranks = _sparse_ranks(scores, targets_all[chunk].to(device), ex_rows.to(device), ex_items.to(device), buffer)
            rank_chunks.append(ranks.cpu())
    ranks_all = torch.cat(rank_chunks)
    result: dict[str, float] = metrics_from_ranks(ranks_all, ks)
    result["users"] = int(ranks_all.numel())
    return result
