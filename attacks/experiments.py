"""Experiment driver that needs several training runs: LiRA user membership.

It trains the federated recommender several times with
:func:`gfmfr_secure.simulation.loop.run_federated` (``participants`` selects who
trains), attack only what an *outsider* sees -- the released global model
(:class:`~gfmfr_secure.models.params.SharedParams`) and the released group
preferences (``server.teacher``) -- and returns a plain dict. It writes nothing.

:func:`user_membership_experiment`
    User-level membership inference with the likelihood-ratio attack of Carlini et
    al. (IEEE S&P 2022): a target run on a random half of the users, ``n_shadows``
    shadow runs on random subsets, one statistic per user and run, then
    :func:`attacks.membership.lira_scores`.

Return values are JSON-serialisable (``math.inf`` is written as ``Infinity`` by
:mod:`json`) except the numpy arrays under the ``"curves"`` key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from attacks.membership import lira_scores, logit_scale
from attacks.metrics import attack_metrics, roc_points
from gfmfr_secure.config import with_overrides
from gfmfr_secure.data import InteractionData, Split
from gfmfr_secure.rng import derive_seed, numpy_rng
from gfmfr_secure.simulation.loop import FederatedRun, run_federated

__all__ = [
    "MEMBERSHIP_STATISTICS",
    "roc_inputs",
    "user_membership_experiment",
    "user_statistic",
]

#: per-user statistics of :func:`user_statistic`
MEMBERSHIP_STATISTICS: tuple[str, ...] = ("teacher", "item_norm")

#: below this many shadows LiRA uses the pooled ("fixed") variances, as Carlini et al. (2022) advise for few shadows
_FIXED_VARIANCE_BELOW = 64
_SEED_MOD = 2**31


# --------------------------------------------------------------------------- helpers


def _run_seed(seed: int, *path: int | str) -> int:
    """A ``cfg.seed`` for one training run, derived from the experiment ``seed``."""
    return derive_seed(seed, *path) % _SEED_MOD


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _released(run: FederatedRun) -> tuple[np.ndarray, np.ndarray | None]:
    """The outsider's view of a run: item table ``[I, d]`` and teacher ``[G, I]`` (or None), float64."""
    table = run.shared.item_table.detach().cpu().numpy().astype(np.float64)
    teacher = run.server.teacher
    return table, None if teacher is None else teacher.detach().cpu().numpy().astype(np.float64)


