"""Experiment drivers that need several training runs: LiRA user membership and a DP audit.

Both drivers train the federated recommender several times with
:func:`gfmfr_secure.simulation.loop.run_federated` (``participants`` selects who
trains), attack only what an *outsider* sees -- the released global model
(:class:`~gfmfr_secure.models.params.SharedParams`) and the released group
preferences (``server.teacher``) -- and return plain dicts. They write nothing.

:func:`user_membership_experiment`
    User-level membership inference with the likelihood-ratio attack of Carlini et
    al. (IEEE S&P 2022): a target run on a random half of the users, ``n_shadows``
    shadow runs on random subsets, one statistic per user and run, then
    :func:`attacks.membership.lira_scores`.
:func:`dp_audit_experiment`
    Empirical DP audit in the style of Jagielski et al. (NeurIPS 2020) and Nasr et
    al. (IEEE S&P 2021): canary users interacting with rare items are each IN or OUT
    of every run at random; a per-canary statistic of the released item table is
    turned into an epsilon lower bound (:func:`attacks.audit.empirical_epsilon`) and
    compared with the accountant's epsilon (:func:`attacks.audit.check_audit`).

Return values are JSON-serialisable (``math.inf`` is written as ``Infinity`` by
:mod:`json`) except the numpy arrays under the ``"curves"`` key.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from attacks.audit import AuditViolation, check_audit, empirical_epsilon
from attacks.membership import lira_scores, logit_scale
from attacks.metrics import attack_metrics, roc_points
from gfmfr_secure.config import with_overrides
from gfmfr_secure.data import InteractionData, Split, leave_one_out
from gfmfr_secure.data.dataset import IdMap
from gfmfr_secure.models import init_shared_params
from gfmfr_secure.rng import derive_seed, numpy_rng, torch_generator
from gfmfr_secure.simulation.loop import FederatedRun, run_federated

__all__ = [
    "AUDIT_STATISTICS",
    "MEMBERSHIP_STATISTICS",
    "add_canaries",
    "canary_statistic",
    "dp_audit_experiment",
    "roc_inputs",
    "user_membership_experiment",
    "user_statistic",
]

#: per-user statistics of :func:`user_statistic`
MEMBERSHIP_STATISTICS: tuple[str, ...] = ("teacher", "item_norm")
#: per-canary statistics of :func:`canary_statistic`
AUDIT_STATISTICS: tuple[str, ...] = ("drift", "norm", "head_projection")

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


# --------------------------------------------------------------------------- canaries and the audit


def add_canaries(
    data: InteractionData,
    n_canaries: int,
    canary_items: int,
    seed: int,
) -> tuple[InteractionData, np.ndarray, np.ndarray]:
    """Append ``n_canaries`` canary users who interact only with rare items.

    Item choice: the pool is the ``P = min(I, n_canaries * canary_items)`` least
    popular items (fewest interactions in ``data``, ties by item index), shuffled
    with ``numpy_rng(seed, "canaries")``. When the pool is large enough
    (``P = n_canaries * canary_items``) it is dealt out into disjoint per-canary
    sets, so one canary's statistic is not moved by another canary; otherwise each
    canary draws its own ``canary_items`` items from the pool (sets may overlap).

    Timestamps: every canary row is later than every real interaction, and a
    canary's rows increase in the (random) order of its set, so
    :func:`gfmfr_secure.data.leave_one_out` holds out the last two items of the set
    (validation and test) and keeps ``canary_items - 2`` in training. Real users'
    splits do not change. Canaries get the data's largest rating (1.0 for implicit
    data) and all-missing user attributes; their ids extend the user id map
    (``max id + 1 + k`` for integer ids, ``"canary-k"`` for string ids).

    Parameters
    ----------
    data : InteractionData with ``U`` users and ``I`` items.
    n_canaries : number of canaries ``K >= 1``.
    canary_items : items per canary ``m``, ``3 <= m <= I`` (at least one training item).
    seed : root seed of the item choice.

    Returns
    -------
    augmented : InteractionData with ``U + K`` users (canaries are users ``U .. U+K-1``),
        ``N + K m`` rows, the same items and item features.
    canary_users : int64 [K] canary user indices.
    items : int64 [K, m] each canary's items in time order (last two are held out).

    Raises
    ------
    ValueError
        Bad counts or seed, or string user ids that already use a canary name.
    """
    seed = _check_seed(seed)
    n_items = data.n_items
    if isinstance(n_canaries, bool) or int(n_canaries) != n_canaries or n_canaries < 1:
        raise ValueError(f"n_canaries must be a positive integer, got {n_canaries!r}")
    if isinstance(canary_items, bool) or int(canary_items) != canary_items or not 3 <= canary_items <= n_items:
        raise ValueError(f"canary_items must be an integer in [3, {n_items}] (leave_one_out holds out two), got {canary_items!r}")
    k, m = int(n_canaries), int(canary_items)
    popularity = np.bincount(data.items, minlength=n_items)
    pool = np.lexsort((np.arange(n_items), popularity))[: min(n_items, k * m)]  # rarest first
    rng = numpy_rng(seed, "canaries")
    if pool.size == k * m:
        sets = rng.permutation(pool).reshape(k, m)
    else:
        sets = np.stack([rng.choice(pool, size=m, replace=False) for _ in range(k)])
    sets = sets.astype(np.int64)

    u0 = data.n_users
    canary_users = np.arange(u0, u0 + k, dtype=np.int64)
    t0 = int(data.timestamps.max()) + 1 if data.n_interactions else 0
    new_users = np.repeat(canary_users, m)
    new_items = sets.reshape(-1)
    new_ts = t0 + np.tile(np.arange(m, dtype=np.int64), k)
    rating = np.float32(data.ratings.max()) if data.n_interactions else np.float32(1.0)

    ids = data.user_map.ids
    if ids.dtype.kind == "i":
        start = int(ids.max()) + 1 if ids.size else 0
        new_ids: np.ndarray = np.concatenate([ids, np.arange(start, start + k, dtype=np.int64)])
    else:
        names = np.array([f"canary-{j}" for j in range(k)])
        clash = np.intersect1d(ids, names)
        if clash.size:
            raise ValueError(f"user ids already contain canary names: {clash[:5].tolist()}")
        new_ids = np.concatenate([ids.astype(str), names])
    attrs = None if data.user_attributes is None else data.user_attributes.reset_index(drop=True).reindex(range(u0 + k))

    augmented = dataclasses.replace(
        data,
        name=f"{data.name}+{k}canaries",
        n_users=u0 + k,
        users=np.concatenate([data.users, new_users]).astype(np.int64),
        items=np.concatenate([data.items, new_items]).astype(np.int64),
        ratings=np.concatenate([data.ratings, np.full(k * m, rating, dtype=np.float32)]),
        timestamps=np.concatenate([data.timestamps, new_ts]).astype(np.int64),
        user_map=IdMap(new_ids),
        user_attributes=attrs,
    )
    return augmented, canary_users, sets


def canary_statistic(
    split: Split,
    canary_users: np.ndarray,
    item_table: np.ndarray,
    initial_table: np.ndarray | None = None,
    direction: np.ndarray | None = None,
) -> np.ndarray:
    """Per-canary distinguishing statistic from the released item table (higher = IN).

    With ``X = C - C0`` (released minus initial item table; ``X = C`` when
    ``initial_table`` is None) and ``T_k`` the canary's training items:

    - ``direction`` None: ``score_k = mean_{i in T_k} ||X_i||``. An IN canary trains
      its items as positives and moves their rows; the rows of an OUT canary's rare
      items move only through DP noise and real users' negatives. This is
      ``"drift"`` with ``C0`` (which depends only on the public run seed) and
      ``"norm"`` without it.
    - ``direction`` given (``"head_projection"``): ``score_k = mean_{i in T_k} <X_i, v>``
      with ``v = direction / ||direction||``; for ``v = W1_item^T w2`` of the released
      head, the first-order direction in which training an item as a positive raises
      its predicted score, so an IN canary's push adds coherently over its items.

    Parameters
    ----------
    split : split of the augmented data (training items of each canary).
    canary_users : int64 [K] canary user indices.
    item_table : [I, d] released item table.
    initial_table : [I, d] initial item table, or None.
    direction : [d] projection direction, or None.

    Returns
    -------
    np.ndarray [K] float64.
    """
    table = np.asarray(item_table, dtype=np.float64)
    if table.ndim != 2 or table.shape[0] != split.n_items:
        raise ValueError(f"item_table must have shape [{split.n_items}, d], got {list(table.shape)}")
    if initial_table is not None:
        init = np.asarray(initial_table, dtype=np.float64)
        if init.shape != table.shape:
            raise ValueError(f"initial_table has shape {list(init.shape)}, expected {list(table.shape)}")
        table = table - init
    if direction is None:
        per_item = np.linalg.norm(table, axis=1)
    else:
        v = np.asarray(direction, dtype=np.float64)
        if v.shape != (table.shape[1],) or not np.isfinite(v).all() or not np.linalg.norm(v) > 0:
            raise ValueError(f"direction must be a finite non-zero vector of length {table.shape[1]}, got shape {list(v.shape)}")
        per_item = table @ (v / np.linalg.norm(v))
    users = np.asarray(canary_users, dtype=np.int64)
    counts = split.train_counts()[users]
    if (counts == 0).any():
        raise ValueError(f"canaries without training items: {users[counts == 0][:5].tolist()}")
    return np.array([per_item[split.train_of(int(u))].mean() for u in users])


def _claimed_epsilon(report: Mapping[str, Any]) -> tuple[float, str]:
    """User-level epsilon a run's accountant claims, and where it came from."""
    mechanism = report.get("mechanism", "none")
    if mechanism == "none":
        return math.inf, "none (no differential privacy)"
    if mechanism == "dpsgd":
        return math.inf, "none (record-level DP-SGD claims nothing for a whole user)"
    if report.get("epsilon") is not None:
        return float(report["epsilon"]), "epsilon"
    if report.get("epsilon_if_covered") is not None:
        return float(report["epsilon_if_covered"]), "epsilon_if_covered (epsilon withheld: " + str(report.get("epsilon_withheld_because", "")) + ")"
    return math.inf, "none (the accountant reported no epsilon)"


