"""Attacks that combine several rounds of what an adversary saw.

Differencing released sums (server)
-----------------------------------
Under secure aggregation the server learns, each round ``t``, the sum ``Y_tg`` of the
updates of the clients in each group ``g`` and the group counts; it also knows who
took part (it runs the protocol with them), but under oblivious grouping not who chose
which group. Membership changes between rounds (a client not sampled is absent; a
client may pick another centroid), so linear combinations of released sums across
rounds and groups can cancel every client but one: round ``t`` group ``g`` =
{A, B, C} and round ``t + 1`` group ``g`` = {A, B} give ``Y_tg - Y_t+1,g = x_C`` when
A's and B's updates did not change.

The attack makes that exact. It models each client's update as constant over the
rounds attacked, ``x_ut = s_t x_u`` (``s_t`` a public schedule factor, 1 by default), so
that every released sum it can attribute is a row of a linear system ``Y = A X + noise``
with ``A[k, u] = s_t(k)`` when client ``u`` is counted in sum ``k``. The rows it can
attribute are the per-group sums when it knows the groups (``plain``: the group field
of each upload) and only each round's total (the sum over groups, whose members are
the cohort) when it does not (``masking``, ``ckks``). For a target ``c`` it takes the
combination ``w`` of the rows that keeps ``c``'s coefficient at 1 and minimises what
remains of every other client plus the release noise,

    w_c = argmin  r^2 |A^T w - e_c|^2 + sum_k w_k^2 tau_k^2   s.t.  (A^T w)_c = 1
        = M^+ a_c / (a_c^T M^+ a_c),   M = A A^T + diag(tau^2) / r^2,

(``a_c`` the target's column, ``tau_k`` the noise std of row ``k``, ``r^2`` the energy
per coordinate of one client's update). The estimate is ``x_hat_c = w_c^T Y``. Without
noise ``|A^T w_c - e_c|^2 = 1 / h_c - 1`` where ``h_c = a_c^T (A A^T)^+ a_c`` is the
target's leverage: the target is *isolated* exactly when ``h_c = 1``, i.e. when ``e_c``
is a combination of the rows. With ``K`` attributable rows and ``U`` clients this needs
structure (a group or cohort that differs by one client, or colluders whose updates
are known and subtracted, :func:`isolating_weights`' ``known``), since the rows span at
most ``K`` of ``U`` directions. Clients' updates share a large common part (the
cohort's direction), so the attack also asks the combination's coefficients to total 1
(the row counts are public): that part then cancels from what leaks, and an exact
isolation still meets both constraints.

From the estimated item rows the attacker reads the target's interactions as the
``dot``-scorer reconstruction does (every row of a client moves along its user vector:
:func:`attacks.interaction.dot_imia_row_scores`) and calls an item a positive when its
projection stands out of the noise (more than 3 robust standard deviations, 1.4826
MAD, above 0).

LiRA after many rounds (outsider)
---------------------------------
:func:`lira_rounds_experiment` trains ``n_shadows + 1`` runs per seed (each user a
member of half of them, :func:`attacks.membership.balanced_membership`), attacks each
released model in turn with the other runs as shadows (online LiRA with per-user
Gaussian fits, Carlini et al. 2022), pools the scores of all target models and seeds
and reports AUC and TPR at low FPR with pigeonhole-bootstrap intervals, a TPR only
where enough non-members make it meaningful
(:func:`attacks.membership.membership_figures`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.base import as_array
from attacks.interaction import dot_imia_row_scores
from attacks.membership import balanced_membership, fold_in_statistic, lira_leave_one_out, membership_figures
from attacks.metrics import attack_metrics
from attacks.reconstruction import reconstruction_metrics

__all__ = [
    "LIRA_STATISTICS",
    "Isolation",
    "RoundRelease",
    "client_updates",
    "differencing_attack",
    "differencing_on_views",
    "isolating_weights",
    "lira_rounds_experiment",
    "release_rows",
    "releases_from_views",
    "row_decisions",
]

#: per-user statistics of the released model that :func:`lira_rounds_experiment` can attack with
LIRA_STATISTICS: tuple[str, ...] = ("fold_in", "item_norm", "teacher")

_ISOLATED = 1e-6
_NUMERICAL_ZERO = 1e-9


# --------------------------------------------------------------------------- what the server learned


@dataclass(frozen=True)
class RoundRelease:
    """What the server learned from one round of group-wise aggregation.

    Attributes
    ----------
    round : round index.
    cohort : int64 [n] ids of the clients that took part (the server runs the protocol
        with them, so it knows them under every backend).
    sums : float64 [G, D] released sum of each group's flattened updates
        ``[item-table deltas (I * d) | head deltas (H)]``.
    counts : float64 [G] released group counts.
    groups : int64 [n] the group of each cohort member when the server knows it (``plain``:
        the upload's group field; a single group), else None.
    noise_std : std of the release noise on each coordinate of each group sum (0 without DP).
    """

    round: int
    cohort: np.ndarray
    sums: np.ndarray
    counts: np.ndarray
    groups: np.ndarray | None = None
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        cohort = as_array("cohort", self.cohort, ndim=1, dtype=np.int64)
        sums = as_array("sums", self.sums, ndim=2)
        counts = as_array("counts", self.counts, ndim=1, shape=(sums.shape[0],))
        object.__setattr__(self, "cohort", cohort)
        object.__setattr__(self, "sums", sums)
        object.__setattr__(self, "counts", counts)
        if self.groups is not None:
            groups = as_array("groups", self.groups, ndim=1, dtype=np.int64, shape=(cohort.size,))
            if groups.size and (groups.min() < 0 or groups.max() >= sums.shape[0]):
                raise ValueError(f"groups must lie in [0, {sums.shape[0]}) for {sums.shape[0]} released sums")
            object.__setattr__(self, "groups", groups)
        if not self.noise_std >= 0.0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")


def _release_noise_std(dp: Mapping[str, Any] | None, count_scale: float, n_clients: int, n_blocks: int) -> float:
    """Per-coordinate noise std of one released group sum, from the round's DP facts.

    ``central`` / ``distributed``: ``sigma * C * sqrt(1 + count_scale^2)`` (distributed
    shares sized so that the honest ones carry it; more when fewer report). ``local``:
    each of the ``n`` clients adds ``sigma * S`` to every coordinate of every block, with
    ``S`` the local sensitivity of :class:`gfmfr_secure.privacy.plan.UserLevelDP`.
    """
    if not dp or dp.get("mechanism") in (None, "none", "dpsgd"):
        return 0.0
    sigma, clip = float(dp["noise_multiplier"]), float(dp["clip"])
    delta = clip * float(np.sqrt(1.0 + count_scale**2))
    if dp["mechanism"] == "local":
        s = 2.0 * clip if n_blocks <= 1 else max(2.0 * clip, clip * float(np.sqrt(2.0 * (1.0 + count_scale**2))))
        return sigma * s * float(np.sqrt(n_clients))
    return sigma * delta


def releases_from_views(
    views_dir: str | Path,
    rounds: Sequence[int],
    *,
    groups_known: bool | None = None,
    count_scale: float = 0.5,
) -> list[RoundRelease]:
    """The server's recorded views of ``rounds`` as :class:`RoundRelease` records.

    Parameters
    ----------
    views_dir : a run's ``views/`` folder (``record.views_rounds``).
    rounds : the rounds to read, each recorded.
    groups_known : None: the server knows each member's group when its view carries it
        (per-client uploads with a group field, or one group); False: drop it, leaving
        what a secure backend releases (group sums, counts, the cohort).
    count_scale : ``privacy.count_scale`` of the run (sizes the DP noise).
    """
    from gfmfr_secure.simulation.views import load_view

    out = []
    for t in rounds:
        view = load_view(views_dir, int(t), "server")
        rec, truth = view["received"], view["truth"]
        cohort = np.asarray(truth["clients"], dtype=np.int64)
        if rec.get("group_item_sum") is not None:
            items = rec["group_item_sum"].double()
            heads = rec["group_head_sum"].double() if rec.get("group_head_sum") is not None else torch.zeros(items.shape[0], 0, dtype=torch.float64)
            counts = rec["group_counts"].double().numpy()
        else:
            items = rec["item_sum"].double().unsqueeze(0)
            heads = (rec["head_sum"].double() if rec.get("head_sum") is not None else torch.zeros(0, dtype=torch.float64)).unsqueeze(0)
            counts = np.array([float(cohort.size)])
        sums = torch.cat([items.reshape(items.shape[0], -1), heads], dim=1).numpy()
        groups = None
        per_client = rec.get("per_client")
        if groups_known is not False:
            if sums.shape[0] == 1:
                groups = np.zeros(cohort.size, dtype=np.int64)
            elif per_client is not None and view["meta"].get("grouping") in ("oblivious", "none"):
                field = np.asarray(getattr(per_client, "group", None) if not isinstance(per_client, Mapping) else per_client.get("group"))
                if field.shape == cohort.shape and (field >= 0).all():
                    groups = field.astype(np.int64)
        noise = _release_noise_std(view["meta"].get("dp"), count_scale, cohort.size, sums.shape[0])
        out.append(RoundRelease(round=int(t), cohort=cohort, sums=sums, counts=counts, groups=groups, noise_std=noise))
    return out


def release_rows(
    releases: Sequence[RoundRelease],
    n_users: int,
    *,
    use_groups: bool = True,
    round_scale: Mapping[int, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """The linear system the attacker can attribute: ``Y = A X + noise``.

    Parameters
    ----------
    releases : the rounds, in any order.
    n_users : U (client ids lie in ``[0, U)``).
    use_groups : use per-group rows where a round's groups are known; a round whose
        groups are unknown (or ``use_groups=False``) gives one row, its total.
    round_scale : ``t -> s_t``, the factor of round ``t``'s updates (default 1).

    Returns
    -------
    a : float64 [K, U] coefficient of each client in each row.
    y : float64 [K, D] the rows' released sums.
    tau : float64 [K] noise std of each coordinate of each row.
    labels : K pairs ``(round, group)``, group -1 for a round's total.
    """
    if not releases:
        raise ValueError("need at least one released round")
    dims = {r.sums.shape[1] for r in releases}
    if len(dims) != 1:
        raise ValueError(f"released sums differ in width across rounds: {sorted(dims)}")
    a_rows, y_rows, tau, labels = [], [], [], []
    for r in releases:
        if r.cohort.size and (r.cohort.min() < 0 or r.cohort.max() >= n_users):
            raise ValueError(f"round {r.round}: client ids must lie in [0, {n_users})")
        s = 1.0 if round_scale is None else float(round_scale[r.round])
        if use_groups and r.groups is not None:
            for g in range(r.sums.shape[0]):
                members = r.cohort[r.groups == g]
                if members.size == 0:
                    continue  # a sum of no client: noise (or zeros) only
                row = np.zeros(n_users)
                row[members] = s
                a_rows.append(row)
                y_rows.append(r.sums[g])
                tau.append(r.noise_std)
                labels.append((r.round, g))
        elif r.cohort.size:
            row = np.zeros(n_users)
            row[r.cohort] = s
            a_rows.append(row)
            y_rows.append(r.sums.sum(0))
            tau.append(r.noise_std * float(np.sqrt(r.sums.shape[0])))
            labels.append((r.round, -1))
    if not a_rows:
        raise ValueError("no released round had a client in it")
    return np.stack(a_rows), np.stack(y_rows), np.asarray(tau), labels


@dataclass(frozen=True)
class Isolation:
    """The attacker's best combination of released sums for each target.

    Attributes
    ----------
    targets : int64 [m] client ids.
    weights : float64 [m, K] ``w_c``: the estimate is ``weights @ y``.
    leakage : float64 [m] ``|A^T w_c - e_c|``: how much of the other clients' (modelled)
        updates remains in the estimate, in units of one client's update (0 = isolated).
    leverage : float64 [m] ``a_c^T M^+ a_c`` (the target's leverage when there is no noise).
    noise_std : float64 [m] noise std of each coordinate of the estimate, ``sqrt(sum_k w_k^2 tau_k^2)``.
    """

    targets: np.ndarray
    weights: np.ndarray
    leakage: np.ndarray
    leverage: np.ndarray
    noise_std: np.ndarray

    @property
    def isolated(self) -> np.ndarray:
        """bool [m]: the combination cancels every other client (leakage below 1e-6)."""
        return self.leakage < _ISOLATED


def isolating_weights(
    a: np.ndarray,
    targets: np.ndarray | Sequence[int],
    *,
    tau: np.ndarray | None = None,
    prior_var: float = 1.0,
    known: np.ndarray | Sequence[int] | None = None,
    common: bool = False,
) -> Isolation:
    """For each target, the combination of rows that keeps it and cancels the rest best.

    With ``common``, the combination must also keep the total coefficient at 1
    (``sum_u (A^T w)_u = 1``, the row counts being public): a component shared by every
    client's update (the cohort's common direction) then cancels from what leaks, and
    the leakage counts only the clients' deviations from it. An exact isolation meets
    both constraints, so it is still found.

    Parameters
    ----------
    a : [K, U] row coefficients (:func:`release_rows`).
    targets : int64 [m] client ids, each counted in at least one row.
    tau : [K] noise std per coordinate of each row (default none).
    prior_var : ``r^2``, the energy per coordinate of one client's update; it weighs
        leakage against noise (irrelevant without noise).
    known : client ids whose contributions the attacker knows and has subtracted from
        the sums (colluders): their columns are dropped.
    common : also cancel a component common to all clients (above).

    Returns
    -------
    :class:`Isolation`.

    Raises
    ------
    ValueError
        A target that appears in no row (nothing released depends on it), or bad shapes.
    """
    coef = as_array("a", a, ndim=2)
    tgt = as_array("targets", targets, ndim=1, dtype=np.int64)
    n_rows, n_users = coef.shape
    if tgt.size and (tgt.min() < 0 or tgt.max() >= n_users):
        raise ValueError(f"targets must lie in [0, {n_users})")
    noise = np.zeros(n_rows) if tau is None else as_array("tau", tau, ndim=1, shape=(n_rows,))
    if not prior_var > 0.0:
        raise ValueError(f"prior_var must be > 0, got {prior_var}")
    if known is not None:
        kn = as_array("known", known, ndim=1, dtype=np.int64)
        if np.isin(tgt, kn).any():
            raise ValueError("a target cannot be among the known (colluding) clients")
        coef = coef.copy()
        coef[:, kn] = 0.0
    cols = coef[:, tgt]  # [K, m]
    absent = ~cols.any(axis=0)
    if absent.any():
        raise ValueError(f"targets {tgt[absent][:10].tolist()} are counted in no released row: nothing depends on them")
    gram = coef @ coef.T + np.diag(noise**2 / prior_var)
    pinv = np.linalg.pinv(gram, hermitian=True)
    pa = pinv @ cols  # [K, m]
    lev = np.einsum("km,km->m", cols, pa)
    w = pa / lev  # [K, m]
    if common:  # two constraints, a_c^T w = 1 and n^T w = 1: w = P (l1 a_c + l2 n) with a 2 x 2 solve per target
        pn = pinv @ coef.sum(axis=1)  # [K]
        b = cols.T @ pn  # [m]
        s_nn = float(coef.sum(axis=1) @ pn)
        det = lev * s_nn - b**2
        ok = det > 1e-9 * lev * max(s_nn, 1e-300)  # else the counts add no direction: keep the single constraint
        l1 = np.where(ok, (s_nn - b) / np.where(ok, det, 1.0), 0.0)
        l2 = np.where(ok, (lev - b) / np.where(ok, det, 1.0), 0.0)
        w = np.where(ok[None, :], pa * l1[None, :] + pn[:, None] * l2[None, :], w)
    resid = coef.T @ w  # [U, m]
    resid[tgt, np.arange(tgt.size)] -= 1.0
    leakage = np.linalg.norm(resid, axis=0)
    return Isolation(
        targets=tgt,
        weights=w.T.copy(),
        leakage=leakage,
        leverage=lev,
        noise_std=np.sqrt((w**2 * noise[:, None] ** 2).sum(0)),
    )


# --------------------------------------------------------------------------- reading interactions


def row_decisions(item_estimate: np.ndarray, *, n_sigma: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Interaction scores and decisions from estimated item-table updates.

    Parameters
    ----------
    item_estimate : [m, I, d] each target's estimated item-table update.
    n_sigma : an item is a positive when its score exceeds ``n_sigma`` robust standard
        deviations (1.4826 MAD of the target's scores) and ``1e-9`` of its largest score
        (what rounding leaves of rows an exact cancellation zeroed).

    Returns
    -------
    scores : float64 [m, I] projection of each row on the target's dominant direction,
        oriented so that positives score high (:func:`attacks.interaction.dot_imia_row_scores`,
        the orientation with fewer positive rows, as a client has more negatives than positives).
    positive : bool [m, I].
    """
    est = as_array("item_estimate", item_estimate, ndim=3)
    m, n_items, d = est.shape
    ptr = np.arange(m + 1, dtype=np.int64) * n_items
    scores = dot_imia_row_scores(ptr, est.reshape(m * n_items, d), pos_fraction=0.0).reshape(m, n_items)
    med = np.median(scores, axis=1, keepdims=True)
    spread = 1.4826 * np.median(np.abs(scores - med), axis=1, keepdims=True)
    zero = _NUMERICAL_ZERO * np.abs(scores).max(axis=1, keepdims=True)  # rounding left by an exact cancellation
    return scores, scores > np.maximum(n_sigma * spread, zero)


# --------------------------------------------------------------------------- the attack


def _csr_rows(indptr: np.ndarray, picks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entries of the CSR rows ``picks``: ``owner`` (position in ``picks``) and entry index, int64 [N] each."""
    starts, ends = indptr[picks], indptr[picks + 1]
    lengths = ends - starts
    owner = np.repeat(np.arange(picks.size), lengths)
    offsets = np.cumsum(lengths) - lengths
    return owner, np.arange(int(lengths.sum())) - np.repeat(offsets, lengths) + np.repeat(starts, lengths)


def client_updates(
    views_dir: str | Path,
    rounds: Sequence[int],
    targets: np.ndarray,
    n_items: int,
    latent_dim: int,
    *,
    round_scale: Mapping[int, float] | None = None,
) -> np.ndarray:
    """Ground truth for scoring: each target's mean update ``mean_t x_ut / s_t`` over the rounds it took part in.

    Read from views that carry per-client uploads (``plain`` without noise shares).

    Returns
    -------
    float64 [m, D] flattened ``[item deltas (I * d) | head deltas (H)]``; rows of
    targets that took part in none of the rounds are NaN.
    """
    from gfmfr_secure.simulation.views import load_view

    tgt = np.asarray(targets, dtype=np.int64)
    item_total = np.zeros((tgt.size, n_items, latent_dim))
    head_total: np.ndarray | None = None
    seen = np.zeros(tgt.size)
    for t in rounds:
        view = load_view(views_dir, int(t), "server")
        pc = view["received"].get("per_client")
        if pc is None or view["received"].get("noise_shares") is not None:
            raise ValueError(f"round {t}: the view holds no exact per-client uploads (a secure backend or noised uploads): no ground truth here")
        get = pc.get if isinstance(pc, Mapping) else lambda k, pc=pc: getattr(pc, k)
        clients = np.asarray(get("clients"), dtype=np.int64)
        head = get("head_delta")
        n_head = 0 if head is None else int(head.shape[1])
        if head_total is None:
            head_total = np.zeros((tgt.size, n_head))
        s = 1.0 if round_scale is None else float(round_scale[int(t)])
        if clients.size == 0:
            continue
        order = np.argsort(clients, kind="stable")
        at = np.minimum(np.searchsorted(clients[order], tgt), clients.size - 1)
        here = np.where(clients[order][at] == tgt, order[at], -1)  # cohort position of each target, -1 if absent
        which = np.flatnonzero(here >= 0)
        if which.size == 0:
            continue
        owner, rows = _csr_rows(np.asarray(get("row_ptr"), dtype=np.int64), here[which])
        owner = which[owner]
        items = np.asarray(get("row_items"), dtype=np.int64)[rows]
        delta = get("item_delta")[torch.from_numpy(rows)].double().numpy()
        np.add.at(item_total, (owner, items), delta / s)
        if n_head:
            head_total[which] += head[torch.from_numpy(here[which])].double().numpy() / s
        seen[which] += 1
    if head_total is None:
        raise ValueError("no rounds given")
    total = np.concatenate([item_total.reshape(tgt.size, -1), head_total], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / np.where(seen > 0, seen, np.nan)[:, None]


def differencing_attack(
    releases: Sequence[RoundRelease],
    *,
    n_users: int,
    n_items: int,
    latent_dim: int,
    truth_items: tuple[np.ndarray, np.ndarray],
    targets: np.ndarray | Sequence[int] | None = None,
    use_groups: bool = True,
    round_scale: Mapping[int, float] | None = None,
    known: np.ndarray | Sequence[int] | None = None,
    true_updates: np.ndarray | None = None,
    split: Any = None,
    seed: int = 0,
    chunk: int = 64,
) -> dict[str, Any]:
    """Estimate each target's update and interaction set by differencing released sums.

    Parameters
    ----------
    releases : the rounds the server saw (:func:`releases_from_views`).
    n_users, n_items, latent_dim : U, I, d; each sum is ``[I * d item deltas | H head deltas]``.
    truth_items : ``(indptr [U + 1], items)``: every user's training items (scoring only).
    targets : client ids to attack (default: every client counted in some row).
    use_groups, round_scale : see :func:`release_rows`.
    known : colluding clients whose contributions were subtracted from the sums.
    true_updates : [m, D] each target's true (mean, schedule-divided) update, for the
        error figures (:func:`client_updates`); None skips them.
    split : the leave-one-out split; when given, the interaction AUC uses its
        popularity-matched negatives (:func:`attacks.suite.interaction_targets`), else all items.
    seed : draws the popularity-matched negatives.
    chunk : targets estimated at once (memory: ``chunk * D`` floats).

    Returns
    -------
    dict with

    - ``rows`` (attributable sums), ``rounds``, ``targets``, ``use_groups``;
    - ``isolated_fraction``, ``leakage`` (median, 10th and 90th percentiles), ``noise_std``
      (median per-coordinate noise std of an estimate);
    - ``interaction``: :func:`attacks.reconstruction.reconstruction_metrics` of the
      decisions (``precision``, ``recall``, ``f1``, ``exact_recovery`` ...) with
      ``baseline_f1`` (everyone predicts every item: ``2 pi / (1 + pi)``), and ``auc`` /
      ``tpr_at_fpr_0.01`` of the scores;
    - with ``true_updates``: ``relative_error`` (``|x_hat - x| / |x|``: median, 10th / 90th
      percentiles, share below 0.1) and ``baseline_relative_error`` (the error of guessing the
      mean update ``m = sum_k Y_k / sum_k n_k s_k`` for every client: an estimate worse than
      that has learned nothing about the target);
    - ``per_target``: arrays ``leakage``, ``noise_std``, ``f1``, and ``relative_error`` when scored.
    """
    a, y, tau, labels = release_rows(releases, n_users, use_groups=use_groups, round_scale=round_scale)
    if y.shape[1] < n_items * latent_dim:
        raise ValueError(f"released sums have {y.shape[1]} coordinates, fewer than I * d = {n_items * latent_dim}")
    counted = np.flatnonzero(a.any(axis=0))
    tgt = counted if targets is None else as_array("targets", targets, ndim=1, dtype=np.int64)
    if known is not None:
        tgt = tgt[~np.isin(tgt, np.asarray(known, dtype=np.int64))]
    if tgt.size == 0:
        raise ValueError("no target to attack")
    n_in = a.sum(axis=0)
    energy = np.einsum("kd,kd->k", y, y) - y.shape[1] * tau**2
    prior = float(np.median(np.maximum(energy, 0.0) / np.maximum(a.sum(axis=1) * y.shape[1], 1.0))) if tau.any() else 1.0
    iso = isolating_weights(a, tgt, tau=tau, prior_var=max(prior, 1e-30), known=known, common=True)
    indptr, items = (np.asarray(x, dtype=np.int64) for x in truth_items)
    truth = np.zeros((tgt.size, n_items), dtype=bool)
    owner, rows = _csr_rows(indptr, tgt)
    truth[owner, items[rows]] = True
    mean_update = y.sum(0) / max(float(n_in.sum()), 1.0)

    scores = np.zeros((tgt.size, n_items))
    decided = np.zeros((tgt.size, n_items), dtype=bool)
    rel_err = np.full(tgt.size, np.nan)
    base_err = np.full(tgt.size, np.nan)
    if true_updates is not None:
        true = as_array("true_updates", true_updates, ndim=2, shape=(tgt.size, y.shape[1]), finite=False)
    for lo in range(0, tgt.size, chunk):
        sl = slice(lo, min(lo + chunk, tgt.size))
        est = iso.weights[sl] @ y  # [c, D]
        sc, dec = row_decisions(est[:, : n_items * latent_dim].reshape(-1, n_items, latent_dim))
        scores[sl], decided[sl] = sc, dec
        if true_updates is not None:
            x = true[sl]
            norm = np.linalg.norm(x, axis=1)
            rel_err[sl] = np.linalg.norm(est - x, axis=1) / norm
            base_err[sl] = np.linalg.norm(mean_update[None, :] - x, axis=1) / norm

    ptr = np.arange(tgt.size + 1, dtype=np.int64) * n_items
    recon = reconstruction_metrics(ptr, decided.ravel(), truth.ravel())
    pi = truth.mean()
    if split is not None:
        from attacks.suite import interaction_targets

        pos, its, lab = interaction_targets(split, tgt, seed)
        inter = attack_metrics(lab, scores[pos, its])
    else:
        inter = attack_metrics(truth.ravel().astype(np.int64), scores.ravel())
    tp = np.bincount(np.repeat(np.arange(tgt.size), n_items), weights=(decided & truth).ravel(), minlength=tgt.size)
    per_f1 = 2.0 * tp / np.maximum(decided.sum(1) + truth.sum(1), 1)

    def q(v: np.ndarray) -> dict[str, float]:
        v = v[np.isfinite(v)]
        if v.size == 0:
            return {}
        return {"median": float(np.median(v)), "p10": float(np.quantile(v, 0.1)), "p90": float(np.quantile(v, 0.9))}

    out: dict[str, Any] = {
        "rows": len(labels),
        "rounds": sorted({r for r, _ in labels}),
        "targets": int(tgt.size),
        "use_groups": bool(use_groups),
        "groups_known_rounds": sorted({r for r, g in labels if g >= 0}),
        "isolated": int(iso.isolated.sum()),
        "isolated_fraction": float(iso.isolated.mean()),
        "leakage": q(iso.leakage),
        "noise_std": float(np.median(iso.noise_std)),
        "interaction": {
            **recon,
            "baseline_f1": float(2.0 * pi / (1.0 + pi)),
            "auc": inter["auc"],
            "tpr_at_fpr_0.01": inter["tpr_at_fpr_0.01"],
            "auc_pairs": "popularity-matched negatives" if split is not None else "all items",
        },
        "per_target": {"targets": tgt, "leakage": iso.leakage, "noise_std": iso.noise_std, "f1": per_f1},
    }
    if true_updates is not None:
        out["relative_error"] = {**q(rel_err), "below_0.1": float(np.mean(rel_err[np.isfinite(rel_err)] < 0.1))}
        out["baseline_relative_error"] = q(base_err)
        out["per_target"]["relative_error"] = rel_err
    return out


def differencing_on_views(
    views_dir: str | Path,
    rounds: Sequence[int],
    split: Any,
    *,
    latent_dim: int,
    groups_known: bool | None = None,
    truth_dir: str | Path | None = None,
    round_scale: Mapping[int, float] | None = None,
    count_scale: float = 0.5,
    targets: np.ndarray | None = None,
    max_targets: int = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`differencing_attack` on a run's recorded server views of ``rounds``.

    ``targets`` default: up to ``max_targets`` clients drawn (with ``seed``) from those
    counted in some released row; the ground truth holds ``targets x D`` floats.

    ``truth_dir``: views with per-client uploads of the same rounds (this run's own
    under ``plain``; a ``plain`` run of the same seed for a ``masking`` run, whose
    cohorts and groups must then be the same) to score the estimated updates; without
    one only the interaction figures are computed. ``groups_known=False`` attacks what
    a secure backend would have released from a ``plain`` run.
    """
    releases = releases_from_views(views_dir, rounds, groups_known=groups_known, count_scale=count_scale)
    truth_updates = None
    a, _, _, _ = release_rows(releases, split.n_users, round_scale=round_scale)
    if targets is None:
        counted = np.flatnonzero(a.any(axis=0))
        tgt = np.sort(np.random.default_rng(seed).choice(counted, size=min(max_targets, counted.size), replace=False))
    else:
        tgt = np.asarray(targets, dtype=np.int64)
    if truth_dir is not None:
        from gfmfr_secure.errors import ConfigError
        from gfmfr_secure.simulation.views import load_view, view_path

        missing = [t for t in rounds if not view_path(truth_dir, t, "server").is_file()]
        if missing:
            raise ConfigError(f"no recorded server view of rounds {missing} in {truth_dir}; train the ground-truth run with record.views_rounds covering them")
        for r in releases:
            other = load_view(truth_dir, r.round, "server")["truth"]
            if not np.array_equal(np.asarray(other["clients"]), r.cohort):
                raise ConfigError(
                    f"round {r.round}: the ground-truth run's cohort differs from the attacked run's; give a plain run of the same config and seed"
                )
        truth_updates = client_updates(truth_dir, rounds, tgt, split.n_items, latent_dim, round_scale=round_scale)
    return differencing_attack(
        releases, n_users=split.n_users, n_items=split.n_items, latent_dim=latent_dim,
        truth_items=(split.train_indptr, split.train_items), targets=tgt, round_scale=round_scale,
        true_updates=truth_updates, split=split, seed=seed,
    )


# --------------------------------------------------------------------------- LiRA after many rounds


def _statistics(split: Any, released: Mapping[str, np.ndarray], wanted: Sequence[str], targets: np.ndarray) -> dict[str, np.ndarray]:
    """``name -> [M, U']`` per-user statistics of every run's released outputs."""
    from attacks.experiments import user_statistic

    tables = released["item_table"]
    teachers = released.get("teacher")
    out: dict[str, np.ndarray] = {}
    for name in wanted:
        if name == "fold_in":
            out[name] = np.stack([fold_in_statistic(split.train_indptr, split.train_items, tb)[targets] for tb in tables])
        elif name == "teacher" and teachers is None:
            continue  # no group preferences released (distillation off)
        else:
            out[name] = np.stack([user_statistic(split, tb, None if teachers is None else teachers[m], name)[0][targets] for m, tb in enumerate(tables)])
    return out


def lira_rounds_experiment(
    cfg: Any,
    data: Any,
    split: Any,
    *,
    n_shadows: int = 16,
    seeds: Sequence[int] = (0, 1),
    statistics: Sequence[str] = ("fold_in", "item_norm"),
    n_boot: int = 500,
    out_dir: str | Path | None = None,
    fpr_targets: Sequence[float] = (0.01, 0.001),
) -> dict[str, Any]:
    """The outsider's online LiRA against models released after ``cfg.train.rounds`` rounds.

    For each seed, ``n_shadows + 1`` runs of ``cfg`` (each with its own derived
    ``cfg.seed``), every user with training items a member of half of them
    (:func:`attacks.membership.balanced_membership`). Each run's released item table
    (and teacher) gives one statistic per user; each run is attacked in turn with the
    other ``n_shadows`` as its shadows (:func:`attacks.membership.lira_leave_one_out`,
    per-user in / out Gaussians). Figures per seed and pooled over seeds come from
    :func:`attacks.membership.membership_figures`: AUC, and TPR at each FPR in
    ``fpr_targets`` only with at least ``100 / FPR`` non-members, each with a 95%
    pigeonhole-bootstrap interval. The raw statistic (no per-user calibration) is
    reported beside LiRA as the baseline.

    Parameters
    ----------
    cfg : ExperimentConfig of every run (use ``train.selection=last`` so that the released
        model is the one after the last round).
    data, split : the dataset and its leave-one-out split (the adversary knows each
        target's training items).
    n_shadows : shadows per target model (>= 4: each user then has >= 2 runs on each side).
    seeds : experiment seeds (memberships and run seeds derive from them).
    statistics : names in :data:`LIRA_STATISTICS`; ``teacher`` is skipped when no teacher is released.
    n_boot : bootstrap resamples.
    out_dir : when given, each seed's memberships and released outputs are saved there as
        ``released-seed{s}.npz`` (to recompute other statistics without training).

    Returns
    -------
    dict: ``rounds``, ``n_shadows``, ``seeds``, ``n_users``, ``statistics`` -> ``{"lira":
    {"per_seed": {seed: figures}, "pooled": figures}, "raw": ...}``, ``test`` (mean test
    metrics over all runs), ``privacy`` (the first run's), ``seconds``.
    """
    from attacks.experiments import _privacy_summary, _released
    from gfmfr_secure.config import with_overrides
    from gfmfr_secure.rng import derive_seed, numpy_rng
    from gfmfr_secure.simulation.loop import run_federated

    if isinstance(n_shadows, bool) or int(n_shadows) != n_shadows or n_shadows < 4:
        raise ValueError(f"n_shadows must be an integer >= 4 (per-user fits need two runs on each side), got {n_shadows!r}")
    unknown = [s for s in statistics if s not in LIRA_STATISTICS]
    if unknown or not statistics:
        raise ValueError(f"unknown membership statistics {unknown}; known: {', '.join(LIRA_STATISTICS)}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {list(seeds)}")
    targets = np.flatnonzero(split.train_counts() > 0).astype(np.int64)
    if targets.size < 4:
        raise ValueError(f"need at least four users with training items, got {targets.size}")
    start = time.perf_counter()
    layouts: dict[str, dict[str, list[tuple[np.ndarray, np.ndarray]]]] = {}
    tests: list[dict[str, float]] = []
    privacy: dict[str, Any] = {}
    for seed in seeds:
        keep = balanced_membership(n_shadows + 1, targets.size, numpy_rng(int(seed), "lira-rounds", "membership"))
        tables, teachers = [], []
        for m in range(n_shadows + 1):  # keep only the released outputs: client stores are large
            run_seed = derive_seed(int(seed), "lira-rounds", "run", m) % 2**31
            run = run_federated(with_overrides(cfg, [f"seed={run_seed}"]), data, split, progress=False, participants=targets[keep[m]])
            table, teacher = _released(run)
            tables.append(table)
            teachers.append(teacher)
            tests.append({k: float(v) for k, v in run.metrics["test"].items()})
            if not privacy:
                privacy = _privacy_summary(run.metrics["privacy"])
            del run
        released = {"item_table": np.stack(tables), "keep": keep, "targets": targets}
        if all(t is not None for t in teachers):
            released["teacher"] = np.stack(teachers)
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            np.savez_compressed(Path(out_dir) / f"released-seed{seed}.npz", **released)
        for name, stats in _statistics(split, released, statistics, targets).items():
            entry = layouts.setdefault(name, {"lira": [], "raw": []})
            entry["lira"].append((lira_leave_one_out(stats, keep), keep))
            entry["raw"].append((stats, keep))
    results: dict[str, Any] = {}
    for name, entry in layouts.items():
        results[name] = {
            kind: {
                "per_seed": {int(s): membership_figures([lay], fpr_targets=fpr_targets, n_boot=n_boot, seed=int(s)) for s, lay in zip(seeds, lays)},
                "pooled": membership_figures(lays, fpr_targets=fpr_targets, n_boot=n_boot, seed=0),
            }
            for kind, lays in entry.items()
        }
    test_keys = sorted(set.intersection(*(set(t) for t in tests)))
    return {
        "rounds": int(cfg.train.rounds),
        "n_shadows": int(n_shadows),
        "runs_per_seed": int(n_shadows + 1),
        "seeds": [int(s) for s in seeds],
        "n_users": int(targets.size),
        "statistics": results,
        "test": {k: float(np.mean([t[k] for t in tests])) for k in test_keys},
        "privacy": privacy,
        "seconds": time.perf_counter() - start,
    }


# --------------------------------------------------------------------------- command-line reports


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{float(v):.{digits}f}" if isinstance(v, (int, float, np.floating)) else str(v)


def differencing_lines(results: Mapping[str, Mapping[str, Any]], head: Sequence[str] = ()) -> list[str]:
    """Markdown table of :func:`differencing_attack` results, one row per label."""
    lines = [
        *head,
        "| server knows | rounds | sums used | targets | isolated | leakage (median, p10-p90) | relative error (median, p10-p90) | "
        "error of the mean update | interaction F1 (baseline) | precision / recall | interaction AUC |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        lk, err, base, it = r["leakage"], r.get("relative_error"), r.get("baseline_relative_error"), r["interaction"]
        lines.append(
            f"| {label} | {r['rounds'][0]}-{r['rounds'][-1]} | {r['rows']} | {r['targets']} | {r['isolated']} | "
            f"{_fmt(lk['median'])} ({_fmt(lk['p10'])}-{_fmt(lk['p90'])}) | "
            + (f"{_fmt(err['median'])} ({_fmt(err['p10'])}-{_fmt(err['p90'])}) | {_fmt(base['median'])} | " if err else "- | - | ")
            + f"{_fmt(it['f1'])} ({_fmt(it['baseline_f1'])}) | {_fmt(it['precision'])} / {_fmt(it['recall'])} | {_fmt(it['auc'])} |"
        )
    return lines


def lira_lines(results: Mapping[str, Mapping[str, Any]], head: Sequence[str] = ()) -> list[str]:
    """Markdown table of :func:`lira_rounds_experiment` results, keyed by config label."""

    def cell(entry: Mapping[str, Any]) -> str:
        if not entry.get("estimable", True):
            return entry["reason"]
        return f"{_fmt(entry['value'])} [{_fmt(entry['lo'])}, {_fmt(entry['hi'])}]"

    lines = [
        *head,
        "| config | rounds | statistic | score | seeds | runs (targets) | members / non-members | AUC [95% CI] | TPR@1%FPR [95% CI] | TPR@0.1%FPR [95% CI] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, res in results.items():
        for stat, kinds in res["statistics"].items():
            for kind, figs in kinds.items():
                rows = [(str(s), f) for s, f in figs["per_seed"].items()] + [("pooled " + " ".join(str(s) for s in res["seeds"]), figs["pooled"])]
                for seeds, f in rows:
                    lines.append(
                        f"| {label} | {res['rounds']} | {stat} | {'online LiRA' if kind == 'lira' else 'raw statistic'} | {seeds} | {f['n_models']} | "
                        f"{f['n_pos']} / {f['n_neg']} | {cell(f['auc'])} | {cell(f['tpr_at_fpr_0.01'])} | {cell(f['tpr_at_fpr_0.001'])} |"
                    )
    return lines


def differencing_command(run_dir: Path, rounds: Sequence[int], *, data_dir: str | None, truth_run: str | None, seed: int, max_targets: int) -> int:
    """``gfmfr-secure attack --run RUN_DIR --difference-rounds R ...``: write and print ``attacks/differencing.{json,md}``."""
    import json

    from gfmfr_secure.config import load_config, resolve_data_path
    from gfmfr_secure.errors import ConfigError
    from gfmfr_secure.simulation.runner import prepare_data

    rounds = sorted(set(int(t) for t in rounds))
    if len(rounds) < 2:
        raise ConfigError(f"--difference-rounds needs at least two rounds to difference, got {rounds}")
    if max_targets < 1:
        raise ConfigError(f"--max-targets must be >= 1, got {max_targets}")
    cfg = resolve_data_path(load_config(run_dir / "config.yaml"), data_dir)
    _data, split = prepare_data(cfg)
    scale = {t: float(cfg.train.item_lr_decay) ** t for t in rounds}
    views = run_dir / "views"
    truth_dir = Path(truth_run) / "views" if truth_run else None
    if truth_dir is None and cfg.aggregation.backend == "plain" and cfg.privacy.mechanism not in ("distributed", "local"):
        truth_dir = views
    known = any(r.groups is not None for r in releases_from_views(views, rounds[:1], count_scale=cfg.privacy.count_scale))
    modes = {"its view (groups known)" if known else "its view (cohorts; groups unknown)": None}
    if known:
        modes["sums and cohorts only (what masking releases)"] = False
    common = dict(latent_dim=int(cfg.model.latent_dim), truth_dir=truth_dir, round_scale=scale, count_scale=cfg.privacy.count_scale, seed=seed, max_targets=max_targets)
    results = {label: differencing_on_views(views, rounds, split, groups_known=gk, **common) for label, gk in modes.items()}
    out = run_dir / "attacks"
    out.mkdir(parents=True, exist_ok=True)
    plain = {k: {kk: vv for kk, vv in v.items() if kk != "per_target"} for k, v in results.items()}
    (out / "differencing.json").write_text(json.dumps({"rounds": rounds, "round_scale": scale, "results": plain}, indent=2, default=float), encoding="utf-8")
    head = [
        f"Differencing released sums across rounds {rounds[0]}-{rounds[-1]} of `{run_dir}` ({cfg.aggregation.backend}, grouping {cfg.grouping.method}, "
        f"client_fraction {cfg.train.client_fraction}).",
        "Each target's update is modelled as constant over the rounds up to the lr schedule (item_lr_decay^t); the estimate is the",
        "combination of attributable sums that keeps the target at 1 and leaves least of the others (leakage: what remains of them,",
        "in client updates; 0 = isolated). Relative error against the target's true mean update"
        + (" (from the per-client uploads)." if truth_dir is not None else ": not scored (no per-client ground truth; --truth-run)."),
        "",
    ]
    text = "\n".join(differencing_lines(results, head)) + "\n"
    (out / "differencing.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


def lira_rounds_command(args: Any, load: Any) -> int:
    """``gfmfr-secure membership --leave-one-out``: write and print ``OUT/membership-lira.{json,md}``."""
    import json
    import shlex
    import sys

    from gfmfr_secure.errors import ConfigError

    if args.shadows < 16:
        print(f"warning: --shadows {args.shadows}: fewer than 16 shadows per target make the per-user variances noisy", file=sys.stderr)
    if args.shadows < 4:
        raise ConfigError(f"--leave-one-out needs --shadows >= 4 (each user then has two runs on each side), got {args.shadows}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for path in args.configs:
        cfg, data, split = load(path, args.overrides, args.data)
        label = Path(path).stem
        results[label] = lira_rounds_experiment(
            cfg, data, split, n_shadows=args.shadows, seeds=args.seeds, statistics=args.statistics, n_boot=args.boot, out_dir=out / label,
        )
    (out / "membership-lira.json").write_text(json.dumps(results, indent=2, default=float), encoding="utf-8")
    head = [
        f"Produced by: `gfmfr-secure {shlex.join(sys.argv[1:])}`",
        "",
        "Online LiRA (per-user in / out Gaussians), every run attacked in turn with the other runs of its seed as shadows; scores of",
        "all target runs pooled. A TPR at FPR t is given only with at least 100 / t non-members; 95% intervals: pigeonhole bootstrap",
        "over users and runs. 'raw statistic': the statistic itself as the score (no per-user calibration).",
        "",
    ]
    text = "\n".join(lira_lines(results, head)) + "\n"
    (out / "membership-lira.md").write_text(text, encoding="utf-8")
    print(text)
    return 0