def _row_means(indptr: np.ndarray, items: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Mean of ``values[..., item]`` over each CSR row.

    Parameters
    ----------
    indptr : int64 [U+1] row pointer.
    items : int64 [N] column (item) of each entry.
    values : [I] or [K, I] per-item values.

    Returns
    -------
    np.ndarray
        [U] or [K, U] row means; 0 for empty rows.
    """
    counts = np.diff(indptr)
    rows = np.repeat(np.arange(counts.size), counts)
    vals = np.atleast_2d(values)
    sums = np.stack([np.bincount(rows, weights=v[items], minlength=counts.size) for v in vals])
    means = np.divide(sums, counts[None, :], out=np.zeros_like(sums), where=counts[None, :] > 0)
    return means if values.ndim == 2 else means[0]


def _privacy_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar part of a run's ``metrics["privacy"]`` block."""
    keys = ("mechanism", "epsilon", "epsilon_if_covered", "delta", "noise_multiplier", "clip", "rounds", "epsilon_withheld_because")
    return {k: report[k] for k in keys if k in report}


def _curve(y_true: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
    fpr, tpr, thr = roc_points(y_true, scores)
    return {"y_true": y_true.astype(np.int64), "scores": scores, "fpr": fpr, "tpr": tpr, "thresholds": thr}


def roc_inputs(result: Mapping[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``label -> (y_true, scores)`` from a driver's ``"curves"``, ready for :func:`attacks.metrics.plot_roc`."""
    curves = result.get("curves")
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("result has no 'curves' entry; pass the dict returned by user_membership_experiment or dp_audit_experiment")
    return {label: (c["y_true"], c["scores"]) for label, c in curves.items()}


# --------------------------------------------------------------------------- membership


def user_statistic(
    split: Split,
    item_table: np.ndarray,
    teacher: np.ndarray | None,
    statistic: str = "teacher",
) -> tuple[np.ndarray, str]:
    """Per-user membership statistic from released outputs and the user's training items.

    The adversary knows each target user's training items (auxiliary knowledge,
    read from ``split``) and sees the released model. Higher means "member".

    ``"teacher"``
        ``max_g ( mean_{i in T_u} logit q[g, i] - mean_i logit q[g, i] )``: how much
        the most favourable group's released preference ``q`` (logit-scaled, as in
        Carlini et al.) lifts the user's items above the average item. Training on a
        user pulls their group's preferences towards their items.
    ``"item_norm"``
        ``mean_{i in T_u} ||C_i|| - mean_i ||C_i||`` over rows of the released item
        table ``C``: item rows that clients train on as positives grow. Used for
        ``"teacher"`` when no teacher was released (distillation off).

    Parameters
    ----------
    split : the leave-one-out split (training items ``T_u`` per user).
    item_table : [I, d] released item table.
    teacher : [G, I] released group preferences in (0, 1), or None.
    statistic : ``"teacher"`` or ``"item_norm"``.

    Returns
    -------
    stats : [U] float64 (0 for users without training items).
    used : the statistic actually computed (``"item_norm"`` when falling back).
    """
    if statistic not in MEMBERSHIP_STATISTICS:
        raise ValueError(f"unknown membership statistic {statistic!r}; known: {', '.join(MEMBERSHIP_STATISTICS)}")
    table = np.asarray(item_table, dtype=np.float64)
    if table.ndim != 2 or table.shape[0] != split.n_items:
        raise ValueError(f"item_table must have shape [{split.n_items}, d], got {list(table.shape)}")
    if statistic == "teacher" and teacher is not None:
        q = np.asarray(teacher, dtype=np.float64)
        if q.ndim != 2 or q.shape[1] != split.n_items:
            raise ValueError(f"teacher must have shape [G, {split.n_items}], got {list(q.shape)}")
        lq = logit_scale(q)
        lift = _row_means(split.train_indptr, split.train_items, lq) - lq.mean(axis=1, keepdims=True)  # [G, U]
        return lift.max(axis=0), "teacher"
    norms = np.linalg.norm(table, axis=1)
    return _row_means(split.train_indptr, split.train_items, norms) - norms.mean(), "item_norm"


def user_membership_experiment(
    cfg: Any,
    data: InteractionData,
    split: Split,
    *,
    n_shadows: int,
    seed: int,
    statistic: str = "teacher",
    fix_variance: bool | None = None,
) -> dict[str, Any]:
    """LiRA user-level membership inference by an outsider, with shadow runs.

    Runs ``1 + n_shadows`` trainings, each with its own ``cfg.seed`` derived from
    ``seed``:

    - target: a uniformly random half (``floor(U' / 2)``) of the ``U'`` users with
      training items participates;
    - shadow ``s``: each such user participates independently with probability 1/2.

    Each run releases its item table and teacher; :func:`user_statistic` turns them
    into one number per user, and :func:`attacks.membership.lira_scores` scores the
    target's statistics against the shadows'. Users without training items are not
    attacked (they never train).

    Parameters
    ----------
    cfg : ExperimentConfig of every run (only ``seed`` is changed per run).
    data : InteractionData (item features for the fusion module).
    split : its leave-one-out split; the adversary knows every user's training items.
    n_shadows : number of shadow runs, >= 2. With few shadows most users have fewer
        than two runs on one side and LiRA uses the pooled variances.
    seed : root of every random choice (memberships and run seeds).
    statistic : ``"teacher"`` or ``"item_norm"`` (:func:`user_statistic`); ``"teacher"``
        falls back to ``"item_norm"`` for all runs when any run released no teacher.
    fix_variance : pooled in / out variances for every user; default (None):
        True below 64 shadows, as Carlini et al. recommend.

    Returns
    -------
    dict with

    - ``lira`` / ``lira_offline`` : :func:`attacks.metrics.attack_metrics` of the
      online and offline LiRA scores (AUC, ``tpr_at_fpr_0.01``, ``tpr_at_fpr_0.001``,
      baselines, counts);
    - ``raw_statistic`` : the same metrics for the uncalibrated statistic of the
      target run (a loss-threshold style baseline);
    - ``statistic``, ``statistic_used``, ``n_shadows``, ``fix_variance``, ``seed``,
      ``run_seeds`` (target first), ``n_users`` (attacked), ``n_members``,
      ``target_privacy`` (scalar part of the target's ``metrics["privacy"]``),
      ``target_test`` (the target's test metrics);
    - ``curves`` : label -> ``{"y_true" [U'], "scores" [U'], "fpr", "tpr", "thresholds"}``
      numpy arrays for ``lira``, ``lira_offline`` and ``raw_statistic``
      (:func:`roc_inputs` feeds them to :func:`attacks.metrics.plot_roc`).

    Raises
    ------
    ValueError
        ``n_shadows < 2``, an unknown statistic, a bad seed, or fewer than two users
        with training items.
    """
    seed = _check_seed(seed)
    if isinstance(n_shadows, bool) or int(n_shadows) != n_shadows or n_shadows < 2:
        raise ValueError(f"n_shadows must be an integer >= 2 (LiRA needs a variance), got {n_shadows!r}")
    n_shadows = int(n_shadows)
    if statistic not in MEMBERSHIP_STATISTICS:
        raise ValueError(f"unknown membership statistic {statistic!r}; known: {', '.join(MEMBERSHIP_STATISTICS)}")
    if split.n_users != data.n_users or split.n_items != data.n_items:
        raise ValueError(f"split is {split.n_users} x {split.n_items} but data is {data.n_users} x {data.n_items}")
    targets = np.flatnonzero(split.train_counts() > 0).astype(np.int64)  # [U']
    if targets.size < 2:
        raise ValueError(f"need at least two users with training items, got {targets.size}")

    target_in = np.zeros(targets.size, dtype=bool)
    target_in[numpy_rng(seed, "membership", "target-members").permutation(targets.size)[: targets.size // 2]] = True
    shadow_in = np.stack([numpy_rng(seed, "membership", "shadow-members", s).random(targets.size) < 0.5 for s in range(n_shadows)])
    for s in range(n_shadows):
        if not shadow_in[s].any():  # a shadow run needs one participant; vanishingly rare beyond tiny U'
            shadow_in[s, numpy_rng(seed, "membership", "shadow-fallback", s).integers(targets.size)] = True

    run_seeds = [_run_seed(seed, "membership", "target")] + [_run_seed(seed, "membership", "shadow", s) for s in range(n_shadows)]
    memberships = [target_in, *shadow_in]
    released: list[tuple[np.ndarray, np.ndarray | None]] = []
    target_metrics: dict[str, Any] = {}
    for run_seed, members in zip(run_seeds, memberships):  # keep only the released outputs: client stores can be large
        run = run_federated(with_overrides(cfg, [f"seed={run_seed}"]), data, split, progress=False, participants=targets[members])
        released.append(_released(run))
        if not target_metrics:
            target_metrics = run.metrics
        del run

    wanted = statistic if all(t is not None for _, t in released) else "item_norm"
    stats = []
    used = wanted
    for table, teacher in released:
        values, used = user_statistic(split, table, teacher, wanted)
        stats.append(values[targets])
    target_stats, shadow_stats = stats[0], np.stack(stats[1:])  # [U'], [S, U']

    fixed = (n_shadows < _FIXED_VARIANCE_BELOW) if fix_variance is None else bool(fix_variance)
    online = lira_scores(target_stats, shadow_stats, shadow_in, online=True, fix_variance=fixed)
    offline = lira_scores(target_stats, shadow_stats, shadow_in, online=False, fix_variance=fixed)
    y = target_in.astype(np.int64)
    scores = {"lira": online, "lira_offline": offline, "raw_statistic": target_stats}
    out: dict[str, Any] = {label: attack_metrics(y, s) for label, s in scores.items()}
    out.update(
        statistic=statistic,
        statistic_used=used,
        n_shadows=n_shadows,
        fix_variance=fixed,
        seed=seed,
        run_seeds=run_seeds,
        n_users=int(targets.size),
        n_members=int(target_in.sum()),
        target_privacy=_privacy_summary(target_metrics["privacy"]),
        target_test={k: float(v) for k, v in target_metrics["test"].items()},
        curves={label: _curve(y, s) for label, s in scores.items()},
    )
    return out