def dp_audit_experiment(
    cfg: Any,
    data: InteractionData,
    *,
    n_canaries: int,
    n_runs: int,
    seed: int,
    canary_items: int = 20,
    statistic: str = "drift",
    alpha: float = 0.05,
    raise_on_violation: bool = True,
) -> dict[str, Any]:
    """Empirical user-level DP audit with canary clients.

    1. :func:`add_canaries` appends ``n_canaries`` canary users (rare, per-canary
       item sets) to ``data``; the augmented data is split with
       :func:`gfmfr_secure.data.leave_one_out`.
    2. For each of ``n_runs`` runs (``cfg.seed`` derived from ``seed``) every canary
       is independently IN with probability 1/2; all real users with training items
       and the IN canaries participate.
    3. The outsider scores each canary with :func:`canary_statistic` on the released
       model: ``"drift"`` (default) measures row movement from the initial table,
       which an adversary recomputes from the run's seed (data-independent; Nasr et
       al. likewise assume a known initialisation); ``"norm"`` uses the released rows
       alone; ``"head_projection"`` projects the movement on the released head's
       item direction ``W1_item^T w2``.
    4. IN and OUT scores pooled over runs and canaries go to
       :func:`attacks.audit.empirical_epsilon` at the runs' delta, and the bound is
       checked against the accountant's epsilon with :func:`attacks.audit.check_audit`.

    Claimed epsilon: the largest over runs of ``metrics["privacy"]["epsilon"]``
    (every run is a mechanism at most that private, so the pooled test is bounded
    by it); where the accountant withholds epsilon (a release path it does not
    cover), ``epsilon_if_covered`` is audited instead and ``claimed_source`` says
    so; without DP (or with record-level DP-SGD, which claims nothing for a whole
    user) the claim is ``inf``. The delta is the largest run delta
    (``cfg.privacy.delta`` without DP).

    Power: a canary is an honest client. FedAvg divides its item-row update by the
    number of participants, while every rare row is also moved by the negatives of
    all real users, so with tens of clients a canary's push is a few percent of the
    run-to-run spread of its rows and the bound is often 0 even without DP. The
    bound is valid but weak; it tests the accounting, not the attack's ceiling.

    Caveat: canaries of one run share that run's randomness, so pooled samples are
    not independent and the Clopper-Pearson confidence is approximate (a one-run
    analysis such as Steinke et al., NeurIPS 2023, handles this exactly); the
    threshold is also chosen on the same samples (see :mod:`attacks.audit`).

    Parameters
    ----------
    cfg : ExperimentConfig of every run (only ``seed`` is changed per run).
    data : the real InteractionData (without canaries).
    n_canaries : number of canary users ``K >= 1``.
    n_runs : number of training runs ``R >= 1``; ``R K`` scores in all.
    seed : root of every random choice (canary items, memberships, run seeds).
    canary_items : items per canary (``canary_items - 2`` are trained on).
    statistic : ``"drift"``, ``"norm"`` or ``"head_projection"`` (see above).
    alpha : confidence parameter of :func:`attacks.audit.empirical_epsilon`.
    raise_on_violation : raise :class:`attacks.audit.AuditViolation` when the bound
        exceeds the claim (default); otherwise report ``passed = False``.

    Returns
    -------
    dict with ``eps_lb``, ``threshold`` (None when ``eps_lb`` is 0), ``direction``,
    ``fp``, ``fn``, ``fpr_hi``, ``fnr_hi``, ``n_in``, ``n_out``, ``delta``, ``alpha``,
    ``two_sided`` (from :class:`attacks.audit.AuditResult`), ``eps_claimed``,
    ``claimed_source``, ``passed``, ``statistic``, ``n_canaries``, ``n_runs``,
    ``canary_items``, ``canary_train_items``, ``seed``, ``run_seeds``, ``privacy``
    (scalar part of the first run's ``metrics["privacy"]``) and ``curves``:
    ``{"audit": {"y_true" [R K], "scores" [R K], "fpr", "tpr", "thresholds"}}``.

    Raises
    ------
    AuditViolation
        ``raise_on_violation`` and ``eps_lb > eps_claimed``.
    ValueError
        Bad counts, seed or statistic; all canaries IN (or all OUT) in every run.
    """
    seed = _check_seed(seed)
    if isinstance(n_runs, bool) or int(n_runs) != n_runs or n_runs < 1:
        raise ValueError(f"n_runs must be a positive integer, got {n_runs!r}")
    if statistic not in AUDIT_STATISTICS:
        raise ValueError(f"unknown audit statistic {statistic!r}; known: {', '.join(AUDIT_STATISTICS)}")
    n_runs = int(n_runs)
    augmented, canaries, _ = add_canaries(data, n_canaries, canary_items, seed)
    split = leave_one_out(augmented)
    real = np.flatnonzero(split.train_counts()[: data.n_users] > 0).astype(np.int64)
    inside = np.stack([numpy_rng(seed, "audit", "canaries-in", r).random(canaries.size) < 0.5 for r in range(n_runs)])  # [R, K]
    if inside.all() or not inside.any():
        raise ValueError(f"every canary was {'IN' if inside.all() else 'OUT'} in every run; use more canaries or runs")

    run_seeds = [_run_seed(seed, "audit", "run", r) for r in range(n_runs)]
    scores = np.zeros(inside.shape)
    claims: list[tuple[float, str]] = []
    deltas: list[float] = []
    first_privacy: dict[str, Any] = {}
    for r, run_seed in enumerate(run_seeds):
        run_cfg = with_overrides(cfg, [f"seed={run_seed}"])
        run = run_federated(run_cfg, augmented, split, progress=False, participants=np.concatenate([real, canaries[inside[r]]]))
        table, _ = _released(run)
        init = direction = None
        if statistic != "norm":  # the initial table depends only on the run's seed
            init = init_shared_params(split.n_items, table.shape[1], torch_generator(run_seed, "init", "shared")).item_table.numpy()
        if statistic == "head_projection":
            direction = (run.shared.w1_item.T @ run.shared.w2).detach().cpu().numpy().astype(np.float64)
        scores[r] = canary_statistic(split, canaries, table, init, direction)
        report = run.metrics["privacy"]
        del run  # client stores can be large
        claims.append(_claimed_epsilon(report))
        deltas.append(float(report["delta"]) if report.get("delta") is not None else float(cfg.privacy.delta))
        if r == 0:
            first_privacy = _privacy_summary(report)

    eps_claimed, source = max(claims, key=lambda c: c[0])
    delta = max(deltas)
    result = empirical_epsilon(scores[inside], scores[~inside], delta, alpha=alpha)
    passed = True
    try:
        check_audit(result, eps_claimed)
    except AuditViolation:
        if raise_on_violation:
            raise
        passed = False
    y = inside.reshape(-1).astype(np.int64)
    out: dict[str, Any] = result.to_dict()
    out.update(
        threshold=None if math.isnan(result.threshold) else result.threshold,
        eps_claimed=eps_claimed,
        claimed_source=source,
        passed=passed,
        statistic=statistic,
        n_canaries=int(canaries.size),
        n_runs=n_runs,
        canary_items=int(canary_items),
        canary_train_items=int(split.train_counts()[canaries].min()),
        seed=seed,
        run_seeds=run_seeds,
        privacy=first_privacy,
        curves={"audit": _curve(y, scores.reshape(-1))},
    )
    return out
