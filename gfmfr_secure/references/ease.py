"""EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019).

A centralised item-item model with a closed form: for the binary user x item
training matrix ``X`` and an L2 weight ``lambda``,

    P = (X^T X + lambda I)^-1,    B = I - P diag(1 / diag(P)),

that is ``B[i, j] = -P[i, j] / P[j, j]`` off the diagonal and ``B[j, j] = 0``
(the constraint that keeps an item from predicting itself). A user's scores
are ``X[u] @ B``.

It is a reference for accuracy, not a federated method: it needs every user's
history in one place. ``lambda`` is chosen on the validation split only
(:func:`select_ease_lambda` never sees a test item), and the model is fitted on
the training interactions of the leave-one-out split, like every trained method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from gfmfr_secure.data import Split
from gfmfr_secure.errors import ConfigError
from gfmfr_secure.metrics import evaluate_ranking, train_mask

__all__ = [
    "DEFAULT_LAMBDAS",
    "EaseSelection",
    "blank_test",
    "ease_scorer",
    "ease_weights",
    "select_ease_lambda",
    "training_gram",
]

#: Grid of L2 weights searched by default (validation NDCG@10 picks one).
DEFAULT_LAMBDAS: tuple[float, ...] = (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)


def ease_weights(gram: Tensor, lam: float) -> Tensor:
    """EASE item-item weights from the Gram matrix of the training interactions.

    Parameters
    ----------
    gram : Tensor, shape [I, I]
        ``X^T X`` for the binary training matrix ``X`` ([U, I]); symmetric.
    lam : float
        L2 weight ``lambda > 0``.

    Returns
    -------
    Tensor, shape [I, I], float64
        ``B = I - P diag(1 / diag(P))`` with ``P = (gram + lam I)^-1``; the
        diagonal is exactly zero.

    Raises
    ------
    ConfigError
        ``lam`` is not a finite number > 0.
    ValueError
        ``gram`` is not square.
    """
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not np.isfinite(lam) or lam <= 0:
        raise ConfigError(f"EASE lambda must be a finite number > 0, got {lam!r}")
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square [I, I] matrix, got shape {tuple(gram.shape)}")
    n = gram.shape[0]
    reg = gram.to(torch.float64) + float(lam) * torch.eye(n, dtype=torch.float64)
    # gram + lam I is symmetric positive definite: solve against I through its Cholesky
    # factor (torch's cholesky_inverse is several times slower on CPU)
    eye = torch.eye(n, dtype=torch.float64)
    precision = torch.cholesky_solve(eye, torch.linalg.cholesky(reg))  # P, [I, I]
    weights = -precision / torch.diagonal(precision).unsqueeze(0)  # column j divided by P[j, j]
    weights.fill_diagonal_(0.0)
    return weights


def training_gram(split: Split) -> Tensor:
    """``X^T X`` of the binary training matrix, built sparsely.

    Returns
    -------
    Tensor, shape [I, I], float64
        Entry ``(i, j)`` counts the users who trained on both ``i`` and ``j``.
    """
    n_train = int(split.train_indptr[-1])
    x = sp.csr_matrix(
        (np.ones(n_train, dtype=np.float64), split.train_items, split.train_indptr),
        shape=(split.n_users, split.n_items),
    )
    return torch.from_numpy((x.T @ x).toarray())


def ease_scorer(split: Split, weights: Tensor) -> Callable[[Tensor], Tensor]:
    """Score function for :func:`gfmfr_secure.metrics.evaluate_ranking`.

    Parameters
    ----------
    split : Split
        Supplies each user's training items (the rows of ``X``).
    weights : Tensor, shape [I, I]
        From :func:`ease_weights`.

    Returns
    -------
    callable
        ``users: int64 [B] -> scores: float64 [B, I]`` (``X[users] @ B``).
    """
    indptr = torch.from_numpy(split.train_indptr)
    items = torch.from_numpy(split.train_items)
    n_items = int(split.n_items)

    def score(users: Tensor) -> Tensor:
        rows = train_mask(users.to(torch.int64), indptr, items, n_items).to(weights.dtype)  # [B, I]
        return rows @ weights

    return score


def blank_test(split: Split) -> Split:
    """A copy of ``split`` with every test item removed (``-1``): what model selection may see."""
    return dataclasses.replace(split, test_items=np.full(split.n_users, -1, dtype=np.int64))


@dataclass(frozen=True)
class EaseSelection:
    """The validation-selected EASE model.

    Attributes
    ----------
    lam : float
        The chosen L2 weight.
    weights : Tensor, shape [I, I], float64
        ``B`` for ``lam``.
    val : dict[str, float]
        Validation metrics of the chosen model.
    grid : tuple[tuple[float, float], ...]
        ``(lambda, validation NDCG@10)`` for every lambda tried, in grid order.
    """

    lam: float
    weights: Tensor
    val: dict[str, float]
    grid: tuple[tuple[float, float], ...]


def select_ease_lambda(
    split: Split,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    *,
    ks: Sequence[int] = (10, 20, 50),
    chunk_size: int = 1024,
) -> EaseSelection:
    """Fit EASE for every ``lambda`` and keep the best by validation NDCG@10.

    Selection runs on :func:`blank_test` of the split, so no test item can
    influence it. Ties go to the first lambda in grid order.

    Parameters
    ----------
    split : Split
        Training interactions (the model) and validation items (the choice).
    lambdas : sequence of float
        Candidate L2 weights, each > 0, at least one.
    ks : sequence of int
        Cut-offs reported in ``val`` (must include 10).
    chunk_size : int
        Users scored at once.

    Raises
    ------
    ConfigError
        Empty grid, a lambda <= 0, or 10 missing from ``ks``.
    DataError
        No user has a validation item.
    """
    grid_in = tuple(lambdas)
    if not grid_in:
        raise ConfigError("the EASE lambda grid is empty; give at least one value > 0")
    if 10 not in ks:
        raise ConfigError(f"selection uses validation NDCG@10: ks must include 10, got {tuple(ks)}")
    visible = blank_test(split)
    gram = training_gram(visible)
    best: EaseSelection | None = None
    scores: list[tuple[float, float]] = []
    for lam in grid_in:
        weights = ease_weights(gram, lam)
        val = evaluate_ranking(ease_scorer(visible, weights), visible, "val", ks=ks, chunk_size=chunk_size)
        scores.append((float(lam), val["NDCG@10"]))
        if best is None or val["NDCG@10"] > best.val["NDCG@10"]:
            best = EaseSelection(float(lam), weights, val, ())
    assert best is not None  # the grid is non-empty
    return dataclasses.replace(best, grid=tuple(scores))
